"""`llmopt bench MODE... --nproc N`: distributed modes against the single-process run, in the same run.

    llmopt bench ddp fsdp hsdp tp pp dp_tp pp_dp_tp --nproc 4 --model tiny --steps 10

Each MODE is a layout of N processes (`MODES`), or an explicit mesh (`dp=2,tp=2`, `pp=2` ...). All modes
of one N run in one torchrun world, one after another (`llmopt.train.distributed.jobs`); the baseline is
the same recipe in one process. For each mode the report gives: the largest difference of its per-step
losses from the baseline's, the bytes each kind of collective moved per step on rank 0 (counted by
`CommCounter`) next to the analytic formula (`expected_rank0_bytes`) and their ratio, rank 0's accounted
bytes of parameters + gradients + optimizer state against the single process, and tokens/s against
the single process (noisy on shared CPUs: one number per mode, not interleaved rounds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {
    "ddp": lambda n: ("dp={n}", ["dist.data_parallel=ddp"]),
    "fsdp": lambda n: ("dp={n}", ["dist.data_parallel=fsdp"]),
    "hsdp": lambda n: ("dp_replicate=2,dp_shard={h}", []),
    "tp": lambda n: ("tp={n}", []),
    "pp": lambda n: ("pp={n}", ["dist.pp_schedule=1f1b"]),
    "pp_gpipe": lambda n: ("pp={n}", ["dist.pp_schedule=gpipe"]),
    "dp_tp": lambda n: ("dp={h},tp=2", []),
    "pp_dp": lambda n: ("pp=2,dp={h}", []),
    "pp_dp_tp": lambda n: ("pp=2,dp={q},tp=2", []),
}
"""Mode name -> (mesh template for N processes, config overrides)."""


class BenchDistError(ValueError):
    """Bad input to the distributed bench (one line)."""


def mode_mesh(name: str, nproc: int) -> tuple[str, list[str]]:
    if "=" in name:
        return name, []
    if name not in MODES:
        raise BenchDistError(f"unknown distributed mode {name!r}; choose from {', '.join(MODES)} or give a mesh "
                             "such as dp=2,tp=2")
    template, sets = MODES[name](nproc)
    return template.format(n=nproc, h=nproc // 2, q=max(nproc // 4, 1)), sets


def bench_distributed(names: list[str], *, nproc: int, model: str = "tiny", steps: int = 10, out: str | Path,
                      overrides: list[str] | None = None, force: bool = False) -> dict:
    from llmopt.recipes import get_recipe
    from llmopt.train import apply_overrides, fit
    from llmopt.train.config import RunConfig
    from llmopt.train.distributed.comm import expected_rank0_bytes
    from llmopt.train.distributed.launch import check_launch
    from llmopt.train.distributed.mesh import MeshSpec

    out = Path(out)
    if out.exists() and not force:
        raise BenchDistError(f"{out} exists; pass --force to replace it or choose another --out")
    base_sets = [f"train.steps={steps}", "train.log_every=1", f"train.eval_every={steps}", "train.progress=false",
                 *(overrides or [])]
    recipe = model if model in ("tiny", "demo", "demo_quick", "draft") else None
    if recipe is None:
        raise BenchDistError(f"--model {model}: distributed bench runs the recipes tiny, demo, demo_quick or draft")
    work = Path(tempfile.mkdtemp(prefix="llmopt-bench-dist-"))
    jobs, meshes = [], {}
    for name in names:
        mesh, sets = mode_mesh(name, nproc)
        run = apply_overrides(get_recipe(recipe), base_sets + sets + [f"dist.mesh={mesh}"])
        check_launch(run, nproc)  # every layout checked before anything starts
        meshes[name] = run
        jobs.append({"out": str(work / name), "run": run.to_dict(), "count_comm": True})
    (work / "jobs.json").write_text(json.dumps(jobs))

    # the single-process baseline, in this process
    base_run = apply_overrides(get_recipe(recipe), base_sets)
    captured: dict = {}
    import torch

    torch.set_num_threads(1)
    base = fit(base_run, work / "single", hooks=[_CaptureBytes(captured)])
    base_losses = {r["step"]: r["loss"] for r in base.history if "loss" in r}  # logged to 6 decimals
    env = dict(os.environ, OMP_NUM_THREADS="1", LLMOPT_NO_PROGRESS="1")
    rc = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                          "-m", "llmopt.train.distributed.jobs", str(work / "jobs.json")], env=env)
    if rc != 0:
        raise RuntimeError(f"torchrun exited with status {rc}; rerun with LLMOPT_DEBUG=1 to see the workers' errors")
    rows = []
    for name in names:
        res = json.loads((work / name / "job_result.json").read_text())
        run: RunConfig = meshes[name]
        spec = MeshSpec.parse(run.dist.mesh)
        expected = expected_rank0_bytes(run.model, spec, run.train, run.dist)
        measured = {k: v["bytes_per_step"] for k, v in (res["comm"] or {}).items()}
        comm = {k: {"measured": measured.get(k, 0.0), "expected": expected.get(k, 0.0),
                    "ratio": (measured.get(k, 0.0) / expected[k]) if expected.get(k) else None}
                for k in sorted(set(measured) | set(expected))}
        losses = {int(k): v for k, v in res["losses"].items()}
        diff = max(abs(losses[s] - base_losses[s]) for s in losses)
        rows.append({"mode": name, "mesh": run.dist.mesh, "world_size": res["world_size"],
                     "max_loss_diff": diff, "comm_per_step": comm,
                     "accounted_rank0": res["accounted_rank0"], "accounted_single": captured,
                     "accounted_ratio": res["accounted_rank0"]["total"] / captured["total"],
                     "tokens_per_s_ratio": (res["tokens"] / res["seconds"]) / (base.tokens_seen / base.seconds)})
    result = {"kind": "distributed", "model": model, "nproc": nproc, "steps": steps, "rows": rows,
              "command": "llmopt bench " + " ".join(names) + f" --nproc {nproc} --model {model} --steps {steps}"}
    tmp_out = out.with_name(out.name + ".tmp")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    tmp_out.mkdir(parents=True)
    (tmp_out / "results.json").write_text(json.dumps(result, indent=2))
    (tmp_out / "report.md").write_text(render(result))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp_out, out)
    shutil.rmtree(work, ignore_errors=True)
    return result


class _CaptureBytes:
    """Loop hook: accounted bytes of the single-process run after its last optimizer step."""

    def __init__(self, into: dict) -> None:
        self.into = into

    def after_optimizer_step(self, state) -> None:
        from llmopt.train.distributed.jobs import accounted_bytes

        self.into.update(accounted_bytes(state.model, state.optimizer))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render(result: dict) -> str:
    lines = [f"# Distributed bench: {result['model']} on {result['nproc']} processes, {result['steps']} steps", "",
             f"Command: `{result['command']}`", "",
             "Baseline: the same recipe in one process. Bytes are rank 0's payload per optimizer step (all-gather: "
             "gathered output, reduce-scatter: full input), counted by hooks, next to the analytic formula.", "",
             "| mode | mesh | max loss diff | collective: measured / formula (ratio) | rank-0 params+grads+optim | "
             "vs 1 process | tokens/s vs 1 process |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        comm = "<br>".join(f"{k}: {_fmt_bytes(v['measured'])} / {_fmt_bytes(v['expected'])} "
                           f"({v['ratio']:.3f})" if v["ratio"] is not None else
                           f"{k}: {_fmt_bytes(v['measured'])} / - " for k, v in r["comm_per_step"].items())
        lines.append(f"| {r['mode']} | {r['mesh']} | {r['max_loss_diff']:.1e} | {comm} | "
                     f"{_fmt_bytes(r['accounted_rank0']['total'])} | {r['accounted_ratio']:.3f}x | "
                     f"{r['tokens_per_s_ratio']:.2f}x |")
    lines += ["", "Collectives without a formula (DDP's one-time buffer broadcast, pipeline shape handshakes) are "
                  "a few bytes; tokens/s on a shared CPU with one thread per rank says little about a GPU cluster."]
    return "\n".join(lines) + "\n"
