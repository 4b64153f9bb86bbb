"""LAMB: layer-wise adaptive moments for large batches (You et al. 2019, arXiv 1904.00962, Algorithm 2).

Per parameter tensor (a "layer") x with gradient g, at step t:

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)           v_hat = v / (1 - b2^t)          (bias_correction=True)
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * x
    x = x - lr * phi(||x||) / ||r|| * r,      phi(z) = min(z, clamp_value)

with the trust ratio phi(||x||) / ||r|| taken as 1 when either norm is 0.

Defaults and why: `bias_correction=True` because Algorithm 2 of the paper's final version has it
(torch-optimizer's `Lamb` leaves it off by default, `debias=False`, following paper v3, and when
on it folds the correction into the step size, which moves eps: jettify/pytorch-optimizer#443).
`clamp_value=10` is the paper's phi upper bound gamma_u and torch-optimizer's default. eps=1e-6 as
in the paper. With `bias_correction=False` the update is torch-optimizer's `Lamb(debias=False)`.

Numerics contract: each update equals a float64 evaluation of the equations above to 1e-6 relative
(tests/optim/test_lamb_novograd.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from llmopt.optim._step import adam_state, closure_loss, params_with_grad

__all__ = ["Lamb"]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019): Adam moments scaled per tensor by the trust ratio ||x|| / ||update||."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, *, clamp_value: float = 10.0,
                 bias_correction: bool = True) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or clamp_value <= 0:
            raise ValueError(f"lr, eps, weight_decay must be >= 0 and clamp_value > 0; got {lr}, {eps}, "
                             f"{weight_decay}, {clamp_value}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      clamp_value=clamp_value, bias_correction=bias_correction))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in params_with_grad(group, "Lamb"):
                state = adam_state(self.state[p], p)
                state["step"] += 1
                step = float(state["step"])
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                if group["bias_correction"]:
                    denom = (v / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                    update = (m / (1 - beta1 ** step)).div_(denom)
                else:
                    update = m / v.sqrt().add_(group["eps"])
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                weight_norm = torch.linalg.vector_norm(p).clamp(max=group["clamp_value"])
                update_norm = torch.linalg.vector_norm(update)
                trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm,
                                    torch.ones_like(weight_norm))
                p.add_(update * trust, alpha=-group["lr"])
        return loss
