"""Where a training step of the demo model spends its time, by aten op (torch.profiler, 1 thread).

    .venv/bin/python benchmarks/profile_train_step.py                 # eager
    .venv/bin/python benchmarks/profile_train_step.py --fused auto    # with fused_ops:backend=auto

Prints the self-time table and the share of the step in matmuls (aten::mm / addmm / addmm_ / bmm) and in the
SDPA attention kernels, forward and backward: the part of the step that operator fusion cannot shorten, so
1 / (that share) bounds what any fusion can gain (Amdahl). Also the rate of the step's matmuls (the profiler's
FLOP count over their self time) against a large square fp32 GEMM timed in the same process: when the two are
close, the matmuls already run at what this core can do and fusion has nothing left to take from them.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="demo")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--fused", default=None, help="fused_ops backend to apply (auto/reference/compiled)")
    a = p.parse_args()
    torch.set_num_threads(1)
    import llmopt.techniques  # noqa: F401
    from llmopt.core import apply_
    from llmopt.models import ModelConfig, build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig.from_name(a.model))
    if a.fused:
        from llmopt.techniques.fused_ops import FusedOpsConfig

        apply_(m, FusedOpsConfig(backend=a.fused))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
    x = torch.randint(0, m.config.vocab_size, (a.batch_size, a.seq_len + 1))

    def step():
        loss, n = m.loss(x[:, :-1], x[:, 1:])
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(a.steps):
            step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=20))
    total = sum(e.self_cpu_time_total for e in events)
    gemms = [e for e in events if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")]
    mm = sum(e.self_cpu_time_total for e in gemms)
    mm_flops = sum(e.flops for e in gemms)
    attn = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    fixed = (mm + attn) / total
    print(f"matmul share {mm / total:.1%}, attention kernels {attn / total:.1%}: {fixed:.1%} of the step is in "
          f"kernels fusion does not shorten; even free everything-else gives at most {1 / fixed:.2f}x")
    # the core's GEMM rate: a large square fp32 product, best of 5 (the same thread count)
    import time

    n = 2048
    u, v = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(u, v)
        best = min(best, time.perf_counter() - t0)
    counted = sum(e.self_cpu_time_total for e in gemms if e.flops)  # the profiler counts no FLOPs for addmm_
    step_rate = mm_flops / (counted * 1e-6) / 1e9 if counted else 0.0
    peak_rate = 2 * n ** 3 / best / 1e9
    print(f"matmul FLOPs per step (addmm_ not counted) {mm_flops / a.steps / 1e9:.1f} G at {step_rate:.0f} GFLOP/s in the step; a "
          f"{n}^3 fp32 GEMM here runs at {peak_rate:.0f} GFLOP/s: the step's matmuls at {step_rate / peak_rate:.0%} "
          "of it")


if __name__ == "__main__":
    main()
