"""RetNet: multi-scale retention (Sun et al. 2023, "Retentive Network", arXiv 2307.08621), top to bottom.

One block: x = x + MSR(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)), where multi-scale retention per head h is
    q, k = rotary(x W_Q) * d^-0.5, rotary(x W_K)     # (B, H, T, d)   (the paper's Θ = e^{i n θ})
    v = x W_V                                        # (B, H, T, d_v), d_v = value_factor * d
    retention(q, k, v) = (q k^T ⊙ D) v,  D_nm = γ_h^(n-m) for n >= m, else 0,  γ_h = 1 - 2^(-5-h)
    y = GroupNorm_h(retention)                       # per head, no affine
    MSR(x) = (swish(x W_G) ⊙ y) W_O
Three equivalent forms (`retention_parallel`, `retention_recurrent_step`, `retention_chunkwise`):
- parallel (training): the T x T decay-masked matrix above;
- recurrent (decoding, constant memory): S_n = γ S_{n-1} + k_n^T v_n, o_n = q_n S_n, S (B, H, d, d_v);
- chunkwise (long sequences): inside a chunk the parallel form, across chunks the state,
  o_chunk = (q k^T ⊙ D) v + (q ⊙ γ^(j+1)) S,  S <- γ^L S + (k ⊙ γ^(L-1-j))^T v.

Deviations from the paper, chosen so that the forms agree exactly: no xPos length scaling (the decay γ
plays its role, as in torchscale's later RetNet) and no extra normalization of D or of q k^T (the
per-head GroupNorm is invariant to those scales up to its eps; the paper adds them for fp16 range).
RMSNorm and SwiGLU instead of LayerNorm and GELU FFN, to match llmopt's transformer for comparison.

Numerics contract: the three forms compute the same sums in a different order and agree to about 1e-6
in fp32 (tested at 1e-5 for chunk sizes 1, 16, 64 and the full length). The recurrent state is fp32.

Family settings (`ModelConfig.extra`): `value_factor` (2), `form` ("parallel" or "chunkwise": the
full-sequence forward), `chunk_size` (64: chunkwise form and cached prefill).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.models.config import ModelConfig
from llmopt.models.contract import CausalLM
from llmopt.models.llama import FeedForward, RMSNorm, rotate_half
from llmopt.models.loss import linear_cross_entropy

RETNET_DEFAULTS = dict(value_factor=2, chunk_size=64, form="parallel")


def retnet_settings(config: ModelConfig) -> dict:
    unknown = set(config.extra) - set(RETNET_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown retnet settings {sorted(unknown)} in model.extra; valid: {sorted(RETNET_DEFAULTS)}")
    s = {**RETNET_DEFAULTS, **config.extra}
    if int(s["value_factor"]) <= 0 or int(s["chunk_size"]) <= 0:
        raise ValueError(f"model.extra value_factor and chunk_size must be positive, got {s}")
    if s["form"] not in ("parallel", "chunkwise"):
        raise ValueError(f"model.extra.form must be 'parallel' or 'chunkwise', got {s['form']!r}")
    return s


def head_decays(n_head: int) -> torch.Tensor:
    """log γ_h for γ_h = 1 - 2^(-5-h), h = 0..n_head-1 (fp32, shape (n_head,))."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(n_head, dtype=torch.float32)))


# ---- the three forms ------------------------------------------------------------------------------
def _decay_matrix(log_gamma: torch.Tensor, T: int) -> torch.Tensor:
    """D (H, T, T): γ^(n-m) for n >= m, 0 above the diagonal."""
    n = torch.arange(T, device=log_gamma.device, dtype=torch.float32)
    diff = n[:, None] - n[None, :]
    return torch.exp(diff.clamp(min=0) * log_gamma[:, None, None]) * (diff >= 0)


def retention_parallel(q, k, v, log_gamma, state=None):
    """q/k (B, H, T, d), v (B, H, T, dv), log_gamma (H,), state (B, H, d, dv) or None
    -> (out (B, H, T, dv), state after the T positions)."""
    T = q.size(2)
    D = _decay_matrix(log_gamma, T)  # (H, T, T)
    out = ((q @ k.transpose(-1, -2)) * D) @ v  # (B, H, T, dv)
    j = torch.arange(T, device=q.device, dtype=torch.float32)
    if state is not None:  # what the earlier positions left: (q ⊙ γ^(j+1)) S
        out = out + (q * torch.exp((j + 1)[:, None] * log_gamma[:, None, None])) @ state
    k_decay = k * torch.exp((T - 1 - j)[:, None] * log_gamma[:, None, None])  # (B, H, T, d)
    new_state = k_decay.transpose(-1, -2) @ v  # (B, H, d, dv)
    if state is not None:
        new_state = new_state + torch.exp(T * log_gamma)[:, None, None] * state
    return out, new_state


def retention_chunkwise(q, k, v, log_gamma, state=None, chunk_size: int = 64):
    """Same contract as `retention_parallel`, chunk by chunk: memory linear in T."""
    B, H, T, d = q.shape
    if state is None:
        state = q.new_zeros(B, H, d, v.size(-1))
    outs = []
    for start in range(0, T, chunk_size):
        end = min(T, start + chunk_size)
        out, state = retention_parallel(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], log_gamma, state)
        outs.append(out)
    return torch.cat(outs, dim=2), state


def retention_recurrent_step(q, k, v, log_gamma, state):
    """One position: q/k (B, H, d), v (B, H, dv), state (B, H, d, dv) -> (out (B, H, dv), new state)."""
    state = torch.exp(log_gamma)[:, None, None] * state + k[..., :, None] * v[..., None, :]
    return (q[..., None, :] @ state).squeeze(-2), state


def retention_recurrent(q, k, v, log_gamma, state=None):
    """The recurrent form over a whole sequence (the oracle for the other two)."""
    B, H, T, d = q.shape
    if state is None:
        state = q.new_zeros(B, H, d, v.size(-1))
    outs = []
    for t in range(T):
        out, state = retention_recurrent_step(q[:, :, t], k[:, :, t], v[:, :, t], log_gamma, state)
        outs.append(out)
    return torch.stack(outs, dim=2), state


def rotary_tables(pos: torch.Tensor, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, d) fp32, of the rotary embedding at integer positions pos (T,)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d))
    freqs = pos.to(torch.float32)[:, None] * inv_freq  # (T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotary(x: torch.Tensor, pos: torch.Tensor, theta: float, tables=None) -> torch.Tensor:
    """Rotary embedding (rotate_half layout) of x (B, H, T, d) at integer positions pos (T,); `tables` =
    `rotary_tables(pos, d, theta)` when the caller has them (the model computes them once per forward)."""
    cos, sin = rotary_tables(pos, x.size(-1), theta) if tables is None else tables
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


# ---- the model ------------------------------------------------------------------------------------
class MultiScaleRetention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        s = retnet_settings(config)
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.value_dim = s["value_factor"] * config.head_dim
        self.form, self.chunk_size, self.theta, self.eps = s["form"], s["chunk_size"], config.rope_theta, config.norm_eps
        inner = self.n_head * self.head_dim
        self.q_proj = nn.Linear(config.dim, inner, bias=False)
        self.k_proj = nn.Linear(config.dim, inner, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_head * self.value_dim, bias=False)
        self.g_proj = nn.Linear(config.dim, self.n_head * self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.value_dim, config.dim, bias=False)
        self.retention_fn = None
        """Optional replacement of the full-sequence form (same contract as `retention_chunkwise` without
        chunk_size), e.g. the Triton kernel installed by `llmopt.kernels.retention.use_triton_retention_`."""

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache=None, shared: dict | None = None) -> torch.Tensor:
        """`shared` (optional): {"rope": rotary_tables(pos, ...), "log_gamma": head_decays(...)} computed once
        per model forward instead of once per layer (a decode step is a few hundred small ops)."""
        B, T, _ = x.shape
        dtype = x.dtype
        shared = shared or {}
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.value_dim).transpose(1, 2)  # (B, H, T, dv)
        rope = shared.get("rope")
        q = rotary(q.float(), pos, self.theta, rope) * self.head_dim ** -0.5
        k, v = rotary(k.float(), pos, self.theta, rope), v.float()
        log_gamma = shared.get("log_gamma")
        if log_gamma is None:  # not a buffer: nothing to rebuild after loading
            log_gamma = head_decays(self.n_head).to(q.device)
        state = None if cache is None else cache.state[self.layer_idx]
        if cache is not None and T == 1:
            y, state = retention_recurrent_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], log_gamma, state)
            y = y[:, :, None]
        elif self.retention_fn is not None:
            y, state = self.retention_fn(q, k, v, log_gamma, state)
        elif self.form == "chunkwise" or cache is not None:
            y, state = retention_chunkwise(q, k, v, log_gamma, state, chunk_size=self.chunk_size)
        else:
            y, state = retention_parallel(q, k, v, log_gamma)
        if cache is not None:
            cache.state[self.layer_idx] = state
        y = F.layer_norm(y, (self.value_dim,), eps=self.eps)  # GroupNorm: one group per head, no affine
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.value_dim).to(dtype)
        return self.o_proj(F.silu(self.g_proj(x)) * y)


class RetNetBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.retention = MultiScaleRetention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache=None, shared: dict | None = None) -> torch.Tensor:
        x = x + self.retention(self.input_layernorm(x), pos, cache=cache, shared=shared)
        return x + self.mlp(self.post_attention_layernorm(x))


class RetNet(CausalLM):
    """RetNet language model behind the model contract: `logits = model(idx, *, input_pos=None, cache=None)`.

    With a `RetNetCache` (`llmopt.inference.make_cache(model, batch_size)`) positions must continue the
    cache; a prompt runs chunkwise from the state, a single token takes the recurrent step.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.family != "retnet":
            raise ValueError(f"RetNet needs model.family='retnet', got {config.family!r}")
        self.config = config
        self.settings = retnet_settings(config)
        self.value_head_dim = self.settings["value_factor"] * config.head_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(RetNetBlock(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.loss_fn = linear_cross_entropy
        """Loss on (hidden (N, dim), weight (V, dim), targets (N,)) -> (sum of token losses, token count)."""
        self.applied_techniques: list = []
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std), residual projections scaled by 1/sqrt(2 n_layer), norms at 1."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj", "down_proj")) else 1.0
                module.weight.normal_(0.0, std * scale, generator=generator)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def set_form(self, form: str, chunk_size: int | None = None) -> None:
        """Switch every layer's full-sequence form ("parallel" or "chunkwise"), optionally its chunk size."""
        if form not in ("parallel", "chunkwise"):
            raise ValueError(f"form must be 'parallel' or 'chunkwise', got {form!r}")
        for layer in self.layers:
            layer.retention.form = form
            if chunk_size is not None:
                layer.retention.chunk_size = chunk_size

    def hidden_states(self, idx: torch.Tensor, *, input_pos: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        B, T = idx.shape
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than model.max_seq_len={self.config.max_seq_len}")
            if input_pos is not None and int(input_pos[0]) != 0:
                raise ValueError("RetNet without a cache runs whole sequences from position 0; pass a RetNetCache")
            pos = torch.arange(T, device=idx.device)
        else:
            if input_pos is None:
                raise ValueError("input_pos is required with a cache: pass the absolute positions of idx, shape (T,)")
            cache.check_model(self)
            cache.advance(input_pos, batch_size=B)
            pos = input_pos
        x = self.embed_tokens(idx)  # (B, T, dim)
        c = self.config
        shared = {"rope": rotary_tables(pos, c.head_dim, c.rope_theta),
                  "log_gamma": head_decays(c.n_head).to(idx.device)}  # the same in every layer
        for layer in self.layers:
            x = layer(x, pos, cache=cache, shared=shared)
        return self.norm(x)

