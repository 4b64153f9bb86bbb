"""LoRA: train a low-rank update beside frozen Linear weights (Hu et al. 2021, arXiv:2106.09685).

`apply_(model, LoRAConfig(r=8))` swaps each chosen `nn.Linear` for a `LoRALinear`, which keeps the
same `weight` and `bias` Parameters (no copy, same state-dict names) and adds `lora_A` (r, in) and
`lora_B` (out, r):

    y = x W^T + b + (dropout(x) A^T) B^T * alpha / r

`lora_B` starts at zero and `lora_A` Kaiming-uniform, so the outputs at apply time are exactly the
base model's. Every parameter except the adapters is frozen (`report.trainable_after`).

Numerics contract: exact at apply (B = 0: the added term is an exact zero); `revert_` restores the
original modules and `requires_grad` flags, exactly; `merge_(model)` folds `B A * alpha / r` into the
weight and swaps back to `nn.Linear` (outputs within fp32 rounding, 1e-5, of the unmerged model).

The forward computes the low-rank path on the flattened (N, in) input and adds it into the base
output inside one `addmm` (no separate scale and add passes). Adapters save and load on their own:
`llmopt.techniques.adapters_io.save_adapters` / `load_adapters`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.core import (
    ApplyReport,
    Stage,
    TechniqueConfig,
    applied_techniques,
    fqn_filter,
    freeze_all_but,
    register,
    register_revert,
    replace_modules,
    revert_,
)
from llmopt.core.registry import entry_for_config

logger = logging.getLogger("llmopt")

ADAPTER_PREFIX = "lora_"
"""Every adapter parameter's name starts with this (`lora_A`, `lora_B`, `lora_magnitude`): they train."""
ADAPTER_TECHNIQUES = ("lora", "dora", "qlora")
"""Techniques whose adapters `merge_` folds and `adapters_io` saves."""
_MERGE_FLAG = "_llmopt_merge_adapters"  # set by merge_ on the model, read (and removed) by the revert handlers


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(TechniqueConfig):
    """LoRA: frozen Linear weights plus a trainable rank-r update B A (Hu et al. 2021)."""

    r: int = 8
    """Rank of the update B A."""
    alpha: float = 16.0
    """The update is scaled by alpha / r (so changing r does not change the learning rate to use)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only); 0 disables it."""
    target: tuple[str, ...] = ("q_proj", "v_proj")
    """Linear modules to adapt: names, dotted suffixes (`q_proj`), `re:<regex>`, or `all-linear` (every Linear
    but the output layer). The default, the attention query and value projections, is the LoRA paper's
    setting (Hu et al. §4.2/§7.1) and PEFT's default for Llama models."""
    exclude: tuple[str, ...] = ("lm_head",)
    """Modules left alone even if `target` matches them (same pattern syntax)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r must be a positive rank, got {self.r}; use r=8 or r=16")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}; alpha=2*r is a common choice")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}; use 0.0 or 0.05")
        if not self.target:
            raise ValueError("target is empty; name modules (q_proj|v_proj) or use all-linear")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def add_lora_(y: torch.Tensor, x2d: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
              dropout: float, training: bool) -> torch.Tensor:
    """y + (dropout(x) A^T) B^T * scale, added inside one addmm, in place into y (a fresh base output).

    In place is safe: the matmul that made y saves its inputs, not y. Under autocast or mixed dtypes
    the add is out of place in y's dtype.
    """
    if dropout and training:
        x2d = F.dropout(x2d, p=dropout, training=True)
    xa = F.linear(x2d, lora_A)  # (N, r)
    if y.dtype == xa.dtype == lora_B.dtype:
        return y.addmm_(xa, lora_B.t(), alpha=scale)
    return torch.addmm(y, xa.to(y.dtype), lora_B.t().to(y.dtype), alpha=scale)


def lora_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scale: float, dropout: float, training: bool) -> torch.Tensor:
    """(N, in) -> (N, out): x W^T + b + (dropout(x) A^T) B^T * scale."""
    return add_lora_(F.linear(x2d, weight, bias), x2d, lora_A, lora_B, scale, dropout, training)


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`/`bias` Parameters) plus a trainable low-rank update."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int, alpha: float,
                 dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r, self.alpha, self.dropout, self.scale = r, alpha, dropout, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.reset_adapter()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """A LoRALinear sharing `linear`'s weight and bias Parameters (adapters on the weight's device)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, r=r, alpha=alpha,
                  dropout=dropout, device="meta", dtype=linear.weight.dtype)
        new.weight, new.bias = linear.weight, linear.bias
        device = linear.weight.device
        new.lora_A = nn.Parameter(torch.empty_like(new.lora_A, device=device))
        new.lora_B = nn.Parameter(torch.empty_like(new.lora_B, device=device))
        new.reset_adapter()
        new.train(linear.training)
        return new

    def reset_adapter(self) -> None:
        """A Kaiming-uniform (as nn.Linear and PEFT), B zero: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def reset_parameters(self) -> None:  # nn.Linear.__init__ calls it before the adapters exist
        if not self.weight.is_meta:
            super().reset_parameters()

    def delta_weight(self) -> torch.Tensor:
        """B A * scale, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)  # (N, in), a view for contiguous x
        y = lora_forward(x2d, self.weight, self.bias, self.lora_A, self.lora_B, self.scale, self.dropout,
                         self.training)
        return y.view(*x.shape[:-1], self.out_features)

    def to_linear(self, *, merge: bool) -> nn.Linear:
        """The plain nn.Linear: the same Parameters (revert), or the weight with B A * scale folded in (merge)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=self.weight.dtype)
        if merge:
            with torch.no_grad():
                self.weight.add_(self.delta_weight().to(self.weight.dtype))
        linear.weight, linear.bias = self.weight, self.bias
        linear.train(self.training)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}"


def apply_adapters(model: nn.Module, *, target: tuple[str, ...], exclude: tuple[str, ...],
                   build: Callable[[nn.Module, str], nn.Module], filter_fn=None,
                   sources: tuple[type, ...] = (nn.Linear,)) -> ApplyReport:
    """Swap the selected modules with `build(module, fqn)` and freeze everything but the adapters.

    Shared by lora, dora and qlora. `report.revert_state["requires_grad"]` keeps the flags to restore.
    """
    select = fqn_filter(include=target, exclude=exclude)

    def policy(module: nn.Module, fqn: str) -> nn.Module | None:
        if filter_fn is not None and not filter_fn(module, fqn):
            return None
        return build(module, fqn)

    flags = {fqn: p.requires_grad for fqn, p in model.named_parameters()}
    skipped: dict[str, str] = {}
    changed = replace_modules(model, {cls: policy for cls in sources}, filter_fn=select, skipped=skipped)
    if changed:
        freeze_all_but(model, ADAPTER_PREFIX)
    return ApplyReport(changed=changed, skipped=skipped, revert_state={"requires_grad": flags})


def revert_adapters(model: nn.Module, report: ApplyReport,
                    unwrap: dict[type, Callable[[nn.Module, bool], nn.Module]]) -> ApplyReport:
    """Swap adapter modules back with `unwrap[cls](module, merge)`; restore the requires_grad flags."""
    merge = bool(model.__dict__.pop(_MERGE_FLAG, False))
    policy = {cls: (lambda fn: lambda m, fqn: fn(m, merge))(fn) for cls, fn in unwrap.items()}
    changed = replace_modules(model, policy, filter_fn=lambda m, fqn: fqn in report.changed)
    flags = report.revert_state.get("requires_grad", {})
    for fqn, p in model.named_parameters():
        if fqn in flags:
            p.requires_grad_(flags[fqn])
    return ApplyReport(changed=changed, notes=["adapters merged into the weights"] if merge else [])


def merge_(model: nn.Module, technique: str | None = None) -> ApplyReport:
    """Fold the adapters of lora, dora or qlora into the base weights and remove them; returns the report.

    The technique is taken off `model.applied_techniques` (the model is a plain model again, with new
    weights). With several adapter techniques applied, name the one to merge (the last applied).
    """
    applied = []
    for config in applied_techniques(model):
        entry = entry_for_config(config)
        if entry is not None and entry.name in ADAPTER_TECHNIQUES:
            applied.append(entry.name)
    if technique is None:
        if not applied:
            raise ValueError("merge_: no adapters on this model; apply lora, dora or qlora first")
        technique = applied[-1]
    elif technique not in applied:
        raise ValueError(f"merge_: {technique!r} is not applied to this model; applied adapters: "
                         f"{', '.join(applied) or 'none'}")
    model.__dict__[_MERGE_FLAG] = True
    try:
        report = revert_(model, technique)
    finally:
        model.__dict__.pop(_MERGE_FLAG, None)
    report.technique = f"merge {technique}"
    return report


@register(LoRAConfig, name="lora", stage=Stage.SURGERY, workload="train")
def apply_lora(model: nn.Module, config: LoRAConfig, *, filter_fn=None) -> ApplyReport:
    """Swap the target nn.Linear modules for LoRALinear and freeze everything but the adapters."""
    def build(module: nn.Module, fqn: str) -> LoRALinear:
        return LoRALinear.from_linear(module, r=config.r, alpha=config.alpha, dropout=config.dropout)

    report = apply_adapters(model, target=config.target, exclude=config.exclude, build=build, filter_fn=filter_fn)
    report.notes.append(f"B=0 at init (outputs unchanged); only lora_A/lora_B train, scale alpha/r={config.scale:g}")
    return report


@register_revert(LoRAConfig)
def revert_lora(model: nn.Module, report: ApplyReport) -> ApplyReport:
    """Swap LoRALinear back to nn.Linear (same Parameters, or merged when called through merge_)."""
    return revert_adapters(model, report, {LoRALinear: lambda m, merge: m.to_linear(merge=merge)})


__all__ = ["LoRAConfig", "LoRALinear", "add_lora_", "apply_lora", "lora_forward", "merge_", "revert_lora"]
