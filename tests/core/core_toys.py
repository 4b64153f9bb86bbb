"""Toy techniques for the core tests (registered per test by the `toys` fixture of conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from llmopt.core import ApplyReport, Hook, SkipModule, TechniqueConfig, fqn_filter, replace_modules


class ScaledLinear(nn.Module):
    """A Linear whose output is multiplied by a constant."""

    def __init__(self, inner: nn.Linear, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


@dataclass(frozen=True, kw_only=True)
class ScaleLinearConfig(TechniqueConfig):
    """Multiply the outputs of Linear layers by a constant (a toy surgery)."""

    scale: float = 2.0
    """Factor applied to the outputs."""
    include: tuple[str, ...] = ("all-linear",)
    """Modules to wrap (fqn_filter syntax)."""
    exclude: tuple[str, ...] = ()
    """Modules to leave alone."""
    mode: Literal["mul", "noop"] = "mul"
    """'noop' skips every module (to test skip reasons)."""
    limit: int | None = None
    """Wrap at most this many modules."""

    def __post_init__(self) -> None:
        if self.scale == 0:
            raise ValueError("scale must be nonzero; use scale=1.0 for an identity")


def apply_scale_linear(model, config: ScaleLinearConfig, *, filter_fn=None) -> ApplyReport:
    select = fqn_filter(include=config.include, exclude=config.exclude)
    count = [0]

    def swap(module, fqn):
        if config.mode == "noop":
            raise SkipModule("noop mode")
        if config.limit is not None and count[0] >= config.limit:
            raise SkipModule("over limit")
        if filter_fn is not None and not filter_fn(module, fqn):
            return None
        count[0] += 1
        return ScaledLinear(module, config.scale)

    skipped: dict[str, str] = {}
    changed = replace_modules(model, {nn.Linear: swap}, filter_fn=select, skipped=skipped)
    return ApplyReport(changed=changed, skipped=skipped)


def revert_scale_linear(model, report: ApplyReport):
    changed = replace_modules(model, {ScaledLinear: lambda m, fqn: m.inner},
                              filter_fn=lambda m, fqn: fqn in report.changed)
    return ApplyReport(changed=changed)


@dataclass(frozen=True, kw_only=True)
class ToyCompileConfig(TechniqueConfig):
    """Mark the model as compiled (a toy stage-COMPILE technique)."""


def apply_toy_compile(model, config, *, filter_fn=None) -> ApplyReport:
    model.toy_compiled = True
    name = type(model).__name__
    return ApplyReport(changed={"": (name, f"{name} (toy compiled)")}, notes=["nothing is really compiled"])


class CountingHook(Hook):
    def __init__(self) -> None:
        self.steps = 0

    def after_optimizer_step(self, state) -> None:
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, d) -> None:
        self.steps = d["steps"]


@dataclass(frozen=True, kw_only=True)
class ToyHookConfig(TechniqueConfig):
    """Changes no module, only adds a loop hook."""


def apply_toy_hook(model, config, *, filter_fn=None) -> ApplyReport:
    return ApplyReport(hooks=[CountingHook()])


@dataclass(frozen=True, kw_only=True)
class ToyCheckpointConfig(TechniqueConfig):
    """A stage-CHECKPOINTING toy that changes nothing unless allowed."""


def apply_toy_checkpoint(model, config, *, filter_fn=None) -> ApplyReport:
    return ApplyReport()
