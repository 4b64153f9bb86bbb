"""AdamW8bit step() of this tree vs an earlier revision of it, torch AdamW(foreach) and bitsandbytes, same run.

The earlier `llmopt/optim/adamw8bit.py` and `quantization.py` are taken from git (`--before REV`) into a
temporary package. Parameters: Llama-style dim-512 shapes (embedding 4096 x 512, two layers of q, k, v, o
512 x 512 and gate/up/down 2048 x 512, four norms: 10.5M), fixed N(0, 1e-3) gradients, fp32, one thread.
Every optimizer steps once per round in a rotating order; ratios to AdamW's time of the same round, median
(min-max) over rounds, for wall time and for the thread's CPU time (less sensitive to a loaded machine).

    python benchmarks/bench_adamw8bit_revisions.py --before b80bff1 --rounds 11 --out docs/results/x.json
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
    ap.add_argument("--before", default="b80bff1", help="git revision of the earlier AdamW8bit")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from llmopt.optim import AdamW8bit

    def params():
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in SHAPES]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        return ps

    with tempfile.TemporaryDirectory() as tmp:
        Old = old_adamw8bit(args.before, Path(tmp))
        opts = {"adamw_foreach": torch.optim.AdamW(params(), foreach=True),
                f"llmopt_adamw8bit@{args.before}": Old(params()), "llmopt_adamw8bit": AdamW8bit(params())}
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
    out = {"params": sum(torch.Size(s).numel() for s in SHAPES), "rounds": args.rounds, "torch": torch.__version__,
           "rows": {}}
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
