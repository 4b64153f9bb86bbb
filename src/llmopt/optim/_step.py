"""The lines every llmopt optimizer's `step()` shares: the closure, the walk over parameters with a
gradient, and Adam's two-moment state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """`closure()` with gradients enabled (step() itself runs under no_grad), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def params_with_grad(group: dict[str, Any], optimizer: str) -> Iterator[torch.Tensor]:
    """The parameters of `group` that have a gradient; a sparse gradient raises, naming `optimizer`."""
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{optimizer} does not support sparse gradients")
        yield p


def adam_state(state: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
    """`state`, given a step counter and zero moments `exp_avg`, `exp_avg_sq` (like p) where missing."""
    state.setdefault("step", torch.tensor(0.0))
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state
