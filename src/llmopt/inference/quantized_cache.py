"""Quantized key/value cache in the KIVI layout (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache").

Keys are quantized per channel (each channel of each head gets its own scale and zero point over a group of
`group_size` consecutive tokens: key outliers live in fixed channels), values per token (a scale and zero
point per group of `group_size` channels of one token). Codes are 8, 4 or 2 bits, packed into bytes; scales
and zero points are fp16. The most recent tokens stay in full precision (the cache dtype): a key group can
only be quantized once its `group_size` tokens exist, so a window of between `residual_length` and
`residual_length + group_size - 1` tokens is kept as is, and the oldest `group_size` of them are quantized
together when it fills.

Quantize on write, dequantize inside attention: the cache exposes `attend(layer, q, mask)`, which walks the
quantized tokens in chunks of `chunk_size`, dequantizes one chunk of one layer at a time and combines the
chunks with an online softmax (running max and sum, as in FlashAttention), then the full-precision window.
A full-precision copy of the whole cache never exists. The model calls `attend` instead of its own attention
when the cache has one (`Attention.forward` in `llmopt.models.llama`).

Rotation (`rotate="values"|"both"`, QuaRot's idea, Ashkboos et al. 2024): values (and optionally keys) are
multiplied by an orthonormal Hadamard matrix H (head_dim x head_dim, H = H^T = H^-1) before they are quantized,
which spreads a few large channels over all of them, so a per-token group's range shrinks. Attention is
unchanged up to rounding: q k^T = (q H)(k H)^T and p V = (p (V H)) H, so `attend` rotates the query for the
rotated keys and the accumulated output of the rotated values once per call (two (T, D) x (D, D) products);
the full-precision window stays unrotated.

Attention sinks (`sink_tokens=S`, S <= group_size; KVQuant / IntactKV): a full-precision copy of the first S
positions is kept, and once their group is quantized attention reads them from the copy and never their codes;
the first key group's range leaves them out. Bytes: S more tokens at the cache dtype.

Decode view (`decode_view=True`, the default): a forward that writes T > 1 tokens (a chunked prefill, a
speculative verify step) lets the query at position p see the cache as token-by-token decoding would have at
p: positions stored once p was written (`stored_after`) from their codes, later ones in full precision (from
this write, held for the duration of the layer's attention only). So logits do not depend on how the tokens
were chunked (tested against token-by-token on the tiny model), and a chunked perplexity is the decoding one.
With `decode_view=False` every query sees the cache as it is after the write.

Clipping (`key_clip`, `value_clip`): "minmax" maps a group's [min, max] onto the codes; "mse" searches shrunk
ranges refined by Lloyd steps for the least squared error (never above min-max's); "unbiased" keeps those codes
with the scale and zero that make the group's error zero-mean and uncorrelated with the values (no shrinking
toward the mean, which attention does not average out). Pre-RoPE keys (`rope=(cos, sin)`, KVQuant): a key group
is rotated back to its pre-RoPE values before it is quantized, and gets RoPE again when read. The int2 defaults of
`make_quantized_cache` use both and 4 sinks (measured in docs/techniques/kv_cache_quant.md). One-byte scales:
`scale_format="fp8"`. The one-call C decode step of `generate` (`kernels.kv_attention.QuantizedDecodeAttention`)
reads pre-RoPE keys (RoPE applied per stored key, as `dequantize` does); `attend`'s own C kernel reads neither
pre-RoPE keys nor fp8 scales (the torch path then), nor does the one-call step read fp8 scales.

Numerics contract: lossy, bounded. Asymmetric min-max rounding: every dequantized key or value is within
half a step, (max - min) / (2^bits - 1) / 2, of the original over its group (plus fp16 rounding of the
scale and zero point); the full-precision window is exact. The clip modes trade that bound for less squared
error ("mse": per group at most min-max's) or a zero-mean, uncorrelated error ("unbiased"). The effect on the
model is measured (perplexity with the cache in the loop, `benchmarks/bench_inference.py`,
`benchmarks/bench_kv_int2.py`), not assumed.
"""

from __future__ import annotations

import math

import torch

from llmopt.inference.cache import KVCache
from llmopt.kernels import kv_attention
from llmopt.models.llama import rotate_half

SCALE_DTYPE = torch.float16


def hadamard(n: int, device=None) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order n (a power of two): symmetric, H @ H = I."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}; use rotate='none'")
    h = torch.ones(1, 1)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device)


# ---- quantization primitives --------------------------------------------------------------------
CLIPS = ("minmax", "mse", "unbiased")
CLIP_RATIOS = {3: (0.9, 0.8, 0.7, 0.6, 0.5), 15: (0.95, 0.9, 0.85, 0.8), 255: (0.98, 0.95, 0.9)}
"""Range shrink factors (about the group's midpoint) that `clip="mse"` starts from, besides min-max, by the number
of steps (2^bits - 1): 0.6 is near the MSE-optimal 2-bit step for Gaussian groups of 64 (about 1 sigma)."""


SCALE_DTYPES = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}
"""Storage of the scales (`scale_format`): fp16, or fp8 e4m3 (one byte; 3 mantissa bits, so within 1/16 of
the wanted step; the zero points stay fp16)."""
_FP8_MIN, _FP8_MAX = 2.0 ** -6, 448.0  # e4m3's smallest normal and largest finite value


def _round_scale(scale: torch.Tensor, dtype: torch.dtype, up: bool = False) -> torch.Tensor:
    """`scale` rounded to what `dtype` stores, as fp32; `up`: not below `scale` (min-max keeps its range)."""
    if dtype == torch.float16:
        return scale.clamp_min(1e-8).to(dtype).float()
    scale = scale.clamp(_FP8_MIN, _FP8_MAX)
    return (scale * (16 / 15) if up else scale).clamp_max(_FP8_MAX).to(dtype).float()


def _fit(x, lo, hi, levels, dim, scale_dtype, up=False):
    """Codes, scale (rounded to `scale_dtype`, as fp32) and fp16 zero for the range [lo, hi], and the squared
    error of what they store."""
    scale = _round_scale((hi - lo) / levels, scale_dtype, up)
    zero = lo.to(SCALE_DTYPE).float()
    codes = ((x - zero) / scale).round_().clamp_(0, levels)
    err = (codes * scale + zero - x).square_().sum(dim, keepdim=True)
    return codes, scale, zero, err


def quantize_groups(x: torch.Tensor, bits: int, dim: int, clip: str = "minmax",
                    scale_dtype: torch.dtype = SCALE_DTYPE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization reducing over `dim`: (codes uint8, scale `scale_dtype`, zero fp16).

    x ~ codes * scale + zero, with codes in [0, 2^bits - 1]; scale and zero keep `dim` with size 1.
    `clip="minmax"`: the group's range is [min, max]. `clip="mse"`: per group, the range is shrunk about its
    midpoint by each of `CLIP_RATIOS` (all at once), each refined by two Lloyd steps (the nearest codes, then the
    least-squares scale and zero for them); the candidate whose stored values (rounded scale and zero) have the least
    squared error is kept, min-max among them, so the error is never above min-max's. `clip="unbiased"`: the
    codes of "mse", with the scale and zero that make the error zero-mean and uncorrelated with x over the group
    (a little more squared error than "mse", but no shrinking of x: what attention averages over many values).
    `scale_dtype=torch.float8_e4m3fn`: scales in one byte (rounded up for min-max, so its range is kept).
    """
    if clip not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(map(repr, CLIPS))}, got {clip!r}")
    if scale_dtype not in SCALE_DTYPES.values():
        raise ValueError(f"scale_dtype must be float16 or float8_e4m3fn, got {scale_dtype}")
    levels = 2 ** bits - 1
    if clip != "minmax":  # the search works along the last dimension (contiguous: cheap broadcasts)
        codes, scale, zero = _search(x.movedim(dim, -1).contiguous(), levels, clip, scale_dtype)
        return tuple(t.movedim(-1, dim).contiguous() for t in (codes, scale, zero))
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    codes, scale, zero, _ = _fit(x, lo, hi, levels, dim, scale_dtype, up=True)
    return codes.to(torch.uint8), scale.to(scale_dtype), zero.to(SCALE_DTYPE)


def _search(x: torch.Tensor, levels: int, clip: str, scale_dtype: torch.dtype):
    """`quantize_groups` with clip "mse" or "unbiased" over the last dimension of x."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    codes, scale, zero, err = _fit(x, lo, hi, levels, -1, scale_dtype, up=True)
    # every shrunk range at once: candidates along a new leading dimension
    ratios = torch.tensor(CLIP_RATIOS[levels], device=x.device).view(-1, *[1] * x.dim())
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    s = _round_scale(ratios * 2 * half / levels, scale_dtype)
    z = (mid - ratios * half).to(SCALE_DTYPE).float()
    xm = x.mean(-1, keepdim=True)
    xc = x - xm
    for _ in range(2):  # Lloyd: the nearest codes, then the least-squares scale and zero for them
        c = ((x - z) / s).round_().clamp_(0, levels)
        cm = c.mean(-1, keepdim=True)
        c -= cm
        var = c.square().sum(-1, keepdim=True)
        slope = (c * xc).sum(-1, keepdim=True) / var.clamp_min(1e-12)
        s = _round_scale(torch.where(var > 0, slope, s), scale_dtype)
        z = (xm - s * cm).to(SCALE_DTYPE).float()
    e = (((x - z) / s).round_().clamp_(0, levels).mul_(s).add_(z) - x).square_().sum(-1, keepdim=True)
    best = e.argmin(0, keepdim=True)
    e, s, z = e.gather(0, best)[0], s.gather(0, best)[0], z.gather(0, best)[0]
    better = e < err
    scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    codes = ((x - zero) / scale).round_().clamp_(0, levels)
    if clip == "unbiased":  # keep the codes; scale so that the error has zero mean and is uncorrelated with x
        cc = codes - codes.mean(-1, keepdim=True)
        cov = (xc * cc).sum(-1, keepdim=True)
        slope = xc.square().sum(-1, keepdim=True) / cov.clamp_min(1e-12)
        slope = torch.where(cov > 0, slope, scale)
        scale = _round_scale(slope, scale_dtype)
        zero = (xm - scale * codes.mean(-1, keepdim=True)).to(SCALE_DTYPE).float()
    return codes.to(torch.uint8), scale.to(scale_dtype), zero.to(SCALE_DTYPE)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) uint8 codes of `bits` bits -> (..., n * bits / 8) bytes, the low bits first."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    grouped = codes.view(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: (..., m) bytes -> (..., m * 8 / bits) uint8 codes."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & (2 ** bits - 1)).flatten(-2)


# ---- the cache ----------------------------------------------------------------------------------
class QuantizedKVCache(KVCache):
    """`KVCache` whose old tokens are stored in `bits` bits (8, 4 or 2), KIVI layout; same interface plus `attend`."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, *, bits: int = 4,
                 group_size: int = 64, residual_length: int = 0, chunk_size: int = 1024,
                 static: bool = False, rotate: str = "auto", kernel: str = "auto",
                 value_group: int | None = None, sink_tokens: int = 0, decode_view: bool = True,
                 key_clip: str | None = None, value_clip: str | None = None,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None, scale_format: str = "fp16") -> None:
        if bits not in (8, 4, 2):
            raise ValueError(f"QuantizedKVCache bits must be 8, 4 or 2, got {bits}")
        if static:
            raise ValueError("QuantizedKVCache is dynamic only (static=False); compile needs the dense KVCache")
        self.value_group = min(group_size, head_dim) if value_group is None else value_group
        if value_group is not None and (value_group <= 0 or head_dim % value_group):
            raise ValueError(f"value_group={value_group} must be positive and divide head_dim={head_dim}")
        if group_size <= 0 or head_dim % self.value_group or head_dim * bits % 8:
            raise ValueError(f"group_size={group_size} must be positive and divide head_dim={head_dim} "
                             "(or exceed it: values are then grouped per head)")
        if residual_length < 0 or chunk_size < group_size:
            raise ValueError(f"need residual_length >= 0 and chunk_size >= group_size, got {residual_length}, "
                             f"{chunk_size}")
        if not 0 <= sink_tokens <= group_size:
            raise ValueError(f"sink_tokens must be in [0, group_size={group_size}], got {sink_tokens}")
        if rotate not in ("auto", "none", "values", "both"):
            raise ValueError(f"rotate must be 'auto', 'none', 'values' or 'both', got {rotate!r}")
        if rotate == "auto":  # measured on SmolLM2 int4: ppl +3.3% unrotated, +1.1% with both rotated
            rotate = "both" if head_dim & (head_dim - 1) == 0 else "none"
        self.rotate = rotate
        if kernel not in ("auto", "torch", "c"):
            raise ValueError(f"kernel must be 'auto', 'torch' or 'c', got {kernel!r}")
        self.kernel = kernel
        default_clip = "unbiased" if bits == 2 else "minmax"  # measured on SmolLM2: see the method card
        key_clip = default_clip if key_clip is None else key_clip
        value_clip = default_clip if value_clip is None else value_clip
        for name, clip in (("key_clip", key_clip), ("value_clip", value_clip)):
            if clip not in CLIPS:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, CLIPS))}, got {clip!r}")
        self.key_clip, self.value_clip = key_clip, value_clip
        if scale_format not in SCALE_DTYPES:
            raise ValueError(f"scale_format must be one of {', '.join(map(repr, SCALE_DTYPES))}, "
                             f"got {scale_format!r}")
        self.scale_format, self.scale_dtype = scale_format, SCALE_DTYPES[scale_format]
        if rope is not None:
            cos, sin = rope
            if cos.shape != sin.shape or cos.dim() != 2 or cos.size(0) < max_len or cos.size(1) != head_dim:
                raise ValueError(f"rope must be the model's (cos, sin) tables of shape (>= max_len={max_len}, "
                                 f"head_dim={head_dim}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
            rope = (cos[:max_len].float(), sin[:max_len].float())
        self.rope = rope
        """(cos, sin) of the model's rotary embedding, or None. When set, keys are quantized before RoPE
        (KVQuant): a flushed group is rotated back to its pre-RoPE keys, and a stored chunk gets RoPE again
        as it is read."""
        self.H = hadamard(head_dim, device) if rotate != "none" else None
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.sink_tokens, self.decode_view = sink_tokens, decode_view
        self._fresh = None  # (layer, first position, k, v, q0 before the write): the last write, full precision
        self.chunk_size = chunk_size // group_size * group_size
        super().__init__(n_layer, batch_size, n_kv_head, max_len, head_dim, dtype, device, static=False)

    def _allocate(self) -> None:
        B, H, D, G, S = self.batch_size, self.n_kv_head, self.head_dim, self.group_size, self.sink_tokens
        cap = self.max_len // G * G  # positions that can ever be quantized
        packed = D * self.bits // 8
        dev = self.device

        def zeros(*shape, dtype):
            return [torch.zeros(shape, dtype=dtype, device=dev) for _ in range(self.n_layer)]

        self.k_codes = zeros(B, H, cap, packed, dtype=torch.uint8)
        self.k_scale = zeros(B, H, cap // G, 1, D, dtype=self.scale_dtype)
        self.k_zero = zeros(B, H, cap // G, 1, D, dtype=SCALE_DTYPE)
        self.v_codes = zeros(B, H, cap, packed, dtype=torch.uint8)
        self.v_scale = zeros(B, H, cap, D // self.value_group, 1, dtype=self.scale_dtype)
        self.v_zero = zeros(B, H, cap, D // self.value_group, 1, dtype=SCALE_DTYPE)
        window = S + min(self.residual_length + G, self.max_len)  # slots [0, S): the sinks; then the window
        self.k_window = zeros(B, H, window, D, dtype=self.dtype)
        self.v_window = zeros(B, H, window, D, dtype=self.dtype)
        self.quantized = [0] * self.n_layer
        """Per layer, positions [0, quantized) are in codes, [quantized, seq_len) in the window (slots S..).
        Slots [0, S) hold a full-precision copy of positions [0, S), the sinks: once quantized, attention reads
        them from there and ignores their codes."""
        self._write_start = 0

    # ---- writing -------------------------------------------------------------------------------
    def attn_mask(self, input_pos: torch.Tensor):
        previous = self.seq_len
        mask = super().attn_mask(input_pos)
        self._write_start = self.seq_len - input_pos.numel()  # positions are contiguous (prefill, decode, verify)
        if self._write_start < max(self.quantized):
            self.seq_len = previous
            raise ValueError(f"position {self._write_start} is already quantized (cache holds "
                             f"{max(self.quantized)} stored positions); truncate the cache before rewriting it")
        return mask

    def stored_after(self, q0: int, end: int) -> int:
        """Stored positions once positions < `end` are written, starting from `q0` stored: the same for one
        write of many tokens and for token-by-token writes (a group is quantized as soon as it leaves the window)."""
        G = self.group_size
        n = max(0, (end - q0 - self.residual_length) // G)
        return q0 + min(n, (self.k_codes[0].size(2) - q0) // G) * G

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv_head, T, head_dim); quantize whole groups that left the window. Returns None:
        attention reads the cache through `attend`."""
        if k.size(0) != self.batch_size:
            raise ValueError(f"batch of {k.size(0)} rows does not match the cache's batch_size={self.batch_size}; "
                             "build the cache with make_quantized_cache(model, batch_size)")
        G, S, q0, ws = self.group_size, self.sink_tokens, self.quantized[layer], self._write_start
        k, v = k.to(self.dtype), v.to(self.dtype)
        if ws < S:  # a full-precision copy of the sinks
            n = min(S - ws, k.size(2))
            self.k_window[layer][:, :, ws:ws + n] = k[:, :, :n]
            self.v_window[layer][:, :, ws:ws + n] = v[:, :, :n]
        kept = ws - q0  # window tokens before the new ones
        k_all = torch.cat([self.k_window[layer][:, :, S:S + kept], k], dim=2)  # the window + new only
        v_all = torch.cat([self.v_window[layer][:, :, S:S + kept], v], dim=2)
        self._fresh = (layer, self.seq_len - k_all.size(2), k_all, v_all, q0)
        n_groups = max(0, (k_all.size(2) - self.residual_length) // G)
        n_groups = min(n_groups, (self.k_codes[layer].size(2) - q0) // G)
        if n_groups:
            n, i0 = n_groups * G, q0
            B, H, _, D = k_all.shape
            kn, vn = k_all[:, :, :n].float(), v_all[:, :, :n].float()
            if self.rope is not None:  # back to the pre-RoPE keys: rotation by minus the position's angles
                cos, sin = self.rope[0][i0:i0 + n], self.rope[1][i0:i0 + n]
                kn = kn * cos - rotate_half(kn) * sin
            if q0 == 0 and S:  # the sinks' codes are never read: keep them out of the first key group's range
                kn[:, :, :S] = kn[:, :, S:S + 1]
            if self.rotate == "both":
                kn = kn @ self.H
            if self.rotate != "none":
                vn = vn @ self.H
            kq, ks, kz = quantize_groups(kn.view(B, H, n_groups, G, D), self.bits, dim=3, clip=self.key_clip,
                                         scale_dtype=self.scale_dtype)
            self.k_codes[layer][:, :, i0:i0 + n] = pack(kq.view(B, H, n, D), self.bits)
            self.k_scale[layer][:, :, i0 // G:i0 // G + n_groups] = ks
            self.k_zero[layer][:, :, i0 // G:i0 // G + n_groups] = kz
            vq, vs, vz = quantize_groups(vn.view(B, H, n, D // self.value_group, self.value_group), self.bits, dim=4,
                                         clip=self.value_clip, scale_dtype=self.scale_dtype)
            self.v_codes[layer][:, :, i0:i0 + n] = pack(vq.view(B, H, n, D), self.bits)
            self.v_scale[layer][:, :, i0:i0 + n] = vs
            self.v_zero[layer][:, :, i0:i0 + n] = vz
            q0 += n
            k_all, v_all = k_all[:, :, n:], v_all[:, :, n:]
        self.quantized[layer] = q0
        if k_all.size(2) > self.k_window[layer].size(2) - S:
            raise RuntimeError(f"window overflow ({k_all.size(2)} tokens); internal error")
        self.k_window[layer][:, :, S:S + k_all.size(2)] = k_all
        self.v_window[layer][:, :, S:S + v_all.size(2)] = v_all
        return None

    # ---- reading -------------------------------------------------------------------------------
    def dequantize(self, layer: int, start: int, end: int, *,
                   rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of quantized positions [start, end) (multiples of group_size), fp32 (B, H, n, D), from
        their codes (for sinks too); with `rotated=True` as stored (rotated by H where `rotate` says so), otherwise
        rotated back. Pre-RoPE keys (`rope`) always come back with RoPE applied, in the original basis."""
        G = self.group_size
        B, H, D = self.batch_size, self.n_kv_head, self.head_dim
        n = end - start
        k = unpack(self.k_codes[layer][:, :, start:end], self.bits).view(B, H, n // G, G, D).float()
        k = (k * self.k_scale[layer][:, :, start // G:end // G].float()
             + self.k_zero[layer][:, :, start // G:end // G].float()).view(B, H, n, D)
        v = unpack(self.v_codes[layer][:, :, start:end], self.bits).view(B, H, n, D // self.value_group,
                                                                       self.value_group).float()
        v = (v * self.v_scale[layer][:, :, start:end].float() + self.v_zero[layer][:, :, start:end].float())
        v = v.view(B, H, n, D)
        if not rotated and self.rotate != "none":
            v = v @ self.H
        if self.rope is not None:  # stored pre-RoPE: rotate back to the original basis, apply RoPE at [start, end)
            if self.rotate == "both":
                k = k @ self.H
            k = k * self.rope[0][start:end] + rotate_half(k) * self.rope[1][start:end]
        elif not rotated and self.rotate == "both":
            k = k @ self.H
        return k, v

    def attend(self, layer: int, q: torch.Tensor, mask) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v over everything the cache holds for `layer`; q (B, n_head, T, D).

        `mask` is what `attn_mask` returned for this forward. Returns (B, n_head, T, D) in q's dtype.

        With `decode_view` (the default), the T queries of the forward that just wrote T tokens see the cache
        as token-by-token decoding would have: the query at position p sees as quantized only the positions
        stored once p was written (`stored_after`), and the later ones in full precision (from this write).
        Otherwise every query sees the cache as it is now (later groups of this write already quantized).
        """
        B, n_head, T, D = q.shape
        H, L, S = self.n_kv_head, self.seq_len, self.sink_tokens
        qg = q.float().view(B, H, n_head // H, T, D) * (1.0 / math.sqrt(D))  # grouped-query heads share a kv head
        if T == 1 and self._use_kernel(q, mask):
            return self._attend_kernel(layer, qg, mask).view(B, n_head, T, D).to(q.dtype)
        if isinstance(mask, str):  # "causal": the T queries are positions 0..T-1
            mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril_()
        if mask is not None and mask.dim() == 4:
            mask = mask[:, :, None]  # (B, 1, 1, T, L)
        q_end = self.quantized[layer]
        n_sink = min(S, q_end)  # positions [0, n_sink) are read from the sinks' full-precision copy
        fresh = self._fresh
        view = None  # (T, 1): positions stored (quantized) as each query was written
        if (self.decode_view and T > 1 and fresh is not None and fresh[0] == layer
                and self.seq_len - T == self._write_start and q_end > fresh[4]):
            view = torch.tensor([self.stored_after(fresh[4], p + 1) for p in range(L - T, L)],
                                device=q.device)[:, None]
        if mask is None and (view is not None or n_sink):
            mask = torch.ones(T, L, dtype=torch.bool, device=q.device)
        running_max = torch.full((B, H, n_head // H, T, 1), float("-inf"), device=q.device)
        total = torch.zeros_like(running_max)
        out = torch.zeros(B, H, n_head // H, T, D, device=q.device)
        out_rot = torch.zeros_like(out) if self.rotate != "none" else None  # sum p (V H): rotated back at the end
        q_rot = qg @ self.H if self.rotate == "both" and self.rope is None else qg  # for keys as stored
        # spans: (kind, first position, last position + 1); "stored" = codes, "fp" = sink or window slots,
        # "fresh" = this write in full precision
        spans = [("fp", 0, n_sink)]
        spans += [("stored", s, min(s + self.chunk_size, q_end)) for s in range(0, q_end, self.chunk_size)]
        if view is None:
            spans.append(("fp", q_end, L))
        else:
            f0 = max(fresh[1], n_sink)
            spans += [("fresh", s, min(s + self.chunk_size, L)) for s in range(f0, L, self.chunk_size)]
        for kind, start, end in spans:
            if end <= start:
                continue
            if kind == "stored":
                k, v = self.dequantize(layer, start, end, rotated=True)
            elif kind == "fresh":
                k = fresh[2][:, :, start - fresh[1]:end - fresh[1]].float()
                v = fresh[3][:, :, start - fresh[1]:end - fresh[1]].float()
            else:  # sinks sit at slots = positions; the window at slots S + (position - q_end)
                slot = start if start < n_sink else S + start - q_end
                k = self.k_window[layer][:, :, slot:slot + end - start].float()
                v = self.v_window[layer][:, :, slot:slot + end - start].float()
            rotated = kind == "stored"
            scores = (q_rot if rotated else qg) @ k[:, :, None].transpose(-1, -2)  # (B, H, g, T, n)
            if mask is not None:
                m = mask[..., start:end]
                cols = torch.arange(start, end, device=q.device)[None, :]
                if kind == "stored" and start < n_sink:
                    m = m & (cols >= n_sink)
                if view is not None and kind != "fp":
                    m = m & ((cols < view) if kind == "stored" else (cols >= view))
                scores = scores.masked_fill(~m, float("-inf"))
            new_max = torch.maximum(running_max, scores.amax(-1, keepdim=True))
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)  # all masked so far
            correction = torch.exp(running_max - safe_max)
            weights = torch.exp(scores - safe_max)
            total = total * correction + weights.sum(-1, keepdim=True)
            out = out * correction
            if out_rot is not None:
                out_rot = out_rot * correction
            if rotated and out_rot is not None:  # stored values are V H: their sum is rotated back at the end
                out_rot = out_rot + weights @ v[:, :, None]
            else:
                out = out + weights @ v[:, :, None]
            running_max = new_max
        if out_rot is not None:
            out = out + out_rot @ self.H
        return (out / total).view(B, n_head, T, D).to(q.dtype)

    def _use_kernel(self, q: torch.Tensor, mask, *, pre_rope_ok: bool = False) -> bool:
        """Whether a one-token attention takes a C kernel. `pre_rope_ok`: the caller's kernel applies RoPE to
        pre-RoPE keys (the one-call decode step's `kv_attention.QuantizedDecodeAttention`); `attend`'s own
        kernel (`kv_attend_decode_cpu`) reads keys as stored."""
        if self.kernel == "torch" or q.device.type != "cpu" or self.dtype != torch.float32:
            return False
        if self.scale_dtype != SCALE_DTYPE or (self.rope is not None and not pre_rope_ok):
            if self.kernel == "c":
                raise ValueError("kernel='c': attend's C kernel reads fp16 scales and post-RoPE keys only (not "
                                 "scale_format='fp8' or pre_rope=True; the one-call decode step of generate reads "
                                 "pre-RoPE keys too); use kernel='auto' or 'torch'")
            return False
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.size(2) == 1):
            return False
        if self.kernel == "c":
            return True  # build errors surface
        return kv_attention.available()

    def _attend_kernel(self, layer: int, qg: torch.Tensor, mask) -> torch.Tensor:
        """One decode token through the C kernel (`llmopt.kernels.kv_attention`): no dequantized copy at all.
        The kernel's "window" is the window buffer from slot 0: the sink slots, then the window proper."""
        q_end, L, S = self.quantized[layer], self.seq_len, self.sink_tokens
        q = qg[:, :, :, 0]  # (B, H, g, D)
        q_stored = q @ self.H if self.rotate == "both" else q
        keep = None if mask is None else mask[:, 0, 0, :L]
        if S:  # the kernel's order: codes, then the S sink slots, then the window
            keep = torch.ones(self.batch_size, L, dtype=torch.bool, device=q.device) if keep is None else keep
            n_sink = min(S, q_end)  # a sink is read from its slot once it is in codes (from the window before)
            sinks = torch.zeros(self.batch_size, S, dtype=torch.bool, device=q.device)
            sinks[:, :n_sink] = keep[:, :n_sink]
            codes = keep[:, :q_end].clone()
            codes[:, :n_sink] = False  # the sinks' codes are never read
            keep = torch.cat([codes, sinks, keep[:, q_end:]], 1)
        out_q, out_w = kv_attention.kv_attend_decode_cpu(
            q_stored, q, self.k_codes[layer], self.k_scale[layer], self.k_zero[layer], self.v_codes[layer],
            self.v_scale[layer], self.v_zero[layer], self.k_window[layer], self.v_window[layer], n_quantized=q_end,
            n_window=S + L - q_end, group_size=self.group_size, value_group=self.value_group, bits=self.bits,
            keep=keep)
        if self.rotate != "none":
            out_q = out_q @ self.H
        return out_q + out_w

    # ---- bookkeeping ---------------------------------------------------------------------------
    def truncate(self, length: int) -> None:
        """Forget positions >= length. Quantized positions that come back into the window are dequantized
        into it (they stay at their quantized values)."""
        super().truncate(length)
        G, S = self.group_size, self.sink_tokens
        self._fresh = None
        for layer in range(self.n_layer):
            q_end = self.quantized[layer]
            if q_end <= length:
                continue
            start = length // G * G
            k, v = self.dequantize(layer, start, q_end)
            n = length - start
            self.k_window[layer][:, :, S:S + n] = k[:, :, :n].to(self.dtype)
            self.v_window[layer][:, :, S:S + n] = v[:, :, :n].to(self.dtype)
            if start < S:  # sinks come back exact
                m = min(S, length) - start
                self.k_window[layer][:, :, S:S + m] = self.k_window[layer][:, :, start:start + m]
                self.v_window[layer][:, :, S:S + m] = self.v_window[layer][:, :, start:start + m]
            self.quantized[layer] = start

    def reset(self) -> None:
        super().reset()
        self.quantized = [0] * self.n_layer
        self._fresh = None

    @property
    def quantized_bytes_per_token(self) -> int | float:
        """Bytes of one quantized position, every layer, k and v: codes plus amortized scales and zero points."""
        D = self.head_dim
        s = (torch.empty((), dtype=self.scale_dtype).element_size()  # a scale and a zero point (fp16)
             + torch.empty((), dtype=SCALE_DTYPE).element_size())
        codes = 2 * D * self.bits / 8
        scales = s * D / self.group_size + s * D / self.value_group  # scale + zero: keys per G tokens, values per token
        return self.n_layer * self.n_kv_head * (codes + scales)

    def bytes_at(self, length: int) -> float:
        """Bytes a sequence of `length` tokens occupies (one row): quantized positions, their scales and the
        full-precision window."""
        G, S = self.group_size, self.sink_tokens
        quantized = max(0, (length - self.residual_length) // G) * G
        full = length - quantized + min(S, quantized)  # the window, and the sinks' copy once they are in codes
        return quantized * self.quantized_bytes_per_token + full * super().bytes_per_token

    @property
    def bytes_per_token(self) -> float:
        """Bytes per position of a full cache (max_len tokens), window and scales included."""
        return self.bytes_at(self.max_len) / self.max_len

    @property
    def nbytes(self) -> int:
        tensors = [*self.k_codes, *self.k_scale, *self.k_zero, *self.v_codes, *self.v_scale, *self.v_zero,
                   *self.k_window, *self.v_window]
        return sum(t.numel() * t.element_size() for t in tensors)


def make_quantized_cache(model, batch_size: int, max_len: int | None = None, *, bits: int = 4,
                         group_size: int = 64, residual_length: int = 0, chunk_size: int = 1024,
                         dtype: torch.dtype | None = None, rotate: str = "auto",
                         kernel: str = "auto", value_group: int | None = None, sink_tokens: int | None = None,
                         decode_view: bool = True, key_clip: str | None = None,
                         value_clip: str | None = None, pre_rope: bool | None = None,
                         scale_format: str = "fp16") -> QuantizedKVCache:
    """A `QuantizedKVCache` sized from `model.config`, on the model's device (window in the model's dtype).
    `pre_rope=True` quantizes keys before RoPE, with the model's rotary tables. Defaults by `bits`: at 2 bits
    pre-RoPE keys, `key_clip = value_clip = "unbiased"` and 4 sink tokens (measured on SmolLM2: perplexity +3.8%
    instead of +11-17%, 0.158x the bytes of fp16; `generate`'s one-call C decode step applies RoPE to the stored
keys; the step that flushes a group, once in `group_size`, runs the torch attention);
    at 8 and 4 bits post-RoPE keys, min-max and no sinks (the C kernel's layout)."""
    config = model.config
    if config.family != "llama":
        raise ValueError(f"no KV cache for model family {config.family!r}; available: llama")
    max_len = config.max_seq_len if max_len is None else max_len
    if max_len > config.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={config.max_seq_len}")
    param = next(model.parameters())
    pre_rope = bits == 2 if pre_rope is None else pre_rope
    sink_tokens = (min(4, group_size) if bits == 2 else 0) if sink_tokens is None else sink_tokens
    return QuantizedKVCache(config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim,
                            param.dtype if dtype is None else dtype, param.device, bits=bits, group_size=group_size,
                            residual_length=residual_length, chunk_size=chunk_size, rotate=rotate,
                            kernel=kernel, value_group=value_group, sink_tokens=sink_tokens,
                            decode_view=decode_view, key_clip=key_clip,
                            value_clip=value_clip, rope=(model.rope_cos, model.rope_sin) if pre_rope else None,
                            scale_format=scale_format)
