"""NovoGrad: SGD with momentum on gradients normalized by a per-layer second moment (Ginsburg et al.
2019, arXiv 1905.11286, Algorithm 1).

Per parameter tensor (a "layer") w with gradient g; v is one scalar per tensor:

    step 1:   v = ||g||^2
    step t>1: v = b2 v + (1 - b2) ||g||^2
    m = b1 m + c (g / (sqrt(v) + eps) + weight_decay * w),    c = 1 (paper) or 1 - b1 (grad_averaging)
    w = w - lr m

State: one full-size momentum and one scalar per tensor, so half of Adam's state bytes.

Defaults and why: betas (0.95, 0.98) are the paper's (torch-optimizer defaults to b2=0, which makes
v the last gradient's norm alone); `grad_averaging=False` is Algorithm 1 (apex and torch-optimizer
offer the (1 - b1) factor as an option, as here). With the same settings the update equals
torch-optimizer's `NovoGrad`, except that it never writes into `p.grad` (torch-optimizer divides the
gradient in place, so a caller reading `p.grad` after the step sees a changed gradient).

Numerics contract: each update equals a float64 evaluation of the equations above to 1e-6 relative.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llmopt.optim._step import closure_loss, params_with_grad

__all__ = ["NovoGrad"]


class NovoGrad(torch.optim.Optimizer):
    """NovoGrad (Ginsburg et al. 2019): layer-wise normalized gradients with momentum; half of Adam's state."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.95, 0.98),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, grad_averaging: bool = False) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      grad_averaging=grad_averaging))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in params_with_grad(group, "NovoGrad"):
                state = self.state[p]
                g = p.grad
                norm_sq = torch.sum(g * g)
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = norm_sq.clone()  # v_1 = ||g_1||^2
                else:
                    state["exp_avg_sq"].mul_(beta2).add_(norm_sq, alpha=1 - beta2)
                state["step"] += 1
                direction = g / (state["exp_avg_sq"].sqrt() + group["eps"])
                if group["weight_decay"] != 0:
                    direction.add_(p, alpha=group["weight_decay"])
                if group["grad_averaging"]:
                    direction.mul_(1 - beta1)
                state["exp_avg"].mul_(beta1).add_(direction)
                p.add_(state["exp_avg"], alpha=-group["lr"])
        return loss
