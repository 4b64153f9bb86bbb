"""Decode-faithful perplexity and bytes of quantized KV cache variants on SmolLM2-135M (fp32, 1 thread), the same
method as `bench_inference.py kv` (held-out Shakespeare: the last 5% of the corpus, windows of `--context` tokens
fed through the cache in chunks of `--chunk` with the decode view), for any `make_quantized_cache` options.

    python benchmarks/bench_kv_int2.py --windows 1 \\
        --cache "int2 sinks4=bits=2,sink_tokens=4" --cache "int2 mse=bits=2,sink_tokens=4,clip=mse"

Each `--cache NAME=key=value,...` takes `make_quantized_cache` keyword arguments (ints where they parse).
Every row reports bytes against an fp16 cache at `--context` tokens (and the worst case over the last 64 lengths)
and the perplexity ratio against our fp32 cache on the same windows. One JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llmopt.data.corpus import default_corpus_text
from llmopt.inference import KVCache, decode_one_token, make_cache, make_quantized_cache
from llmopt.models import load_pretrained

from bench_inference import _nll_with_cache as nll_with_cache  # the same measure (benchmarks/ is on sys.path)


def parse_cache(spec: str) -> tuple[str, dict]:
    name, _, fields = spec.partition("=")
    if not fields:
        raise SystemExit(f"--cache {spec!r}: use NAME=key=value,... (make_quantized_cache arguments)")
    opts = {}
    for kv in fields.split(","):
        key, _, value = kv.partition("=")
        try:
            opts[key] = int(value)
        except ValueError:
            opts[key] = {"True": True, "False": False}.get(value, value)
    return name, opts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", action="append", required=True, help="NAME=key=value,... (make_quantized_cache)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--decode-rounds", type=int, default=0,
                   help="also time 32 greedy decode steps from L - 64 cached tokens, this many rotated rounds "
                        "(the same method as bench_inference.py kv), instead of perplexity when --windows 0")
    p.add_argument("--json", help="write every row to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []

    def emit(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    model, tok = load_pretrained("smollm2-135m")
    model.eval()
    c, L = model.config, args.context
    fp16 = KVCache(c.n_layer, 1, c.n_kv_head, L, c.head_dim, torch.float16).bytes_per_token
    text = default_corpus_text()
    ids = torch.tensor(tok.encode(text[-int(len(text) * 0.05):]))
    windows = [ids[i * L:(i + 1) * L][None] for i in range(args.windows)]
    specs = [parse_cache(s) for s in args.cache]
    if args.decode_rounds:
        decode(model, ids[None, :L], specs, args.decode_rounds, emit)
    t0 = time.perf_counter()
    if not windows:
        return finish(args, rows)
    ref = [nll_with_cache(model, w, make_cache(model, 1, L), args.chunk) for w in windows]
    emit(cache="fp32", nll=sum(ref) / len(ref), per_window_nll=ref, seconds=time.perf_counter() - t0)
    for name, opts in specs:
        cache = make_quantized_cache(model, 1, L, **opts)
        q16 = make_quantized_cache(model, 1, L, dtype=torch.float16, **opts)
        t0 = time.perf_counter()
        per = [nll_with_cache(model, w, cache, args.chunk) for w in windows]
        nll = sum(per) / len(per)
        emit(cache=name, options=opts, ratio_vs_fp16=q16.bytes_per_token / fp16,
             worst_case_ratio=max(q16.bytes_at(n) / n for n in range(L - 64, L + 1)) / fp16,
             nll=nll, ppl=float(torch.tensor(nll).exp()),
             ppl_ratio_vs_fp32=float(torch.tensor(nll - sum(ref) / len(ref)).exp()),
             per_window_ratio=[float(torch.tensor(a - b).exp()) for a, b in zip(per, ref)],
             seconds=time.perf_counter() - t0)
    finish(args, rows)


def finish(args, rows):
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/bench_kv_int2.py " + " ".join(
                f"--cache {s!r}" for s in args.cache) + f" --context {args.context} --windows {args.windows} "
                f"--chunk {args.chunk} --threads {args.threads} --decode-rounds {args.decode_rounds}",
                "rows": rows}, f, indent=1)


def decode(model, window, specs, rounds, emit, new=32):
    """tok/s of `new` greedy decode steps from L - 64 cached tokens (a group boundary) for each cache against
    our fp32 cache, per round (the order rotates), median and min-max over the rounds."""
    L = window.size(1)
    caches = {"fp32": make_cache(model, 1, L)}
    caches.update({name: make_quantized_cache(model, 1, L, **opts) for name, opts in specs})
    with torch.no_grad():
        for cache in caches.values():
            for start in range(0, L - 1, 256):
                end = min(start + 256, L - 1)
                model(window[:, start:end], input_pos=torch.arange(start, end), cache=cache)
    seconds = {name: [] for name in caches}
    start_pos = L - 64
    with torch.no_grad():
        for r in range(rounds):
            names = list(caches)
            for name in names[r % len(names):] + names[:r % len(names)]:
                cache, token = caches[name], window[:, start_pos:start_pos + 1]
                cache.truncate(start_pos)
                t0 = time.perf_counter()
                for pos in range(start_pos, start_pos + new):
                    token, _ = decode_one_token(model, token, torch.tensor([pos]), cache)
                seconds[name].append(time.perf_counter() - t0)
    for name in caches:
        ratios = [b / t for b, t in zip(seconds["fp32"], seconds[name])]
        emit(bench=f"decode at {start_pos} context ({new} steps)", cache=name,
             median_tok_s=new / statistics.median(seconds[name]), tok_s_ratio_vs_fp32=statistics.median(ratios),
             ratio_min=min(ratios), ratio_max=max(ratios))


if __name__ == "__main__":
    main()
