"""Gradient clipping, once per optimizer step after unscaling: by global norm, by value, or adaptive.

`clip_gradients_(params, mode, value) -> (norm_before, norm_after)` mutates the gradients in place and
returns the global L2 norm of all gradients before and after clipping (what the loop logs).

- `norm`: scale all gradients by min(1, value / global_norm) (torch's `clip_grad_norm_`).
- `value`: clamp every gradient element into [-value, value] (torch's `clip_grad_value_`).
- `agc`: adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image
  Recognition Without Normalization", arXiv 2102.06171): per unit (row of a weight, i.e. norms over
  every dimension but the first; whole tensor for 1-D parameters), a gradient whose norm exceeds
  value * max(||W_unit||, 1e-3) is scaled down to that bound. `value` is the paper's lambda (0.01 is
  typical; the paper does not clip the final classifier layer: pass only the parameters to clip).

Numerics contract: `norm` and `value` are torch's functions; `agc` is tested against a float64
evaluation of the formula above.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["CLIP_MODES", "clip_gradients_"]

CLIP_MODES = ("norm", "value", "agc")
AGC_EPS = 1e-3
"""Brock et al.'s floor on the weight norm, so zero-initialized weights can still move."""


def _global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _unit_norm(x: torch.Tensor) -> torch.Tensor:
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


def clip_gradients_(params: Iterable[torch.Tensor], mode: str, value: float | None) -> tuple[float, float]:
    """Clip the `.grad` of `params` in place; returns (global grad norm before, after). `value=None`
    only measures the norm."""
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode {mode!r} is not one of {', '.join(CLIP_MODES)} (train.clip_mode)")
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    if value is not None and value <= 0:
        raise ValueError(f"clipping value must be positive, got {value} (train.grad_clip); use None to disable")
    before = float(_global_norm(grads))
    if value is None or not grads:
        return before, before
    if mode == "norm":
        total = torch.nn.utils.clip_grad_norm_(params, value, foreach=True)
        coef = min(1.0, value / (float(total) + 1e-6))  # torch's own clip coefficient
        return before, before * coef
    with torch.no_grad():
        if mode == "value":
            torch.nn.utils.clip_grad_value_(params, value, foreach=True)
        else:  # agc
            for p in params:
                max_norm = _unit_norm(p.detach()).clamp_min(AGC_EPS) * value
                grad_norm = _unit_norm(p.grad)
                scale = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp_min(1e-6),
                                    torch.ones_like(grad_norm))
                p.grad.mul_(scale)
    return before, float(_global_norm(grads))
