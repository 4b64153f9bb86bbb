"""Several distributed runs in one torchrun world, one after another: what the tests and `llmopt bench --nproc`
start (process start-up, not training, dominates small runs on a CPU).

    torchrun --nproc_per_node N -m llmopt.train.distributed.jobs JOBS.json

JOBS.json is a list of {"out": dir, "run": RunConfig dict, "resume": bool, "count_comm": bool}. Each job is a
`fit_distributed`; rank 0 writes `out/job_result.json` with the losses of every step, the communication
bytes per step by kind (counted by `CommCounter`), and rank 0's accounted bytes of parameters, gradients and
optimizer state.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def accounted_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients (one per trainable parameter) and optimizer state."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    seen, params, grads = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = local(p).numel() * p.element_size()
        params += n
        grads += n if p.requires_grad else 0
    state = 0
    for s in optimizer.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                state += local(v).numel() * v.element_size()
    return {"params": params, "grads": grads, "optimizer": state, "total": params + grads + state}


def run_job(job: dict) -> None:
    from llmopt.train.config import RunConfig
    from llmopt.train.distributed.comm import CommCounter
    from llmopt.train.distributed.trainer import fit_distributed

    run = RunConfig.from_dict(job["run"])
    counter = CommCounter() if job.get("count_comm") else None
    captured = {}
    result = fit_distributed(run, job["out"], resume=job.get("resume", False), comm_counter=counter,
                             on_end=lambda model, opt: captured.update(accounted_bytes(model, opt)))
    steps_run = counter.steps if counter is not None else result.steps
    if dist.get_rank() == 0:
        losses = {r["step"]: r["loss_exact"] for r in result.history if "loss_exact" in r}
        vals = {r["step"]: r["val_loss"] for r in result.history if "val_loss" in r}
        comm = None
        if counter is not None:
            comm = {k: {"bytes_per_step": v["bytes"] / max(steps_run, 1), "calls_per_step": v["calls"] / max(steps_run, 1)}
                    for k, v in counter.summary().items()}
        out = {"mesh": run.dist.mesh, "world_size": dist.get_world_size(), "losses": losses, "val_losses": vals,
               "comm": comm, "accounted_rank0": captured, "seconds": result.seconds, "steps": result.steps,
               "tokens": result.tokens_seen}
        Path(job["out"], "job_result.json").write_text(json.dumps(out, indent=2))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LLMOPT_NO_PROGRESS", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    jobs = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    try:
        for job in jobs:
            run_job(job)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
