"""Fused ops: RMSNorm, SwiGLU, RoPE, residual add + RMSNorm and chunked linear + cross-entropy.

Liger-Kernel (Hsu et al. 2024, arXiv:2410.10989) fuses each of these into one kernel; the largest
single saving is the fused linear + cross-entropy, which never builds the (tokens x vocabulary)
logits (`llmopt.kernels.fused_linear_cross_entropy`; Cut Cross-Entropy, Wijmans et al. 2024).

```python
report = apply_(model, FusedOpsConfig())                  # all fusions; Triton on CUDA, compiled on CPU
report = apply_(model, FusedOpsConfig(rope=False, backend="reference"))
```
Module swaps keep parameter names, so state dicts stay in the stock layout: `RMSNorm` ->
`FusedRMSNorm`, `FeedForward` -> `FusedFeedForward` (SwiGLU), `Attention` -> `RoPEFusedAttention`
(rotary embedding; a subclass, so a flash-attention technique composes with it), `Block` ->
`FusedBlock` (the attention residual add fused with the post-attention norm), and `model.loss_fn`
-> `fused_linear_cross_entropy` (in chunks of rows, forward and backward). `revert_` restores the
original classes and loss function.

Backends: "auto" (Triton on CUDA, else the CPU path), "reference" (the model's own math through
the fused modules: bit-identical except the chunked loss), "compiled" (each op under
`torch.compile`, and the chunked eager cross-entropy), "triton".

Numerics contract: tolerance. fp32: outputs within ~1e-6 relative of the stock model (fused and
reordered reductions); the chunked cross-entropy's loss and gradients within 1e-5 relative of the
full-logits loss (typically ~1e-7; tested up to a 256k vocabulary). bf16: within bf16 rounding.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from llmopt.core import ApplyReport, Stage, TechniqueConfig, fqn_filter, register, register_revert, replace_modules
from llmopt.kernels import add_rms_norm, fused_linear_cross_entropy, rms_norm, rope, swiglu
from llmopt.models.llama import Attention, Block, FeedForward, RMSNorm

__all__ = ["FusedBlock", "FusedFeedForward", "FusedOpsConfig", "FusedRMSNorm", "RoPEFusedAttention",
           "apply_fused_ops", "revert_fused_ops", "swap_class", "with_mixin"]


@dataclass(frozen=True, kw_only=True)
class FusedOpsConfig(TechniqueConfig):
    """Fused RMSNorm, SwiGLU, RoPE, residual add + norm and chunked linear + cross-entropy (Liger-Kernel style)."""

    rms_norm: bool = True
    """Swap RMSNorm modules for FusedRMSNorm."""
    swiglu: bool = True
    """Swap FeedForward modules for FusedFeedForward (silu(gate) * up in one op)."""
    rope: bool = True
    """Apply the rotary embedding of q and k with the fused kernel (Attention -> RoPEFusedAttention)."""
    residual_norm: bool = True
    """Fuse each block's attention residual add with its post-attention RMSNorm (Block -> FusedBlock)."""
    cross_entropy: bool = True
    """Replace model.loss_fn with the chunked fused linear + cross-entropy (no tokens x vocab logits)."""
    backend: Literal["auto", "reference", "compiled", "triton"] = "auto"
    """Kernel backend; "compiled" means torch.compile for the pointwise ops and the chunked eager loss."""
    chunk_size: int = 0
    """Rows per cross-entropy chunk; 0 chooses 16 MiB of fp32 logits per chunk."""
    include: tuple[str, ...] = ()
    """Swap only modules matching these fqn patterns (fqn_filter syntax); empty means all."""

    def __post_init__(self) -> None:
        if not (self.rms_norm or self.swiglu or self.rope or self.residual_norm or self.cross_entropy):
            raise ValueError("every fusion is off; enable at least one of rms_norm, swiglu, rope, residual_norm, "
                             "cross_entropy")
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = automatic), got {self.chunk_size}")


# ---- class swaps that keep the module's state -------------------------------------------------------

_MIXED: dict[tuple[type, type], type] = {}


def with_mixin(mixin: type, cls: type, prefix: str) -> type:
    """The class `prefix + cls.__name__` deriving from (mixin, cls), built once (so techniques stack)."""
    key = (mixin, cls)
    if key not in _MIXED:
        name = prefix + cls.__name__
        new = type(name, (mixin, cls), {"__module__": mixin.__module__, "__qualname__": name})
        _MIXED[key] = new
        sys.modules[mixin.__module__].__dict__.setdefault(name, new)  # picklable by name
    return _MIXED[key]


def swap_class(module: nn.Module, cls: type) -> nn.Module:
    """A module of class `cls` sharing `module`'s parameters, buffers, submodules and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


# ---- fused modules (parameter names unchanged) -------------------------------------------------------

class FusedRMSNorm(RMSNorm):
    """RMSNorm through `llmopt.kernels.rms_norm`."""

    fused_backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.fused_backend)


class FusedFeedForward(FeedForward):
    """SwiGLU feed-forward with silu(gate) * up fused."""

    fused_backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self.fused_backend))


class RoPEFusedAttentionMixin:
    """Attention whose rotary embedding runs through `llmopt.kernels.rope` (mixed into any Attention class)."""

    fused_backend = "auto"

    def forward(self, x, cos, sin, *, cache=None, input_pos=None, mask=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = rope(q, k, cos, sin, backend=self.fused_backend)
        if cache is None:
            y = self.attend(q, k, v, mask=None, is_causal=True)
        else:
            k, v = cache.update(self.layer_idx, input_pos, k, v)  # (B, nkv, L, hd)
            y = self.attend(q, k, v, mask=mask, is_causal=isinstance(mask, str))
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


RoPEFusedAttention = with_mixin(RoPEFusedAttentionMixin, Attention, "RoPEFused")


class FusedBlock(Block):
    """Block whose attention residual add and post-attention RMSNorm are one fused op."""

    fused_backend = "auto"

    def forward(self, x, cos, sin, *, cache=None, input_pos=None, mask=None) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache=cache, input_pos=input_pos, mask=mask)
        norm = self.post_attention_layernorm
        normed, h = add_rms_norm(a, x, norm.weight, norm.eps, backend=self.fused_backend)  # h = x + a
        return h + self.mlp(normed)


# ---- apply / revert -----------------------------------------------------------------------------------

def _ce_backend(backend: str) -> str:
    return {"compiled": "chunked"}.get(backend, backend)


@register(FusedOpsConfig, name="fused_ops", stage=Stage.SURGERY, workload="train")
def apply_fused_ops(model: nn.Module, config: FusedOpsConfig, *, filter_fn=None) -> ApplyReport:
    """Swap norms, feed-forwards, attention (RoPE) and blocks for fused subclasses; set the fused loss."""
    include = fqn_filter(config.include or None)

    def chosen(module: nn.Module, fqn: str) -> bool:
        return include(module, fqn) and (filter_fn is None or filter_fn(module, fqn))

    def to(cls):
        def build(module: nn.Module, fqn: str) -> nn.Module:
            new = swap_class(module, cls)
            new.fused_backend = config.backend
            return new
        return build

    policy: dict[type, object] = {}
    if config.rms_norm:
        policy[RMSNorm] = to(FusedRMSNorm)
    if config.swiglu:
        policy[FeedForward] = to(FusedFeedForward)
    if config.residual_norm:
        policy[Block] = to(FusedBlock)
    if config.rope:
        for module in model.modules():
            cls = type(module)
            if isinstance(module, Attention) and not isinstance(module, RoPEFusedAttentionMixin):
                policy[cls] = to(with_mixin(RoPEFusedAttentionMixin, cls, "RoPEFused"))
    skipped: dict[str, str] = {}
    changed: dict[str, tuple[str, str]] = {}
    originals: dict[str, type] = {}
    # one pass per class: a Block swap must not hide its norms and attention from the other policies
    for cls, build in policy.items():
        before = {fqn: type(m) for fqn, m in model.named_modules()}
        for fqn, change in replace_modules(model, {cls: build}, filter_fn=chosen, skipped=skipped).items():
            changed[fqn] = change
            originals[fqn] = before[fqn]
    report = ApplyReport(changed=changed, skipped=skipped)
    report.revert_state["classes"] = originals
    if config.cross_entropy:
        loss_fn = getattr(model, "loss_fn", None)
        if loss_fn is None:
            skipped["loss_fn"] = "the model has no loss_fn attribute (the llmopt model contract) to replace"
        else:
            report.revert_state["loss_fn"] = loss_fn
            model.loss_fn = functools.partial(fused_linear_cross_entropy, backend=_ce_backend(config.backend),
                                              chunk_size=config.chunk_size or None)
            changed["loss_fn"] = (getattr(loss_fn, "__name__", type(loss_fn).__name__), "fused_linear_cross_entropy")
    report.notes.append(f"backend={config.backend}; parameter names and state_dict keys unchanged")
    return report


@register_revert(FusedOpsConfig)
def revert_fused_ops(model: nn.Module, report: ApplyReport) -> ApplyReport:
    """Restore the original module classes (same parameters) and loss function."""
    changed = {}
    for fqn, cls in sorted(report.revert_state["classes"].items(), key=lambda kv: -kv[0].count(".")):
        from llmopt.core import get_submodule_parent

        parent, attr = get_submodule_parent(model, fqn)
        module = getattr(parent, attr)
        old = swap_class(module, cls)
        old.__dict__.pop("fused_backend", None)
        setattr(parent, attr, old)
        changed[fqn] = report.changed[fqn][::-1]
    if "loss_fn" in report.revert_state:
        model.loss_fn = report.revert_state["loss_fn"]
        changed["loss_fn"] = report.changed["loss_fn"][::-1]
    return ApplyReport(changed=changed)
