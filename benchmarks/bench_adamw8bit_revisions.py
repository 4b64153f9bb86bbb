"""AdamW8bit step() of this tree (fused CPU kernel and torch path) vs torch AdamW(foreach), bitsandbytes and
optionally an earlier revision, same run.

Rows: `llmopt_adamw8bit` (the default, `backend="auto"`: the fused C kernel on CPU fp32),
`llmopt_adamw8bit_torch` (`backend="torch"`, the eager reference path), and with `--before REV` the
`llmopt/optim/adamw8bit.py` and `quantization.py` of that git revision, loaded into a temporary package.
Parameters: Llama-style dim-512 shapes (embedding 4096 x 512, two layers of q, k, v, o 512 x 512 and
gate/up/down 2048 x 512, four norms: 10.5M), fixed N(0, 1e-3) gradients, fp32, `--threads` threads
(default 1). Every optimizer steps once per round in a rotating order; ratios to AdamW's time of the same round, median
(min-max) over rounds, for wall time and for the thread's CPU time (less sensitive to a loaded machine).

    python benchmarks/bench_adamw8bit_revisions.py --rounds 11 --threads 1 --out docs/results/x.json
    python benchmarks/bench_adamw8bit_revisions.py --before b80bff1 --rounds 11   # with an old revision
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

SHAPES = [(4096, 512)] + [(512, 512)] * 4 * 2 + [(2048, 512), (512, 2048), (2048, 512)] * 2 + [(512,)] * 4


def old_adamw8bit(rev: str, where: Path):
    for name in ("adamw8bit", "quantization", "_step"):
        try:
            text = subprocess.run(["git", "show", f"{rev}:src/llmopt/optim/{name}.py"], check=True,
                                  capture_output=True, text=True).stdout
        except subprocess.CalledProcessError:
            continue  # _step.py did not exist yet
        (where / f"old_{name}.py").write_text(text.replace("from llmopt.optim.quantization", "from old_quantization")
                                              .replace("from llmopt.optim._step", "from old__step"))
    sys.path.insert(0, str(where))
    from old_adamw8bit import AdamW8bit
    return AdamW8bit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=None, help="git revision of an earlier AdamW8bit to time too")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llmopt.optim import AdamW8bit

    def params():
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in SHAPES]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        return ps

    with tempfile.TemporaryDirectory() as tmp:
        opts = {"adamw_foreach": torch.optim.AdamW(params(), foreach=True)}
        if args.before:
            opts[f"llmopt_adamw8bit@{args.before}"] = old_adamw8bit(args.before, Path(tmp))(params())
        opts["llmopt_adamw8bit_torch"] = AdamW8bit(params(), backend="torch")
        opts["llmopt_adamw8bit"] = AdamW8bit(params())
        try:
            import bitsandbytes as bnb
            opts["bnb_adamw8bit"] = bnb.optim.AdamW8bit(params())
        except ImportError:
            pass
        for o in opts.values():
            o.step()
        names = list(opts)
        wall, cpu = {k: [] for k in names}, {k: [] for k in names}
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t, c = time.perf_counter(), time.thread_time()
                opts[k].step()
                cpu[k].append(time.thread_time() - c)
                wall[k].append(time.perf_counter() - t)
    out = {"params": sum(torch.Size(s).numel() for s in SHAPES), "rounds": args.rounds, "threads": args.threads,
           "torch": torch.__version__, "rows": {}}
    for k in names:
        row = {}
        for label, times in (("wall", wall), ("thread_cpu", cpu)):
            ratios = sorted(a / b for a, b in zip(times[k], times["adamw_foreach"]))
            row[label] = {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}
        out["rows"][k] = row
        print(f"| {k} | {row['wall']['median']:.3f} ({row['wall']['min']:.3f}-{row['wall']['max']:.3f}) | "
              f"{row['thread_cpu']['median']:.3f} ({row['thread_cpu']['min']:.3f}-{row['thread_cpu']['max']:.3f}) |")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
