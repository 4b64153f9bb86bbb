"""The SGD fine-tuning recipe: momentum (or Nesterov) SGD with the token embeddings frozen.

Kumar et al., "How to Fine-Tune Vision Models with SGD" (arXiv 2211.09359, ICLR 2024): SGD trails
AdamW in fine-tuning mostly because of the embedding layer (the patch embedding of ViTs, where the
gradients are large); freezing it (< 1% of parameters) lets SGD match or beat AdamW while keeping
one state buffer per parameter (momentum) instead of two. Its evidence is on vision transformers and
CLIP/ConvNeXt; for language models the embedding is a far larger share (4-20% of a small LLM) and
the paper does not test them, so the recipe is offered and measured here, not claimed.

State: one momentum buffer per trainable parameter (none with momentum=0): state bytes = 4 per
trainable parameter, against 8 for AdamW, and the frozen embedding needs no gradient either.

With a tied lm_head (`tie_embeddings=True`) freezing the embedding also freezes the output head.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["sgd_finetune_param_groups", "sgd_finetune_optimizer"]

log = logging.getLogger(__name__)


def sgd_finetune_param_groups(model: torch.nn.Module, freeze_embeddings: bool = True,
                              weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Freeze every `nn.Embedding` (when asked) and return param groups of what still trains:
    matrices with `weight_decay`, vectors (norms, biases) without."""
    if freeze_embeddings:
        frozen = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        if not frozen:
            raise ValueError("freeze_embeddings=True but the model has no nn.Embedding; pass freeze_embeddings=False")
        for w in frozen:
            w.requires_grad_(False)
        log.info("sgd recipe: froze %d embedding(s), %d parameters", len(frozen), sum(w.numel() for w in frozen))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def sgd_finetune_optimizer(model: torch.nn.Module, *, lr: float, momentum: float = 0.9, nesterov: bool = False,
                           weight_decay: float = 0.0, freeze_embeddings: bool = True) -> torch.optim.SGD:
    """`torch.optim.SGD` over `sgd_finetune_param_groups(model, freeze_embeddings)`."""
    groups = sgd_finetune_param_groups(model, freeze_embeddings, weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, foreach=True)
