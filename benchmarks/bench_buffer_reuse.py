"""Peak RSS with variable-length batches: default vs buffer_reuse (bucketing + arena cap + malloc_trim).

    .venv/bin/python benchmarks/bench_buffer_reuse.py --model demo --steps 30 --repeats 3
    .venv/bin/python benchmarks/bench_buffer_reuse.py --variants buffer_reuse buffer_reuse:mmap_threshold=none
    .venv/bin/python benchmarks/bench_buffer_reuse.py --variants "THP_MEM_ALLOC_ENABLE=1 buffer_reuse"

A variant is a technique spec, optionally preceded by `NAME=value` environment variables for its child
process (allocator settings read at process start), or only environment variables (the default model with them).

Each run is a fresh subprocess (`llmopt.measure.memory.run_in_subprocess`, peak = the child's VmHWM),
default and buffer_reuse interleaved. A run trains `--steps` AdamW steps on batches whose sequence
length is drawn uniformly from [16, max_len] (same seed for both), and reports its median step time.
The live-bytes lower bound is `account_training_step` at the longest length (params + grads + optimizer
state + saved activations).
"""

from __future__ import annotations

import argparse
import os
import statistics


def one_run(*, model: str, steps: int, batch_size: int, max_len: int, spec: str | None, threads: int) -> dict:
    import random
    import time

    import torch

    torch.set_num_threads(threads)
    import llmopt.techniques  # noqa: F401
    from llmopt.core import apply_, call_hooks, parse_technique_spec
    from llmopt.models import ModelConfig, build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig.from_name(model))
    hooks = list(apply_(m, parse_technique_spec(spec)).hooks) if spec else []
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    from llmopt.techniques.buffer_reuse import rss_bytes

    rss_before = rss_bytes()  # torch, the model and its weights: what the step's memory sits on
    rng = random.Random(0)
    state = type("S", (), {})()
    state.model, state.metrics = m, {}
    times, cpu = [], []
    for step in range(steps):
        state.step = step
        T = rng.randint(16, max_len)
        x = torch.randint(0, m.config.vocab_size, (batch_size, T + 1))
        t0, c0 = time.perf_counter(), time.process_time()
        batch = call_hooks(hooks, "before_forward", state, (x[:, :-1], x[:, 1:]))
        loss_sum, n = m.loss(*batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        call_hooks(hooks, "after_optimizer_step", state)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    from llmopt.measure.memory import account_training_step

    x = torch.randint(0, m.config.vocab_size, (batch_size, max_len + 1))
    acc = account_training_step(m, opt, lambda: (lambda s, n: s / n)(*m.loss(x[:, :-1], x[:, 1:])))
    out = {"step_s": statistics.median(times), "cpu_s": statistics.median(cpu), "live_lower_bound": acc.total,
           "rss_before": rss_before}
    import sys

    alloc = sys.modules.get("llmopt.kernels.cpu_allocator")
    if alloc is not None and alloc.installed():  # the caching allocator's counters, for the report
        st = alloc.stats()
        out["allocator"] = {"requests": st.requests, "reused": st.reused, "extended": st.extended,
                            "new_page_MiB": round(st.new_page_bytes / 2**20, 1),
                            "peak_live_MiB": round(st.peak_live_bytes / 2**20, 1),
                            "high_water_MiB": round(st.peak_touched_bytes / 2**20, 1)}
    return out


def split_variant(name: str) -> tuple[dict[str, str], str | None]:
    """'A=1 B=2 spec' -> ({A: 1, B: 2}, spec); the spec may be absent (None: the default model)."""
    env, spec = {}, None
    for token in name.split():
        if "=" in token and token.split("=", 1)[0].replace("_", "A").isalnum() and token.split("=", 1)[0].isupper():
            key, value = token.split("=", 1)
            env[key] = value
        else:
            spec = token
    return env, (None if spec in (None, "default") else spec)


def main() -> None:
    from llmopt.measure.memory import run_in_subprocess

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="demo")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["buffer_reuse"], help="technique specs to compare with default")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    rows = {name: [] for name in ["default", *a.variants]}
    for r in range(a.repeats):
        names = list(rows)
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated order
            env, spec = split_variant(name)
            out = run_in_subprocess("bench_buffer_reuse:one_run", dict(model=a.model, steps=a.steps,
                                    batch_size=a.batch_size, max_len=a.max_len, spec=spec, threads=a.threads),
                                    env={**os.environ, **env} if env else None)
            assert out["ok"], out
            rows[name].append({"peak": out["peak_rss_bytes"], **out["result"]})
            print(name, rows[name][-1], flush=True)
    print("| run | peak RSS MiB | peak vs default (per round) | peak above start MiB | vs live lower bound | "
          "step time vs default (per round) | CPU time vs default (per round) |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        peak = [r["peak"] / d["peak"] for r, d in zip(rs, rows["default"])]
        step = [r["step_s"] / d["step_s"] for r, d in zip(rs, rows["default"])]
        cpu = [r["cpu_s"] / d["cpu_s"] for r, d in zip(rs, rows["default"])]
        above = statistics.median(r["peak"] - r["rss_before"] for r in rs)
        bound = rs[0]["live_lower_bound"]
        print(f"| {name} | {statistics.median(r['peak'] for r in rs) / 2**20:.0f} | {statistics.median(peak):.2f}x "
              f"({min(peak):.2f}-{max(peak):.2f}) | {above / 2**20:.0f} | {above / bound:.2f}x of {bound / 2**20:.0f} MiB | "
              f"{statistics.median(step):.2f}x ({min(step):.2f}-{max(step):.2f}) | "
              f"{statistics.median(cpu):.2f}x ({min(cpu):.2f}-{max(cpu):.2f}) |")
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    main()
