"""Weight-only quantization on a real model: weight bytes, perplexity and decode tokens/s against fp32.

    .venv/bin/python benchmarks/bench_weight_only_quant.py --model smollm2-135m --rounds 5
    .venv/bin/python benchmarks/bench_weight_only_quant.py --model demo        # runs/demo, from `llmopt demo`
    .venv/bin/python benchmarks/bench_weight_only_quant.py --model PATH        # any run / HF directory or GGUF

Variants: `int8` (per channel), `int4:G` (group size G), each optionally `@torch` (PyTorch's int8/int4 kernels
for decode instead of llmopt's C kernels, i.e. the behaviour before them) or `@dequant` (dequantize + matmul).

All variants are built from the same fp32 weights in one process and timed interleaved (fp32, int8,
int4 g32, ... then again), `--rounds` times; the table gives medians and the ratio of medians.
Perplexity: non-overlapping windows over the first `--ppl-tokens` tokens of the bundled corpus
(the model's own tokenizer). Decode: greedy `llmopt.inference.generate`, batch 1, `--new-tokens`
after a `--prompt-len` prompt; tokens/s of the decode phase. Because whole `generate` calls are seconds
apart, a loaded machine moves each call's speed by 2x or more; the bench therefore also interleaves
*single decode steps* (`--token-steps` of them): each variant decodes its own greedy continuation with
its own cache, one `decode_one_token` each in rotated order, and the figure is the median over steps of
the per-step ratio fp32 time / variant time, with its 25-75% band. Weight bytes: every parameter and buffer
of the Linear and Embedding modules (tied tables once), against fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import llmopt.techniques  # noqa: F401  (registers the techniques)
from llmopt.core import apply_
from llmopt.inference import generate
from llmopt.measure.perplexity import perplexity
from llmopt.techniques.weight_only_quant import WeightOnlyQuantConfig


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for module in model.modules():
        if type(module).__name__ not in ("Linear", "Embedding", "IntWeightOnlyLinear", "IntWeightOnlyEmbedding"):
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def interleaved_decode_steps(variants: dict, prompt: torch.Tensor, steps: int,
                             kernels: str = "auto") -> dict[str, list[float]]:
    """{variant: [fp32 step seconds / variant step seconds, per decode step]}, steps interleaved in rotated order,
    inside `cpu_linear_kernels` (as `generate` decodes) unless kernels="torch"."""
    from llmopt.inference.cpu_linear import cpu_linear_kernels
    from llmopt.inference.generate import decode_one_token, make_cache, prefill

    with cpu_linear_kernels(*variants.values(), enabled=kernels == "auto"):
        return _interleaved_decode_steps(variants, prompt, steps, decode_one_token, make_cache, prefill)


def _interleaved_decode_steps(variants, prompt, steps, decode_one_token, make_cache, prefill):
    names = list(variants)
    state = {}
    for name, model in variants.items():
        cache = make_cache(model, 1, prompt.size(1) + steps + 1)
        logits = prefill(model, prompt, cache)
        state[name] = [logits.argmax(-1, keepdim=True), cache]
    ratios: dict[str, list[float]] = {name: [] for name in names if name != "fp32"}
    for i in range(steps):
        pos = torch.tensor([prompt.size(1) + i])
        seconds = {}
        for name in names[i % len(names):] + names[:i % len(names)]:
            token, cache = state[name]
            t0 = time.perf_counter()
            state[name][0], _ = decode_one_token(variants[name], token, pos, cache)
            seconds[name] = time.perf_counter() - t0
        for name in ratios:
            ratios[name].append(seconds["fp32"] / seconds[name])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, demo (the run directory runs/demo that `llmopt demo` trains), or a path")
    parser.add_argument("--variants", default="int8,int4:32,int4:64,int4:48")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--token-steps", type=int, default=64)
    parser.add_argument("--kernels", choices=("auto", "torch"), default="auto",
                        help="decode through generate's CPU kernels (auto: the fused stack step, GEMV kernels) or "
                             "module by module with F.linear (torch), for every variant alike")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llmopt.data import load_text
    from llmopt.models import load_pretrained

    source = args.model
    if source == "demo":
        source = "runs/demo"
        if not Path(source, "config.json").is_file():
            raise SystemExit("--model demo reads runs/demo: train it first with `llmopt demo` (about 7 minutes), "
                             "or pass --model PATH of a demo run directory")
    base, tokenizer = load_pretrained(source)
    base.eval()
    text = load_text(None)
    ids = torch.tensor(tokenizer.encode(text[-200_000:]), dtype=torch.long)[:args.ppl_tokens + args.prompt_len]
    prompt, ppl_ids = ids[:args.prompt_len][None], ids[args.prompt_len:]

    variants = {"fp32": base}
    for spec in args.variants.split(","):
        quant, _, kernel = spec.partition("@")
        bits, _, group = quant.partition(":")
        config = WeightOnlyQuantConfig(bits=int(bits[3:]), group_size=int(group) if group else None,
                                       kernel=kernel or "auto")
        model = copy.deepcopy(base)
        apply_(model, config)
        variants[spec] = model

    rows = {}
    fp_bytes = weight_bytes(base)
    for name, model in variants.items():
        t0 = time.perf_counter()
        ppl = perplexity(model, ppl_ids, window=args.window, stride=args.window)["ppl"]
        rows[name] = {"weight_bytes": weight_bytes(model), "bytes_ratio": weight_bytes(model) / fp_bytes,
                      "ppl": ppl, "ppl_s": time.perf_counter() - t0, "decode": [], "tokens": None}
        print(f"{name}: ppl {ppl:.3f}, {rows[name]['bytes_ratio']:.3f}x bytes", flush=True)
    for _ in range(2):  # warm-up
        for model in variants.values():
            generate(model, prompt, 4, kernels=args.kernels)
    for _ in range(args.rounds):
        for name, model in variants.items():
            result = generate(model, prompt, args.new_tokens, temperature=0.0, kernels=args.kernels)
            rows[name]["decode"].append(result.decode_tokens_per_second)
            rows[name]["tokens"] = result.new_tokens[0].tolist()
            print(f"{name}: decode {result.decode_tokens_per_second:.1f} tok/s", flush=True)
    token_ratios = interleaved_decode_steps(variants, prompt, args.token_steps, args.kernels)
    for name, ratios in token_ratios.items():
        q = statistics.quantiles(ratios, n=4)
        rows[name].update(step_speedup_median=statistics.median(ratios), step_speedup_band=[q[0], q[2]])
        print(f"{name}: per-step decode speed-up vs fp32 {statistics.median(ratios):.2f}x "
              f"(25-75%: {q[0]:.2f}-{q[2]:.2f}, {len(ratios)} steps)", flush=True)
    ref = rows["fp32"]
    ref_decode = statistics.median(ref["decode"])
    from llmopt.kernels.int_gemv import int_gemv_available, kernel_isa

    isa = kernel_isa() if int_gemv_available() else "unavailable"
    print(f"model {args.model}, C decode kernels: {isa}, {args.threads} thread(s), {args.rounds} interleaved rounds, ppl over "
          f"{ppl_ids.numel()} tokens (window {args.window})")
    print("| variant | weight MiB | bytes vs fp32 | ppl | ppl vs fp32 | decode tok/s (median) | decode vs fp32 "
          "| greedy tokens = fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        decode = statistics.median(row["decode"])
        same = sum(a == b for a, b in zip(row["tokens"], ref["tokens"]))
        row.update(decode_median=decode, decode_ratio=decode / ref_decode, ppl_ratio=row["ppl"] / ref["ppl"])
        print(f"| {name} | {row['weight_bytes'] / 2**20:.1f} | {row['bytes_ratio']:.3f}x | {row['ppl']:.3f} | "
              f"{row['ppl_ratio']:.4f}x | {decode:.1f} | {row['decode_ratio']:.2f}x | {same}/{len(ref['tokens'])} |")
    if args.json:
        meta = {"model": args.model, "kernels": isa, "threads": args.threads, "args": vars(args),
                "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({**rows, "_meta": meta}, f, indent=1)


if __name__ == "__main__":
    main()
