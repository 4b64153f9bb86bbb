"""QAT vs post-training quantization on the demo model: how much of the PTQ loss gap QAT recovers.

    .venv/bin/python benchmarks/bench_qat.py --pretrain-steps 300 --steps 100

1. Train the `demo` preset (fp32) from scratch for --pretrain-steps on the bundled corpus.
2. From that checkpoint, three continuations of --steps each, same batches and learning rate:
   fp32 (no quantization), llmopt QAT (int4 group-32 weights, int8 per-token activations, then
   `convert_qat_`), and, when torchao is installed, torchao's `Int8DynActInt4WeightQATQuantizer`
   (prepare -> train -> convert) as a peer column.
3. PTQ: the fp32 continuation quantized to the same format without training (QAT prepare + convert).
Recovery = (PTQ - QAT) / (PTQ - fp32) on the validation loss (the goal is >= 0.70).

`--model smollm2-135m` skips step 1 and fine-tunes the pretrained SmolLM2-135M (bundled package, its own
tokenizer) on the bundled corpus instead: a model trained long enough for PTQ to open a gap, which a demo
model trained for minutes does not. `--group-size 0` quantizes per output channel; `--ptq-only` prints the
PTQ gap of the starting model for the formats given to `--probe-groups` and stops. `--scale-grad absmax`
trains ours with `QATConfig(scale_grad="absmax")` (PTQ is the same either way: it only changes the gradient);
Our QAT trains with QATConfig's defaults (the full-range grid, fp32 scales, int8_asym activations);
`--qmax-grid` / `--scale-dtype bf16` / `--activations int8` give the earlier defaults. `ptq` is always the
absmax / 7 grid with bf16 scales (`PTQ_GRID`, the better PTQ), so recovery never gains from a worse PTQ;
`ptq_own_format` is PTQ in the trained format.
torchao's own PTQ (its prepare + convert of the fp32 continuation) is reported as `torchao_ptq`.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import llmopt.techniques  # noqa: F401
from llmopt.core import apply_
from llmopt.techniques.qat import QATConfig, convert_qat_


PTQ_GRID = {"full_range": False, "scale_dtype": "bf16"}
"""Post-training quantization's grid: absmax / qmax with bf16 scales, the better grid without training."""

def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-chars", type=int, default=2_000_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--model", default="demo", choices=("demo", "smollm2-135m"))
    parser.add_argument("--group-size", type=int, default=32, help="int4 weight group size; 0 = per output channel")
    parser.add_argument("--ptq-only", action="store_true")
    parser.add_argument("--probe-groups", default="32,64,128,0")
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--no-torchao", action="store_true", help="skip the torchao QAT peer column")
    parser.add_argument("--activations", default="int8_asym", help="QAT activation format (int8_asym, int8, none, ...)")
    parser.add_argument("--scale-grad", default="none", choices=("none", "absmax"),
                        help="QATConfig.scale_grad of our QAT (absmax: the scale's gradient reaches the weight that sets it)")
    parser.add_argument("--qmax-grid", action="store_true",
                        help="QATConfig(full_range=False) for our QAT: the absmax / 7 grid instead of the default "
                             "full-range one (absmax / 7.5, codes [-8, 7], clamp-aware STE, torchao's grid)")
    parser.add_argument("--full-range", action="store_true", help="(the default now; kept for old commands)")
    parser.add_argument("--scale-dtype", default="fp32", choices=("bf16", "fp32"), help="QATConfig.scale_dtype of our QAT")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llmopt.data import BatchLoader
    from llmopt.recipes import get_recipe
    from llmopt.train.loop import evaluate, lr_at, prepare_run

    run = get_recipe("demo" if args.model == "demo" else "finetune_lora")
    run.techniques = []
    run.data.max_chars = args.max_chars
    run.train.batch_size, run.train.seq_len = args.batch_size, args.seq_len
    import tempfile

    model, _, train_ids, val_ids, _ = prepare_run(run, __import__("pathlib").Path(tempfile.mkdtemp()))

    def train(m, steps, seed, lr_peak, warmup):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr_peak, weight_decay=0.1)
        m.train()
        with BatchLoader(train_ids, batch_size=args.batch_size, seq_len=args.seq_len, seed=seed) as loader:
            for step in range(steps):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, lr=lr_peak, min_lr=lr_peak / 10, warmup_steps=warmup, total_steps=steps)
                x, y = next(loader)
                loss_sum, n = m.loss(x, y)
                (loss_sum / n).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return m

    def val(m):
        return evaluate(m, val_ids, batch_size=args.batch_size, seq_len=args.seq_len, batches=args.val_batches)

    t0 = time.perf_counter()
    if args.model == "demo":
        train(model, args.pretrain_steps, seed=1, lr_peak=args.lr * 3, warmup=20)
    start_val = val(model)
    print(f"start model: {args.model}, pretrained {args.pretrain_steps if args.model == 'demo' else 'upstream'} "
          f"({time.perf_counter() - t0:.0f} s), val {start_val:.4f}", flush=True)
    if args.ptq_only:
        probe = {"fp32": start_val}
        for g in (int(v) for v in args.probe_groups.split(",")):
            q = copy.deepcopy(model)
            apply_(q, QATConfig(weight="int4", group_size=g or None, activations=args.activations, **PTQ_GRID))
            convert_qat_(q)
            key = f"int4 {'g' + str(g) if g else 'per-channel'} + {args.activations} act"
            probe[key] = val(q)
            print(f"PTQ {key}: {probe[key]:.4f} ({probe[key] / probe['fp32']:.3f}x fp32)", flush=True)
        print(json.dumps(probe, indent=1))
        return
    group = args.group_size or None
    args.full_range = not args.qmax_grid
    config = QATConfig(weight="int4", group_size=group, activations=args.activations, scale_grad=args.scale_grad,
                       full_range=args.full_range, scale_dtype=args.scale_dtype)
    ptq_config = QATConfig(weight="int4", group_size=group, activations=args.activations, **PTQ_GRID)  # the better PTQ grid
    results: dict = {"model": args.model, "group_size": args.group_size or "per-channel", "steps": args.steps,
                     "activations": args.activations, "scale_grad": args.scale_grad, "full_range": args.full_range,
                     "scale_dtype": args.scale_dtype,
                     "lr": args.lr, "batch": [args.batch_size, args.seq_len]}

    fp32 = train(copy.deepcopy(model), args.steps, seed=2, lr_peak=args.lr, warmup=5)
    results["fp32"] = val(fp32)
    ptq = copy.deepcopy(fp32)
    apply_(ptq, ptq_config)
    convert_qat_(ptq)
    results["ptq"] = val(ptq)
    print(f"fp32 {results['fp32']:.4f}  ptq {results['ptq']:.4f}", flush=True)
    if config != ptq_config:  # PTQ in the exact format our QAT converts to (recovery is taken from `ptq`, the better one)
        own = copy.deepcopy(fp32)
        apply_(own, QATConfig(weight="int4", group_size=group, activations=args.activations,
                              full_range=args.full_range, scale_dtype=args.scale_dtype))
        convert_qat_(own)
        results["ptq_own_format"] = val(own)
        del own
        print(f"ptq in our QAT's format {results['ptq_own_format']:.4f}", flush=True)

    qat = copy.deepcopy(model)
    apply_(qat, config)
    train(qat, args.steps, seed=2, lr_peak=args.lr, warmup=5)
    results["qat_fake"] = val(qat)
    convert_qat_(qat)
    results["qat"] = val(qat)
    gap = results["ptq"] - results["fp32"]
    results["recovery"] = (results["ptq"] - results["qat"]) / gap if gap else float("nan")
    print(f"qat {results['qat']:.4f} (fake {results['qat_fake']:.4f}) recovery {results['recovery']:.2f}", flush=True)

    try:
        if args.no_torchao:
            raise ImportError("skipped (--no-torchao)")
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.qat import QATConfig as TorchaoQATConfig
    except ImportError as e:
        results["torchao"] = f"not run: {e}"
    else:
        # The same format as ours (int4 symmetric group-32 weights, int8 dynamic per-token activations; torchao's
        # activations are asymmetric) on the same Linears: lm_head stays full precision in both.
        base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group) if group else PerAxis(0))
        only_blocks = lambda mod, fqn: isinstance(mod, torch.nn.Linear) and not fqn.endswith("lm_head")  # noqa: E731
        # torchao's PTQ: its own prepare + convert of the fp32 continuation (its grid: absmax / 7.5, all 16 codes)
        peer_ptq = copy.deepcopy(fp32)
        quantize_(peer_ptq, TorchaoQATConfig(base, step="prepare"), filter_fn=only_blocks)
        quantize_(peer_ptq, TorchaoQATConfig(base, step="convert"), filter_fn=only_blocks)
        results["torchao_ptq"] = val(peer_ptq)
        del peer_ptq
        peer = copy.deepcopy(model)
        quantize_(peer, TorchaoQATConfig(base, step="prepare"), filter_fn=only_blocks)
        train(peer, args.steps, seed=2, lr_peak=args.lr, warmup=5)
        results["torchao_qat_fake"] = val(peer)
        quantize_(peer, TorchaoQATConfig(base, step="convert"), filter_fn=only_blocks)
        results["torchao_qat"] = val(peer)
        results["torchao_recovery"] = (results["ptq"] - results["torchao_qat"]) / gap if gap else float("nan")
        own_gap = results["torchao_ptq"] - results["fp32"]
        results["torchao_recovery_own_ptq"] = ((results["torchao_ptq"] - results["torchao_qat"]) / own_gap
                                               if own_gap else float("nan"))
        print(f"torchao ptq {results['torchao_ptq']:.4f} qat {results['torchao_qat']:.4f} recovery "
              f"{results['torchao_recovery']:.2f} (of our PTQ gap), {results['torchao_recovery_own_ptq']:.2f} "
              "(of its own PTQ gap)", flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
