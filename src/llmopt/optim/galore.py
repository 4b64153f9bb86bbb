"""GaLore: AdamW on a low-rank projection of each weight's gradient (Zhao et al. 2024, "GaLore:
Memory-Efficient LLM Training by Gradient Low-Rank Projection", arXiv 2403.03507, Algorithm 2).

For a weight W (m x n) in a GaLore group, with gradient G at step t:
- every `update_proj_gap` steps (and at the first), the projector is refreshed: the top-`rank`
  singular subspace of G on its smaller side, P (m x r) when m <= n, else Q (n x r);
- R = P^T G (r x n) or G Q (m x r) is the low-rank gradient; Adam's moments live in that shape;
- N = m_hat / (sqrt(v_hat) + eps) (torch AdamW's formula), projected back P N or N Q^T, times `scale`;
- W <- W (1 - lr wd) - lr scale (back-projected N).
As in the paper and galore-torch, the moments are kept across a projector refresh (not rotated).

The refresh uses a randomized range finder (Halko, Martinsson & Tropp 2011, Algorithm 4.4): Y = G O
for a Gaussian O with rank + `oversample` columns, `power_iters` subspace iterations with QR
re-orthonormalization, then a small SVD of Q^T G to keep the best rank-r part. O comes from a
generator seeded by (parameter index, step), so a run, and a resumed run, are deterministic. Cost
O(mn(r+p)) against O(mn min(m, n)) for `torch.linalg.svd`.

`optim_bits=8` stores both low-rank moments with the block-wise dynamic 8-bit quantization of
`llmopt.optim.quantization` (as the paper's 8-bit GaLore does via bitsandbytes).

Gradient accumulation: the projection happens in `step()`, once per optimizer step, on the
accumulated gradient, so k micro-batches then one step equal the full batch (tested). galore-torch's
layer-wise mode instead steps each parameter from a post-accumulate-grad hook during backward, so
with k micro-batches it takes k optimizer steps per logical step (jiaweizzhao/GaLore#78).

Parameters outside GaLore groups (embeddings, norms, lm_head) get plain AdamW, the same update as
torch.optim.AdamW. Numerics contract: GaLore with rank >= min(m, n) and an exact projector would be
AdamW in a rotated basis; the tests check the update against a float64 evaluation of the equations
above given the same projector, and the projector against the SVD's subspace.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from llmopt.optim._step import adam_state, closure_loss
from llmopt.optim.quantization import BLOCK_SIZE, dequantize_blockwise, quantize_blockwise, restore_state_dtypes_

__all__ = ["GaLoreAdamW", "galore_param_groups", "randomized_range_finder"]

log = logging.getLogger(__name__)


def randomized_range_finder(matrix: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """An orthonormal basis (m x rank) of the approximate top-`rank` left singular subspace of `matrix` (m x n)."""
    m, n = matrix.shape
    a = matrix.float()
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, device=a.device if generator is None else "cpu").to(a.device)
    q, _ = torch.linalg.qr(a @ omega)                        # (m, k)
    for _ in range(power_iters):                            # subspace iteration sharpens the spectrum
        q, _ = torch.linalg.qr(a.T @ q)                     # (n, k)
        q, _ = torch.linalg.qr(a @ q)                       # (m, k)
    u_small, _, _ = torch.linalg.svd(q.T @ a, full_matrices=False)  # (k, k): best rank-r part of the range
    return q @ u_small[:, :rank]                            # (m, rank)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore low-rank gradient projection for param groups that set `rank`."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int | None = None,
                 update_proj_gap: int = 200, scale: float = 0.25, oversample: int = 8, power_iters: int = 2,
                 optim_bits: int = 32, block_size: int = BLOCK_SIZE, seed: int = 0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if update_proj_gap <= 0 or (rank is not None and rank <= 0):
            raise ValueError(f"rank and update_proj_gap must be positive, got {rank}, {update_proj_gap}")
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, oversample=oversample,
                        power_iters=power_iters, optim_bits=optim_bits, block_size=block_size)
        super().__init__(params, defaults)
        self.seed = seed
        for group in self.param_groups:
            if group["rank"] is not None:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(f"GaLore projects 2-D weights; a parameter of shape {tuple(p.shape)} is "
                                         "in a group with rank set: put it in a group without rank "
                                         "(galore_param_groups does this)")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes_(self, state_dict)  # torch casts every state tensor to the param dtype, codes too

    def _index(self, p: torch.Tensor) -> int:
        i = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return i
                i += 1
        raise KeyError("parameter not in this optimizer")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if group["rank"] is None or group["rank"] >= min(p.shape):
                        self._adamw(p, group)
                    else:
                        self._galore(p, group, index)
                index += 1
        return loss

    def _adamw(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        state = adam_state(self.state[p], p)
        state["step"] += 1
        step = float(state["step"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))

    def _galore(self, p: torch.Tensor, group: dict[str, Any], index: int) -> None:
        beta1, beta2 = group["betas"]
        rank, eight_bit = group["rank"], group["optim_bits"] == 8
        grad = p.grad.float()
        left = p.shape[0] <= p.shape[1]  # project the smaller side: state r x max(m, n)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
        step = int(state["step"])
        if step % group["update_proj_gap"] == 0:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index * 7919 + step)
            state["projector"] = randomized_range_finder(grad if left else grad.T, rank,
                                                         oversample=group["oversample"],
                                                         power_iters=group["power_iters"], generator=generator)
        proj = state["projector"]
        low = proj.T @ grad if left else grad @ proj             # (r, n) or (m, r)
        if "exp_avg" not in state and "exp_avg_codes" not in state:
            m, v = torch.zeros_like(low), torch.zeros_like(low)
        elif eight_bit:
            bs = group["block_size"]
            m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], low.shape, signed=True,
                                     block_size=bs)
            v = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], low.shape,
                                     signed=False, block_size=bs)
        else:
            m, v = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        t = float(state["step"])
        m.lerp_(low, 1 - beta1)
        v.mul_(beta2).addcmul_(low, low, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        normalized = m / denom / (1 - beta1 ** t)
        update = proj @ normalized if left else normalized @ proj.T   # back to (m, n)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"] * group["scale"])
        if eight_bit:
            bs = group["block_size"]
            state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(m, signed=True, block_size=bs)
            state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(v, signed=False,
                                                                                       block_size=bs)
        else:
            state["exp_avg"], state["exp_avg_sq"] = m, v


DEFAULT_TARGETS = ("attn", "mlp")
"""Module-name substrings of the Linear layers GaLore projects (attention and MLP; `self_attn` matches)."""


def galore_param_groups(model: torch.nn.Module, *, rank: int = 128, targets: Sequence[str] = DEFAULT_TARGETS,
                        update_proj_gap: int = 200, scale: float = 0.25, optim_bits: int = 32,
                        weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Two param groups: the 2-D weights of `nn.Linear` modules whose name contains one of `targets`
    (and whose smaller side exceeds `rank`) get GaLore; everything else trainable gets plain AdamW."""
    galore_ids: set[int] = set()
    too_small = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(t in name for t in targets) and module.weight.requires_grad:
            if min(module.weight.shape) > rank:
                galore_ids.add(id(module.weight))
            else:
                too_small.append(name)
    if not galore_ids:
        raise ValueError(f"no trainable nn.Linear whose name contains {tuple(targets)} has both sides larger than "
                         f"rank={rank}" + (f" ({len(too_small)} matched but are too small; lower rank)"
                                           if too_small else "; pass targets= naming the model's linear layers"))
    if too_small:
        log.info("galore: %d matching layers have a side <= rank=%d and get plain AdamW: %s", len(too_small), rank,
                 ", ".join(too_small[:4]) + (" ..." if len(too_small) > 4 else ""))
    seen: set[int] = set()
    projected, regular = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (projected if id(p) in galore_ids else regular).append(p)
    groups = [{"params": projected, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
               "optim_bits": optim_bits, "weight_decay": weight_decay}]
    if regular:
        groups.append({"params": regular, "rank": None})
    return groups
