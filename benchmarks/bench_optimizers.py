"""llmopt optimizers vs torch AdamW and peer libraries: optimizer.step() time, state bytes, GaLore refresh, loss.

Phase A (peer_anchors W2): `optimizer.step()` alone on an llmopt Llama stack (default W2's shape: dim 512,
8 layers, intermediate 2048, 8 heads, vocab 8192, untied: 41.9M parameters), fp32. Every optimizer gets its
own copy of the weights; fixed N(0,1)*1e-3 gradients are copied into `.grad` before each step, outside the
timed region. One state-initialising step and `--warmup` steps each, then `--rounds` rounds with every
optimizer once per round in a rotating order; each round's time is divided by that round's AdamW-foreach
time and the median (min-max) of those ratios is reported. State bytes count every tensor in
`optimizer.state` (`llmopt.optim.state_bytes`, looking inside torchao's subclasses and galore-torch's
projector objects).

Phase B: one GaLore projector refresh, `randomized_range_finder` vs `torch.linalg.svd`, rank 32 on a
1024 x 1024 gradient, interleaved, median of per-round ratios.

Phase C (`--train-steps N`): the `demo_quick` recipe (or `--recipe`) trained with llmopt's loop for N steps
with adamw, adamw8bit, galore, lamb, novograd; final validation loss and its ratio to AdamW's.

    python benchmarks/bench_optimizers.py --threads 2 --out runs/bench-optimizers.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llmopt.models import ModelConfig, build_model
from llmopt.optim import (AdamW8bit, GaLoreAdamW, Lamb, NovoGrad, galore_param_groups, randomized_range_finder,
                          state_bytes)


def _peer_state_bytes(optimizer) -> int:
    """state_bytes, plus torchao's tensor subclasses (codes + scales) seen through their attributes."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and hasattr(value, "codes"):
                total += sum(t.numel() * t.element_size() for t in (value.codes, value.scale))
            elif isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif hasattr(value, "__dict__"):
                total += sum(t.numel() * t.element_size() for t in vars(value).values() if isinstance(t, torch.Tensor))
    return total


def _factories(args):
    lr = 1e-3
    out = {
        "adamw_foreach": lambda m: torch.optim.AdamW(m.parameters(), lr=lr, foreach=True),
        "llmopt_adamw8bit": lambda m: AdamW8bit(m.parameters(), lr=lr),  # fused CPU kernel (backend="auto")
        "llmopt_adamw8bit_torch": lambda m: AdamW8bit(m.parameters(), lr=lr, backend="torch"),
        "llmopt_galore_r64": lambda m: GaLoreAdamW(galore_param_groups(m, rank=64), lr=lr),
        "llmopt_galore8bit_r64": lambda m: GaLoreAdamW(galore_param_groups(m, rank=64, optim_bits=8), lr=lr),
        "llmopt_lamb": lambda m: Lamb(m.parameters(), lr=lr),
        "llmopt_novograd": lambda m: NovoGrad(m.parameters(), lr=lr),
        "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, foreach=True),
    }
    try:
        import bitsandbytes as bnb
        out["bnb_adamw8bit"] = lambda m: bnb.optim.AdamW8bit(m.parameters(), lr=lr)
    except ImportError:
        pass
    if args.torchao:
        try:
            from torchao.optim import AdamW8bit as AoAdamW8bit
            out["torchao_adamw8bit"] = lambda m: AoAdamW8bit(m.parameters(), lr=lr)
        except ImportError:
            pass
    try:
        import galore_torch

        def galore_peer(m):
            groups = galore_param_groups(m, rank=64)  # galore-torch treats any group with a "rank" key as GaLore
            groups = [{"params": groups[0]["params"], "rank": 64, "update_proj_gap": 200, "scale": 0.25,
                       "proj_type": "std"}] + [{"params": g["params"]} for g in groups[1:]]
            return galore_torch.GaLoreAdamW(groups, lr=lr)
        out["galore_torch_r64"] = galore_peer
    except ImportError:
        pass
    try:
        import torch_optimizer
        out["torch_optimizer_lamb"] = lambda m: torch_optimizer.Lamb(m.parameters(), lr=lr)
        out["torch_optimizer_novograd"] = lambda m: torch_optimizer.NovoGrad(m.parameters(), lr=lr)
    except ImportError:
        pass
    return out


def phase_a(args) -> dict:
    cfg = ModelConfig.from_name("demo", dim=args.dim, n_layer=args.layers, n_head=8, n_kv_head=8,
                                intermediate_size=args.dim * 4, vocab_size=args.vocab, tie_embeddings=False)
    torch.manual_seed(0)
    base = build_model(cfg)
    n_params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in base.parameters()]
    factories = _factories(args)
    if args.only:
        factories = {k: v for k, v in factories.items() if k == "adamw_foreach" or k in args.only}
    runs, first_step = {}, {}
    for name, make in factories.items():
        model = copy.deepcopy(base)
        opt = make(model)
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        t = time.perf_counter()
        opt.step()
        first_step[name] = time.perf_counter() - t
        runs[name] = (model, opt)
        print(f"  init {name}: {first_step[name]:.2f} s", file=sys.stderr)

    def timed_step(name):
        model, opt = runs[name]
        for p, g in zip(model.parameters(), grads):
            p.grad.copy_(g)
        t = time.perf_counter()
        opt.step()
        return time.perf_counter() - t

    for _ in range(args.warmup):
        for name in runs:
            timed_step(name)
    names = list(runs)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed_step(name))
        print(f"  round {r + 1}/{args.rounds}", file=sys.stderr)
    base_bytes = state_bytes(runs["adamw_foreach"][1])
    rows = {}
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times["adamw_foreach"])]
        opt = runs[name][1]
        sb = _peer_state_bytes(opt) if not name.startswith("llmopt") else state_bytes(opt)
        rows[name] = {"step_ms_median": 1e3 * statistics.median(times[name]),
                      "step_ms_min": 1e3 * min(times[name]), "step_ms_max": 1e3 * max(times[name]),
                      "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                      "state_bytes": sb, "state_ratio": sb / base_bytes, "first_step_s": first_step[name]}
    return {"params": n_params, "model": cfg.to_dict(), "rows": rows}


def phase_b(args) -> dict:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(1024, 1024, generator=gen)
    t_svd, t_rr = [], []
    randomized_range_finder(g, 32)
    torch.linalg.svd(g, full_matrices=False)
    for _ in range(args.rounds):
        t = time.perf_counter()
        torch.linalg.svd(g, full_matrices=False)
        t_svd.append(time.perf_counter() - t)
        t = time.perf_counter()
        randomized_range_finder(g, 32, generator=torch.Generator().manual_seed(1))
        t_rr.append(time.perf_counter() - t)
    speedups = [s / r for s, r in zip(t_svd, t_rr)]
    return {"svd_ms_median": 1e3 * statistics.median(t_svd), "range_finder_ms_median": 1e3 * statistics.median(t_rr),
            "speedup_median": statistics.median(speedups), "speedup_min": min(speedups),
            "speedup_max": max(speedups)}


def phase_c(args) -> dict:
    import tempfile

    from llmopt.recipes import get_recipe
    from llmopt.train import apply_overrides, fit

    out = {}
    for name, extra in (("adamw", []), ("adamw8bit", []), ("galore", [f"optim.rank={args.galore_rank}",
                                                                      "optim.update_proj_gap=50"]),
                        ("lamb", []), ("novograd", [])):
        run = apply_overrides(get_recipe(args.recipe), [f"train.steps={args.train_steps}", "train.progress=false",
                                                        f"optim.name={name}", *extra])
        with tempfile.TemporaryDirectory() as d:
            result = fit(run, d)
        out[name] = {"val_loss": result.final_val_loss, "seconds": result.seconds}
        print(f"  train {name}: val {result.final_val_loss:.4f} in {result.seconds:.0f} s", file=sys.stderr)
    for name in out:
        out[name]["val_ratio"] = out[name]["val_loss"] / out["adamw"]["val_loss"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="optimizer rows to run (adamw_foreach always runs)")
    ap.add_argument("--torchao", action="store_true", help="include torchao AdamW8bit (compiles per shape: slow)")
    ap.add_argument("--train-steps", type=int, default=0, help="phase C: training steps per optimizer (0: skip)")
    ap.add_argument("--recipe", default="demo_quick")
    ap.add_argument("--galore-rank", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "torch": torch.__version__}
    result["step"] = phase_a(args)
    print(f"\nstep() on {result['step']['params'] / 1e6:.1f}M params, ratio = time / AdamW-foreach time per round")
    print("| optimizer | step ms median (min-max) | ratio median (min-max) | state MB | state ratio | first step s |")
    print("|---|---|---|---|---|---|")
    for name, r in result["step"]["rows"].items():
        print(f"| {name} | {r['step_ms_median']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) | "
              f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | {r['state_bytes'] / 1e6:.1f} | "
              f"{r['state_ratio']:.3f} | {r['first_step_s']:.2f} |")
    result["refresh"] = phase_b(args)
    r = result["refresh"]
    print(f"\nGaLore refresh, rank 32 on 1024x1024: svd {r['svd_ms_median']:.1f} ms, range finder "
          f"{r['range_finder_ms_median']:.1f} ms, speedup {r['speedup_median']:.1f}x "
          f"({r['speedup_min']:.1f}-{r['speedup_max']:.1f})")
    if args.train_steps:
        result["train"] = phase_c(args)
        print(f"\n{args.recipe}, {args.train_steps} steps: final validation loss")
        for name, t in result["train"].items():
            print(f"| {name} | {t['val_loss']:.4f} | {t['val_ratio']:.4f} | {t['seconds']:.0f} s |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
