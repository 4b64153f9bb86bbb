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
from llmopt.inference import (DraftModelProposer, KVCache, PromptLookupProposer, decode_one_token, generate,
                              make_cache,
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
    """Plain greedy vs prompt lookup (ours, adaptive k <= 10) vs transformers' prompt lookup (10 tokens), on
    a copy-heavy prompt (a passage given twice, then its start: the continuation copies it) and on a prompt
    with nothing to copy."""
    from llmopt.models.hf import to_hf

    model, tok = load_pretrained("smollm2-135m")
    hf = to_hf(model).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = shakespeare_ids(tok)
    passage = ids[2000:2150]
    newline = tok.encode("\n\n")
    copy_prompt = passage + newline + passage + newline + passage[:20]
    plain_prompt = ids[:128]
    n = args.new_tokens

    def theirs(prompt):
        x = torch.tensor([prompt])
        with torch.no_grad():
            return hf.generate(x, attention_mask=torch.ones_like(x), prompt_lookup_num_tokens=10, do_sample=False,
                               max_new_tokens=n, min_new_tokens=n)[0, len(prompt):]

    for label, prompt in (("copy-heavy", copy_prompt), ("no-copy", plain_prompt)):
        configs = {
            "plain": lambda p=prompt: generate(model, [p], n),
            "prompt_lookup": lambda p=prompt: speculative_generate(model, [p], n, proposer=PromptLookupProposer(),
                                                                    k=10),
            "transformers_prompt_lookup": lambda p=prompt: theirs(p),
        }
        out = rounds_table(f"lookup/{label} ({len(prompt)} prompt + {n} new)", configs, args.rounds, "plain")
        spec = out["prompt_lookup"]
        emit(bench=f"lookup/{label}", identical=torch.equal(out["plain"].tokens, spec.tokens),
             transformers_identical=torch.equal(out["plain"].new_tokens[0], out["transformers_prompt_lookup"]),
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
        q16 = make_quantized_cache(model, 1, L, bits=bits, dtype=torch.float16, residual_length=args.residual,
                                   group_size=args.group, rotate=args.rotate, kernel=args.kernel)
        emit(bench="kv/bytes", bits=bits, context=L, bytes_per_token=q16.bytes_per_token,
             fp16_bytes_per_token=fp16, ratio_vs_fp16=q16.bytes_per_token / fp16,
             worst_case_ratio=max(q16.bytes_at(n) / n for n in range(L - 64, L + 1)) / fp16)
    # perplexity with the cache in the loop: held-out Shakespeare (the tail of the corpus), windows of L tokens
    text = default_corpus_text()
    ids = torch.tensor(tok.encode(text[-int(len(text) * 0.05):]))
    windows = [ids[i * L:(i + 1) * L][None] for i in range(args.windows)]
    caches = {"fp32": make_cache(model, 1, L)}
    caches.update({f"int{b}": make_quantized_cache(model, 1, L, bits=b, residual_length=args.residual,
                                                   group_size=args.group, rotate=args.rotate, kernel=args.kernel)
                   for b in (8, 4, 2)})
    nll = {}
    for name, cache in caches.items():
        nll[name] = sum(_nll_with_cache(model, w, cache, args.chunk) for w in windows) / len(windows)
        emit(bench="kv/perplexity", cache=name, residual=args.residual, group=args.group, rotate=args.rotate,
             windows=len(windows),
             tokens_per_window=L, chunk=args.chunk,
             nll=nll[name], ppl=float(torch.tensor(nll[name]).exp()),
             ppl_ratio_vs_fp32=float(torch.tensor(nll[name] - nll["fp32"]).exp()))
    # decode at L context: every cache still holds the last window's L - 1 tokens; each round rolls it back to
    # L - 64 (a group boundary) and times `new` greedy decode steps from there (the caches rotate per round)
    if args.no_decode:
        return
    new, start_pos = 32, L - 64
    decode_s = {k: [] for k in caches}
    with torch.no_grad():
        for r in range(args.rounds):
            for name in list(caches)[r % len(caches):] + list(caches)[: r % len(caches)]:
                cache = caches[name]
                cache.truncate(start_pos)
                token = windows[-1][:, start_pos:start_pos + 1]
                t0 = time.perf_counter()
                for pos in range(start_pos, start_pos + new):
                    token, _ = decode_one_token(model, token, torch.tensor([pos]), cache)
                decode_s[name].append(time.perf_counter() - t0)
    for name in caches:
        ratios = [b / t for b, t in zip(decode_s["fp32"], decode_s[name])]
        emit(bench=f"kv/decode at {start_pos} context ({new} decode steps)", cache=name,
             median_decode_tok_s=new / statistics.median(decode_s[name]),
             tok_s_ratio_vs_fp32=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))


def bench_hf(args):
    """Greedy identity and speed vs transformers generate on the same weights.

    Identity: `--prompts` prompts of 32 held-in Shakespeare tokens, `--new-tokens` greedy tokens each, as
    one batch on each side (equal lengths: no padding), compared row by row. Speed: batch 1, one prompt,
    `--speed-tokens` new tokens, ours and theirs alternating for `--rounds` rounds (order flipped every
    round); tok/s over the whole generate call (32-token prefill included), one ratio per round.
    """
    from llmopt.models.hf import to_hf

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tok = load_pretrained("smollm2-135m", dtype=dtype)
    hf = to_hf(model).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = shakespeare_ids(tok)

    def theirs(prompt, n):
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n)[:, prompt.size(1):]

    if args.prompts:
        prompts = torch.tensor([ids[i * 300:i * 300 + 32] for i in range(args.prompts)])  # (P, 32)
        ours_out = generate(model, prompts, args.new_tokens).new_tokens
        theirs_out = theirs(prompts, args.new_tokens)
        same = [bool(torch.equal(a, b)) for a, b in zip(ours_out, theirs_out)]
        first_diff = [int((a != b).nonzero()[0]) for a, b, e in zip(ours_out, theirs_out, same) if not e]
        emit(bench=f"hf/greedy identity {args.dtype}", prompts=args.prompts, prompt_tokens=32,
             new_tokens=args.new_tokens, identical=sum(same), first_divergence=first_diff)

    prompt = torch.tensor([ids[:32]])
    n = args.speed_tokens
    generate(model, prompt, 4), theirs(prompt, 4)  # warm-up
    ratios, seconds = [], {"ours": [], "theirs": []}
    for r in range(args.rounds):
        for name in ("ours", "theirs")[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            generate(model, prompt, n) if name == "ours" else theirs(prompt, n)
            seconds[name].append(time.perf_counter() - start)
        ratios.append(seconds["theirs"][-1] / seconds["ours"][-1])
    emit(bench=f"hf/speed {args.dtype}", rounds=args.rounds, prompt_tokens=32, new_tokens=n,
         threads=torch.get_num_threads(), ours_median_s=statistics.median(seconds["ours"]),
         transformers_median_s=statistics.median(seconds["theirs"]),
         tok_s_ratio_vs_transformers=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
         ratios=ratios)


CODE_PROMPT = """def merge_sorted(a, b):
    \"\"\"Merge two sorted lists into one sorted list.\"\"\"
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
"""


def load_draft(path):
    """The distilled SmolLM2 draft at `path`, built there by the `distill_draft` recipe if absent."""
    from pathlib import Path

    path = Path(path)
    if not (path / "config.json").is_file():
        from llmopt.recipes import get_recipe
        from llmopt.recipes.distill import distill

        emit(bench="spec/draft", building=str(path), recipe="distill_draft")
        distill(get_recipe("distill_draft"), path, on_log=lambda r: print(json.dumps(r), flush=True))
    draft, _ = load_pretrained(path)
    info = json.loads((path / "distill.json").read_text()) if (path / "distill.json").is_file() else {}
    emit(bench="spec/draft", path=str(path), params=draft.num_parameters(),
         **{k: info[k] for k in ("teacher_tokens", "student_tokens", "teacher_seconds", "train_seconds",
                                 "total_seconds", "final") if k in info})
    return draft


def bench_spec(args):
    """Plain greedy vs speculative decoding with the distilled draft (adaptive k) vs transformers assisted
    generation with the same draft, on held-out Shakespeare (the draft's domain) and on Python code (the
    draft disagrees: adaptive k must keep the loss small)."""
    from llmopt.models.hf import to_hf

    model, tok = load_pretrained("smollm2-135m")
    draft = load_draft(args.draft or "runs/smollm2-draft")
    hf, hf_draft = to_hf(model).eval(), to_hf(draft).eval()
    for m in (hf, hf_draft):
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
    text = default_corpus_text()
    heldout = tok.encode(text[-30_000:])  # the corpus tail: outside every distillation window
    prompts = {"shakespeare": heldout[1000:1064], "code (draft disagrees)": tok.encode(CODE_PROMPT)}
    n = args.new_tokens

    def assisted(prompt):
        x = torch.tensor([prompt])
        with torch.no_grad():
            return hf.generate(x, attention_mask=torch.ones_like(x), assistant_model=hf_draft, do_sample=False,
                               max_new_tokens=n, min_new_tokens=n)[0, len(prompt):]

    for label, prompt in prompts.items():
        configs = {"plain": lambda p=prompt: generate(model, [p], n),
                   "speculative": lambda p=prompt: speculative_generate(model, [p], n,
                                                                        proposer=DraftModelProposer(draft), k=args.k),
                   "transformers_assisted": lambda p=prompt: assisted(p)}
        out = rounds_table(f"spec/{label} ({len(prompt)} prompt + {n} new)", configs, args.rounds, "plain")
        spec = out["speculative"]
        emit(bench=f"spec/{label}", identical=torch.equal(out["plain"].tokens, spec.tokens),
             transformers_identical=torch.equal(out["plain"].new_tokens[0], out["transformers_assisted"]),
             **{k: v for k, v in spec.summary().items()
                if k in ("acceptance_rate", "proposed", "accepted", "target_forwards", "mean_k")})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["lookup", "kv", "hf", "spec"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--residual", type=int, default=0)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--no-decode", action="store_true", help="kv: perplexity and bytes only")
    p.add_argument("--rotate", choices=["auto", "none", "values", "both"], default="auto", help="kv: Hadamard rotation")
    p.add_argument("--kernel", choices=["auto", "torch", "c"], default="auto", help="kv: decode attention path")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--speed-tokens", type=int, default=32)
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
