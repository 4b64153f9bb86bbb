"""`llmopt train RECIPE --nproc N --mesh ...`: check everything, then start N ranks with torchrun.

The launcher validates the mesh against N, the model and the batch *before* any process starts (a bad mesh
is one line here, not a hang in N processes), writes the resolved run config next to the run, and runs
`torch.distributed.run --standalone` (one node, a free port) over `llmopt.train.distributed.trainer`.
On a cluster, skip `--nproc` and run `llmopt train` itself under torchrun or srun (docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llmopt.train.config import RunConfig
from llmopt.train.distributed.mesh import MeshError, MeshSpec, validate


def check_launch(run: RunConfig, nproc: int) -> MeshSpec:
    """The mesh of `run` for `nproc` processes (a plain `dp=nproc` when none is given), validated."""
    if nproc < 1:
        raise MeshError(f"--nproc {nproc} must be at least 1")
    spec = MeshSpec.parse(run.dist.mesh) if run.dist.mesh else MeshSpec(dp=nproc)
    model_config = None if run.init_from else run.model  # a pretrained model is checked again once loaded
    validate(spec, world_size=nproc, model_config=model_config, train_config=run.train, dist_config=run.dist)
    return spec


def launch(run: RunConfig, out_dir: str | Path, *, nproc: int, resume: bool = False, threads_per_rank: int = 1,
           extra_env: dict | None = None) -> int:
    """Run `run` on `nproc` local processes; returns torchrun's exit status."""
    spec = check_launch(run, nproc)
    run.dist.mesh = ",".join(f"{n}={s}" for n, s in spec.axes() if s > 1) or f"dp={nproc}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "launch_config.json"
    tmp = config_path.with_name(config_path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(run.to_dict(), indent=2))
    os.replace(tmp, config_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmopt.train.distributed.trainer", str(config_path), str(out_dir)] + (["--resume"] if resume else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank), LLMOPT_NO_PROGRESS="1", **(extra_env or {}))
    return subprocess.call(cmd, env=env)
