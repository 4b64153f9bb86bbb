"""Mamba-2: the SSD block (Dao and Gu 2024, "Transformers are SSMs", arXiv 2405.21060), a second block type
of the `mamba` family (`ModelConfig.extra["block"] = "mamba2"`; the model is `llmopt.models.mamba.Mamba`).

One mixer, ngroups = 1 (B and C shared by every head):
    z, xBC, dt = in_proj(h).split(d_inner, d_inner + 2 d_state, n_heads)
    x, B, C = silu(depthwise causal conv1d(xBC)).split(d_inner, d_state, d_state)
    dt = softplus(dt + dt_bias)                           # (B, T, H): one step size per head
    h_t = exp(dt_t a) h_{t-1} + dt_t x_t B_t^T            # state (B, H, P, N); a = -exp(A_log) a scalar per head
    y_t = h_t C_t + D x_t                                 # (B, H, P)
    out = out_proj(rmsnorm(y * silu(z)))                  # gated RMSNorm, then the residual add in the block
A is a scalar times the identity, so the decay between two steps is one number per head, and a chunk of
L steps is a masked matrix product (the "state space dual"): three evaluation paths of the same recurrence,
- `ssd_sequential`: one step at a time (the oracle);
- `ssd_chunked` (training and prefill, default): per chunk, the decays exp(segsum) = exp(cs_t - cs_s) (cs the
  cumulative sum of dt a inside the chunk; every exponent <= 0, so nothing overflows whatever the weights)
  form an (L, L) lower-triangular matrix per head; intra-chunk outputs are (C B^T ⊙ decay) (dt x), two
  batched matmuls; the state entering the chunk adds exp(cs_t) C_t h_0; the state leaving is
  exp(cs_L) h_0 + Σ_s exp(cs_L - cs_s) dt_s x_s B_s^T; a short loop over chunks carries it;
- `ssd_step` (decoding): one step from the constant-size state in the cache.

Numerics contract: the three paths compute the same recurrence in fp32 in a different order; they agree to
about 1e-6 (tested at 1e-5). The state is fp32 whatever the weight dtype.

Cache: a `MambaCache` (`llmopt.inference.make_cache`), sized from `Mamba.settings`: its conv state holds the
last d_conv - 1 inputs of the conv over (x, B, C) (`conv_dim` channels), its SSM state is (B, conv_dim,
d_state) of which the first d_inner rows hold the (H, P, N) state (the 2 d_state rows past them are unused:
2 KB per layer at the demo size; a cache class of its own would drop them).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.models.config import ModelConfig


# ---- the three scans -----------------------------------------------------------------------------------
def ssd_step(h, x, dt, a, Bm, Cm) -> tuple[torch.Tensor, torch.Tensor]:
    """One step. h (B, H, P, N) fp32, x (B, H, P), dt (B, H), a (H,), Bm/Cm (B, N) -> (y (B, H, P), new h)."""
    decay = torch.exp(dt * a)[..., None, None]  # (B, H, 1, 1)
    h = decay * h + (dt[..., None] * x)[..., None] * Bm[:, None, None, :]
    return torch.einsum("bhpn,bn->bhp", h, Cm), h


def ssd_sequential(x, dt, a, Bm, Cm, h0=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, H, P), dt (B, T, H), a (H,), Bm/Cm (B, T, N), h0 (B, H, P, N) or None -> (y (B, T, H, P), h)."""
    Bsz, T, H, P = x.shape
    h = x.new_zeros(Bsz, H, P, Bm.size(-1)) if h0 is None else h0
    ys = []
    for t in range(T):
        y, h = ssd_step(h, x[:, t], dt[:, t], a, Bm[:, t], Cm[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), h


def ssd_chunked(x, dt, a, Bm, Cm, h0=None, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `ssd_sequential`, a chunk of `chunk_size` steps at a time in the matrix form."""
    Bsz, T, H, P = x.shape
    N = Bm.size(-1)
    h = x.new_zeros(Bsz, H, P, N) if h0 is None else h0
    ys = []
    for start in range(0, T, chunk_size):
        end = min(T, start + chunk_size)
        y, h = _ssd_chunk(x[:, start:end], dt[:, start:end], a, Bm[:, start:end], Cm[:, start:end], h)
        ys.append(y)
    return torch.cat(ys, dim=1), h


def _ssd_chunk(x, dt, a, Bm, Cm, h):
    """x (B, L, H, P), dt (B, L, H), Bm/Cm (B, L, N), h (B, H, P, N) entering -> (y (B, L, H, P), h leaving)."""
    L = x.size(1)
    cs = torch.cumsum(dt * a, dim=1).transpose(1, 2)  # (B, H, L): log decay from the chunk start, <= 0
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril_()
    # decay[t, s] = exp(cs_t - cs_s) for s <= t, else 0; the masked exponents are set to -inf before exp so
    # no exp(positive) is ever computed (and the backward sees no inf * 0)
    seg = (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, float("-inf"))  # (B, H, L, L)
    decay = torch.exp(seg)
    xdt = x * dt[..., None]  # (B, L, H, P)
    scores = torch.matmul(Cm, Bm.transpose(1, 2))[:, None] * decay  # (B, H, L, L): (C_t . B_s) exp(cs_t - cs_s)
    y = torch.matmul(scores, xdt.transpose(1, 2))  # (B, H, L, P): the intra-chunk part
    y = y + torch.exp(cs)[..., None] * torch.einsum("bln,bhpn->bhlp", Cm, h)  # + what the entering state gives
    to_end = torch.exp(cs[..., -1:] - cs)  # (B, H, L): decay from step s to the chunk's end
    h = torch.exp(cs[..., -1])[..., None, None] * h + torch.einsum("bhl,blhp,bln->bhpn", to_end, xdt, Bm)
    return y.transpose(1, 2), h


# ---- the mixer -----------------------------------------------------------------------------------------
class RMSNormGated(nn.Module):
    """rmsnorm(y * silu(z)) * weight, in fp32 (Mamba-2's gated norm, norm_before_gate=False)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y.float() * F.silu(z.float())
        return y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, settings: dict) -> None:
        super().__init__()
        s = settings
        self.layer_idx = layer_idx
        self.d_inner, self.d_state, self.d_conv = s["d_inner"], s["d_state"], s["d_conv"]
        self.headdim, self.n_heads, self.conv_dim = s["headdim"], s["n_heads"], s["conv_dim"]
        self.chunk_size, self.scan = s["chunk_size"], s["scan"]
        self.in_proj = nn.Linear(config.dim, self.d_inner + self.conv_dim + self.n_heads, bias=s["bias"])
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, bias=s["conv_bias"],
                                padding=self.d_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = RMSNormGated(self.d_inner, config.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.dim, bias=s["bias"])

    @torch.no_grad()
    def init_ssm_(self, generator: torch.Generator | None = None) -> None:
        """a = -uniform(1, 16) per head (log-stored), dt in [1e-3, 1e-1] log-uniform via dt_bias, D = 1."""
        dev = self.A_log.device
        self.A_log.copy_(torch.log(torch.rand(self.n_heads, generator=generator, device=dev) * 15 + 1))
        u = torch.rand(self.n_heads, generator=generator, device=dev)
        dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def forward(self, hidden: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, _ = hidden.shape
        dtype = hidden.dtype
        z, xBC, dt = torch.split(self.in_proj(hidden), [self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xBC = xBC.transpose(1, 2)  # (B, conv_dim, T)
        if cache is None:
            xBC = self.conv1d(xBC)[..., :T]
        else:  # the conv state holds the previous d_conv - 1 inputs (zeros at the start = the zero padding)
            full = torch.cat([cache.conv[self.layer_idx].to(xBC.dtype), xBC], dim=-1)
            cache.conv[self.layer_idx] = full[..., full.size(-1) - (self.d_conv - 1):].to(cache.dtype)
            xBC = F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        xBC = F.silu(xBC).transpose(1, 2)  # (B, T, conv_dim)
        x, Bm, Cm = torch.split(xBC.float(), [self.d_inner, self.d_state, self.d_state], dim=-1)
        x = x.reshape(B, T, self.n_heads, self.headdim)  # (B, T, H, P)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, T, H)
        a = -torch.exp(self.A_log.float())  # (H,)
        h0 = None
        if cache is not None:  # the first d_inner rows of the (B, conv_dim, N) state are the (H, P, N) state
            h0 = cache.ssm[self.layer_idx][:, :self.d_inner].view(B, self.n_heads, self.headdim, self.d_state)
        if cache is not None and T == 1:
            y, h = ssd_step(h0, x[:, 0], dt[:, 0], a, Bm[:, 0], Cm[:, 0])
            y = y[:, None]
        elif self.scan == "sequential":
            y, h = ssd_sequential(x, dt, a, Bm, Cm, h0)
        else:
            y, h = ssd_chunked(x, dt, a, Bm, Cm, h0, chunk_size=self.chunk_size)
        if cache is not None:
            cache.ssm[self.layer_idx][:, :self.d_inner] = h.reshape(B, self.d_inner, self.d_state)
        y = y + x * self.D.float()[:, None]  # (B, T, H, P)
        y = self.norm(y.reshape(B, T, self.d_inner), z)
        return self.out_proj(y.to(dtype))
