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
from llmopt.inference import (DraftModelProposer, FeatureDraftProposer, KVCache, PromptLookupProposer, decode_one_token, generate,
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


NO_COPY_PROMPTS = (
    "Photosynthesis is the process by which green plants",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg",
)
"""Prompts whose greedy SmolLM2 continuation (64 tokens) has almost nothing a prompt lookup could copy."""


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
    # modern prose: SmolLM2's greedy continuations of these repeat no 2-gram of prompt or output in 3-9 of 64
    # positions (the Shakespeare prompt's continuation loops, so lookup wins there too): nothing to copy
    prose = [tok.encode(p) for p in NO_COPY_PROMPTS]

    def theirs(prompt):
        x = torch.tensor([prompt])
        with torch.no_grad():
            return hf.generate(x, attention_mask=torch.ones_like(x), prompt_lookup_num_tokens=10, do_sample=False,
                               max_new_tokens=n, min_new_tokens=n)[0, len(prompt):]

    cases = [("copy-heavy", copy_prompt), ("Shakespeare, repetitive continuation", plain_prompt)]
    cases += [(f"no-copy prose {i + 1}", prompt) for i, prompt in enumerate(prose)]
    for label, prompt in cases:
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


def _hf_nll(hf, ids, cache, chunk):
    """The same through transformers' model with its cache object `cache` in the loop (positions from the cache).

    `chunk=0`: one token, then `cache`'s residual length per forward. transformers' QuantizedCache quantizes its
    first forward's tokens at once and then flushes its window whenever a forward brings it to the residual
    length, so this schedule makes the same flushes, and lets every query see the same tokens in full
    precision, as feeding token by token (`chunk=1`) does, at the cost of a chunked prefill."""
    total, count = 0.0, 0
    n = ids.size(1) - 1
    if chunk == 0:
        step = cache.layers[0].residual_length if hasattr(cache.layers[0], "residual_length") else 256
        bounds = [0, *range(1, n, step), n]
    else:
        bounds = [*range(0, n, chunk), n]
    with torch.no_grad():
        for start, end in zip(bounds[:-1], bounds[1:]):
            logits = hf(input_ids=ids[:, start:end], cache=cache, use_cache=True).logits
            total += torch.nn.functional.cross_entropy(logits[0].float(), ids[0, start + 1:end + 1],
                                                       reduction="sum").item()
            count += end - start
    return total / count


def _hf_cache_bytes(cache):
    """(bytes as stored, bytes with fp16 scales, zero points and window) of a transformers cache, all layers:
    quanto's packed codes, its per-group scale and shift, and the full-precision residual window."""
    def leaves(t):
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return [x for n in names for x in leaves(getattr(t, n))]
        return [t]

    stored = fp16 = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            t = getattr(layer, name, None)
            if t is None or not t.numel():
                continue
            for x in leaves(t):
                stored += x.numel() * x.element_size()
                fp16 += x.numel() * (1 if x.dtype == torch.uint8 else 2)
    return stored, fp16


def bench_kv(args):
    """Bytes, perplexity with the cache in the loop and decode speed at `--context`, for our quantized caches
    (`--bits`) against our fp32 cache, and with `--peer` transformers' QuantizedCache (quanto backend, its
    defaults: residual 128, q_group_size 64) against transformers' DynamicCache on the same weights.

    Perplexity: `--windows` held-out windows of `--context` tokens (the corpus tail). Ours are fed in chunks
    of `--chunk`; with `--view decode` (the default) each chunk's queries see the cache as token-by-token
    decoding would (`QuantizedKVCache(decode_view=True)`, tested equal), so the figure is decode-faithful at
    any chunk; `--view stored` lets every query see its own chunk's already quantized groups (the older,
    harsher figure). transformers' caches are fed `--peer-chunk` tokens a forward over the first
    `--peer-windows` windows: 1 = token by token, 0 (default) = one token, then 128 (the residual length) a
    forward, which makes the same flushes as token by token, so it is decode-faithful too.
    """
    model, tok = load_pretrained("smollm2-135m")
    c = model.config
    L = args.context
    bits_list = [int(b) for b in args.bits.split(",")]
    opts = dict(residual_length=args.residual, group_size=args.group, rotate=args.rotate, kernel=args.kernel,
                value_group=args.value_group, sink_tokens=args.sinks, decode_view=args.view == "decode")
    fp16 = KVCache(c.n_layer, 1, c.n_kv_head, L, c.head_dim, torch.float16).bytes_per_token
    for bits in bits_list:
        q16 = make_quantized_cache(model, 1, L, bits=bits, dtype=torch.float16, **opts)
        emit(bench="kv/bytes", bits=bits, context=L, sinks=args.sinks, group=args.group,
             value_group=q16.value_group, residual=args.residual, bytes_per_token=q16.bytes_per_token,
             fp16_bytes_per_token=fp16, ratio_vs_fp16=q16.bytes_per_token / fp16,
             worst_case_ratio=max(q16.bytes_at(n) / n for n in range(L - 64, L + 1)) / fp16)
    # perplexity with the cache in the loop: held-out Shakespeare (the tail of the corpus), windows of L tokens
    text = default_corpus_text()
    ids = torch.tensor(tok.encode(text[-int(len(text) * 0.05):]))
    windows = [ids[i * L:(i + 1) * L][None] for i in range(args.windows)]
    caches = {"fp32": make_cache(model, 1, L)}
    caches.update({f"int{b}": make_quantized_cache(model, 1, L, bits=b, **opts) for b in bits_list})
    variants = {}  # --also: perplexity (and bytes) only
    keys = {"group": "group_size", "residual": "residual_length", "sinks": "sink_tokens", "value_group": "value_group",
            "rotate": "rotate", "view": "decode_view"}
    for spec in args.also or []:
        fields = dict(kv.split("=") for kv in spec.split(","))
        bits = int(fields.pop("bits"))
        o = dict(opts)
        for key, value in fields.items():
            if key not in keys:
                raise SystemExit(f"--also {spec!r}: unknown field {key!r}; use bits and {', '.join(keys)}")
            o[keys[key]] = value == "decode" if key == "view" else value if key == "rotate" else int(value)
        name = f"int{bits} " + " ".join(f"{k}={v}" for k, v in fields.items())
        variants[name] = make_quantized_cache(model, 1, L, bits=bits, **o)
        q16 = make_quantized_cache(model, 1, L, bits=bits, dtype=torch.float16, **o)
        emit(bench="kv/bytes", cache=name, context=L, ratio_vs_fp16=q16.bytes_per_token / fp16,
             worst_case_ratio=max(q16.bytes_at(n) / n for n in range(L - 64, L + 1)) / fp16)
    nll = {}
    for name, cache in {**caches, **variants}.items():
        if args.skip_ppl:  # the decode timing below needs our caches filled: prefill the last window instead
            with torch.no_grad():
                cache.reset()
                for start in range(0, L - 1, args.chunk):
                    end = min(start + args.chunk, L - 1)
                    model(windows[-1][:, start:end], input_pos=torch.arange(start, end), cache=cache)
            continue
        t0 = time.perf_counter()
        per_window = [_nll_with_cache(model, w, cache, args.chunk) for w in windows]
        nll[name] = sum(per_window) / len(windows)
        quantized = name != "fp32"
        view = ("decode" if cache.decode_view else "stored") if quantized else "-"
        emit(bench="kv/perplexity", cache=name, view=view,
             residual=getattr(cache, "residual_length", None), group=getattr(cache, "group_size", None),
             value_group=getattr(cache, "value_group", None), sinks=getattr(cache, "sink_tokens", None),
             rotate=getattr(cache, "rotate", None), windows=len(windows), tokens_per_window=L, chunk=args.chunk,
             seconds=time.perf_counter() - t0, nll=nll[name], ppl=float(torch.tensor(nll[name]).exp()),
             ppl_ratio_vs_fp32=float(torch.tensor(nll[name] - nll["fp32"]).exp()), per_window_nll=per_window)
    hf, peers = None, {}
    if args.peer:
        from transformers import DynamicCache, QuantizedCache

        from llmopt.models.hf import to_hf

        hf = to_hf(model).eval()
        peers = {"transformers_dynamic": lambda: DynamicCache(config=hf.config)}
        peers.update({f"transformers_quanto_int{b}": lambda b=b: QuantizedCache(backend="quanto", config=hf.config,
                                                                                nbits=b)
                      for b in (4, 2)})
        peer_windows = windows[:args.peer_windows]
        peer_nll = {}
        for name, make in peers.items():
            chunk = args.chunk if name == "transformers_dynamic" else args.peer_chunk  # dynamic: exact at any chunk
            t0 = time.perf_counter()
            per_window = []
            for w in peer_windows:
                cache = make()
                per_window.append(_hf_nll(hf, w[:, :args.peer_tokens or None], cache, chunk))
            peer_nll[name] = sum(per_window) / len(per_window)
            stored, as_fp16 = _hf_cache_bytes(cache)
            n_tok = peer_windows[-1][:, :args.peer_tokens or None].size(1) - 1
            dense16 = n_tok * fp16
            emit(bench="kv/perplexity", cache=name, windows=len(peer_windows), tokens_per_window=L, chunk=chunk,
                 seconds=time.perf_counter() - t0, nll=peer_nll[name], ppl=float(torch.tensor(peer_nll[name]).exp()),
                 ppl_ratio_vs_transformers_dynamic=float(torch.tensor(peer_nll[name]
                                                                      - peer_nll["transformers_dynamic"]).exp()),
                 ppl_ratio_vs_our_fp32=float(torch.tensor(peer_nll[name] - nll["fp32"]).exp()) if nll else None,
                 per_window_nll=per_window, cache_tokens=n_tok, bytes_as_stored=stored,
                 bytes_with_fp16_scales_and_window=as_fp16, ratio_vs_fp16=as_fp16 / dense16)
    # decode at L context: every cache of ours still holds the last window's L - 1 tokens; each round rolls it
    # back to L - 64 (a group boundary) and times `new` greedy decode steps from there; transformers' caches are
    # prefilled with the same L - 64 tokens each round (untimed), then timed the same way. Order rotates per round.
    if args.no_decode:
        return
    new, start_pos = 32, L - 64
    prompt = windows[-1][:, :start_pos]
    decode_s = {k: [] for k in [*caches, *peers]}
    with torch.no_grad():
        for r in range(args.rounds):
            names = list(decode_s)
            for name in names[r % len(names):] + names[: r % len(names)]:
                token = windows[-1][:, start_pos:start_pos + 1]
                if name in caches:
                    cache = caches[name]
                    cache.truncate(start_pos)
                    t0 = time.perf_counter()
                    for pos in range(start_pos, start_pos + new):
                        token, _ = decode_one_token(model, token, torch.tensor([pos]), cache)
                else:
                    cache = peers[name]()
                    hf(input_ids=prompt, cache=cache, use_cache=True)
                    t0 = time.perf_counter()
                    for _ in range(new):
                        logits = hf(input_ids=token, cache=cache, use_cache=True).logits
                        token = logits[:, -1:].argmax(-1)
                decode_s[name].append(time.perf_counter() - t0)
    for name in decode_s:
        ratios = [b / t for b, t in zip(decode_s["fp32"], decode_s[name])]
        row = dict(bench=f"kv/decode at {start_pos} context ({new} decode steps)", cache=name,
                   median_decode_tok_s=new / statistics.median(decode_s[name]),
                   tok_s_ratio_vs_fp32=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        if peers:
            rs = [b / t for b, t in zip(decode_s["transformers_dynamic"], decode_s[name])]
            row.update(tok_s_ratio_vs_transformers_dynamic=statistics.median(rs), peer_ratio_min=min(rs),
                       peer_ratio_max=max(rs))
        emit(**row)


def bench_hf(args):
    """Greedy identity and speed vs transformers generate on the same weights.

    Identity: `--prompts` prompts of 32 held-in Shakespeare tokens, `--new-tokens` greedy tokens each, as
    one batch on each side (equal lengths: no padding), compared row by row. Speed: batch 1, one prompt,
    `--speed-tokens` new tokens, ours and theirs alternating for `--rounds` rounds (order flipped every
    round); per round and implementation the call for `--speed-tokens` new tokens and for 1, so decode tok/s
    (t(n) - t(1) over n - 1 tokens), prefill (t(1)) and the whole call are each compared, one ratio per round.
    `ours_kernels_torch` is our decoding with `kernels="torch"` (module by module with F.linear: no CPU decode kernels).
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
    runs = {"ours": lambda m: generate(model, prompt, m),
            "ours_kernels_torch": lambda m: generate(model, prompt, m, kernels="torch"),
            "transformers": lambda m: theirs(prompt, m)}
    for run in runs.values():  # warm-up
        run(4)
    # Per round and implementation: the whole call for n new tokens and for 1 (prefill + first token), so
    # decode time = t(n) - t(1) over n - 1 tokens and prefill time = t(1), both measured the same way for both.
    seconds = {name: {"n": [], "1": []} for name in runs}
    for r in range(args.rounds):
        order = list(runs)[r % 3:] + list(runs)[:r % 3]
        for name in order:
            for m, key in ((n, "n"), (1, "1")):
                start = time.perf_counter()
                runs[name](m)
                seconds[name][key].append(time.perf_counter() - start)

    def ratios(name, of):
        return [of(seconds["transformers"], i) / of(seconds[name], i) for i in range(args.rounds)]

    whole = lambda s, i: s["n"][i]  # noqa: E731
    decode = lambda s, i: max(s["n"][i] - s["1"][i], 1e-9)  # noqa: E731
    first = lambda s, i: s["1"][i]  # noqa: E731
    row = dict(bench=f"hf/speed {args.dtype}", rounds=args.rounds, prompt_tokens=32, new_tokens=n,
               threads=torch.get_num_threads())
    for name in ("ours", "ours_kernels_torch"):
        for what, of in (("whole_call", whole), ("decode", decode), ("prefill", first)):
            rs = ratios(name, of)
            row[f"{name}_{what}_tok_s_ratio_vs_transformers"] = statistics.median(rs)
            row[f"{name}_{what}_band"] = [min(rs), max(rs)]
    row["tok_s_ratio_vs_transformers"] = row["ours_whole_call_tok_s_ratio_vs_transformers"]
    row["median_seconds"] = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in seconds.items()}
    emit(**row)


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
    generation with the same draft vs prompt lookup (no draft) vs both (`DraftWithLookupProposer`), on
    `--spec-prompts` held-out Shakespeare prompts (the draft's domain; 64-token slices of the corpus tail,
    spread over it) and on Python code (the draft disagrees: adaptive k must keep the loss small). Every
    round times each config on every prompt (config order rotated); the Shakespeare aggregate ratio is, per
    round, the summed plain time over the summed config time (end to end: the 64-token prefill included), and
    `decode_ratio` the same over the decode phase alone (what speculation speeds up; our configs only)."""
    from llmopt.inference.speculative import DraftWithLookupProposer
    from llmopt.models.hf import to_hf

    model, tok = load_pretrained("smollm2-135m")
    skip = set(args.skip or [])
    standalone = not {"speculative", "transformers_assisted", "draft_with_lookup"} <= skip
    draft = load_draft(args.draft or "runs/smollm2-draft") if standalone else None
    if standalone:
        hf, hf_draft = to_hf(model).eval(), to_hf(draft).eval()
        for m in (hf, hf_draft):
            m.generation_config.eos_token_id = None
            m.generation_config.pad_token_id = 0
    text = default_corpus_text()
    heldout = tok.encode(text[-30_000:])  # the corpus tail: outside every distillation window and prompt
    if args.spec_prompts < 1:
        raise SystemExit(f"--spec-prompts must be at least 1, got {args.spec_prompts}")
    plen, n = 64, args.new_tokens
    step = (len(heldout) - 1000 - plen) // args.spec_prompts
    shakespeare = {f"shakespeare{i}": heldout[1000 + i * step:1000 + i * step + plen]
                   for i in range(args.spec_prompts)}
    groups = {"shakespeare": list(shakespeare), "code (draft disagrees)": ["code"]}
    prompts = {**shakespeare, "code": tok.encode(CODE_PROMPT)}

    def assisted(prompt):
        x = torch.tensor([prompt])
        with torch.no_grad():
            return hf.generate(x, attention_mask=torch.ones_like(x), assistant_model=hf_draft, do_sample=False,
                               max_new_tokens=n, min_new_tokens=n)[0, len(prompt):]

    heads = {}  # config name -> EAGLE head: the first --feature-draft is "feature_draft", the next "feature_draft_2"
    for i, path in enumerate(args.feature_draft or []):
        from llmopt.models.feature_draft import FeatureDraft

        head = FeatureDraft.load(path, model)
        info = head.info
        name = "feature_draft" if i == 0 else f"feature_draft_{i + 1}"
        emit(bench=f"spec/{name}", path=path, params=head.num_parameters(trainable_only=True),
             multiply_adds_per_token=head.multiply_adds_per_token(),
             fraction_of_target=round(head.multiply_adds_per_token() / model.num_parameters(), 4),
             **{k: info[k] for k in ("vocab", "val_coverage", "rows", "steps", "unroll", "feature_seconds",
                                     "train_seconds", "total_seconds") if k in info},
             final={k: v for k, v in info.get("final", {}).items() if k.startswith(("val_", "expected"))})
        heads[name] = head
        if args.feature_bf16:  # the same head drafting with bf16 weights (half the bytes a drafted token reads)
            heads[f"{name}_bf16"] = FeatureDraft.load(path, model, dtype=torch.bfloat16)
        if args.feature_int8:  # int8 weight-only linears (weight_only_quant on the C decode kernels): 1/4 the bytes
            from llmopt.core import apply_
            from llmopt.techniques.weight_only_quant import WeightOnlyQuantConfig

            heads[f"{name}_int8"] = FeatureDraft.load(path, model)
            apply_(heads[f"{name}_int8"], WeightOnlyQuantConfig(bits=8))
    head = heads.get("feature_draft")
    configs = {"plain": lambda p: generate(model, [p], n),
               "speculative": lambda p: speculative_generate(model, [p], n, proposer=DraftModelProposer(draft),
                                                             k=args.k),
               "transformers_assisted": assisted,
               "draft_with_lookup": lambda p: speculative_generate(model, [p], n, k=args.k,
                                                                   proposer=DraftWithLookupProposer(draft)),
               # no draft: how much of the gain n-gram copies alone give (greedy continuations repeat themselves)
               "prompt_lookup": lambda p: speculative_generate(model, [p], n, proposer=PromptLookupProposer(), k=10)}
    head_configs = []  # the configs drafting with an EAGLE head alone (per-prompt statistics below)
    for name, h in heads.items():  # the EAGLE heads: read SmolLM2's own hidden states (no transformers peer for it)
        # the head drafting the k adaptive k asks for; then the chain sized by the head's own confidence
        for c in [None] + (args.feature_stop_below or []):
            config = name if c is None else f"{name}_stop{c:g}"
            configs[config] = (lambda h, c: lambda p: speculative_generate(
                model, [p], n, proposer=FeatureDraftProposer(h, stop_below=c), k=args.k))(h, c)
            head_configs.append(config)
    if head is not None:
        for c in args.feature_confidence or []:  # EAGLE-2 style: stop drafting below this head confidence
            configs[f"feature_draft_conf{c:g}"] = (lambda c: lambda p: speculative_generate(
                model, [p], n, proposer=FeatureDraftProposer(head, min_confidence=c), k=args.k))(c)
        configs["feature_draft_with_lookup"] = lambda p: speculative_generate(
            model, [p], n, k=args.k, proposer=DraftWithLookupProposer(head))
    for c in args.skip or []:
        if c not in configs or c == "plain":
            raise SystemExit(f"--skip {c!r}: choose from {', '.join(x for x in configs if x != 'plain')}")
        del configs[c]
    times = {(c, name): [] for c in configs for name in prompts}
    decode = {(c, name): [] for c in configs for name in prompts}  # the decode phase alone (after the prefill)
    outputs = {}
    for r in range(args.rounds):
        order = list(configs)[r % len(configs):] + list(configs)[: r % len(configs)]
        for name, prompt in prompts.items():
            for c in order:
                start = time.perf_counter()
                outputs[c, name] = configs[c](prompt)
                times[c, name].append(time.perf_counter() - start)
                decode[c, name].append(getattr(outputs[c, name], "decode_seconds", None))

    for label, names in groups.items():
        for c in configs:
            total = [sum(times[c, name][r] for name in names) for r in range(args.rounds)]
            plain = [sum(times["plain", name][r] for name in names) for r in range(args.rounds)]
            ratios = [b / t for b, t in zip(plain, total)]
            row = dict(bench=f"spec/{label} ({len(names)} prompts x {n} new)", config=c,
                       median_s=statistics.median(total), tok_s_ratio_vs_baseline=statistics.median(ratios),
                       ratio_min=min(ratios), ratio_max=max(ratios))
            if all(decode[c, name][r] is not None for name in names for r in range(args.rounds)):
                # decode tokens/s (prefill excluded: the same 64-token prefill in every config, which speculation
                # does not touch; transformers' generate does not report it)
                d = [sum(decode["plain", name][r] for name in names) / sum(decode[c, name][r] for name in names)
                     for r in range(args.rounds)]
                row.update(decode_ratio=statistics.median(d), decode_ratio_min=min(d), decode_ratio_max=max(d))
            emit(**row)
        for hc in [c for c in head_configs if c in configs]:
            fd = [outputs[hc, name] for name in names]
            ks = [k for s in fd for k in s.ks]
            emit(bench=f"spec/{label}/{hc}",
                 identical=all(torch.equal(outputs["plain", name].tokens, outputs[hc, name].tokens) for name in names),
                 acceptance_rate=sum(s.accepted for s in fd) / max(1, sum(s.proposed for s in fd)),
                 proposed=sum(s.proposed for s in fd), accepted=sum(s.accepted for s in fd),
                 target_forwards=sum(s.target_forwards for s in fd), mean_k=sum(ks) / len(ks) if ks else 0.0,
                 accept_counts=[sum(c) for c in zip(*[s.accept_counts for s in fd])],
                 **({"with_lookup_identical": all(torch.equal(outputs["plain", name].tokens,
                                                              outputs["feature_draft_with_lookup", name].tokens)
                                                  for name in names),
                     "with_lookup_acceptance": sum(outputs["feature_draft_with_lookup", name].accepted for name in names)
                     / max(1, sum(outputs["feature_draft_with_lookup", name].proposed for name in names))}
                    if hc == "feature_draft" and "feature_draft_with_lookup" in configs else {}))
            if len(names) > 1:
                for name in names:
                    s = outputs[hc, name]
                    ratios = [b / t for b, t in zip(times["plain", name], times[hc, name])]
                    emit(bench=f"spec/{label}/{name}/{hc}", ratio_median=statistics.median(ratios),
                         ratio_min=min(ratios), ratio_max=max(ratios), acceptance_rate=s.acceptance_rate,
                         target_forwards=s.target_forwards, mean_k=sum(s.ks) / len(s.ks) if s.ks else 0.0)
        if "speculative" not in configs or "transformers_assisted" not in configs:
            continue
        specs = [outputs["speculative", name] for name in names]
        proposed, accepted = sum(s.proposed for s in specs), sum(s.accepted for s in specs)
        ks = [k for s in specs for k in s.ks]
        emit(bench=f"spec/{label}", identical=all(torch.equal(outputs["plain", name].tokens,
                                                              outputs["speculative", name].tokens) for name in names),
             transformers_identical=all(torch.equal(outputs["plain", name].new_tokens[0],
                                                    outputs["transformers_assisted", name]) for name in names),
             acceptance_rate=accepted / proposed if proposed else 0.0, proposed=proposed, accepted=accepted,
             target_forwards=sum(s.target_forwards for s in specs), mean_k=sum(ks) / len(ks) if ks else 0.0,
             prompt_lookup_identical=all(torch.equal(outputs["plain", name].tokens,
                                                     outputs["prompt_lookup", name].tokens) for name in names),
             draft_with_lookup_identical=all(torch.equal(outputs["plain", name].tokens,
                                                         outputs["draft_with_lookup", name].tokens) for name in names),
             draft_with_lookup_acceptance=sum(outputs["draft_with_lookup", name].accepted for name in names)
             / max(1, sum(outputs["draft_with_lookup", name].proposed for name in names)),
             prompt_lookup_acceptance=sum(outputs["prompt_lookup", name].accepted for name in names)
             / max(1, sum(outputs["prompt_lookup", name].proposed for name in names)))
        if len(names) > 1:
            for name in names:
                s = outputs["speculative", name]
                ratios = [b / t for b, t in zip(times["plain", name], times["speculative", name])]
                emit(bench=f"spec/{label}/{name}", ratio_median=statistics.median(ratios), ratio_min=min(ratios),
                     ratio_max=max(ratios), acceptance_rate=s.acceptance_rate, target_forwards=s.target_forwards,
                     mean_k=sum(s.ks) / len(s.ks) if s.ks else 0.0,
                     identical=torch.equal(outputs["plain", name].tokens, s.tokens))


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
    p.add_argument("--bits", default="8,4,2", help="kv: comma-separated bit widths of our caches")
    p.add_argument("--sinks", type=int, default=0, help="kv: first tokens kept in full precision")
    p.add_argument("--value-group", type=int, help="kv: channels per value scale (default: min(group, head_dim))")
    p.add_argument("--view", choices=["decode", "stored"], default="decode",
                   help="kv: what a multi-token chunk's queries see (decode = as token-by-token decoding)")
    p.add_argument("--also", action="append", help="kv: another cache, perplexity and bytes only, e.g. "
                   "bits=2,group=32,sinks=4 (fields: bits, group, residual, sinks, value_group, rotate, view)")
    p.add_argument("--peer", action="store_true", help="kv: add transformers' QuantizedCache (optimum-quanto)")
    p.add_argument("--peer-chunk", type=int, default=0, help="kv: transformers' quantized caches fed this many "
                   "tokens a forward (1 = token by token; 0 = 1, then 128 a forward: the same as token by token)")
    p.add_argument("--peer-windows", type=int, default=1, help="kv: windows for transformers' perplexity")
    p.add_argument("--peer-tokens", type=int, help="kv: only the first N tokens of each window for transformers")
    p.add_argument("--skip-ppl", action="store_true", help="kv: no perplexity for our caches (decode timing only)")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--speed-tokens", type=int, default=32)
    p.add_argument("--draft")
    p.add_argument("--feature-draft", action="append",
                   help="spec: also an EAGLE head (python -m llmopt.recipes.feature_draft); repeatable: the first is "
                        "config feature_draft, the next feature_draft_2, ...")
    p.add_argument("--feature-int8", action="store_true",
                   help="spec: also each EAGLE head with int8 weight-only linears (configs feature_draft_int8, ...)")
    p.add_argument("--feature-bf16", action="store_true",
                   help="spec: also each EAGLE head with bf16 weights (configs feature_draft_bf16, ...)")
    p.add_argument("--feature-confidence", type=float, action="append",
                   help="spec: also the EAGLE head with min_confidence=C (repeatable)")
    p.add_argument("--feature-stop-below", type=float, action="append",
                   help="spec: also each EAGLE head with stop_below=C: chains sized by the head's confidence up to "
                        "--k (configs feature_draft_stopC, ...; repeatable)")
    p.add_argument("--skip", action="append", help="spec: leave out a config (speculative, transformers_assisted, "
                                                   "draft_with_lookup, prompt_lookup, feature_draft, "
                                                   "feature_draft_with_lookup)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--spec-prompts", type=int, default=6, help="spec: held-out Shakespeare prompts (64 tokens each)")
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
