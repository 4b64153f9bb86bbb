"""Token-by-token NLL of SmolLM2-135M (fp32, 1 thread) with the int2 KV cache's defaults (pre-RoPE keys, unbiased
clip, 4 sinks) through the one-call C decode step of `generate` (the kernel applies RoPE to each stored key) against
the same cache through the per-layer path (the cache's own torch `attend`, what int2 decoded with before), and the
fp32 dense cache: the first `--tokens` held-out tokens (the first window of `bench_kv_int2.py`), fed one at a time
to the three caches in lockstep, so every cache sees the same text. Prints the NLLs, the perplexity ratios and the
largest logit difference between the two int2 paths, and, at every 8th position after the first group flush, the
logit difference of one one-call step taken from the torch path's own cache state (a copy): the step's own error,
without what earlier steps' rounding did to the cache.

`--control`: also the int2 cache through the module path (`F.linear` projections, torch attention, no C kernel):
how far fp32 rounding alone (other summation orders in the projections) moves the int2 NLL. At 2 bits a last-bit
change of a key can flip its code at the group flush (a third of the range), and the flipped codes change later
keys, so two int2 runs that differ only in rounding drift apart (see "Check of the decode view" in the kv card).

    python benchmarks/check_kv_int2_one_call.py [--tokens 512] [--start 0] [--control] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch

from llmopt.data.corpus import default_corpus_text
from llmopt.inference import cpu_linear, decode_one_token, make_cache, make_quantized_cache
from llmopt.models import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--start", type=int, default=0, help="first held-out token")
    p.add_argument("--control", action="store_true", help="also the int2 cache through the module path")
    p.add_argument("--json", help="write the figures to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_pretrained("smollm2-135m")
    model.eval()
    text = default_corpus_text()
    ids = torch.tensor(tok.encode(text[-int(len(text) * 0.05):]))[args.start:args.start + args.tokens + 1][None]
    n = ids.size(1) - 1
    caches = {"fp32": make_cache(model, 1, n + 1),
              "int2 one-call": make_quantized_cache(model, 1, n + 1, bits=2),
              "int2 per-layer (torch attend)": make_quantized_cache(model, 1, n + 1, bits=2)}
    nll = {name: 0.0 for name in caches}
    max_diff, one_call_steps, step_diff = 0.0, 0, 0.0
    fused = cpu_linear._quantized_attention

    def counting(*a):
        nonlocal one_call_steps
        out = fused(*a)
        one_call_steps += out is not None
        return out

    with torch.no_grad(), cpu_linear.cpu_linear_kernels(model):
        for pos in range(n):
            logits = {}
            state = None
            for name, cache in caches.items():
                cpu_linear._quantized_attention = (lambda *a: None) if "per-layer" in name else counting
                try:
                    if "per-layer" in name and pos % 8 == 0 and pos > 64:
                        state = copy.deepcopy(cache)
                    logits[name] = decode_one_token(model, ids[:, pos:pos + 1], torch.tensor([pos]), cache)[1][0]
                finally:
                    cpu_linear._quantized_attention = fused
                if state is not None:  # the same step through the one-call path, from the torch path's state
                    one = decode_one_token(model, ids[:, pos:pos + 1], torch.tensor([pos]), state)[1][0]
                    step_diff = max(step_diff, (one - logits[name]).abs().max().item())
                    state = None
                nll[name] += torch.nn.functional.cross_entropy(logits[name][None].float(), ids[0, pos + 1:pos + 2]).item()
            max_diff = max(max_diff, (logits["int2 one-call"] - logits["int2 per-layer (torch attend)"]).abs().max().item())
    if args.control:  # module by module: the stock forward, F.linear, the cache's torch attention
        name = "int2 module path (F.linear, torch attend)"
        cache, nll[name] = make_quantized_cache(model, 1, n + 1, bits=2), 0.0
        with torch.no_grad():
            for pos in range(n):
                logits = decode_one_token(model, ids[:, pos:pos + 1], torch.tensor([pos]), cache)[1]
                nll[name] += torch.nn.functional.cross_entropy(logits.float(), ids[0, pos + 1:pos + 2]).item()
    nll = {name: v / n for name, v in nll.items()}
    command = (f"python benchmarks/check_kv_int2_one_call.py --tokens {args.tokens} --start {args.start}"
               + " --control" * args.control)
    out = {"command": command, "tokens": n,
           "nll": nll, "ppl_vs_fp32": {name: math.exp(v - nll["fp32"]) for name, v in nll.items()},
           "max_abs_logit_diff_one_call_vs_torch": max_diff,
           "max_abs_logit_diff_one_step_from_the_same_state": step_diff, "one_call_steps": one_call_steps}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
