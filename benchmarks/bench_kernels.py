"""Kernel-level benchmarks for fused linear + cross-entropy and flash attention (not tests).

    python benchmarks/bench_kernels.py ce          # N=2048, V=32k: peak memory and step time vs F.cross_entropy(h @ W.T)
    python benchmarks/bench_kernels.py attention   # T=2048, 4096: saved bytes vs materialized scores; time vs SDPA math
    python benchmarks/bench_kernels.py train --variants fused_ops compile   # demo train step vs eager, in one process
    python benchmarks/bench_kernels.py all --rounds 5 --json out.json

Interleaved A B A B rounds; each figure is the median over rounds of the per-round ratio. Peak memory
is measured per run in a fresh process (VmHWM minus the resident set before the step), so one
run's allocations cannot hide another's. Threads: 1 by default (shared machines), --threads to change.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- fused linear cross-entropy -----------------------------------------------------------------------

def ce_inputs(n, dim, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g) * dim ** -0.5).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, t


def ce_child(kind: str, n: int, dim: int, vocab: int, steps: int, threads: int) -> dict:
    """One fresh-process run: peak bytes above the pre-step resident set, and the median step time."""
    torch.set_num_threads(threads)
    from llmopt.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference

    fn = linear_cross_entropy_reference if kind == "naive" else \
        (lambda *a: fused_linear_cross_entropy(*a, backend="chunked"))
    h, w, t = ce_inputs(n, dim, vocab)
    base = _rss("VmRSS")
    times = []
    for _ in range(steps + 1):
        h.grad = w.grad = None
        start = time.perf_counter()
        loss, count = fn(h, w, t)
        (loss / count).backward()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": _rss("VmHWM") - base, "step_s": statistics.median(times[1:])}


def bench_ce(rounds: int, threads: int) -> dict:
    from llmopt.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference
    from llmopt.measure.memory import run_in_subprocess

    n, dim, vocab = 2048, 256, 32_000  # the demo model's width
    mem, tim = [], []
    for r in range(rounds):
        runs = {}
        for kind in ("naive", "fused") if r % 2 == 0 else ("fused", "naive"):
            out = run_in_subprocess("bench_kernels:ce_child", dict(kind=kind, n=n, dim=dim, vocab=vocab, steps=2,
                                                                   threads=threads), timeout=900)
            assert out["ok"], out
            runs[kind] = out["result"]
        mem.append(runs["fused"]["peak_bytes"] / runs["naive"]["peak_bytes"])
        tim.append(runs["fused"]["step_s"] / runs["naive"]["step_s"])
        print(f"ce round {r}: naive {runs['naive']}, fused {runs['fused']}", flush=True)
    grads = {}
    for (nn_, vv) in ((n, vocab), (256, 262_144)):
        h, w, t = ce_inputs(nn_, dim, vv)
        loss_r, _ = linear_cross_entropy_reference(h, w, t)
        loss_r.backward()
        ref = (loss_r.detach(), h.grad.clone(), w.grad.clone())
        h.grad = w.grad = None
        loss_f, _ = fused_linear_cross_entropy(h, w, t, backend="chunked")
        loss_f.backward()
        grads[f"N={nn_} V={vv}"] = {"loss": rel(loss_f.detach(), ref[0]), "grad_hidden": rel(h.grad, ref[1]),
                                    "grad_weight": rel(w.grad, ref[2])}
    return {"shape": {"N": n, "dim": dim, "V": vocab}, "peak_ratio_median": statistics.median(mem),
            "peak_ratios": mem, "time_ratio_median": statistics.median(tim), "time_ratios": tim,
            "grad_rel_err_vs_fp32_reference": grads}


# ---- attention ----------------------------------------------------------------------------------------

def bench_attention(rounds: int, threads: int, lengths=(2048, 4096)) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmopt.kernels import attention_reference, flash_attention
    from llmopt.measure.memory import saved_activation_bytes

    torch.set_num_threads(threads)
    B, H, Hk, hd = 1, 8, 4, 32  # the demo model's attention (dim 256, 8 heads, 4 kv heads)
    results = {}
    for T in lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, h, T, hd, generator=g).requires_grad_() for h in (H, Hk, Hk))
        do = torch.randn(B, H, T, hd, generator=g)

        def tiled():
            return flash_attention(q, k, v, causal=True, backend="tiled")

        def materialized():
            return attention_reference(q, k, v, causal=True)

        def sdpa_math():
            with sdpa_kernel([SDPBackend.MATH]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        saved = {}
        for name, fn in (("tiled", tiled), ("materialized", materialized), ("sdpa_math", sdpa_math)):
            out, act, _ = saved_activation_bytes(fn)
            out.backward(do)
            saved[name] = act
        ratios = []
        for r in range(rounds):
            t = {}
            for name, fn in ((("tiled", tiled), ("sdpa_math", sdpa_math)) if r % 2 == 0
                             else (("sdpa_math", sdpa_math), ("tiled", tiled))):
                q.grad = k.grad = v.grad = None
                start = time.perf_counter()
                fn().backward(do)
                t[name] = time.perf_counter() - start
            ratios.append(t["tiled"] / t["sdpa_math"])
            print(f"attention T={T} round {r}: {t}", flush=True)
        q.grad = k.grad = v.grad = None
        tiled().backward(do)
        g_tiled = (q.grad.clone(), k.grad.clone(), v.grad.clone())
        q.grad = k.grad = v.grad = None
        materialized().backward(do)
        results[f"T={T}"] = {
            "saved_bytes": saved,
            "saved_ratio_vs_materialized": saved["tiled"] / saved["materialized"],
            "saved_ratio_vs_sdpa_math": saved["tiled"] / saved["sdpa_math"],
            "fwd_bwd_time_ratio_vs_sdpa_math_median": statistics.median(ratios), "time_ratios": ratios,
            "grad_rel_err_vs_materialized": [rel(a, b) for a, b in zip(g_tiled, (q.grad, k.grad, v.grad))],
        }
    return {"shape": {"B": B, "nh": H, "nkv": Hk, "hd": hd}, **results}


# ---- whole-model train step ------------------------------------------------------------------------------

def bench_train(rounds: int, threads: int, variants: list[str], model: str = "demo", batch: int = 16,
                seq_len: int = 128) -> dict:
    """Eager vs each variant (a `+`-joined list of technique specs), one process, same weights and batches.

    Every model is built from the same seed and steps on the same batch; each round times one AdamW step
    of each model in a rotated order, so load from other jobs hits all of them alike. Compile time is paid
    in the untimed warm-up steps. Ratio = variant step time / eager step time of the same round.
    """
    import llmopt
    from llmopt.core import apply_, parse_technique_spec
    from llmopt.models import ModelConfig, build_model

    torch.set_num_threads(threads)
    llmopt.load_techniques()
    names = ["eager", *variants]
    models, opts = {}, {}
    for name in names:
        torch.manual_seed(0)
        m = build_model(ModelConfig.from_name(model))
        if name != "eager":
            apply_(m, *[parse_technique_spec(spec) for spec in name.split("+")])
        models[name], opts[name] = m, torch.optim.AdamW(m.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, models["eager"].config.vocab_size, (batch, seq_len + 1), generator=g)
    losses = {}

    def step(name):
        m, opt = models[name], opts[name]
        start = time.perf_counter()
        loss_sum, n = m.loss(x[:, :-1], x[:, 1:])
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.setdefault(name, float(loss_sum / n))
        return time.perf_counter() - start

    for name in names:  # warm-up (compiles)
        for _ in range(2):
            step(name)
    ratios = {name: [] for name in variants}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        t = {name: step(name) for name in order}
        for name in variants:
            ratios[name].append(t["eager"] / t[name])
        print(f"train round {r}: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()), flush=True)
    return {"model": model, "batch": [batch, seq_len], "threads": threads,
            "first_step_loss": losses,
            "speedup_vs_eager_median": {k: statistics.median(v) for k, v in ratios.items()},
            "speedup_vs_eager_band": {k: [min(v), max(v)] for k, v in ratios.items()},
            "speedups": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["ce", "attention", "train", "all"])
    parser.add_argument("--variants", nargs="+", default=["fused_ops"],
                        help="train: technique specs (joined by +) to time against eager")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {}
    if args.what in ("ce", "all"):
        results["fused_linear_cross_entropy"] = bench_ce(args.rounds, args.threads)
    if args.what in ("attention", "all"):
        results["flash_attention"] = bench_attention(args.rounds, args.threads)
    if args.what == "train":
        results["train_step"] = bench_train(args.rounds, args.threads, args.variants)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
