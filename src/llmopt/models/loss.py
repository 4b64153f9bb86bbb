"""The one loss function training goes through.

`linear_cross_entropy(hidden, weight, targets)` returns the *sum* of token losses and the number of
target tokens, so that the training loop can normalize by the tokens of a whole optimizer step
(exact gradient accumulation). A fused, chunked version with the same signature lives in
`llmopt.kernels` and replaces `model.loss_fn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, dim), weight (V, dim), targets (N,) -> (loss sum (fp32 scalar), token count (int64 scalar))."""
    logits = hidden @ weight.t()  # (N, V)
    loss = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    return loss, (targets != ignore_index).sum()
