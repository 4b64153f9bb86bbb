"""Pipeline parallel: the decoder split by layers into stages, run by torch.distributed.pipelining schedules.

`split_stages(model, pp_rank, pp, per_rank)` keeps on this rank only the layers of its stage(s), as
`PipelineStageModel`s that hold the *same* module objects under the *same* names as the full model
(`embed_tokens`, `layers.<global index>`, `norm`, `lm_head`), so state dicts, DCP checkpoints and the
single-file export use the full model's keys whatever the layout. Stage i of S holds layers
[i*L/S, (i+1)*L/S); the first stage also the embedding, the last the final norm and the output head.

Schedules (Huang et al. 2019 GPipe; Narayanan et al. 2019/2021 1F1B and interleaved): `gpipe`, `1f1b` (one
stage per rank); `interleaved_1f1b`, `looped_bfs` (two stages per rank, stage s on rank s % pp).

Tied embeddings: the last stage gets its own copy of the embedding matrix as its output head, and after
each backward the two gradients are summed over the pipeline group (Megatron's embedding group), so both
copies take identical optimizer steps and stay equal.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B",
             "looped_bfs": "ScheduleLoopedBFS"}
MULTI_STAGE = ("interleaved_1f1b", "looped_bfs")
# not offered: torch 2.13's ScheduleZBVZeroBubble trains here but its eval() fails ("can't steal_bwd_input")


class PipelineStageModel(nn.Module):
    """The part of a llama decoder one pipeline stage runs, under the full model's parameter names.

    forward: token ids (first stage) or hidden states (B, T, dim) -> hidden states, or logits (last stage)."""

    def __init__(self, model: nn.Module, layer_ids: list[int], *, first: bool, last: bool, stage_index: int) -> None:
        super().__init__()
        self.config = model.config
        self.stage_index = stage_index
        self.embed_tokens = model.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.applied_techniques = list(getattr(model, "applied_techniques", []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        T = x.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for layer in self.layers.values():
            x = layer(x, cos, sin)
        if self.norm is not None:
            x = self.lm_head(self.norm(x))
        return x


def stage_ids(pp_rank: int, pp: int, schedule: str) -> list[int]:
    """The stage indices this rank runs."""
    if schedule not in MULTI_STAGE:
        return [pp_rank]
    return [pp_rank, pp_rank + pp]


def split_stages(model: nn.Module, pp_rank: int, pp: int, schedule: str) -> list[PipelineStageModel]:
    """This rank's stage models, in stage order. Layers of other ranks are dropped from `model` (freed)."""
    n_stages = pp * (2 if schedule in MULTI_STAGE else 1)
    L = model.config.n_layer
    stages = []
    for s in stage_ids(pp_rank, pp, schedule):
        lo, hi = s * L // n_stages, (s + 1) * L // n_stages
        stages.append(PipelineStageModel(model, list(range(lo, hi)), first=s == 0, last=s == n_stages - 1,
                                         stage_index=s))
    tied = model.lm_head.weight is model.embed_tokens.weight
    for st in stages:
        if st.lm_head is not None and tied:  # an own copy of the tied matrix (kept equal by sync_tied_grads)
            head = nn.Linear(model.config.dim, model.config.vocab_size, bias=False, device=model.lm_head.weight.device)
            with torch.no_grad():
                head.weight.copy_(model.embed_tokens.weight)
            st.lm_head = head
    return stages


class RankModel(nn.Module):
    """Every module this rank holds, under the full model's names: what the optimizer, the checkpoint and
    the export see when a rank runs two stages (the schedules call the stage models themselves)."""

    def __init__(self, stages: list[PipelineStageModel]) -> None:
        super().__init__()
        self.config = stages[0].config
        layers = {}
        for st in stages:
            for name in ("embed_tokens", "norm", "lm_head"):
                if getattr(st, name) is not None:
                    setattr(self, name, getattr(st, name))
            layers.update(st.layers)
        self.layers = nn.ModuleDict(dict(sorted(layers.items(), key=lambda kv: int(kv[0]))))
        self.applied_techniques = list(stages[0].applied_techniques)


def tied_params(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The embedding and output-head matrices this rank holds (candidates for tied-gradient sync)."""
    out = []
    for m in modules:
        for name in ("embed_tokens", "lm_head"):
            sub = getattr(m, name, None)
            if sub is not None and all(sub.weight is not p for p in out):
                out.append(sub.weight)
    return out


def tied_group(mesh, pp: int):
    """The process group of the ranks holding the first and the last stage (pipeline ranks 0 and pp-1) at this
    rank's (dp, tp) coordinate. Every rank must call this (new_group is collective)."""
    import torch.distributed as dist

    grid = mesh.mesh.reshape(pp, -1)  # (pp, everything else)
    mine = None
    for col in range(grid.shape[1]):
        ranks = sorted({int(grid[0, col]), int(grid[pp - 1, col])})
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if dist.get_rank() in ranks:
            mine = group
    return mine


def sync_tied_grads(params: list[nn.Parameter], group) -> None:
    """Sum the gradients of the tied embedding and output-head copies this rank holds, and over `group` (the
    first and last stage); every copy gets the total, so all copies take the same optimizer step."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = grads[0].clone()
    for g in grads[1:]:
        total += g
    if group is not None:
        dist.all_reduce(total, group=group)
    for g in grads:
        g.copy_(total)


def build_schedule(stage_models: list[PipelineStageModel], *, schedule: str, pp: int, pp_group, microbatches: int,
                   loss_fn, device, submods: list[nn.Module] | None = None):
    """A torch.distributed.pipelining schedule over this rank's stages (`submods` replace the stage models,
    e.g. with DDP wrappers)."""
    import torch.distributed.pipelining as pipelining
    from torch.distributed.pipelining import PipelineStage

    n_stages = pp * (2 if schedule in MULTI_STAGE else 1)
    stages = [PipelineStage(sub, st.stage_index, n_stages, device, group=pp_group)
              for st, sub in zip(stage_models, submods or stage_models)]
    cls = getattr(pipelining, SCHEDULES[schedule])
    if schedule in MULTI_STAGE:
        return cls(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


def logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses, token count) from logits: the last stage's half of model.loss."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, (targets != -100).sum()
