"""DoRA's step-time overhead over LoRA on a stack of SmolLM2-shaped Linear layers, same run, one thread.

The stack: `--layers` copies of SmolLM2-135M's seven projections (q 576x576, k and v 576x192, o 576x576,
gate and up 576x1536, down 1536x576), frozen weights, r=8 adapters with B ~ N(0, 0.01) (so the DoRA norm
is not trivially ||W||), batch `--tokens` x in. One step = zero_grad, forward of every layer on a fixed
input, loss = sum of mean squares, backward, AdamW (foreach). Rounds rotate the order; ratios to LoRA's
time in the same round, median (min-max), by the thread's CPU time and by wall time. `--before REV` adds
the DoRALinear of an earlier git revision as a column.

    python benchmarks/bench_dora_overhead.py --layers 4 --tokens 128 --rounds 21 --before b80bff1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2_PROJ = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
SMOLLM2_QV = [(576, 576), (576, 192)]  # q_proj, v_proj: the default target


def old_dora(rev: str, where: Path):
    text = subprocess.run(["git", "show", f"{rev}:src/llmopt/techniques/dora.py"], check=True, capture_output=True,
                          text=True).stdout
    # the old module's registrations would clash with the current ones: drop the decorators
    text = text.replace('@register(DoRAConfig, name="dora", stage=Stage.SURGERY, workload="train")', "")
    text = text.replace("@register_revert(DoRAConfig)", "")
    (where / "old_dora.py").write_text(text)
    sys.path.insert(0, str(where))
    from old_dora import DoRALinear
    return DoRALinear


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--before", help="git revision whose DoRALinear joins as a column")
    ap.add_argument("--targets", choices=["all", "qv"], default="all",
                    help="the seven projections per layer, or q_proj and v_proj only (the default target)")
    ap.add_argument("--unfused", action="store_true",
                    help="add a column: our DoRA without the [x; A] W^T GEMM (A W^T as its own GEMM)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import llmopt.techniques  # noqa: F401
    from llmopt.techniques.dora import DoRALinear
    from llmopt.techniques.lora import LoRALinear

    classes = {"lora": LoRALinear, "dora": DoRALinear}
    if args.unfused:
        classes["dora_unfused"] = type("DoRAUnfused", (DoRALinear,), {"fuse_norm_gemm": False})
    shapes = SMOLLM2_PROJ if args.targets == "all" else SMOLLM2_QV
    tmp = tempfile.TemporaryDirectory()
    if args.before:
        classes[f"dora@{args.before}"] = old_dora(args.before, Path(tmp.name))

    def stack(cls):
        torch.manual_seed(0)
        mods = torch.nn.ModuleList()
        for i, o in shapes * args.layers:
            lin = torch.nn.Linear(i, o, bias=False)
            lin.weight.requires_grad_(False)
            m = cls.from_linear(lin, r=8, alpha=16.0)
            with torch.no_grad():
                m.lora_B.normal_(0, 0.01)
            mods.append(m)
        opt = torch.optim.AdamW([p for p in mods.parameters() if p.requires_grad], lr=1e-5, foreach=True)
        return mods, opt

    gen = torch.Generator().manual_seed(1)
    x = {576: torch.randn(args.tokens, 576, generator=gen), 1536: torch.randn(args.tokens, 1536, generator=gen)}

    def step(mods, opt):
        opt.zero_grad()
        loss = sum(m(x[m.in_features]).square().mean() for m in mods)
        loss.backward()
        opt.step()

    runs = {k: stack(c) for k, c in classes.items()}
    for k in runs:
        step(*runs[k])
        step(*runs[k])
    names = list(runs)
    wall, cpu = {k: [] for k in names}, {k: [] for k in names}
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t, c = time.perf_counter(), time.thread_time()
            step(*runs[k])
            cpu[k].append(time.thread_time() - c)
            wall[k].append(time.perf_counter() - t)
    out = {"layers": args.layers, "linear": len(shapes) * args.layers, "targets": args.targets, "tokens": args.tokens, "rounds": args.rounds, "rows": {}}
    for k in names:
        row = {}
        for label, times in (("thread_cpu", cpu), ("wall", wall)):
            ratios = sorted(a / b for a, b in zip(times[k], times["lora"]))
            row[label] = {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}
        out["rows"][k] = row
        print(f"| {k} | {row['thread_cpu']['median']:.3f} ({row['thread_cpu']['min']:.3f}-"
              f"{row['thread_cpu']['max']:.3f}) | {row['wall']['median']:.3f} ({row['wall']['min']:.3f}-"
              f"{row['wall']['max']:.3f}) |")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
