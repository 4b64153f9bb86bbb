"""llmopt LoRA / DoRA / QLoRA vs PEFT (+ bitsandbytes) on SmolLM2-135M: step time, bytes, loss.

Every configuration is a `transformers` LlamaForCausalLM with the same SmolLM2 weights (from
`llmopt.models.hf.to_hf`), so the only difference between columns is the adapter implementation:
ours applied in place with `apply_`, PEFT's with `get_peft_model` (bitsandbytes `Linear4bit` for PEFT's
QLoRA). Setup as in peer_anchors W1: batch 1 x 128 tokens (the first 128 SmolLM2 tokens of the
bundled corpus, labels = inputs), r=8, alpha=16, dropout 0, adapters on q_proj and v_proj of every
layer (60 Linear; the default target, `--targets all` for the 7 projections = 210 Linear), every Linear
but lm_head NF4 for the QLoRA columns, AdamW(lr=1e-5, foreach) on the trainable parameters, one step =
zero_grad, forward, backward, step.

Timing: 2 warm-up steps each, then `--rounds` rounds with every configuration once per round in a
rotating order; ratios are taken within a round and the median (min-max) over rounds is reported.

Bytes: parameters + gradients + AdamW state after one step (each tensor once; NF4 buffers count as
parameter storage). Loss: `--quality-steps` steps of lr 1e-4 on consecutive 128-token windows,
final train loss and held-out loss (also every `--quality-eval-every` steps), QLoRA vs LoRA on bf16 weights.

    python benchmarks/bench_peft_family.py --threads 2 --out runs/bench-peft-family.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"qv": ["q_proj", "v_proj"], "all": ALL_PROJ}
PROJ = TARGETS["qv"]  # set by --targets


def base_model():
    from llmopt.models import load_pretrained
    from llmopt.models.hf import to_hf

    model, tokenizer = load_pretrained("smollm2-135m")
    hf = to_hf(model).float()
    hf.config.use_cache = False
    return hf, tokenizer


def ours(technique: str, **options):
    def build(base):
        import llmopt.techniques  # noqa: F401  (registers them)
        from llmopt import apply_
        from llmopt.core import lookup

        model = copy.deepcopy(base)
        cls = lookup(technique).config_cls
        apply_(model, cls(r=8, alpha=16.0, target=tuple(PROJ), **options))  # qlora: quantize= every Linear
        return model
    return build


def peft_build(dora: bool = False, four_bit: str | None = None):
    def build(base):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJ, task_type="CAUSAL_LM",
                            use_dora=dora)
        if four_bit is None:
            return get_peft_model(copy.deepcopy(base), config)
        import tempfile

        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[four_bit]
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(tmp)
            model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=bnb, device_map="cpu",
                                                     torch_dtype=torch.float32)
        model.config.use_cache = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, config)
    return build


def full_ft(base):
    return copy.deepcopy(base)


CONFIGS = {
    "full": full_ft,
    "peft_lora": peft_build(),
    "lora": ours("lora"),
    "peft_dora": peft_build(dora=True),
    "dora": ours("dora"),
    "peft_qlora": peft_build(four_bit="fp32"),
    "qlora": ours("qlora"),
    "peft_qlora_bf16": peft_build(four_bit="bf16"),
    "qlora_bf16": ours("qlora", compute_dtype="bf16"),
}
RATIOS = [("lora", "peft_lora"), ("lora", "full"), ("dora", "lora"), ("dora", "peft_dora"), ("peft_dora", "peft_lora"),
          ("qlora", "lora"), ("qlora", "peft_qlora"), ("qlora_bf16", "peft_qlora_bf16"), ("peft_qlora", "peft_lora")]


def make_step(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step, opt


def ledger(model, opt) -> dict:
    """Bytes of parameters and buffers that hold weights (NF4), gradients and optimizer state."""
    seen, params, grads, trainable, total = set(), 0, 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel() * p.element_size()
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
        if p.grad is not None:
            grads += p.grad.numel() * p.grad.element_size()
    nf4 = 0
    for name, b in model.named_buffers():
        if any(k in name for k in ("nf4_codes", "nf4_absmax")):
            nf4 += b.numel() * b.element_size()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"param_bytes": params + nf4, "grad_bytes": grads, "optim_bytes": state,
            "sum_bytes": params + nf4 + grads + state, "trainable": trainable, "nf4_buffer_bytes": nf4}


def quantized_linear_bytes(model) -> dict:
    """Bytes of the NF4 base weights (adapted and quantize-only, every Linear but lm_head) vs the same in bf16."""
    from llmopt.techniques.qlora import NF4Linear

    nf4 = logical = 0
    for m in model.modules():
        if isinstance(m, NF4Linear):  # QLoRALinear included
            nf4 += m.nf4_bytes()
            logical += m.in_features * m.out_features
    return {"nf4_bytes": nf4, "bf16_bytes": 2 * logical, "ratio_vs_bf16": nf4 / (2 * logical),
            "bits_per_param": 8 * nf4 / logical}


def quality(base, ids_all, steps: int, seq_len: int = 128, n_eval: int = 4, bf16_compute: bool = True,
            eval_every: int = 0, nf4_scale: str = "absmax") -> dict:
    """Loss after `steps` steps (lr 1e-4, batch 1 x seq_len) of LoRA on bf16 base weights vs our QLoRA (fp32
    compute); held-out loss on `n_eval` later windows before training (the quantization gap alone) and after.

    `bf16_compute=False` keeps the LoRA reference's weights bf16-valued (rounded to bf16) but computes in
    fp32: bf16 matmuls are ~10x slower than fp32 on this CPU, and the quantization of the weights, not the
    activation rounding, is what the comparison with NF4 is about."""
    from llmopt import apply_
    from llmopt.techniques import LoRAConfig, QLoRAConfig

    windows = ids_all[: (steps + n_eval) * seq_len].view(-1, seq_len)
    train, held = windows[:steps], windows[steps:steps + n_eval]
    out = {}
    def bf16_base(m):
        if bf16_compute:
            return apply_(m.to(torch.bfloat16), LoRAConfig(r=8, target=tuple(PROJ)))
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.to(torch.bfloat16).float())  # bf16 values, fp32 storage and compute
        return apply_(m, LoRAConfig(r=8, target=tuple(PROJ)))

    autocast = bf16_compute
    for name, make in (("lora_bf16_base", bf16_base),
                       ("qlora", lambda m: apply_(m, QLoRAConfig(r=8, target=tuple(PROJ), nf4_scale=nf4_scale)))):
        torch.manual_seed(0)
        model = copy.deepcopy(base)
        make(model)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def held_out() -> float:
            model.eval()
            bf16 = autocast and name == "lora_bf16_base"
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return statistics.mean(float(model(input_ids=h[None], labels=h[None]).loss) for h in held)
        held_before = held_out()
        print(f"  quality {name}: step 0, held-out {held_before:.4f}", file=sys.stderr)
        curve = {0: held_before}
        model.train()
        losses = []
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and name == "lora_bf16_base"):
                loss = model(input_ids=train[i:i + 1], labels=train[i:i + 1]).loss
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if eval_every and (i + 1) % eval_every == 0 and i + 1 < steps:
                curve[i + 1] = held_out()
                print(f"  quality {name}: step {i + 1}, held-out {curve[i + 1]:.4f}", file=sys.stderr)
                model.train()
            if (i + 1) % 10 == 0:
                print(f"  quality {name}: step {i + 1}/{steps}, loss {losses[-1]:.4f}", file=sys.stderr)
        held_loss = held_out()
        curve[steps] = held_loss
        out[name] = {"held_out_curve": curve, "first_loss": losses[0], "last5_train_loss": statistics.mean(losses[-5:]),
                     "last10_train_loss": statistics.mean(losses[-10:]), "held_out_before": held_before,
                     "held_out_loss": held_loss}
    out["held_out_ratio_before_training"] = out["qlora"]["held_out_before"] / out["lora_bf16_base"]["held_out_before"]
    out["held_out_ratio_qlora_vs_lora_bf16"] = out["qlora"]["held_out_loss"] / out["lora_bf16_base"]["held_out_loss"]
    out["last10_train_ratio"] = out["qlora"]["last10_train_loss"] / out["lora_bf16_base"]["last10_train_loss"]
    out["held_out_ratio_curve"] = {k: out["qlora"]["held_out_curve"][k] / v
                                   for k, v in out["lora_bf16_base"]["held_out_curve"].items()}
    out["setup"] = {"steps": steps, "seq_len": seq_len, "held_out_windows": n_eval, "lr": 1e-4, "batch": 1,
                    "targets": list(PROJ), "qlora_quantized": "every Linear but lm_head", "nf4_scale": nf4_scale,
                    "lora_reference": "bf16 weights, bf16 autocast" if bf16_compute else
                    "bf16-rounded weights, fp32 compute"}
    return out


def merge_check(targets) -> dict:
    """Max |merged - unmerged| logits of our LoRA and DoRA on SmolLM2 (llmopt model, fp32, 128 tokens, B ~ N(0, 0.02),
    DoRA's m scaled by 1 + N(0, 0.05)), and the fp32 model's own error against it cast to float64 (unmerged)."""
    from llmopt import apply_
    from llmopt.data import load_text
    from llmopt.models import load_pretrained
    from llmopt.techniques import DoRAConfig, LoRAConfig, merge_

    out = {}
    for cls in (LoRAConfig, DoRAConfig):
        model, tok = load_pretrained("smollm2-135m")
        ids = torch.tensor(tok.encode(load_text(None)[:2000])[:128])[None]
        model.eval()
        apply_(model, cls(r=8, target=tuple(targets)))
        torch.manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(std=0.02)
                if n.endswith("lora_magnitude"):
                    p.mul_(1 + 0.05 * torch.randn_like(p))
            unmerged = model(ids)
            f64 = copy.deepcopy(model).double()(ids) if cls is LoRAConfig else None
            merge_(model)
            merged = model(ids)
        row = {"max_abs_diff": float((merged - unmerged).abs().max()), "max_abs_logit": float(unmerged.abs().max())}
        if f64 is not None:
            row["fp32_vs_float64_unmerged"] = float((unmerged.double() - f64).abs().max())
        out[cls.__name__] = row
        print(f"merge {cls.__name__}: {row}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quality-steps", type=int, default=20, help="0 skips the loss comparison")
    ap.add_argument("--quality-seq-len", type=int, default=128, help="tokens per quality step (batch 1)")
    ap.add_argument("--quality-eval", type=int, default=4, help="held-out windows for the quality comparison")
    ap.add_argument("--quality-eval-every", type=int, default=0, help="held-out loss every k steps too (0: ends only)")
    ap.add_argument("--nf4-scale", choices=["absmax", "mse"], default="absmax", help="QLoRAConfig.nf4_scale (quality)")
    ap.add_argument("--targets", choices=sorted(TARGETS), default="qv",
                    help="adapted projections: q_proj,v_proj (the default target) or all seven")
    ap.add_argument("--quality-fp32-compute", action="store_true",
                    help="LoRA reference on bf16-rounded weights computed in fp32 (bf16 matmuls are ~10x slower "
                         "on CPU)")
    ap.add_argument("--merge-check", action="store_true", help="max |merged - unmerged| logits of LoRA and DoRA")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    global PROJ
    PROJ = TARGETS[args.targets]
    torch.set_num_threads(args.threads)
    names = [n for n in args.configs.split(",") if n]
    base, tokenizer = base_model()
    from llmopt.data import load_text

    ids_all = torch.tensor(tokenizer.encode(load_text(None)[:200_000]), dtype=torch.long)
    ids = ids_all[:128][None]  # (1, 128)

    steps, results = {}, {"configs": names, "threads": args.threads, "rounds": args.rounds, "targets": PROJ}
    for name in names:
        torch.manual_seed(0)
        model = CONFIGS[name](base)
        step, opt = make_step(model, ids)
        first = step()
        steps[name] = (model, step)
        results.setdefault("first_loss", {})[name] = first
        results.setdefault("bytes", {})[name] = ledger(model, opt)
        if name.startswith("qlora"):
            results.setdefault("qlora_base_bytes", {})[name] = quantized_linear_bytes(model)
        step()  # second warm-up step
        print(f"built {name}: first loss {first:.4f}", file=sys.stderr)

    times = {n: [] for n in names}
    for r in range(args.rounds if names else 0):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t = time.perf_counter()
            steps[name][1]()
            times[name].append(time.perf_counter() - t)
    results["step_s_median"] = {n: statistics.median(v) for n, v in times.items() if v}
    results["ratios"] = {}
    for a, b in RATIOS:
        if a in times and b in times:
            per_round = [x / y for x, y in zip(times[a], times[b])]
            results["ratios"][f"{a}/{b}"] = {"median": statistics.median(per_round), "min": min(per_round),
                                             "max": max(per_round)}
    full = results.get("bytes", {}).get("full")
    if full:
        for n, b in results["bytes"].items():
            b["sum_vs_full"] = b["sum_bytes"] / full["sum_bytes"]
    del steps
    if args.merge_check:
        results["merge_check"] = merge_check(PROJ)
    if args.quality_steps:
        results["quality"] = quality(base, ids_all, args.quality_steps, args.quality_seq_len, args.quality_eval,
                                     bf16_compute=not args.quality_fp32_compute, eval_every=args.quality_eval_every,
                                     nf4_scale=args.nf4_scale)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
