"""llmopt vs `transformers` on identical weights: training tokens/s and greedy decode tokens/s.

One process, both models built from the same weights (`llmopt.models.hf.to_hf`), measured interleaved
(A B, then B A, ...) after warm-up; reported as the median over rounds of the per-round ratio
llmopt / transformers (> 1 means llmopt is faster), with min and max. Absolute times on a shared CPU mean
little; quote the ratios.

    python benchmarks/bench_vs_transformers.py --model demo --threads 2 --out runs/bench-vs-hf.json

(a) training: forward + backward + AdamW step on one fixed batch; llmopt through `model.loss(idx, targets)`,
    transformers through `model(input_ids, labels=..., shift_labels=targets)` (the same targets, unshifted).
(b) decode: `llmopt.inference.generate` (eager, dense KV cache) vs `LlamaForCausalLM.generate(do_sample=False,
    max_new_tokens=N, min_new_tokens=N)` (eager, its default attention and cache). Decode time runs from the
    first generated token (after the prefill) to the end, timed the same way on both sides through their
    streaming callbacks. Greedy tokens must be identical.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch


def build_models(name: str, seed: int):
    """(llmopt model, transformers model) in fp32 eval mode with identical weights."""
    from llmopt.models import ModelConfig, build_model, load_pretrained
    from llmopt.models.hf import to_hf

    if name == "smollm2-135m":
        model, _ = load_pretrained("smollm2-135m")
    else:
        torch.manual_seed(seed)
        model = build_model(ModelConfig.from_name(name))
    hf = to_hf(model)
    hf.generation_config.eos_token_id = None  # never stop early, never mask an id: N tokens on both sides
    hf.generation_config.pad_token_id = 0
    return model.eval(), hf.eval()


def measure_training(model, hf, *, batch: int, seq: int, repeats: int, warmup: int, steps: int, seed: int) -> dict:
    from llmopt.measure import interleaved, median_min_max

    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    idx, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    ours, theirs = copy.deepcopy(model).train(), copy.deepcopy(hf).train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours():
        for _ in range(steps):
            loss_sum, count = ours.loss(idx, targets)
            loss = loss_sum / count
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_theirs():
        for _ in range(steps):
            loss = theirs(input_ids=idx, labels=targets, shift_labels=targets).loss
            loss.backward()
            opt_theirs.step()
            opt_theirs.zero_grad(set_to_none=True)
        return loss.item()

    with torch.no_grad():  # same loss on the same weights before any step: both compute the same thing
        l_ours = (lambda s, c: (s / c).item())(*ours.loss(idx, targets))
        l_theirs = theirs(input_ids=idx, labels=targets, shift_labels=targets).loss.item()
    if abs(l_ours - l_theirs) > 1e-4:
        raise SystemExit(f"training losses differ before any step: llmopt {l_ours} vs transformers {l_theirs}")

    res = interleaved({"transformers": step_theirs, "llmopt": step_ours}, repeats=repeats, warmup=warmup)
    tokens = batch * seq * steps
    speedups = [1.0 / r for r in res.ratios["llmopt"]]
    spread = median_min_max(speedups)
    return {"batch": batch, "seq": seq, "steps_per_round": steps, "initial_loss": l_ours,
            "tokens_per_second": {n: tokens / median_min_max(res.times[n]).median for n in res.names},
            "ratio": spread.median, "ratio_min": spread.min, "ratio_max": spread.max,
            "ratio_of_best": min(res.times["transformers"]) / min(res.times["llmopt"]),
            "round_seconds": res.times, "orders": res.orders}


class _Clock:
    """Streaming callback for both libraries: records when the first generated token arrived."""

    def __init__(self, skip_first_put: bool) -> None:
        self.skip = skip_first_put  # transformers' streamer first receives the prompt
        self.first = None

    def put(self, value) -> None:
        if self.skip:
            self.skip = False
        elif self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass

    __call__ = put


def measure_decode(model, hf, *, batch: int, prompt_len: int, new_tokens: int, repeats: int, warmup: int,
                   seed: int) -> dict:
    from transformers.generation.streamers import BaseStreamer

    from llmopt.inference import generate
    from llmopt.measure import interleaved, median_min_max

    class HFClock(_Clock, BaseStreamer):
        pass

    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                           generator=torch.Generator().manual_seed(seed + 1))
    attention_mask = torch.ones_like(prompt)
    outputs = {}

    def run_ours():
        clock = _Clock(skip_first_put=False)
        result = generate(model, prompt, new_tokens, stream=clock)
        end = time.perf_counter()
        outputs["llmopt"] = result.tokens
        return batch * (new_tokens - 1) / (end - clock.first)

    def run_theirs():
        clock = HFClock(skip_first_put=True)
        with torch.no_grad():
            tokens = hf.generate(prompt, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, streamer=clock)
        end = time.perf_counter()
        outputs["transformers"] = tokens
        return batch * (new_tokens - 1) / (end - clock.first)

    res = interleaved({"transformers": run_theirs, "llmopt": run_ours}, repeats=repeats, warmup=warmup)
    identical = torch.equal(outputs["llmopt"], outputs["transformers"])
    rates = res.returns
    speedups = [o / t for o, t in zip(rates["llmopt"], rates["transformers"])]
    spread = median_min_max(speedups)
    first_diff = None
    if not identical:
        diff = (outputs["llmopt"] != outputs["transformers"]).nonzero()
        first_diff = diff[0].tolist() if len(diff) else "shape"
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "decode_tokens_per_second": {n: median_min_max(rates[n]).median for n in res.names},
            "generate_seconds": {n: median_min_max(res.times[n]).median for n in res.names},
            "ratio": spread.median, "ratio_min": spread.min, "ratio_max": spread.max,
            "ratio_of_best": max(rates["llmopt"]) / max(rates["transformers"]),
            "rounds_tokens_per_second": rates, "orders": res.orders,
            "greedy_tokens_identical": identical, "first_difference": first_diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo", choices=["tiny", "demo", "smollm2-135m"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median of these)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq", type=int, default=128)
    parser.add_argument("--train-steps", type=int, default=2, help="optimizer steps per timed round")
    parser.add_argument("--batch", type=int, default=1, help="generation batch size")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from llmopt.measure import machine_info, versions

    model, hf = build_models(args.model, args.seed)
    results = {"benchmark": "bench_vs_transformers", "model": args.model, "threads": args.threads,
               "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "hf_attn_implementation": hf.config._attn_implementation,
               "machine": machine_info(), "versions": versions()}
    if not args.skip_train:
        results["train"] = measure_training(model, hf, batch=args.train_batch, seq=args.train_seq,
                                            repeats=args.repeats, warmup=args.warmup, steps=args.train_steps,
                                            seed=args.seed)
    results["decode"] = measure_decode(model, hf, batch=args.batch, prompt_len=args.prompt_len,
                                       new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup,
                                       seed=args.seed)

    rows = [("decode tok/s", results["decode"])]
    if "train" in results:
        rows.insert(0, ("train tok/s", results["train"]))
    print(f"model={args.model} threads={args.threads} repeats={args.repeats} "
          f"(transformers attention: {results['hf_attn_implementation']})")
    # ratio: median over rounds of llmopt / transformers in the same round; best: best round / best round
    # (the less contention-sensitive figure on a shared machine)
    print(f"{'metric':<14}{'transformers':>14}{'llmopt':>12}{'ratio':>8}{'min':>8}{'max':>8}{'best':>8}")
    for label, r in rows:
        rate = r.get("tokens_per_second") or r["decode_tokens_per_second"]
        print(f"{label:<14}{rate['transformers']:>14.1f}{rate['llmopt']:>12.1f}"
              f"{r['ratio']:>8.3f}{r['ratio_min']:>8.3f}{r['ratio_max']:>8.3f}{r['ratio_of_best']:>8.3f}")
    print(f"greedy tokens identical: {results['decode']['greedy_tokens_identical']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0 if results["decode"]["greedy_tokens_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
