"""Drop-in `torch.optim.Optimizer` classes and gradient management (DESIGN.md §3, optimizer kind).

| name       | class / function                   | state per parameter element                  |
|------------|------------------------------------|----------------------------------------------|
| sgd        | `sgd_finetune_optimizer` (torch SGD, embeddings frozen on request) | 4 B (momentum) |
| lamb       | `Lamb` (You et al. 2019)           | 8 B (m, v)                                   |
| novograd   | `NovoGrad` (Ginsburg et al. 2019)  | 4 B (m) + one scalar per tensor              |
| adamw8bit  | `AdamW8bit` (Dettmers et al. 2022) | 2 B + 8 B per 256-element block              |
| galore     | `GaLoreAdamW` (Zhao et al. 2024)   | 8 B x rank / min(m, n), plus the projector   |

Each works without llmopt's loop (`Lamb(model.parameters(), lr=1e-3)`); `build(name, param_groups,
optim_config, model=None)` is what the training loop calls for `--set optim.name=NAME`, and each
name is registered with `llmopt.core` (`llmopt techniques`). `clip_gradients_` is the loop's
clipping line; `state_bytes` counts an optimizer's state exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from llmopt.core import register_technique
from llmopt.optim.adamw8bit import AdamW8bit, stable_embedding_param_groups, state_bytes
from llmopt.optim.clipping import CLIP_MODES, clip_gradients_
from llmopt.optim.galore import GaLoreAdamW, galore_param_groups, randomized_range_finder
from llmopt.optim.lamb import Lamb
from llmopt.optim.novograd import NovoGrad
from llmopt.optim.quantization import dequantize_blockwise, dynamic_map, quantize_blockwise
from llmopt.optim.sgd import sgd_finetune_optimizer, sgd_finetune_param_groups

__all__ = ["AdamW8bit", "CLIP_MODES", "GaLoreAdamW", "Lamb", "NovoGrad", "build", "clip_gradients_",
           "dequantize_blockwise", "dynamic_map", "galore_param_groups", "quantize_blockwise",
           "randomized_range_finder", "register_external_optimizer", "sgd", "sgd_finetune_optimizer",
           "sgd_finetune_param_groups", "stable_embedding_param_groups", "state_bytes"]


def sgd(params, lr: float = 1e-2, momentum: float = 0.9, nesterov: bool = False,
        weight_decay: float = 0.0, freeze_embeddings: bool = False) -> torch.optim.SGD:
    """SGD with momentum (or Nesterov); with llmopt's trainer, optim.freeze_embeddings=true freezes embeddings."""
    if freeze_embeddings:  # the option exists for `llmopt bench sgd:freeze_embeddings=true` and --technique
        raise ValueError("freeze_embeddings needs the model, not only its parameters: use "
                         "llmopt.optim.sgd_finetune_optimizer(model, lr=...) or optim.freeze_embeddings=true")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay, foreach=True)


OPTIMIZERS = ("sgd", "lamb", "novograd", "adamw8bit", "galore")

_EXTERNAL: dict[str, Any] = {}


def register_external_optimizer(name: str, builder) -> None:
    """Let `build` (so `optim.name=NAME` in llmopt's loop) make another library's optimizer:
    `builder(param_groups, optim_config, model)` returns it. `llmopt.measure.bench_peers` registers the
    peers of `llmopt bench` this way (bnb_adamw8bit, torchao_adamw8bit, galore_torch, ...)."""
    if name in OPTIMIZERS or name == "adamw":
        raise ValueError(f"{name!r} is an llmopt optimizer; give the external one another name")
    _EXTERNAL[name] = builder


def build(name: str, param_groups: list[dict[str, Any]], optim_config, model: torch.nn.Module | None = None
          ) -> torch.optim.Optimizer:
    """The optimizer `name` over `param_groups` (each with its weight_decay), configured by an `OptimConfig`.

    `model`, when given, lets the optimizers that choose parameters by module build their own groups:
    galore (attention/MLP weights projected, see `galore_param_groups`), sgd with
    `freeze_embeddings`, adamw8bit with `stable_embedding`.
    """
    oc = optim_config
    betas = (oc.beta1, oc.beta2)
    if name == "sgd":
        if oc.freeze_embeddings:
            if model is None:
                raise ValueError("optim.freeze_embeddings needs the model: call build(..., model=model)")
            return sgd_finetune_optimizer(model, lr=oc.lr, momentum=oc.beta1, nesterov=oc.nesterov,
                                          weight_decay=oc.weight_decay, freeze_embeddings=True)
        return sgd(param_groups, lr=oc.lr, momentum=oc.beta1, nesterov=oc.nesterov)
    if name == "lamb":
        return Lamb(param_groups, lr=oc.lr, betas=betas, eps=oc.eps, bias_correction=oc.bias_correction)
    if name == "novograd":
        return NovoGrad(param_groups, lr=oc.lr, betas=betas, eps=oc.eps)
    if name == "adamw8bit":
        if oc.stable_embedding:
            if model is None:
                raise ValueError("optim.stable_embedding needs the model: call build(..., model=model)")
            embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
            param_groups = [dict(g, params=[p for p in g["params"] if (id(p) in embeds) == flag],
                                 **({"optim_bits": 32} if flag else {}))
                            for g in param_groups for flag in (False, True)]
            param_groups = [g for g in param_groups if g["params"]]
        return AdamW8bit(param_groups, lr=oc.lr, betas=betas, eps=oc.eps, block_size=oc.block_size)
    if name == "galore":
        if model is not None:
            param_groups = galore_param_groups(model, rank=oc.rank, update_proj_gap=oc.update_proj_gap,
                                               scale=oc.scale, optim_bits=oc.optim_bits,
                                               weight_decay=oc.weight_decay)
        elif not any(g.get("rank") for g in param_groups):
            raise ValueError("galore needs to know which weights to project: pass model= or param groups from "
                             "galore_param_groups(model, rank=...)")
        return GaLoreAdamW(param_groups, lr=oc.lr, betas=betas, eps=oc.eps, block_size=oc.block_size)
    if name in _EXTERNAL:
        return _EXTERNAL[name](param_groups, oc, model)
    raise ValueError(f"unknown optimizer {name!r} (optim.name); choose adamw or one of: {', '.join(OPTIMIZERS)}")


register_technique("sgd", kind="optimizer", factory=sgd,
                   description="SGD with momentum/Nesterov; fine-tuning recipe freezes embeddings (Kumar et al. 2022)")
register_technique("lamb", kind="optimizer", factory=Lamb,
                   description="LAMB: Adam with a per-layer trust ratio for large batches (You et al. 2019)")
register_technique("novograd", kind="optimizer", factory=NovoGrad,
                   description="NovoGrad: per-layer second moment, half of Adam's state (Ginsburg et al. 2019)")
register_technique("adamw8bit", kind="optimizer", factory=AdamW8bit,
                   description="AdamW with block-wise dynamic 8-bit moments, 0.254x state (Dettmers et al. 2022)")
register_technique("galore", kind="optimizer", factory=GaLoreAdamW,
                   description="GaLore: AdamW on low-rank projected gradients, randomized refresh (Zhao et al. 2024)")
