"""Tensor parallel and data-parallel sharding of the llama decoder, as techniques of the core's later stages.

Both are PyTorch's own: `parallelize_module` with Megatron's column/row split (Shoeybi et al. 2019) and
sequence parallel on the norms (Korthikanti et al. 2022), and FSDP2's `fully_shard` (ZeRO-3 style
sharding of parameters, gradients and optimizer state; Rajbhandari et al. 2020; Zhao et al. 2023), on a
1-D mesh (FSDP) or a 2-D replicate x shard mesh (HSDP). `apply_` runs them in DESIGN.md §3's order:
tensor parallel (stage TENSOR_PARALLEL), then checkpointing and compile, then sharding (DATA_PARALLEL).

```python
init_distributed(MeshSpec.parse("dp=2,tp=2"))           # under torchrun: process group + mesh
apply_(model, TensorParallelConfig(), ActivationCheckpointingConfig(), DataParallelConfig(mode="fsdp"))
```
The mesh is the one `init_distributed` built (`current_mesh()`); configs stay plain data.

DDP is not an in-place transform in PyTorch: `DistributedDataParallel` wraps a module and only sees its
`forward`. `ddp_engine(model)` wraps a small module whose forward is `model.loss`, for the trainer; the
user's model stays unwrapped (its state dict keys unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from llmopt.core import ApplyReport, Stage, TechniqueConfig, register

__all__ = ["DataParallelConfig", "TensorParallelConfig", "apply_data_parallel", "apply_tensor_parallel",
           "current_mesh", "ddp_engine", "set_current_mesh"]

_STATE: dict = {"mesh": None}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def set_current_mesh(mesh) -> None:
    """Make `mesh` (a named DeviceMesh) the one the parallel techniques use."""
    _STATE["mesh"] = mesh


def current_mesh():
    mesh = _STATE["mesh"]
    if mesh is None:
        raise RuntimeError("parallel techniques need a device mesh: run under `llmopt train --nproc N --mesh ...` "
                           "or torchrun, or call llmopt.train.distributed.init_distributed(spec) first")
    return mesh


def _mesh_axis(name: str):
    mesh = current_mesh()
    if name not in (mesh.mesh_dim_names or ()):
        raise ValueError(f"the device mesh has no axis {name!r} (axes: {', '.join(mesh.mesh_dim_names or ())})")
    return mesh[name]


def _decoder_parts(model: nn.Module):
    """(blocks as (fqn, module), final norm or None) of a llama decoder or one of its pipeline stages."""
    layers = getattr(model, "layers", None)
    if layers is None or not hasattr(model, "config") or getattr(model.config, "family", "llama") != "llama":
        raise ValueError(f"{type(model).__name__} is not a llama decoder (model.layers of Blocks); tensor parallel "
                         "is written for llmopt's Transformer")
    items = layers.items() if isinstance(layers, nn.ModuleDict) else ((str(i), b) for i, b in enumerate(layers))
    return [(f"layers.{k}", b) for k, b in items], getattr(model, "norm", None)


# ---- tensor parallel ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class TensorParallelConfig(TechniqueConfig):
    """Megatron tensor parallel of attention and MLP (+ sequence parallel norms), via torch parallelize_module."""

    sequence_parallel: bool = True
    """Keep the residual stream and the norms sharded along the sequence between the parallel regions
    (all-gather before attention/MLP, reduce-scatter after), so activations outside them are 1/tp per rank."""
    mesh_dim: str = "tp"
    """Name of the mesh axis to split over."""


@register(TensorParallelConfig, name="tensor_parallel", stage=Stage.TENSOR_PARALLEL)
def apply_tensor_parallel(model: nn.Module, config: TensorParallelConfig, *, filter_fn=None) -> ApplyReport:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    tp_mesh = _mesh_axis(config.mesh_dim)
    tp = tp_mesh.size()
    blocks, norm = _decoder_parts(model)
    report = ApplyReport()
    if tp == 1:
        report.notes.append(f"mesh axis {config.mesh_dim!r} has size 1: nothing split")
        report.changed[""] = ("tp=1", "tp=1")
        return report
    sp = config.sequence_parallel
    plan: dict = {}
    for i, (fqn, block) in enumerate(blocks):
        attn = block.self_attn
        if attn.n_head % tp or attn.n_kv_head % tp:
            raise ValueError(f"tp={tp} does not divide the heads of {fqn} ({attn.n_head} query, {attn.n_kv_head} kv)")
        if sp:
            if i == 0:  # the embedding (or the previous pipeline stage) hands over the full sequence: keep a slice
                plan[fqn] = PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                               desired_input_layouts=(Shard(1), None, None), use_local_output=False)
            plan[f"{fqn}.input_layernorm"] = SequenceParallel()
            plan[f"{fqn}.post_attention_layernorm"] = SequenceParallel()
            plan[f"{fqn}.self_attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                          desired_input_layouts=(Replicate(), None, None))
            plan[f"{fqn}.mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        out = dict(output_layouts=Shard(1), use_local_output=False) if sp else {}
        plan.update({f"{fqn}.self_attn.q_proj": ColwiseParallel(), f"{fqn}.self_attn.k_proj": ColwiseParallel(),
                     f"{fqn}.self_attn.v_proj": ColwiseParallel(), f"{fqn}.self_attn.o_proj": RowwiseParallel(**out),
                     f"{fqn}.mlp.gate_proj": ColwiseParallel(), f"{fqn}.mlp.up_proj": ColwiseParallel(),
                     f"{fqn}.mlp.down_proj": RowwiseParallel(**out)})
    if sp:
        if norm is not None:  # the final norm sees the gathered sequence; the loss then runs on plain tensors
            plan["norm"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                              use_local_output=True)
        else:  # a pipeline stage without the head hands the full sequence to the next stage
            from torch.distributed.tensor.parallel import PrepareModuleOutput

            plan[blocks[-1][0]] = _merge_output(plan.get(blocks[-1][0]), PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate()))
    parallelize_module(model, tp_mesh, plan)
    for fqn, block in blocks:  # each rank now holds n_head / tp heads of every attention
        block.self_attn.n_head //= tp
        block.self_attn.n_kv_head //= tp
    for name, style in plan.items():
        report.changed[name] = ("replicated", type(style).__name__)
    report.notes.append(f"tp={tp}{' + sequence parallel' if sp else ''}; embedding and output head replicated")
    return report


def _merge_output(input_style, output_style):
    """A block that needs both an input and an output layout change (first and last block of a middle stage)."""
    if input_style is None:
        return output_style
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput

    return PrepareModuleInputOutput(input_layouts=input_style.input_layouts,
                                    desired_input_layouts=input_style.desired_input_layouts,
                                    use_local_input=False, output_layouts=output_style.output_layouts,
                                    desired_output_layouts=output_style.desired_output_layouts,
                                    use_local_output=True)


# ---- data parallel: FSDP2 / HSDP --------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DataParallelConfig(TechniqueConfig):
    """FSDP2 sharding of parameters, gradients and optimizer state (fully_shard), or HSDP on a 2-D mesh."""

    mode: Literal["fsdp", "hsdp"] = "fsdp"
    """fsdp: shard over the `dp` axis. hsdp: replicate over `dp_replicate`, shard over `dp_shard`."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype the parameters are all-gathered and computed in (the sharded masters stay fp32)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype gradients are reduce-scattered (and, for HSDP, all-reduced) in."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each block's forward (gathered again in backward)."""


@register(DataParallelConfig, name="data_parallel", stage=Stage.DATA_PARALLEL)
def apply_data_parallel(model: nn.Module, config: DataParallelConfig, *, filter_fn=None) -> ApplyReport:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = current_mesh()
    dp_mesh = mesh["dp_replicate", "dp_shard"] if config.mode == "hsdp" else _mesh_axis("dp")
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[config.param_dtype], reduce_dtype=DTYPES[config.reduce_dtype])
    report = ApplyReport()
    blocks, _ = _decoder_parts(model) if hasattr(model, "layers") else ([], None)
    n = len(blocks)
    for i, (fqn, block) in enumerate(blocks):
        # the last block's parameters are needed again at once by the backward: keep them (torchtitan's choice)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=config.reshard_after_forward and i < n - 1)
        report.changed[fqn] = (type(block).__name__, f"FSDP{type(block).__name__}")
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=config.reshard_after_forward)
    if hasattr(model, "loss"):  # training and eval call model.loss, not forward (it must not nest another
        register_fsdp_forward_method(model, "loss")  # registered method: its end would reshard mid-loss)
    report.changed[""] = (type(model).__name__, f"FSDP{type(model).__name__}")
    report.notes.append(f"{config.mode} over {dp_mesh.size()} ranks (mesh {tuple(dp_mesh.shape)}), params in "
                        f"{config.param_dtype}, grads reduced in {config.reduce_dtype}")
    return report


# ---- DDP ---------------------------------------------------------------------------------------------------------
class _LossForward(nn.Module):
    """forward(idx, targets) = model.loss(idx, targets): what DDP needs to see."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx, targets):
        return self.model.loss(idx, targets)


def ddp_engine(model: nn.Module, process_group=None, *, forward_is_loss: bool = True):
    """DistributedDataParallel over `model` (gradients all-reduced in buckets during backward).

    With forward_is_loss, calling the engine with (idx, targets) returns model.loss(idx, targets);
    otherwise it is the model's forward (a pipeline stage)."""
    from torch.nn.parallel import DistributedDataParallel

    module = _LossForward(model) if forward_is_loss else model
    return DistributedDataParallel(module, process_group=process_group, broadcast_buffers=False)
