"""Linear-time architectures (Mamba, RetNet) against their own slow paths and a same-size transformer.

Every comparison is interleaved: in each round every contender runs once, each round's times are divided
by that round's baseline time, and the median (min-max) of the per-round ratios is reported.

  scan     demo_mamba forward at length 2,048 (batch 1): chunked torch scan and the C scan (scan="auto", the
           default on fp32 CPU: `llmopt.kernels.scan_backward`) vs the sequential scan (baseline), and
           transformers' `MambaForCausalLM` slow path on the same weights as a peer column. Also the scan alone
           on one layer's shape (d_inner 512, d_state 16): without autograd (prefill), the training forward
           (inputs require grad: the C scan saves its checkpoints) and forward + backward.
  train    one training step (loss, backward, AdamW step) of demo_mamba at the demo recipe's batch (16 x 128):
           scan="chunked" (the torch path, the default before the C backward; baseline) vs scan="auto".
  ssd      the Mamba-2 SSD scan alone on one demo_mamba2 layer's shape (8 heads of 64, d_state 64) at length
           2,048: chunked matrix form (chunk 64) vs the sequential recurrence (baseline).
  decode   tokens/s of one greedy decode step after a context of 8,192 vs 128 (Mamba, RetNet), the same-size
           transformer (`demo` with max_seq_len 8,448) with a dense KV cache at 8,192, and cache bytes at
           128 / 2,048 / 8,192 positions. `mamba` is the default (scan="auto": on fp32 CPU the whole block in
           one C call per layer, `mamba_block_step_cpu`); `mamba_torch` the same weights with scan="chunked"
           (the torch decode step); `mamba_mixer_c` the same weights with the C step between the projections
           only (`mamba_decode_step_cpu`, what `use_fused_scan_` installed before the whole-block step).
  quality  validation-loss curves of runs trained with `llmopt train demo|demo_mamba|demo_retnet` (and
           demo_mamba2 when present; run them first, see docs/results/linear_time_quality.md), drawn in one
           plot with `llmopt.measure.plots.plot_curves`.

    python benchmarks/bench_linear_time.py --part scan train --rounds 5 --forward-rounds 3 --threads 1 \
        --out docs/results/bench_linear_time.json
    python benchmarks/bench_linear_time.py --part decode --rounds 9 --threads 1 \
        --out docs/results/bench_linear_time_decode.json
    python benchmarks/bench_linear_time.py --part quality --runs runs/lt100 --out docs/results/linear_time_quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from llmopt.inference import make_cache
from llmopt.models import ModelConfig, build_model
from llmopt.kernels.scan import mamba_decode_step_cpu, selective_scan_cpu
from llmopt.kernels.scan_backward import CHECKPOINT_EVERY, selective_scan_cpu_autograd
from llmopt.models.mamba import scan_chunked, scan_sequential


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(contenders: dict, baseline: str, rounds: int) -> dict:
    """{name: fn}: each round runs every fn once (rotating order); median/min/max of time / baseline time."""
    names = list(contenders)
    for fn in contenders.values():  # warmup
        fn()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(_timed(contenders[n]))
    out = {}
    for n in names:
        ratios = [t / b for t, b in zip(times[n], times[baseline])]
        out[n] = {"median_s": statistics.median(times[n]), "time_ratio_to_baseline": statistics.median(ratios),
                  "ratio_min": min(ratios), "ratio_max": max(ratios), "speedup": 1 / statistics.median(ratios)}
    return out


def to_hf_mamba(model):
    from transformers import MambaConfig, MambaForCausalLM

    s, c = model.settings, model.config
    hf = MambaForCausalLM(MambaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layer,
                                      state_size=s["d_state"], intermediate_size=s["d_inner"], conv_kernel=s["d_conv"],
                                      time_step_rank=s["dt_rank"], layer_norm_epsilon=c.norm_eps,
                                      use_conv_bias=s["conv_bias"], use_bias=s["bias"])).eval()
    hf.load_state_dict({("lm_head.weight" if k == "lm_head.weight" else "backbone." + k): v
                        for k, v in model.state_dict().items()})
    return hf


@torch.no_grad()
def bench_scan(rounds: int, forward_rounds: int, length: int = 2048) -> dict:
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("demo_mamba")).eval()
    fused = copy.deepcopy(model)  # the default scan="auto": the C scan on fp32 CPU
    hf = to_hf_mamba(model)
    idx = torch.randint(0, model.config.vocab_size, (1, length))

    def ours(scan):
        def run():
            model.set_scan(scan)
            model(idx)
        return run

    model.set_scan("sequential")
    ref = model(idx)
    model.set_scan("chunked")
    max_diff = (model(idx) - ref).abs().max().item()
    fused_diff = (fused(idx) - ref).abs().max().item()
    hf_diff = (hf(idx, use_cache=False).logits - ref).abs().max().item()
    forward = interleaved({"sequential_scan": ours("sequential"), "chunked_scan": ours("chunked"),
                           "c_scan_auto": lambda: fused(idx),
                           "transformers_slow_path": lambda: hf(idx, use_cache=False)}, "sequential_scan",
                          forward_rounds)
    D, N = model.settings["d_inner"], model.settings["d_state"]
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(1, length, D, generator=g), torch.rand(1, length, D, generator=g) * 0.1
    A = -torch.exp(model.layers[0].mixer.A_log.float())
    Bm, Cm = torch.randn(1, length, N, generator=g), torch.randn(1, length, N, generator=g)
    L = model.settings["chunk_size"]
    scan_only = interleaved({"sequential_scan": lambda: scan_sequential(x, dt, A, Bm, Cm),
                             "chunked_scan": lambda: scan_chunked(x, dt, A, Bm, Cm, chunk_size=L),
                             "fused_cpu_scan": lambda: selective_scan_cpu(x, dt, A, Bm, Cm),
                             "c_scan_autograd": lambda: selective_scan_cpu_autograd(x, dt, A, Bm, Cm)},
                            "sequential_scan", rounds)
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, Bm, Cm)]
    dy = torch.randn(x.shape, generator=g)

    def train_forward(scan):
        def run():
            with torch.enable_grad():
                return scan(*inputs)[0]
        return run

    def forward_backward(scan):
        def run():
            with torch.enable_grad():
                torch.autograd.backward(scan(*inputs)[0], dy)
        return run

    scans = {"sequential_scan": scan_sequential, "chunked_scan": lambda *a: scan_chunked(*a, chunk_size=L),
             "c_scan_autograd": selective_scan_cpu_autograd}
    grads = {}
    for name, scan in scans.items():
        for t in inputs:
            t.grad = None
        forward_backward(scan)()
        grads[name] = [t.grad.clone() for t in inputs]
    grad_err = {name: max(float((a - b).abs().max() / b.abs().max())
                          for a, b in zip(grads[name], grads["sequential_scan"])) for name in scans}
    scan_train_forward = interleaved({n: train_forward(f) for n, f in scans.items()}, "sequential_scan", rounds)
    scan_fwd_bwd = interleaved({n: forward_backward(f) for n, f in scans.items()}, "sequential_scan", rounds)
    return {"length": length, "model": "demo_mamba", "forward": forward, "scan_only": scan_only,
            "scan_train_forward": scan_train_forward, "scan_forward_backward": scan_fwd_bwd,
            "max_rel_grad_err_vs_sequential": grad_err, "checkpoint_every": CHECKPOINT_EVERY,
            "checkpoint_bytes_per_layer_per_row": -(-length // CHECKPOINT_EVERY) * D * N * 4,
            "max_abs_logit_diff_chunked_vs_sequential": max_diff, "max_abs_logit_diff_c_scan_vs_sequential": fused_diff,
            "max_abs_logit_diff_transformers_vs_ours": hf_diff}


def bench_train(rounds: int, batch: int = 16, seq_len: int = 128) -> dict:
    """One optimizer step of demo_mamba: torch chunked scan (baseline) vs the default C scan, same weights/data."""
    torch.manual_seed(0)
    before = build_model(ModelConfig.from_name("demo_mamba"))
    before.set_scan("chunked")
    after = copy.deepcopy(before)
    after.set_scan("auto")
    idx = torch.randint(0, before.config.vocab_size, (batch, seq_len + 1))
    optims = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (before, after)}
    losses = {}

    def step(model, name):
        def run():
            loss, n = model.loss(idx[:, :-1], idx[:, 1:])
            loss = loss / n
            loss.backward()
            optims[model].step()
            optims[model].zero_grad(set_to_none=True)
            losses.setdefault(name, []).append(float(loss.detach()))
        return run

    result = interleaved({"chunked_scan": step(before, "chunked_scan"), "c_scan_auto": step(after, "c_scan_auto")},
                         "chunked_scan", rounds)
    return {"batch": batch, "seq_len": seq_len, "step": result,
            "losses_first_steps": {k: v[:3] for k, v in losses.items()},
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses["chunked_scan"], losses["c_scan_auto"])),
            "scan_share_note": "both contenders pay the same projections, conv, loss and AdamW; only the scan differs"}


@torch.no_grad()
def bench_ssd(rounds: int, length: int = 2048) -> dict:
    from llmopt.models.mamba2 import ssd_chunked, ssd_sequential

    g = torch.Generator().manual_seed(0)
    H, P, N = 8, 64, 64
    x, dt = torch.randn(1, length, H, P, generator=g), torch.rand(1, length, H, generator=g) * 0.1
    a = -(torch.rand(H, generator=g) * 15 + 1)
    Bm, Cm = torch.randn(1, length, N, generator=g), torch.randn(1, length, N, generator=g)
    y_ref, _ = ssd_sequential(x, dt, a, Bm, Cm)
    y, _ = ssd_chunked(x, dt, a, Bm, Cm, chunk_size=64)
    out = interleaved({"sequential_ssd": lambda: ssd_sequential(x, dt, a, Bm, Cm),
                       "chunked_ssd": lambda: ssd_chunked(x, dt, a, Bm, Cm, chunk_size=64)}, "sequential_ssd", rounds)
    return {"length": length, "heads": H, "headdim": P, "d_state": N, "chunk": 64, "scan_only": out,
            "max_abs_diff_chunked_vs_sequential": (y - y_ref).abs().max().item()}


@torch.no_grad()
def _fill(model, cache, length: int, piece: int = 512) -> None:
    for start in range(0, length, piece):
        end = min(length, start + piece)
        ids = torch.randint(0, model.config.vocab_size, (1, end - start))
        model(ids, input_pos=torch.arange(start, end), cache=cache)


@torch.no_grad()
def bench_decode(rounds: int, steps: int = 16) -> dict:
    torch.manual_seed(0)
    models = {"mamba": build_model(ModelConfig.from_name("demo_mamba")).eval(),
              "retnet": build_model(ModelConfig.from_name("demo_retnet")).eval(),
              "transformer": build_model(ModelConfig.from_name("demo", max_seq_len=8192 + 256)).eval()}
    models["mamba_torch"] = copy.deepcopy(models["mamba"])
    models["mamba_torch"].set_scan("chunked")  # the torch decode step (the default before the C block step)
    models["mamba_mixer_c"] = copy.deepcopy(models["mamba"])
    for layer in models["mamba_mixer_c"].layers:  # C between the projections only (the opt-in step before)
        layer.mixer.step_fn = mamba_decode_step_cpu
    caches, positions = {}, {}
    for name, model in models.items():
        for ctx in ((128, 8192) if name in ("mamba", "retnet") else (8192,)):
            cache = make_cache(model, 1, max_len=8192 + 256)
            _fill(model, cache, ctx)
            caches[f"{name}@{ctx}"] = (model, cache)
            positions[f"{name}@{ctx}"] = ctx

    def decode(key):
        model, cache = caches[key]

        def run():
            token = torch.zeros(1, 1, dtype=torch.long)
            for _ in range(steps):
                pos = positions[key]
                if pos >= 8192 + 255:
                    return
                token = model(token, input_pos=torch.tensor([pos]), cache=cache)[:, -1].argmax(-1, keepdim=True)
                positions[key] = pos + 1
        return run

    # 8k cache positions advance by rounds * steps (< 256) during the runs; the contexts stay ~8k and ~128
    result = interleaved({k: decode(k) for k in caches}, "transformer@8192", rounds)
    for k in result:
        result[k]["tokens_per_second"] = steps / result[k]["median_s"]
    bytes_at = {}
    for name, model in models.items():
        if name in ("mamba_mixer_c", "mamba_torch"):
            continue
        row = {}
        for length in (128, 2048, 8192):
            cache = make_cache(model, 1, max_len=length)
            if name == "transformer":  # a KV cache's bytes are what it holds: per-token bytes * positions
                row[length] = cache.bytes_per_token * length
            else:
                row[length] = cache.nbytes
        bytes_at[name] = row
    return {"steps_per_round": steps, "decode": result, "cache_bytes": bytes_at,
            "mamba_8k_over_128": result["mamba@8192"]["tokens_per_second"] / result["mamba@128"]["tokens_per_second"],
            "retnet_8k_over_128": result["retnet@8192"]["tokens_per_second"] / result["retnet@128"]["tokens_per_second"],
            "mamba_vs_transformer_8k": result["mamba@8192"]["speedup"],
            "mamba_vs_transformer_8k_band": [1 / result["mamba@8192"]["ratio_max"],
                                             1 / result["mamba@8192"]["ratio_min"]],
            "mamba_torch_vs_transformer_8k": result["mamba_torch@8192"]["speedup"],
            "mamba_mixer_c_vs_transformer_8k": result["mamba_mixer_c@8192"]["speedup"],
            "retnet_vs_transformer_8k": result["retnet@8192"]["speedup"],
            "mamba_cache_saving_8k": 1 - bytes_at["mamba"][8192] / bytes_at["transformer"][8192],
            "retnet_cache_saving_8k": 1 - bytes_at["retnet"][8192] / bytes_at["transformer"][8192]}


def bench_quality(runs_dir: Path, plot_path: Path) -> dict:
    from llmopt.measure.plots import plot_curves

    curves, final = {}, {}
    for name in ("demo", "demo_mamba", "demo_retnet", "demo_mamba2"):
        if name == "demo_mamba2" and not (runs_dir / name / "metrics.jsonl").exists():
            continue  # optional fourth curve
        points = []
        for line in (runs_dir / name / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row.get("val_loss") is not None:
                points.append((row["step"], row["val_loss"]))
        curves[name] = points
        final[name] = points[-1][1] if points else None
    plot_curves(curves, plot_path, ylabel="validation loss")
    base = final["demo"]
    return {"final_val_loss": final, "ratio_to_transformer": {k: v / base for k, v in final.items() if v and base},
            "plot": str(plot_path), "curves": curves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["scan", "decode"],
                        choices=["scan", "train", "ssd", "decode", "quality"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--forward-rounds", type=int, default=3, help="rounds of the length-2,048 model forwards")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=Path, default=Path("runs/linear_time"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-linear-time.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "rounds": args.rounds}
    if "scan" in args.part:
        report["scan"] = bench_scan(args.rounds, args.forward_rounds)
        print(json.dumps(report["scan"], indent=1))
    if "train" in args.part:
        report["train"] = bench_train(args.rounds)
        print(json.dumps(report["train"], indent=1))
    if "ssd" in args.part:
        report["ssd"] = bench_ssd(args.rounds)
        print(json.dumps(report["ssd"], indent=1))
    if "decode" in args.part:
        report["decode"] = bench_decode(args.rounds)
        print(json.dumps({k: v for k, v in report["decode"].items()}, indent=1))
    if "quality" in args.part:
        report["quality"] = bench_quality(args.runs, args.out.with_suffix(".png"))
        print(json.dumps({k: v for k, v in report["quality"].items() if k != "curves"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
