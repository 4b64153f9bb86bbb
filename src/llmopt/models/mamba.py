"""Mamba: a selective state space language model (Gu and Dao 2023, arXiv 2312.00752) that reads top to bottom.

One block: RMSNorm pre-norm, then the mixer
    x, z = in_proj(h).chunk(2)                   # (B, T, d_inner) each
    x = silu(depthwise causal conv1d(x))         # kernel d_conv
    dt, B, C = x_proj(x).split(dt_rank, d_state, d_state)
    dt = softplus(dt_proj(dt))                   # (B, T, d_inner), input-dependent step
    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t   # state (B, d_inner, d_state), A = -exp(A_log)
    y_t = C_t . h_t + D x_t
    out = out_proj(y * silu(z))
and a residual add. Embeddings are tied with the output projection.

Three equivalent evaluation paths of the scan (`scan_sequential`, `scan_chunked`, `scan_step`), plus C kernels:
- sequential: the recurrence above, one step at a time (the oracle; transformers' "slow path");
- chunked (training and prefill where the C kernels below do not run; scan="chunked" forces it): within a
  chunk of L steps the cumulative log decay
  S_t = cumsum(dt A) gives every state at once, h_t = exp(S_t) (h_0 + cumsum_s exp(-S_s) dt_s B_s x_s),
  then a short loop over chunks carries the state. Work is T * d_inner * d_state like the sequential
  scan, but vectorized. exp(-S_s) would overflow for a chunk that decays by more than e^-30; such a
  chunk is split in halves (down to one step), so the result never depends on the weights' range;
- recurrent (decoding): one step from a constant-size state held in a `MambaCache` (conv state of the
  last d_conv - 1 inputs + SSM state), whatever the context length;
- fused C (scan="auto", the default, on fp32 CPU tensors when a C compiler builds it; scan="fused" forces it):
  `llmopt.kernels.scan_backward.selective_scan_cpu_autograd`, one fused sequential pass in C that saves the
  state every 64 steps, with a C backward that recomputes each 64-step chunk from its checkpoint; and for
  decoding `llmopt.kernels.scan.mamba_block_step_cpu` (the whole block, RMSNorm to residual add, in one C call).
  Anything else (no compiler, another dtype or device) takes the torch paths above with no error.

Numerics contract: the three paths compute the same recurrence in fp32 with a different summation order;
they agree to about 1e-6 (tested at 1e-5). The state is kept in fp32 whatever the weight dtype.

Module names follow transformers' `MambaForCausalLM` minus its `backbone.` prefix (`embeddings`,
`layers.0.mixer.in_proj`, `norm_f`, `lm_head`), so `from_hf_mamba` copies weights by name and gives the
same logits as the transformers slow path.

Family settings (`ModelConfig.extra`): `d_state` (16), `d_conv` (4), `expand` (2), `dt_rank` (None =
ceil(dim / 16)), `chunk_size` (32), `scan` ("auto", "fused", "chunked" or "sequential"), `conv_bias` (True),
`bias` (False), `block` ("mamba1", or "mamba2" for the SSD block of `llmopt.models.mamba2`), `headdim` (64;
Mamba-2 only).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.models.config import ModelConfig
from llmopt.models.contract import CausalLM
from llmopt.models.llama import RMSNorm
from llmopt.models.loss import linear_cross_entropy
from llmopt.models.mamba2 import Mamba2Mixer

MAMBA_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank=None, chunk_size=32, scan="auto", conv_bias=True,
                      bias=False, block="mamba1", headdim=64)
_MAX_CHUNK_DECAY = 30.0  # largest -log decay inside a chunk: exp(-S) <= e^30, and products of two such
# factors in the backward stay below fp32's e^88
SCANS = ("auto", "fused", "chunked", "sequential")
"""auto: the C kernels on fp32 CPU tensors when they build, else chunked; fused: the C kernels or an error."""
_MAX_CHUNK_DECAY_INFERENCE = 60.0  # without a backward only exp(-S) (<= e^60) times a term must stay finite


def mamba_settings(config: ModelConfig) -> dict:
    """config.extra merged over the defaults, validated; dt_rank resolved."""
    unknown = set(config.extra) - set(MAMBA_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown mamba settings {sorted(unknown)} in model.extra; valid: {sorted(MAMBA_DEFAULTS)}")
    s = {**MAMBA_DEFAULTS, **config.extra}
    if s["dt_rank"] is None:
        s["dt_rank"] = math.ceil(config.dim / 16)
    for name in ("d_state", "d_conv", "expand", "dt_rank", "chunk_size"):
        if int(s[name]) <= 0:
            raise ValueError(f"model.extra.{name} must be positive, got {s[name]}")
    if s["scan"] not in SCANS:
        raise ValueError(f"model.extra.scan must be one of {SCANS}, got {s['scan']!r}")
    s["d_inner"] = s["expand"] * config.dim
    if s["block"] not in ("mamba1", "mamba2"):
        raise ValueError(f"model.extra.block must be 'mamba1' or 'mamba2', got {s['block']!r}")
    if s["block"] == "mamba2":
        if int(s["headdim"]) <= 0 or s["d_inner"] % int(s["headdim"]):
            raise ValueError(f"model.extra.headdim={s['headdim']} must divide d_inner = expand * dim = {s['d_inner']}")
        if s["scan"] == "fused":
            raise ValueError("model.extra.scan='fused' is the Mamba-1 C kernel; block='mamba2' takes 'auto' (= its "
                             "chunked SSD), 'chunked' or 'sequential'")
        s["n_heads"] = s["d_inner"] // s["headdim"]
        s["conv_dim"] = s["d_inner"] + 2 * s["d_state"]  # the conv runs over (x, B, C)
    return s


# ---- the three scans ------------------------------------------------------------------------------
def scan_step(h: torch.Tensor, x, dt, A, Bm, Cm) -> tuple[torch.Tensor, torch.Tensor]:
    """One step. h (B, D, N) fp32, x/dt (B, D), A (D, N), Bm/Cm (B, N) -> (y (B, D), new h)."""
    h = torch.exp(dt[..., None] * A) * h + (dt * x)[..., None] * Bm[:, None, :]
    return (h * Cm[:, None, :]).sum(-1), h


def scan_sequential(x, dt, A, Bm, Cm, h0=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x/dt (B, T, D), A (D, N), Bm/Cm (B, T, N), h0 (B, D, N) or None -> (y (B, T, D), final h (B, D, N))."""
    Bsz, T, D = x.shape
    h = x.new_zeros(Bsz, D, A.size(1)) if h0 is None else h0
    ys = []
    for t in range(T):
        y, h = scan_step(h, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), h


def scan_chunked(x, dt, A, Bm, Cm, h0=None, chunk_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `scan_sequential`, computed a chunk of `chunk_size` steps at a time.

    A loop over T / chunk_size chunks (a chunk's (B, L, D, N) tensors stay in cache; the whole sequence's
    would not), each chunk's states in one vectorized pass from cumulative log decays. Without autograd
    (inference, prefill) the chunks run in preallocated buffers laid out (B, L, N, D), so every pass and
    the contraction with C vectorize along d_inner and nothing is allocated per chunk.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, Bm, Cm, h0)):
        Bsz, T, D = x.shape
        h = x.new_zeros(Bsz, D, A.size(1)) if h0 is None else h0
        ys = []
        for start in range(0, T, chunk_size):
            end = min(T, start + chunk_size)
            y, h = _scan_chunk(x[:, start:end], dt[:, start:end], A, Bm[:, start:end], Cm[:, start:end], h)
            ys.append(y)
        return torch.cat(ys, dim=1), h
    with torch.no_grad():
        return _scan_chunked_inference(x, dt, A, Bm, Cm, h0, chunk_size)


def _scan_chunked_inference(x, dt, A, Bm, Cm, h0, L: int):
    """The chunked scan without autograd: in-place passes over (B, L, N, D) buffers, y contracted by a matmul."""
    Bsz, T, D = x.shape
    N = A.size(1)
    log2e = 1.4426950408889634
    A2 = (A.t() * log2e).contiguous()  # (N, D): exp(S) = exp2(S log2 e), and exp2 is the cheaper kernel
    A_max = (-A).amax(dim=1)  # (D,): the largest -S of a chunk is max_d cs_L[d] A_max[d]
    h = x.new_zeros(Bsz, N, D) if h0 is None else h0.transpose(1, 2).contiguous()  # state^T (B, N, D)
    y = x.new_empty(Bsz, T, D)
    w = dt * x  # (B, T, D)
    E, U = x.new_empty(Bsz, L, N, D), x.new_empty(Bsz, L, N, D)
    P = x.new_empty(Bsz, L, N * D)
    causal = torch.ones(L, L, dtype=x.dtype, device=x.device).tril_()
    for start in range(0, T, L):
        end = min(T, start + L)
        n = end - start
        cs = torch.cumsum(dt[:, start:end], dim=1)  # (B, n, D): S_t = cs_t A
        if float((cs[:, -1] * A_max).amax()) > _MAX_CHUNK_DECAY_INFERENCE:  # exp(-S) could overflow: split
            hd = h.transpose(1, 2)
            yc, hd = _scan_chunk(x[:, start:end], dt[:, start:end], A, Bm[:, start:end], Cm[:, start:end], hd)
            y[:, start:end] = yc
            h = hd.transpose(1, 2).contiguous()
            continue
        Ec, Uc, Pc = E[:, :n], U[:, :n], P[:, :n]
        torch.mul(cs[:, :, None, :], A2, out=Ec).exp2_()  # (B, n, N, D) decay from the chunk start
        torch.mul(w[:, start:end, None, :], Bm[:, start:end, :, None], out=Uc).div_(Ec)  # exp(-S_s) dt_s B_s x_s
        for b in range(Bsz):  # prefix sums as one matmul with a triangular matrix of ones, h added as the bias
            torch.addmm(h[b].view(1, N * D), causal[:n, :n], Uc[b].view(n, N * D), out=Pc[b])
        hs = Pc.view(Bsz, n, N, D).mul_(Ec)  # (B, n, N, D): every state of the chunk
        h = hs[:, -1].clone()
        torch.matmul(Cm[:, start:end, None, :], hs, out=y[:, start:end, None, :])  # (B, n, 1, N) @ (B, n, N, D)
    return y, h.transpose(1, 2).contiguous()


def _scan_chunk(x, dt, A, Bm, Cm, h):
    """One chunk: x/dt (B, L, D), Bm/Cm (B, L, N), h (B, D, N) entering -> (y (B, L, D), h leaving)."""
    Bsz, L, D = x.shape
    N = A.size(1)
    if L == 1:  # a one-step chunk is the recurrence itself (no exp(-S), whatever the decay)
        y, h = scan_step(h, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0])
        return y[:, None], h
    # A is constant in time, so the cumulative log decay is cumsum(dt) (B, L, D) times A: S_t = A sum_{s<=t} dt_s
    S = torch.cumsum(dt, dim=1)[..., None] * A  # (B, L, D, N), <= 0
    if L > 1 and float(-S[:, -1].detach().min()) > _MAX_CHUNK_DECAY:  # exp(-S) could overflow: halve
        half = L // 2
        y1, h = _scan_chunk(x[:, :half], dt[:, :half], A, Bm[:, :half], Cm[:, :half], h)
        y2, h = _scan_chunk(x[:, half:], dt[:, half:], A, Bm[:, half:], Cm[:, half:], h)
        return torch.cat([y1, y2], dim=1), h
    decay = torch.exp(S)
    # exp(-S) as its own exp, not 1 / decay: the backward of a division by e^-30 would square it
    u = (dt * x)[..., None] * Bm[:, :, None, :] * torch.exp(-S)  # (B, L, D, N): exp(-S_s) dt_s B_s x_s
    # the cumulative sum over the chunk as one matmul with a lower-triangular matrix of ones
    causal = torch.ones(L, L, dtype=x.dtype, device=x.device).tril_()
    prefix = torch.matmul(causal, u.reshape(Bsz, L, D * N)).view(Bsz, L, D, N)
    # h_t = exp(S_t) (h + sum_{s<=t} exp(-S_s) u_s): the rounding error stays below eps * sum |terms|
    hs = decay * (h[:, None] + prefix)  # (B, L, D, N)
    y = (hs * Cm[:, :, None, :]).sum(-1)  # (B, L, D)
    return y, hs[:, -1]


# ---- the C kernels (optional: built with the system compiler at first use) -------------------------
@functools.cache
def _c_kernels():
    """(full-sequence scan with a backward, fused mixer decode step, fused block decode step) or None where the C
    kernels do not build."""
    try:
        from llmopt.kernels.scan import decode_step_available, mamba_block_step_cpu, mamba_decode_step_cpu
        from llmopt.kernels.scan_backward import cpu_scan_available, selective_scan_cpu_autograd
    except ImportError:
        return None
    if not (cpu_scan_available() and decode_step_available()):
        return None
    return selective_scan_cpu_autograd, mamba_decode_step_cpu, mamba_block_step_cpu


def _fused_kernels(scan: str, x: torch.Tensor, strict: bool = True):
    """The C kernels for scan='auto' / 'fused' on fp32 CPU tensors; None means the torch path (for 'fused' an
    error, unless not `strict`: the decode steps fall back quietly)."""
    if scan not in ("auto", "fused"):
        return None
    kernels = _c_kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if kernels is None and scan == "fused" and strict:
        reason = "no C compiler builds the kernel" if x.device.type == "cpu" and x.dtype == torch.float32 \
            else f"it takes fp32 CPU tensors, got {x.dtype} on {x.device}"
        raise ValueError(f"scan='fused' (the C scan) cannot run: {reason}; use scan='auto' or 'chunked'")
    return kernels


# ---- the model ------------------------------------------------------------------------------------
class MambaMixer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        s = mamba_settings(config)
        self.layer_idx = layer_idx
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = s["d_inner"], s["d_state"], s["d_conv"], s["dt_rank"]
        self.chunk_size, self.scan = s["chunk_size"], s["scan"]
        self.in_proj = nn.Linear(config.dim, 2 * self.d_inner, bias=s["bias"])
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, bias=s["conv_bias"],
                                padding=self.d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, config.dim, bias=s["bias"])
        self.scan_fn = None
        """Optional replacement of the full-sequence scan (same contract as `scan_chunked`), e.g. the Triton
        kernel installed by `llmopt.kernels.scan.use_triton_scan_`."""
        self.step_fn = None
        """Optional fused decode step, (mixer, hidden (B, 1, dim), cache) -> (B, 1, dim) or None (not handled),
        e.g. `llmopt.kernels.scan.mamba_decode_step_cpu` installed by `use_fused_scan_`."""

    def forward(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, _ = hidden.shape
        dtype = hidden.dtype
        if cache is not None and T == 1:
            step_fn = self.step_fn
            if step_fn is None and not torch.is_grad_enabled():
                kernels = _fused_kernels(self.scan, hidden, False)
                step_fn = None if kernels is None else kernels[1]
            out = None if step_fn is None else step_fn(self, hidden, cache)
            if out is not None:
                return out
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (B, T, d_inner) each
        x = x.transpose(1, 2)  # (B, d_inner, T)
        weight = self.conv1d.weight  # (d_inner, 1, d_conv)
        if cache is None:
            x = self.conv1d(x)[..., :T]
        else:  # the conv state holds the previous d_conv - 1 inputs (zeros at the start = the zero padding)
            full = torch.cat([cache.conv[self.layer_idx].to(x.dtype), x], dim=-1)  # (B, d_inner, d_conv-1+T)
            cache.conv[self.layer_idx] = full[..., -(self.d_conv - 1):].to(cache.dtype) if self.d_conv > 1 \
                else full[..., :0]
            if T == 1:  # the decode step: one dot product per channel (F.conv1d's setup costs more than the math)
                x = (full * weight[:, 0]).sum(-1, keepdim=True)  # (B, d_inner, 1)
                x = x if self.conv1d.bias is None else x + self.conv1d.bias[:, None]
            else:
                x = F.conv1d(full, weight, self.conv1d.bias, groups=self.d_inner)
        x = F.silu(x).transpose(1, 2)  # (B, T, d_inner)
        dt, Bm, Cm = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt).float())  # (B, T, d_inner), fp32
        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        xf, Bm, Cm = x.float(), Bm.float(), Cm.float()
        h0 = None if cache is None else cache.ssm[self.layer_idx]
        if self.scan_fn is not None:  # a fused kernel, for the decode step too
            y, h = self.scan_fn(xf, dt, A, Bm, Cm, h0)
        elif cache is not None and T == 1:
            y, h = scan_step(h0, xf[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0])
            y = y[:, None]
        elif self.scan == "sequential":
            y, h = scan_sequential(xf, dt, A, Bm, Cm, h0)
        elif (kernels := _fused_kernels(self.scan, xf)) is not None:
            y, h = kernels[0](xf, dt, A, Bm, Cm, h0)
        else:
            y, h = scan_chunked(xf, dt, A, Bm, Cm, h0, chunk_size=self.chunk_size)
        if cache is not None:
            cache.ssm[self.layer_idx] = h
        y = (y + xf * self.D.float()) * F.silu(z.float())  # (B, T, d_inner)
        return self.out_proj(y.to(dtype))


class MambaBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(config.dim, config.norm_eps)
        s = mamba_settings(config)
        self.mixer = MambaMixer(config, layer_idx) if s["block"] == "mamba1" else Mamba2Mixer(config, layer_idx, s)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        if cache is not None and x.size(1) == 1 and type(self.mixer) is MambaMixer and self.mixer.step_fn is None \
                and (kernels := _fused_kernels(self.mixer.scan, x, False)) is not None:
            out = kernels[2](self, x, cache)  # the whole block in one C call (None: not fp32 CPU, or autograd)
            if out is not None:
                return out
        return x + self.mixer(self.norm(x), cache=cache)


class Mamba(CausalLM):
    """Mamba language model behind the model contract: `logits = model(idx, *, input_pos=None, cache=None)`.

    With a `MambaCache` (`llmopt.inference.make_cache(model, batch_size)`), `input_pos` must continue the
    cache exactly (a recurrent state cannot skip or rewind); T == 1 takes the recurrent step.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != "mamba":
            raise ValueError(f"Mamba needs model.family='mamba', got {config.family!r}")
        self.config = config
        self.settings = mamba_settings(config)
        """The resolved family settings; `make_cache` sizes a `MambaCache` from d_inner / d_state / d_conv."""
        if self.settings["block"] == "mamba2":  # the cache's conv state spans (x, B, C): conv_dim channels
            self.settings = {**self.settings, "d_inner": self.settings["conv_dim"],
                             "mixer_d_inner": self.settings["d_inner"]}
        self.embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(MambaBlock(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight
        self.loss_fn = linear_cross_entropy
        """Loss on (hidden (N, dim), weight (V, dim), targets (N,)) -> (sum of token losses, token count)."""
        self.applied_techniques: list = []
        if self.embeddings.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) projections (out_proj scaled by 1/sqrt(n_layer)), Mamba's S4D-real A, dt in
        [1e-3, 1e-1] log-uniform through the dt_proj bias (inverse softplus), D = 1."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(self.config.n_layer) if name.endswith("out_proj") else 1.0
                module.weight.normal_(0.0, std * scale, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Conv1d):
                bound = 1 / math.sqrt(module.kernel_size[0])
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
        for layer in self.layers:
            m = layer.mixer
            if isinstance(m, Mamba2Mixer):
                m.init_ssm_(generator)
                continue
            A = torch.arange(1, m.d_state + 1, dtype=torch.float32, device=m.A_log.device)
            m.A_log.copy_(torch.log(A).expand(m.d_inner, -1))
            m.D.fill_(1.0)
            dt_std = m.dt_rank ** -0.5
            m.dt_proj.weight.uniform_(-dt_std, dt_std, generator=generator)
            u = torch.rand(m.d_inner, generator=generator, device=m.A_log.device)
            dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def hidden_states(self, idx: torch.Tensor, *, input_pos: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Final normalized hidden states (B, T, dim)."""
        B, T = idx.shape
        if cache is None:
            if input_pos is not None and int(input_pos[0]) != 0:
                raise ValueError("Mamba without a cache runs whole sequences from position 0; pass a MambaCache")
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than model.max_seq_len={self.config.max_seq_len}")
        else:
            if input_pos is None:
                raise ValueError("input_pos is required with a cache: pass the absolute positions of idx, shape (T,)")
            cache.check_model(self)
            cache.advance(input_pos, batch_size=B)
        x = self.embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cache=cache)
        return self.norm_f(x)

    def set_scan(self, scan: str) -> None:
        """Switch every layer's scan: "auto", "fused", "chunked" or "sequential" (same results)."""
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
        if scan == "fused" and self.settings["block"] == "mamba2":
            raise ValueError("scan='fused' is the Mamba-1 C kernel; block='mamba2' takes 'auto', 'chunked' or "
                             "'sequential'")
        for layer in self.layers:
            layer.mixer.scan = scan


# ---- transformers interop ---------------------------------------------------------------------------
def config_from_hf_mamba(hf_config, *, max_seq_len: int = 1 << 20) -> ModelConfig:
    """A `ModelConfig(family="mamba")` for a transformers `MambaConfig`."""
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"only hidden_act='silu' Mamba models are supported, got {hf_config.hidden_act!r}")
    expand = hf_config.intermediate_size // hf_config.hidden_size
    if expand * hf_config.hidden_size != hf_config.intermediate_size:
        raise ValueError(f"intermediate_size={hf_config.intermediate_size} is not a multiple of hidden_size="
                         f"{hf_config.hidden_size}")
    return ModelConfig(name="hf-mamba", family="mamba", vocab_size=hf_config.vocab_size, dim=hf_config.hidden_size,
                       n_layer=hf_config.num_hidden_layers, n_head=1, norm_eps=hf_config.layer_norm_epsilon,
                       tie_embeddings=bool(hf_config.tie_word_embeddings), max_seq_len=max_seq_len,
                       intermediate_size=hf_config.intermediate_size,
                       extra=dict(d_state=hf_config.state_size, d_conv=hf_config.conv_kernel, expand=expand,
                                  dt_rank=int(hf_config.time_step_rank), conv_bias=bool(hf_config.use_conv_bias),
                                  bias=bool(hf_config.use_bias)))


def from_hf_mamba(hf_model, *, dtype: torch.dtype | None = None) -> Mamba:
    """An llmopt `Mamba` with a copy of the weights of a transformers `MambaForCausalLM`."""
    config = config_from_hf_mamba(hf_model.config)
    model = Mamba(config)
    sd = {}
    for key, value in hf_model.state_dict().items():
        name = key.removeprefix("backbone.")
        sd[name] = value.detach().clone()
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"transformers Mamba weights do not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if dtype is not None:
        model.to(dtype)
    return model.eval()
