"""Step-time overhead of activation checkpointing, one process: none vs budget 50% vs full (and the earlier
whole-block budget plan), interleaved, many rounds.

    .venv/bin/python benchmarks/bench_checkpointing_step.py --rounds 40 --json docs/results/checkpointing_step_demo.json

Every model is built from the same seed and trains on the same batch (demo, 8x128 by default, fp32, 1 thread).
Each round runs `--steps` AdamW steps of each model in a rotated order and records the wall time and the process
CPU time (`time.process_time`, less sensitive to other jobs than the wall clock: time spent waiting for a core
is not counted). Reported per variant: the median over rounds of (variant / none) and its band (min-max and
the 10th-90th percentiles). The budget is 50% of the accounted saved-activation bytes of the unwrapped step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="demo")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=2, help="steps of each model per round")
    p.add_argument("--fraction", type=float, default=0.5, help="budget as a fraction of the unwrapped activations")
    p.add_argument("--no-coarse", action="store_true", help="skip the whole-block (none/selective/full) budget plan")
    p.add_argument("--selective", action="store_true", help="also time policy='selective' (every block)")
    p.add_argument("--json")
    a = p.parse_args()

    import torch

    torch.set_num_threads(1)
    import llmopt

    llmopt.load_techniques()
    from llmopt.core import apply_
    from llmopt.measure.memory import account_training_step
    from llmopt.models import ModelConfig, build_model
    from llmopt.techniques.checkpointing import (ActivationCheckpointingConfig, block_list, plan_budget,
                                                 plan_recompute, probe_blocks, probe_outside_blocks, wrap_block_)

    B, T = a.batch_size, a.seq_len
    x = torch.randint(0, ModelConfig.from_name(a.model).vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))

    def fresh():
        torch.manual_seed(0)
        return build_model(ModelConfig.from_name(a.model))

    def loss_of(m):
        return lambda: (lambda s, n: s / n)(*m.loss(x[:, :-1], x[:, 1:]))

    base = fresh()
    none_bytes = account_training_step(base, torch.optim.SGD(base.parameters(), lr=0.0), loss_of(base)).activations
    budget = int(a.fraction * none_bytes)
    models, notes, activations = {}, {}, {}
    for name in ["none", "budget", "budget_blocks", "full", "budget_coarse", "selective"]:
        if (name == "budget_coarse" and a.no_coarse) or (name == "selective" and not a.selective):
            continue
        m = fresh()
        if name in ("budget", "budget_blocks"):  # budget: units="best" (whole blocks or their parts)
            units = "blocks" if name == "budget_blocks" else "best"
            notes[name] = apply_(m, ActivationCheckpointingConfig(policy="budget", budget_bytes=budget, units=units,
                                                                  probe_batch_size=B, probe_seq_len=T)).notes
        elif name in ("full", "selective"):
            notes[name] = apply_(m, ActivationCheckpointingConfig(policy=name, probe_batch_size=B,
                                                                  probe_seq_len=T)).notes
        elif name == "budget_coarse":  # the earlier planner's choice: whole blocks only (none / selective / full)
            blocks = block_list(m)
            probe = probe_blocks(m, blocks, B, T)
            outside = probe_outside_blocks(m, blocks, probe, B, T)
            coarse = {f: {k: v for k, v in row.items() if k not in ("ops", "stop")} for f, row in probe.items()}
            plan = plan_budget(coarse, budget - outside)
            for fqn, block in blocks:
                if plan[fqn] != "none":
                    wrap_block_(block, plan[fqn])
            notes[name] = [f"plan {sorted(plan.values())}; recompute +{plan_recompute(probe, plan)[0] / 1e9:.3f} GFLOP"]
        activations[name] = account_training_step(m, torch.optim.SGD(m.parameters(), lr=0.0),
                                                  loss_of(m)).activations
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
        print(name, f"activations {activations[name] / 2**20:.2f} MiB ({activations[name] / budget:.3f}x budget)",
              notes.get(name, ""), flush=True)

    def run(name):
        m, opt = models[name]
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(a.steps):
            s, n = m.loss(x[:, :-1], x[:, 1:])
            (s / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - w0, time.process_time() - c0

    names = list(models)
    for name in names:  # warm-up
        run(name)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        t = {n: run(n) for n in order}
        for n in names:
            wall[n].append(t[n][0] / t["none"][0])
            cpu[n].append(t[n][1] / t["none"][1])
        print(f"round {r}: " + ", ".join(f"{n} wall {wall[n][-1]:.3f} cpu {cpu[n][-1]:.3f}" for n in names[1:]),
              flush=True)

    def summary(v):
        q = statistics.quantiles(v, n=10) if len(v) >= 2 else [v[0]] * 9
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "p10": q[0], "p90": q[-1]}

    out = {"args": vars(a), "budget_bytes": budget, "none_activation_bytes": none_bytes,
           "activations": activations, "notes": notes,
           "wall_vs_none": {n: summary(wall[n]) for n in names[1:]},
           "cpu_vs_none": {n: summary(cpu[n]) for n in names[1:]},
           "per_round": {"wall": wall, "cpu": cpu}}
    # the budget plan against full, per round (the same rounds)
    out["budget_vs_full"] = {"wall": summary([b / f for b, f in zip(wall["budget"], wall["full"])]),
                             "cpu": summary([b / f for b, f in zip(cpu["budget"], cpu["full"])])}
    print("| variant | activations vs budget | wall / none: median (p10-p90, min-max) | CPU / none: median (p10-p90, min-max) |")
    print("|---|---|---|---|")
    for n in names[1:]:
        w, c = out["wall_vs_none"][n], out["cpu_vs_none"][n]
        print(f"| {n} | {activations[n] / budget:.3f}x | {w['median']:.3f} ({w['p10']:.2f}-{w['p90']:.2f}, "
              f"{w['min']:.2f}-{w['max']:.2f}) | {c['median']:.3f} ({c['p10']:.2f}-{c['p90']:.2f}, "
              f"{c['min']:.2f}-{c['max']:.2f}) |")
    bf = out["budget_vs_full"]
    print(f"budget / full per round: wall {bf['wall']['median']:.3f} ({bf['wall']['p10']:.2f}-{bf['wall']['p90']:.2f}), "
          f"cpu {bf['cpu']['median']:.3f} ({bf['cpu']['p10']:.2f}-{bf['cpu']['p90']:.2f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
