"""Inference benchmarks on SmolLM2-135M (fp32, CPU): prompt lookup, quantized KV cache, greedy vs transformers.

    python benchmarks/bench_inference.py lookup   # plain vs prompt lookup, copy-heavy and no-copy prompts
    python benchmarks/bench_inference.py kv       # bytes, perplexity with the cache in the loop, decode at 2k
    python benchmarks/bench_inference.py hf [--dtype bf16]   # greedy tokens and tok/s vs transformers generate
    python benchmarks/bench_inference.py spec [--draft DIR]  # speculative decoding with the distilled draft
                                                             # (built by the distill_draft recipe if DIR is absent)
Add `--json docs/results/inference_WHICH.json` to store every printed row.

Timed configurations run interleaved in one process, round by round; ratios are per round, reported as
median (min-max) over the rounds. tok/s counts new tokens over the whole generate call (prefill included),
as the transformers anchors (peer_anchors.md W3/W4) do. Prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from llmopt.data.corpus import default_corpus_text
from llmopt.inference import (DraftModelProposer, KVCache, PromptLookupProposer, generate, make_cache,
                              make_quantized_cache, speculative_generate)
from llmopt.models import load_pretrained


ROWS: list[dict] = []


def emit(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def rounds_table(name, configs, rounds, baseline):
    """Run every config once per round (order rotated), return per-config times and per-round ratios."""
    times = {c: [] for c in configs}
    outputs = {}
    for r in range(rounds):
        order = list(configs)[r % len(configs):] + list(configs)[: r % len(configs)]
        for c in order:
            start = time.perf_counter()
            outputs[c] = configs[c]()
            times[c].append(time.perf_counter() - start)
    for c in configs:
        ratios = [b / t for b, t in zip(times[baseline], times[c])]  # tok/s ratio = time ratio inverted
        emit(bench=name, config=c, median_s=statistics.median(times[c]), min_s=min(times[c]), max_s=max(times[c]),
             tok_s_ratio_vs_baseline=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    return outputs


def shakespeare_ids(tokenizer):
    text = default_corpus_text()
    return tokenizer.encode(text[100_000:140_000])


def bench_lookup(args):
    model, tok = load_pretrained("smollm2-135m")
    ids = shakespeare_ids(tok)
    passage = ids[2000:2150]
    newline = tok.encode("\n\n")
    copy_prompt = passage + newline + passage + newline + passage[:20]
    plain_prompt = ids[:128]
    for label, prompt in (("copy-heavy", copy_prompt), ("no-copy", plain_prompt)):
        n = args.new_tokens
        configs = {
            "plain": lambda p=prompt: generate(model, [p], n),
            "prompt_lookup": lambda p=prompt: speculative_generate(model, [p], n, proposer=PromptLookupProposer(),
                                                                    k=10),
        }
        out = rounds_table(f"lookup/{label} ({len(prompt)} prompt + {n} new)", configs, args.rounds, "plain")
        spec = out["prompt_lookup"]
        emit(bench=f"lookup/{label}", identical=torch.equal(out["plain"].tokens, spec.tokens),
             target_forwards=spec.target_forwards, plain_forwards=n, acceptance=spec.acceptance_rate,
             accepted=spec.accepted, proposed=spec.proposed)


def _nll_with_cache(model, ids, cache, chunk):
    """Mean next-token NLL of ids (1, L) fed through `cache` in chunks of `chunk` tokens."""
    total, count = 0.0, 0
    cache.reset()
    with torch.no_grad():
        for start in range(0, ids.size(1) - 1, chunk):
            end = min(start + chunk, ids.size(1) - 1)
            logits = model(ids[:, start:end], input_pos=torch.arange(start, end), cache=cache)
            total += torch.nn.functional.cross_entropy(logits[0].float(), ids[0, start + 1:end + 1],
                                                       reduction="sum").item()
            count += end - start
    return total / count


def bench_kv(args):
    model, tok = load_pretrained("smollm2-135m")
    c = model.config
    L = args.context
    fp16 = KVCache(c.n_layer, 1, c.n_kv_head, L, c.head_dim, torch.float16).bytes_per_token
    for bits in (8, 4, 2):
        q16 = make_quantized_cache(model, 1, L, bits=bits, dtype=torch.float16, residual_length=args.residual)
        emit(bench="kv/bytes", bits=bits, context=L, bytes_per_token=q16.bytes_per_token,
             fp16_bytes_per_token=fp16, ratio_vs_fp16=q16.bytes_per_token / fp16,
             worst_case_ratio=max(q16.bytes_at(n) / n for n in range(L - 64, L + 1)) / fp16)
    # perplexity with the cache in the loop: held-out Shakespeare (the tail of the corpus), windows of L tokens
    text = default_corpus_text()
    ids = torch.tensor(tok.encode(text[-int(len(text) * 0.05):]))
    windows = [ids[i * L:(i + 1) * L][None] for i in range(args.windows)]
    nll = {}
    for name in ("fp32", "int8", "int4", "int2"):
        values = []
        for w in windows:
            cache = (make_cache(model, 1, L) if name == "fp32" else
                     make_quantized_cache(model, 1, L, bits=int(name[3:]), residual_length=args.residual))
            values.append(_nll_with_cache(model, w, cache, args.chunk))
        nll[name] = sum(values) / len(values)
        emit(bench="kv/perplexity", cache=name, windows=len(windows), tokens_per_window=L, chunk=args.chunk,
             nll=nll[name], ppl=float(torch.tensor(nll[name]).exp()),
             ppl_ratio_vs_fp32=float(torch.tensor(nll[name] - nll["fp32"]).exp()))
    # decode speed at L context: prefill L - new tokens, then decode `new` tokens
    new = 32
    prompt = ids[: L - new][None]
    caches = {"fp32": make_cache(model, 1, L), "int4": make_quantized_cache(model, 1, L, bits=4,
                                                                            residual_length=args.residual),
              "int2": make_quantized_cache(model, 1, L, bits=2, residual_length=args.residual)}
    decode_s = {k: [] for k in caches}
    for r in range(args.rounds):
        for name in (list(caches)[r % 3:] + list(caches)[: r % 3]):
            result = generate(model, prompt, new, cache=caches[name])
            decode_s[name].append(result.decode_seconds)
    for name in caches:
        ratios = [b / t for b, t in zip(decode_s["fp32"], decode_s[name])]
        emit(bench=f"kv/decode at {L} context ({new} new tokens, decode steps only)", cache=name,
             median_decode_tok_s=(new - 1) / statistics.median(decode_s[name]),
             tok_s_ratio_vs_fp32=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))


def bench_hf(args):
    """Greedy identity and speed vs transformers generate on the same weights: prompt i runs ours then
    theirs (odd i: theirs first), so the per-prompt time ratios are interleaved rounds."""
    from llmopt.models.hf import to_hf

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tok = load_pretrained("smollm2-135m", dtype=dtype)
    hf = to_hf(model).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = shakespeare_ids(tok)
    n = args.new_tokens
    same, first_diff, ratios = 0, [], []
    warm = torch.tensor([ids[:32]])
    generate(model, warm, 4)
    with torch.no_grad():
        hf.generate(warm, attention_mask=torch.ones_like(warm), do_sample=False, max_new_tokens=4)
    for i in range(args.prompts):
        prompt = torch.tensor([ids[i * 300:i * 300 + 32]])

        def ours():
            return generate(model, prompt, n).new_tokens[0]

        def theirs():
            with torch.no_grad():
                return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                   max_new_tokens=n, min_new_tokens=n)[0, 32:]
        seconds, out = {}, {}
        for name, fn in (("ours", ours), ("theirs", theirs))[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            out[name] = fn()
            seconds[name] = time.perf_counter() - start
        equal = torch.equal(out["ours"], out["theirs"])
        same += equal
        if not equal:
            first_diff.append(int((out["ours"] != out["theirs"]).nonzero()[0]))
        ratios.append(seconds["theirs"] / seconds["ours"])
        emit(bench=f"hf/greedy {args.dtype}", prompt=i, identical=equal, ours_s=seconds["ours"],
             transformers_s=seconds["theirs"], tok_s_ratio=ratios[-1])
    emit(bench=f"hf/greedy {args.dtype} summary", prompts=args.prompts, prompt_tokens=32, new_tokens=n,
         identical=same, first_divergence=first_diff, threads=torch.get_num_threads(),
         tok_s_ratio_vs_transformers=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
         note="tok/s over the whole generate call (32-token prefill included); one ratio per prompt, "
              "order alternating")


def bench_spec(args):
    model, tok = load_pretrained("smollm2-135m")
    draft, _ = load_pretrained(args.draft)
    ids = shakespeare_ids(tok)
    prompt = ids[:128]
    n = args.new_tokens
    configs = {"plain": lambda: generate(model, [prompt], n),
               "speculative": lambda: speculative_generate(model, [prompt], n, proposer=DraftModelProposer(draft),
                                                           k=args.k)}
    out = rounds_table(f"spec (128 prompt + {n} new)", configs, args.rounds, "plain")
    spec = out["speculative"]
    emit(bench="spec", identical=torch.equal(out["plain"].tokens, spec.tokens), **{
        k: v for k, v in spec.summary().items() if k in ("acceptance_rate", "target_forwards", "mean_k")})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["lookup", "kv", "hf", "spec"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--residual", type=int, default=0)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--draft")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every row to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"lookup": bench_lookup, "kv": bench_kv, "hf": bench_hf, "spec": bench_spec}[args.which](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/bench_inference.py " + " ".join(sys.argv[1:]),
                       "load_average": os.getloadavg(), "rows": ROWS}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
