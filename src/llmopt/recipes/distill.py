"""Run a distillation recipe (`distill_draft`): a small student learns a pretrained teacher's next-token
distributions on the corpus, sharing the teacher's tokenizer.

    python -m llmopt.recipes.distill --out runs/smollm2-draft [--set train.steps=300 ...] [--top-k 32]

`run.init_from` names the teacher (its tokenizer and tied embedding seed the student); `run.model` is the
student. Steps, in order: the teacher's top-k log-probabilities over non-overlapping windows of the
training text (one no-grad pass, cached under `OUT/teacher_targets/`), the student's tied embedding
set to the teacher's projected on its top `dim` singular directions (`llmopt.data.distill`), then
`train.steps` AdamW steps on the top-k soft cross-entropy with the same learning-rate schedule and
clipping as `llmopt train`. OUT ends as a Hugging Face directory (`load_pretrained(OUT)`, or
`transformers.AutoModelForCausalLM.from_pretrained(OUT)`) plus `distill.json` (times, losses, and the
top-1 agreement with the teacher on held-out windows, the per-token greedy acceptance to expect).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from llmopt.train.config import RunConfig

log = logging.getLogger(__name__)


def distill(run: RunConfig, out_dir: str | Path, *, top_k: int = 32, val_windows: int = 16,
            on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Distill `run.init_from` (the teacher) into a new `run.model` (the student); returns the summary."""
    from llmopt.data import load_text
    from llmopt.data.distill import (TeacherTargets, project_embedding, teacher_topk, top1_agreement,
                                     topk_distill_loss, windows)
    from llmopt.models import build_model, load_pretrained
    from llmopt.models.pretrained import save_pretrained_hf
    from llmopt.optim.clipping import clip_gradients_
    from llmopt.train.loop import _split_point, build_optimizer, lr_at

    if not run.init_from:
        raise ValueError("a distillation run needs init_from: the teacher (e.g. smollm2-135m)")
    tc = run.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    teacher, tokenizer = load_pretrained(run.init_from)
    if run.model.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocab_size={run.model.vocab_size} differs from the teacher's "
                         f"{teacher.config.vocab_size}; a draft must share the teacher's tokenizer")

    # 1. the teacher's top-k over the training text, cached (the teacher pass is most of the time)
    text = load_text(run.data.path)
    if run.data.max_chars:
        text = text[:run.data.max_chars]
    cut = _split_point(text, run.data.val_fraction)
    train_ids = torch.tensor(tokenizer.encode_large(text[:cut]), dtype=torch.long)
    val_ids = torch.tensor(tokenizer.encode_large(text[cut:]), dtype=torch.long)
    # in a subfolder: OUT itself is a Hugging Face directory, whose loaders take every *.safetensors there
    name = f"topk_{Path(run.init_from).name}_{tc.seq_len}x{top_k}_{len(train_ids)}.safetensors"
    cache = out_dir / "teacher_targets" / name
    t0 = time.perf_counter()
    cached = cache.is_file()  # then teacher_seconds counts only the held-out windows' pass
    if cached:
        targets = TeacherTargets.load(cache)
    else:
        def progress(done: int, total: int) -> None:
            if on_log is not None and (done % 64 < 4 or done == total):
                on_log({"teacher_windows": done, "of": total, "elapsed_s": round(time.perf_counter() - t0, 1)})
        targets = teacher_topk(teacher, windows(train_ids, tc.seq_len), top_k=top_k, on_batch=progress)
        targets.save(cache)
    val = teacher_topk(teacher, windows(val_ids, tc.seq_len, val_windows), top_k=top_k)
    teacher_seconds = time.perf_counter() - t0

    # 2. the student, its tied embedding from the teacher's
    torch.manual_seed(tc.seed)
    student = build_model(run.model)
    with torch.no_grad():
        embedding = project_embedding(teacher.embed_tokens.weight, run.model.dim)
        student.embed_tokens.weight.copy_(embedding)
        # at init the residual stream is mostly the input token's embedding, whose logit through the tied
        # head is sqrt(dim) |e| w: scale the final RMSNorm so that this self-logit starts about 4, not ~300
        rms_row = float(embedding.norm(dim=1).pow(2).mean().sqrt())
        student.norm.weight.fill_(4.0 / (run.model.dim ** 0.5 * rms_row))
    del teacher
    optimizer = build_optimizer(student, run.optim)
    params = [p for p in student.parameters() if p.requires_grad]

    def evaluate() -> dict[str, float]:
        student.eval()
        with torch.no_grad():
            logits = torch.cat([student(val.inputs[i:i + 4]) for i in range(0, len(val), 4)])
            loss = float(topk_distill_loss(logits, val.topk_ids, val.topk_logprobs))
        student.train()
        return {"val_distill_loss": round(loss, 4),
                "val_top1_agreement": round(top1_agreement(logits, val.topk_ids), 4)}

    # 3. train on the soft targets
    history = [{"step": 0, **evaluate()}]
    batches = targets.batches(tc.batch_size, seed=tc.seed)
    student.train()
    t1 = time.perf_counter()
    for step in range(1, tc.steps + 1):
        lr = lr_at(step - 1, lr=run.optim.lr, min_lr=run.optim.min_lr, warmup_steps=run.optim.warmup_steps,
                   total_steps=tc.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, ids, logprobs = next(batches)
        loss = topk_distill_loss(student(inputs), ids, logprobs)
        loss.backward()
        grad_norm, _ = clip_gradients_(params, tc.clip_mode, tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"distillation loss became {loss} at step {step}; lower optim.lr")
        record: dict[str, Any] = {}
        if step % tc.log_every == 0 or step == tc.steps:
            record = {"step": step, "loss": round(loss, 4), "lr": lr, "grad_norm": round(grad_norm, 3),
                      "elapsed_s": round(time.perf_counter() - t1, 1)}
        if step % tc.eval_every == 0 or step == tc.steps:
            record = {"step": step, **record, **evaluate()}
        if record:
            history.append(record)
            if on_log is not None:
                on_log(record)
    train_seconds = time.perf_counter() - t1

    student.eval()
    save_pretrained_hf(student, tokenizer, out_dir)
    summary = {"teacher": run.init_from, "student": run.model.to_dict(), "top_k": top_k,
               "teacher_tokens": targets.inputs.numel(), "teacher_top_k_mass": round(targets.mass, 4),
               "student_tokens": tc.steps * tc.batch_size * tc.seq_len, "threads": torch.get_num_threads(),
               "teacher_seconds": round(teacher_seconds, 1), "teacher_targets_reused": cached,
               "train_seconds": round(train_seconds, 1),
               "total_seconds": round(time.perf_counter() - t_start, 1), "final": history[-1],
               "history": history, "run": run.to_dict()}
    (out_dir / "distill.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    from llmopt.recipes import get_recipe
    from llmopt.train.config import apply_overrides

    p = argparse.ArgumentParser(prog="python -m llmopt.recipes.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="distill_draft")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--top-k", type=int, default=32)
    args = p.parse_args(argv)
    run = apply_overrides(get_recipe(args.recipe), args.set)
    summary = distill(run, args.out, top_k=args.top_k, on_log=lambda r: print(json.dumps(r), flush=True))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "run", "student")}))


if __name__ == "__main__":
    main()
