"""A Llama-style decoder that reads top to bottom.

RMSNorm, rotary position embedding (the `rotate_half` layout of Hugging Face Llama, so weights load
without permutation), SwiGLU feed-forward, grouped-query attention through
`F.scaled_dot_product_attention`, optional tied embeddings. Module names follow `transformers`'
`LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`, `lm_head`, ...) minus its `model.` prefix, so
techniques target the same names on both.

The model contract (DESIGN.md §4): `logits = model(idx, *, input_pos=None, cache=None)`.
With no cache it is the plain causal training forward over `idx` of shape (B, T). With a cache
(`llmopt.inference.KVCache` or anything with its interface), `input_pos` (T,) holds the absolute
positions of the tokens in `idx`; keys and values are written to the cache and attention reads back
what the cache returns, masked as the cache says.

Training computes the loss through `model.loss(idx, targets)`, which calls `model.loss_fn` on the final
hidden states and the output weight: a fused linear + cross-entropy can replace `loss_fn` without the
full logits ever existing.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.models.config import ModelConfig
from llmopt.models.contract import CausalLM
from llmopt.models.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in fp32 (as transformers does), scale in the input dtype
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    pos = torch.arange(max_seq_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(pos, inv_freq)  # (L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, nh, T, hd), k (B, nkv, T, hd), cos/sin (T, hd) already gathered at the positions."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, *, cache=None, input_pos=None, mask=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, k, cos, sin)
        if cache is None:
            y = self.attend(q, k, v, mask=None, is_causal=True)
        elif hasattr(cache, "attend"):  # a quantized cache attends over its own storage, chunk by chunk
            cache.update(self.layer_idx, input_pos, k, v)
            y = cache.attend(self.layer_idx, q, mask)
        else:
            k, v = cache.update(self.layer_idx, input_pos, k, v)  # (B, nkv, L, hd)
            y = self.attend(q, k, v, mask=mask, is_causal=isinstance(mask, str))
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)

    def attend(self, q, k, v, *, mask, is_causal: bool) -> torch.Tensor:
        """Scaled dot-product attention; a flash-attention technique replaces this method's module."""
        attn_mask = None if isinstance(mask, str) else mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None,
                                              enable_gqa=self.n_kv_head != self.n_head)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.dim, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x, cos, sin, *, cache=None, input_pos=None, mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache=cache, input_pos=input_pos, mask=mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Transformer(CausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta,
                               device=self.embed_tokens.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.loss_fn = linear_cross_entropy
        """Loss on (hidden (N, dim), weight (V, dim), targets (N,)) -> (sum of token losses, token count)."""
        self.applied_techniques: list = []
        """Technique configs applied by `llmopt.apply_`, in order (saved with checkpoints)."""
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    # ---- construction -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) weights, residual projections scaled by 1/sqrt(2 n_layer), norms at 1.

        Also rebuilds the rotary tables, so a model built on `meta` and moved with `to_empty` is usable.
        """
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj", "down_proj")) else 1.0
                module.weight.normal_(0.0, std * scale, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        self.reset_rope()

    def reset_rope(self) -> None:
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta,
                               device=self.rope_cos.device)
        self.rope_cos, self.rope_sin = cos, sin

    # ---- forward ------------------------------------------------------------------------
    def hidden_states(self, idx: torch.Tensor, *, input_pos: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Final normalized hidden states (B, T, dim): everything but the output projection."""
        B, T = idx.shape
        if input_pos is None:
            if cache is not None:
                raise ValueError("input_pos is required with a cache: pass the absolute positions of idx, shape (T,)")
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than model.max_seq_len={self.config.max_seq_len}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            mask = None
        else:
            if not torch.compiler.is_compiling() and int(input_pos.max()) >= self.config.max_seq_len:
                raise ValueError(f"position {int(input_pos.max())} is beyond model.max_seq_len={self.config.max_seq_len}")
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = cache.attn_mask(input_pos) if cache is not None else "causal"
        x = self.embed_tokens(idx)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, cache=cache, input_pos=input_pos, mask=mask)
        return self.norm(x)

