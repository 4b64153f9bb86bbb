"""Peak RSS with variable-length batches: default vs buffer_reuse (bucketing + arena cap + malloc_trim).

    .venv/bin/python benchmarks/bench_buffer_reuse.py --model demo --steps 30 --repeats 3

Each run is a fresh subprocess (`llmopt.measure.memory.run_in_subprocess`, peak = the child's VmHWM),
default and buffer_reuse interleaved. A run trains `--steps` AdamW steps on batches whose sequence
length is drawn uniformly from [16, max_len] (same seed for both), and reports its median step time.
The live-bytes lower bound is `account_training_step` at the longest length (params + grads + optimizer
state + saved activations).
"""

from __future__ import annotations

import argparse
import statistics


def one_run(*, model: str, steps: int, batch_size: int, max_len: int, reuse: bool, threads: int) -> dict:
    import random
    import time

    import torch

    torch.set_num_threads(threads)
    import llmopt.techniques  # noqa: F401
    from llmopt.core import apply_, call_hooks
    from llmopt.models import ModelConfig, build_model
    from llmopt.techniques.buffer_reuse import BufferReuseConfig

    torch.manual_seed(0)
    m = build_model(ModelConfig.from_name(model))
    hooks = list(apply_(m, BufferReuseConfig()).hooks) if reuse else []
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    rng = random.Random(0)
    state = type("S", (), {})()
    state.model, state.metrics = m, {}
    times = []
    for step in range(steps):
        state.step = step
        T = rng.randint(16, max_len)
        x = torch.randint(0, m.config.vocab_size, (batch_size, T + 1))
        t0 = time.perf_counter()
        batch = call_hooks(hooks, "before_forward", state, (x[:, :-1], x[:, 1:]))
        loss_sum, n = m.loss(*batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        call_hooks(hooks, "after_optimizer_step", state)
        times.append(time.perf_counter() - t0)
    from llmopt.measure.memory import account_training_step

    x = torch.randint(0, m.config.vocab_size, (batch_size, max_len + 1))
    acc = account_training_step(m, opt, lambda: (lambda s, n: s / n)(*m.loss(x[:, :-1], x[:, 1:])))
    return {"step_s": statistics.median(times), "live_lower_bound": acc.total}


def main() -> None:
    from llmopt.measure.memory import run_in_subprocess

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="demo")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    rows = {"default": [], "buffer_reuse": []}
    for _ in range(a.repeats):
        for name in rows:
            out = run_in_subprocess("bench_buffer_reuse:one_run", dict(model=a.model, steps=a.steps,
                                    batch_size=a.batch_size, max_len=a.max_len, reuse=name != "default",
                                    threads=a.threads))
            assert out["ok"], out
            rows[name].append({"peak": out["peak_rss_bytes"], **out["result"]})
            print(name, rows[name][-1], flush=True)
    base_peak = statistics.median(r["peak"] for r in rows["default"])
    base_step = statistics.median(r["step_s"] for r in rows["default"])
    print("| run | peak RSS MiB | vs default | step s | vs default | live lower bound MiB |")
    print("|---|---|---|---|---|---|")
    for name, rs in rows.items():
        peak = statistics.median(r["peak"] for r in rs)
        step = statistics.median(r["step_s"] for r in rs)
        print(f"| {name} | {peak / 2**20:.0f} | {peak / base_peak:.2f}x | {step:.3f} | {step / base_step:.2f}x | "
              f"{rs[0]['live_lower_bound'] / 2**20:.0f} |")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    main()
