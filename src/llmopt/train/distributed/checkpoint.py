"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resumable on another world size and layout.

Each rank writes its own shards of the model and optimizer state under their full-model names (FQNs);
DCP's planner stores replicated tensors once. On load, each rank asks for the tensors of *its* layout and
DCP reads the overlapping pieces, so a run written by 4 processes (dp=4) resumes on 2 (dp=2), or on
dp=2,tp=2, with the same numbers. The step, data position and run config go to `state.json` (rank 0).
The directory is written under a temporary name and renamed when every rank is done, then `latest`
points at it, as for single-process checkpoints.

`export_full_model` gathers the full weights to rank 0 and writes one `model.safetensors`, loadable by
`llmopt generate RUN_DIR` like any single-process run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from llmopt.train.checkpoint import (CheckpointError, _write_json_atomic, _write_text_atomic, check_model_config,
                                     read_state)

FORMAT = "llmopt-dcp-1"


def save_dcp(ckpt_dir: str | Path, *, step: int, model: torch.nn.Module, optimizer, state: dict[str, Any]) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".step_{step:06d}.tmp"
    if dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        _write_json_atomic(tmp / "state.json", {"format": FORMAT, "step": step, **state})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(ckpt_dir / "latest", final.name + "\n")
    dist.barrier()
    return final


def load_dcp(path: str | Path, *, model: torch.nn.Module, optimizer, expected_model_config: dict | None = None
             ) -> dict[str, Any]:
    """Load a DCP checkpoint (any world size / layout) into this rank's model and optimizer; return state.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state = read_state(path)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distributed (DCP) checkpoint; resume it without --mesh/--nproc, "
                              "or start a new --out directory")
    if expected_model_config is not None:
        check_model_config(path, state.get("run_config", {}).get("model", {}), expected_model_config)
    msd, osd = get_state_dict(model, optimizer)
    target = {"model": msd, "optim": osd}
    try:
        dcp.load(target, checkpoint_id=str(path))
    except Exception as e:  # DCP raises CheckpointException with every rank's traceback: keep one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load the sharded checkpoint ({first[:200]}); it is corrupt or for "
                              "another model") from None
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
    return state


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's parameters gathered to full tensors (collective over the data/tensor-parallel ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def export_full_model(model: torch.nn.Module, path: str | Path, *, pp_group=None, is_pp_root: bool = True) -> None:
    """Write the whole model's weights, gathered from every rank, to one safetensors file on global rank 0.

    With pipeline stages, the ranks at data/tensor coordinate 0 send their stage's tensors to rank 0 over
    the pipeline group (`is_pp_root` marks them). Tied weights are stored once (the embedding)."""
    from safetensors.torch import save_file

    sd = full_state_dict(model)
    if pp_group is not None and is_pp_root:
        parts = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(parts, sd, group=pp_group)
        sd = {}
        for part in parts:
            sd.update(part)
    if dist.get_rank() != 0:
        return
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the loader ties it back to the embedding
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(sd, str(tmp), metadata={"format": "llmopt"})
    os.replace(tmp, path)
