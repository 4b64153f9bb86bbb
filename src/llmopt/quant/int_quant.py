"""Integer weight and activation quantization: int8 per-channel, int4/int8 group-wise, int4 packing,
int8 dynamic per-token activations, and fake quantization with a straight-through estimator.
Pure functions; CPU and GPU alike.

Weights (shape (N, K): out_features x in_features) are quantized along the input dimension K in
groups of `group_size` values of one row (None: the whole row, i.e. per output channel):
- symmetric: `code = clamp(round(w / s), qmin, qmax)`, `s = absmax / qmax`, and `w ~= code * s`; with
  `full_range`, `s = absmax / (qmax + 0.5)` and codes in [-2**(bits-1), 2**(bits-1) - 1] (torchao's symmetric
  mapping: every code used, a group's positive extreme clipped by half a step);
- asymmetric: `s = (max - min) / (2**bits - 1)`, `zero = min - qmin * s` (the value of code 0), and
  `w ~= code * s + zero`.
Codes are signed: int8 in [-127, 127] (symmetric) or [-128, 127], int4 in [-8, 7]. Scales (and zeros)
are kept in `scale_dtype` (fp32, or bf16 to save bytes); the codes are chosen with the stored,
rounded scale, so `dequantize_weight` is the exact inverse used everywhere (QAT's fake quantization
calls the same two functions, which is why a converted model equals its fake-quantized one bit for bit).

Int4 packing: two codes per byte, in the layout of PyTorch's CPU int4 matmul
(`torch._convert_weight_to_int4pack_for_cpu`, nibble = code + 8), so that `torch._weight_int4pack_mm_for_cpu`
reads our storage directly: rows in blocks of 32, block `b` stores bytes `[K/4][4][16]` where the byte at
(k // 4, k % 4, n % 16) holds row `32 b + n % 16` in its low nibble and row `32 b + 16 + n % 16` in its
high nibble. Rows are padded with zero codes to a multiple of 32. `unpack_int4` inverts it exactly.
The kernel computes `(nibble - 8) * scale + zero`, i.e. `code * scale + zero`, the same formula.

Error bound: a weight is off by at most half a step (`s / 2`) plus the rounding of the scale multiply,
unless it was clamped (only possible for asymmetric ranges whose endpoints are not representable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes `torch._weight_int4pack_mm_for_cpu` accepts (others fall back to unpack + matmul)."""


def code_range(bits: int, symmetric: bool, full_range: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of the signed codes: int8 symmetric [-127, 127], asymmetric [-128, 127]; int4 [-8, 7];
    `full_range` (symmetric): [-2**(bits-1), 2**(bits-1) - 1] for both."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if (symmetric and bits == 8 and not full_range) else -qmax - 1
    return qmin, qmax


def _check_full_range(full_range: bool, symmetric: bool) -> None:
    if full_range and not symmetric:
        raise ValueError("full_range is a symmetric mapping (asymmetric ranges already use every code); "
                         "use symmetric=True or full_range=False")


@dataclass(frozen=True)
class IntWeight:
    """A weight stored as integer codes with group-wise scales. Plain tensors (a module registers them as buffers)."""

    codes: torch.Tensor
    """int8 (N, K) for bits=8; uint8 (N_padded, K // 2) packed for bits=4 (see the module docstring)."""
    scale: torch.Tensor
    """(N, K // group_size) in scale_dtype."""
    zero: torch.Tensor | None
    """(N, K // group_size) in scale_dtype for asymmetric quantization; None when symmetric."""
    shape: tuple[int, int]
    """(N, K) of the original weight."""
    bits: int
    """4 or 8."""
    group_size: int
    """Values of one row sharing a scale (K for per-channel)."""

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zeros (padding rows included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / math.prod(self.shape)


def _check_group(shape: tuple[int, ...], group_size: int | None, bits: int) -> int:
    if len(shape) != 2:
        raise ValueError(f"weight quantization takes a 2-D (out, in) weight, got shape {tuple(shape)}")
    K = shape[1]
    g = K if group_size is None else group_size
    if g <= 0 or K % g:
        raise ValueError(f"group_size={group_size} does not divide in_features={K}; use a divisor of {K} "
                         "(or None for per-channel)")
    if bits == 4 and (K % 4 or g % 2):
        raise ValueError(f"int4 packing needs in_features divisible by 4 and an even group size, got K={K}, g={g}")
    return g


def choose_qparams(weight: torch.Tensor, *, bits: int, group_size: int | None = None, symmetric: bool = True,
                   scale_dtype: torch.dtype = torch.float32,
                   full_range: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero) of shape (N, K // g) in scale_dtype (zero None when symmetric). Symmetric: `absmax / qmax`,
    or with `full_range` `absmax / (qmax + 0.5)` (torchao's MappingType.SYMMETRIC: all 2**bits codes are used, a
    group's largest positive weight clips by half a step)."""
    g = _check_group(tuple(weight.shape), group_size, bits)
    _check_full_range(full_range, symmetric)
    qmin, qmax = code_range(bits, symmetric)
    w = weight.detach().float().reshape(weight.shape[0], -1, g)  # (N, G, g)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        scale = (w.abs().amax(-1) / (qmax + 0.5 if full_range else qmax)).clamp_min(tiny).to(scale_dtype)
        return scale, None
    lo, hi = w.amin(-1).clamp_max(0.0), w.amax(-1).clamp_min(0.0)  # keep 0 representable
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(tiny).to(scale_dtype)
    zero = (lo - qmin * scale.float()).to(scale_dtype)
    return scale, zero


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, *, bits: int,
                   symmetric: bool, full_range: bool = False) -> torch.Tensor:
    """Signed int8 codes (N, K) of `weight` for the given (stored) scale and zero."""
    qmin, qmax = code_range(bits, symmetric, full_range)
    N, K = weight.shape
    G = scale.shape[-1]
    w = weight.detach().float().reshape(N, G, K // G)
    if zero is not None:
        w = w - zero.float()[..., None]
    codes = torch.round(w / scale.float()[..., None]).clamp_(qmin, qmax)
    return codes.to(torch.int8).reshape(N, K)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`code * scale (+ zero)` per group, in `dtype`; codes (N, K) signed."""
    N, K = codes.shape
    G = scale.shape[-1]
    w = codes.reshape(N, G, K // G).to(dtype) * scale.to(dtype)[..., None]
    if zero is not None:
        w = w + zero.to(dtype)[..., None]
    return w.reshape(N, K)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes (N, K) in [-8, 7] -> uint8 (ceil(N/32)*32, K/2) in the CPU int4-matmul layout."""
    N, K = codes.shape
    if K % 4:
        raise ValueError(f"int4 packing needs K divisible by 4, got {K}")
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    pad = (-N) % 32
    if pad:
        nibbles = F.pad(nibbles, (0, 0, 0, pad), value=8)  # code 0
    Np = N + pad
    v = nibbles.view(Np // 32, 2, 16, K // 4, 4)  # (block, half, row in half, k // 4, k % 4)
    packed = (v[:, 1] << 4) | v[:, 0]  # (block, 16, K/4, 4)
    return packed.permute(0, 2, 3, 1).reshape(Np, K // 2).contiguous()


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack_int4`: int8 codes of `shape` (N, K)."""
    N, K = shape
    Np = packed.shape[0]
    b = packed.view(Np // 32, K // 4, 4, 16).permute(0, 3, 1, 2)  # (block, row in half, K/4, 4)
    lo, hi = b & 15, b >> 4
    nib = torch.stack((lo, hi), dim=1).reshape(Np, K)  # (block, half, 16, K/4, 4) -> rows
    return (nib[:N].to(torch.int8) - 8)


def quantize_weight(weight: torch.Tensor, *, bits: int, group_size: int | None = None, symmetric: bool = True,
                    scale_dtype: torch.dtype = torch.float32, full_range: bool = False) -> IntWeight:
    """Quantize a 2-D weight to int8 or packed int4 codes with per-group (or per-channel) scales."""
    if not weight.is_floating_point():
        raise TypeError(f"quantize_weight takes a floating-point weight, got {weight.dtype}")
    g = _check_group(tuple(weight.shape), group_size, bits)
    scale, zero = choose_qparams(weight, bits=bits, group_size=g, symmetric=symmetric, scale_dtype=scale_dtype,
                                 full_range=full_range)
    codes = quantize_codes(weight, scale, zero, bits=bits, symmetric=symmetric, full_range=full_range)
    if bits == 4:
        codes = pack_int4(codes)
    return IntWeight(codes=codes, scale=scale, zero=zero, shape=tuple(weight.shape), bits=bits, group_size=g)


def weight_codes(q: IntWeight) -> torch.Tensor:
    """Signed int8 codes (N, K), unpacking int4."""
    return unpack_int4(q.codes, q.shape) if q.bits == 4 else q.codes


def dequantize_weight(q: IntWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight `q` stores, in `dtype`."""
    return dequantize_codes(weight_codes(q), q.scale, q.zero, dtype)


def empty_int_weight(shape: tuple[int, int], *, bits: int, group_size: int | None, symmetric: bool,
                     scale_dtype: torch.dtype, device: torch.device | str, full_range: bool = False) -> IntWeight:
    """Tensors of the right shapes and dtypes, uninitialized (for a meta-device model; `full_range` changes no
    shape)."""
    g = _check_group(shape, group_size, bits)
    N, K = shape
    codes = (torch.empty(N, K, dtype=torch.int8, device=device) if bits == 8
             else torch.empty(N + (-N) % 32, K // 2, dtype=torch.uint8, device=device))
    scale = torch.empty(N, K // g, dtype=scale_dtype, device=device)
    zero = None if symmetric else torch.empty(N, K // g, dtype=scale_dtype, device=device)
    return IntWeight(codes=codes, scale=scale, zero=zero, shape=(N, K), bits=bits, group_size=g)


# ---- fake quantization (QAT) ----------------------------------------------------------------

class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value, exactly. Backward: the gradient unchanged (Bengio et al. 2013)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """`quantized` in the forward, identity gradient to `x` in the backward (bit-exact forward, unlike
    `x + (q - x).detach()`, whose two roundings can differ from q)."""
    return _StraightThrough.apply(x, quantized.detach())


class _StraightThroughAbsmaxScale(torch.autograd.Function):
    """Forward: the quantized weight, exactly. Backward: the straight-through gradient, plus, for the one weight
    of each group that sets the group's symmetric scale `s = |w_max| / qmax`, the gradient through that scale:
    `sign(w_max) / qmax * sum_i g_i (code_i - w_i / s)` (what autograd gives for `s * round(w / s)` with a
    straight-through round and `s` not detached; the scale gradient of LSQ, Esser et al. arXiv:1902.08153,
    taken by the weight that sets the scale instead of by a separate parameter). Saves only the scales and the
    argmax positions; the codes are recomputed in the backward."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor, argmax: torch.Tensor,
                qmin: int, qmax: int) -> torch.Tensor:
        ctx.save_for_backward(weight, scale, argmax)
        ctx.qmin, ctx.qmax = qmin, qmax
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale, argmax = ctx.saved_tensors
        N, K = weight.shape
        G = scale.shape[-1]
        w = weight.detach().float().reshape(N, G, K // G) / scale.float()[..., None]
        residual = torch.round(w).clamp_(ctx.qmin, ctx.qmax) - w  # code - w / s
        g = grad.float().reshape(N, G, K // G)
        scale_grad = (g * residual).sum(-1, keepdim=True) / ctx.qmax  # d loss / d |w_max|
        sign = torch.gather(torch.sign(weight.detach().float().reshape(N, G, K // G)), -1, argmax)
        g = g.scatter_add(-1, argmax, sign * scale_grad)
        return g.reshape(N, K).to(grad.dtype), None, None, None, None, None


class _StraightThroughInRange(torch.autograd.Function):
    """Forward: the quantized weight, exactly. Backward: the gradient where `round(w / s)` was inside the code
    range, zero where it was clamped (the clamp-aware straight-through estimator, as torchao's fake quantization
    computes it). Saves the weight and the scales; the mask is recomputed in the backward."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor, qmin: int,
                qmax: int) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        ctx.qmin, ctx.qmax = qmin, qmax
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, scale = ctx.saved_tensors
        N, K = weight.shape
        G = scale.shape[-1]
        r = torch.round(weight.detach().float().reshape(N, G, K // G) / scale.float()[..., None])
        inside = ((r >= ctx.qmin) & (r <= ctx.qmax)).reshape(N, K)
        return grad * inside.to(grad.dtype), None, None, None, None


SCALE_GRADS = ("none", "absmax")
"""How the gradient treats the dynamic weight scale: "none" (plain straight-through: the scale is a constant),
"absmax" (the gradient through each group's scale reaches the weight that sets it; symmetric only)."""


def fake_quantize_weight(weight: torch.Tensor, *, bits: int, group_size: int | None = None, symmetric: bool = True,
                         scale_dtype: torch.dtype = torch.float32, scale_grad: str = "none",
                         full_range: bool = False) -> torch.Tensor:
    """dequantize(quantize(weight)) in the weight's dtype, with a straight-through gradient (`scale_grad`: see
    `SCALE_GRADS`; the forward value is the same for every choice). With `full_range` (see `choose_qparams`)
    the weights clamped to the code range get no gradient (clamp-aware straight-through)."""
    if scale_grad not in SCALE_GRADS:
        raise ValueError(f"scale_grad must be one of {SCALE_GRADS}, got {scale_grad!r}")
    if scale_grad == "absmax" and not symmetric:
        raise ValueError("scale_grad='absmax' routes the gradient of a symmetric scale; use symmetric=True "
                         "or scale_grad='none'")
    if full_range and scale_grad != "none":
        raise ValueError("full_range takes scale_grad='none'")
    with torch.no_grad():
        g = _check_group(tuple(weight.shape), group_size, bits)
        scale, zero = choose_qparams(weight, bits=bits, group_size=g, symmetric=symmetric, scale_dtype=scale_dtype,
                                     full_range=full_range)
        codes = quantize_codes(weight, scale, zero, bits=bits, symmetric=symmetric, full_range=full_range)
        dq = dequantize_codes(codes, scale, zero, torch.float32).to(weight.dtype)
    if full_range and weight.requires_grad and torch.is_grad_enabled():
        return _StraightThroughInRange.apply(weight, dq, scale, *code_range(bits, symmetric, True))
    with torch.no_grad():
        if scale_grad == "absmax":
            N, K = weight.shape
            argmax = weight.detach().reshape(N, K // g, g).abs().argmax(-1, keepdim=True)
    if scale_grad == "absmax" and weight.requires_grad and torch.is_grad_enabled():
        qmin, qmax = code_range(bits, symmetric)
        return _StraightThroughAbsmaxScale.apply(weight, dq, scale, argmax, qmin, qmax)
    return straight_through(weight, dq)


def quantize_activation_int8(x: torch.Tensor) -> torch.Tensor:
    """Dynamic symmetric int8 per token (last dim), quantize then dequantize in x's dtype (no gradient)."""
    with torch.no_grad():
        xf = x.float()
        scale = (xf.abs().amax(-1, keepdim=True) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        return (torch.round(xf / scale).clamp_(-128, 127) * scale).to(x.dtype)


def fake_quantize_activation_int8(x: torch.Tensor) -> torch.Tensor:
    """`quantize_activation_int8(x)` with a straight-through gradient."""
    return straight_through(x, quantize_activation_int8(x))


def quantize_activation_int8_asym(x: torch.Tensor) -> torch.Tensor:
    """Dynamic asymmetric int8 per token: [min, max] (widened to include 0) onto the 256 codes with an integer
    zero point, quantize then dequantize in x's dtype (no gradient). Finer than symmetric for one-sided rows."""
    with torch.no_grad():
        xf = x.float()
        lo = xf.amin(-1, keepdim=True).clamp_max(0.0)
        hi = xf.amax(-1, keepdim=True).clamp_min(0.0)
        scale = ((hi - lo) / 255.0).clamp_min(torch.finfo(torch.float32).tiny)
        zero = torch.round(-lo / scale) - 128.0  # the code of 0.0
        codes = (torch.round(xf / scale) + zero).clamp_(-128, 127)
        return ((codes - zero) * scale).to(x.dtype)


def fake_quantize_activation_int8_asym(x: torch.Tensor) -> torch.Tensor:
    """`quantize_activation_int8_asym(x)` with a straight-through gradient."""
    return straight_through(x, quantize_activation_int8_asym(x))


__all__ = ["IntWeight", "KERNEL_GROUP_SIZES", "SCALE_GRADS", "choose_qparams", "code_range", "dequantize_codes",
           "dequantize_weight", "empty_int_weight", "fake_quantize_activation_int8", "fake_quantize_activation_int8_asym",
           "fake_quantize_weight",
           "pack_int4", "quantize_activation_int8", "quantize_activation_int8_asym", "quantize_codes", "quantize_weight", "straight_through",
           "unpack_int4", "weight_codes"]
