"""Run a distillation recipe (`distill_draft`): a small student learns a pretrained teacher's next-token
distributions on the corpus, sharing the teacher's tokenizer.

    python -m llmopt.recipes.distill --out runs/smollm2-draft [--set train.steps=300 ...] [--top-k 32]
    python -m llmopt.recipes.distill --out runs/smollm2-draft-seq --continuations 640 --continuation-rows 7 \
        --init-student runs/smollm2-draft-full --set train.steps=400 ...   # sequence-level (docs/inference.md)

`run.init_from` names the teacher (its tokenizer and tied embedding seed the student); `run.model` is the
student. Steps, in order: the teacher's top-k log-probabilities over non-overlapping windows of the
training text (one no-grad pass, cached under `OUT/teacher_targets/`), the student's tied embedding
set to the teacher's projected on its top `dim` singular directions (`llmopt.data.distill`), then
`train.steps` AdamW steps on the top-k soft cross-entropy with the same learning-rate schedule and
clipping as `llmopt train`. With `--continuations N`, step 1 also has the teacher continue N prompts
greedily (sequence-level distillation: its top-k kept at every position of prompt + continuation, cached
per batch under `OUT/teacher_targets/`) and those sequences fill `--continuation-rows` of every batch;
held-out continuations measure the agreement on the teacher's own greedy output. OUT ends as a Hugging Face directory (`load_pretrained(OUT)`, or
`transformers.AutoModelForCausalLM.from_pretrained(OUT)`) plus `distill.json` (times, losses, and the
top-1 agreement with the teacher on held-out windows, the per-token greedy acceptance to expect).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch

from llmopt.train.config import RunConfig

log = logging.getLogger(__name__)


@torch.no_grad()
def teacher_continuations(teacher, prompts: torch.Tensor, new_tokens: int, *, top_k: int = 32,
                          kernels: bool = True) -> "TeacherTargets":
    """The teacher's greedy continuations of `prompts` (B, P) and its top-k log-probabilities at every position.

    Returns `TeacherTargets` with inputs (B, P + new_tokens - 1): the prompt and the first new_tokens - 1 greedy
    tokens; the targets at the last position are the distribution of the last greedy token, which is not fed.
    One prefill and new_tokens - 1 batched decode steps through a KV cache (the fused CPU decode step with
    `kernels`), so the targets cost no second teacher pass. This is sequence-level distillation (Kim & Rush
    2016): a greedy draft is judged on exactly these continuations.
    """
    from llmopt.data.distill import TeacherTargets
    from llmopt.inference import make_cache
    from llmopt.inference.cpu_linear import cpu_linear_kernels

    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    if prompts.dim() != 2 or prompts.size(1) < 1:
        raise ValueError(f"prompts must be (B, P) token ids with P >= 1, got shape {tuple(prompts.shape)}")
    B, P = prompts.shape
    was_training = teacher.training
    teacher.eval()
    cache = make_cache(teacher, B, P + new_tokens - 1)
    ids, logprobs, tokens, mass = [], [], [prompts], 0.0

    def keep(logits: torch.Tensor) -> torch.Tensor:
        nonlocal mass
        values, top = logits.float().log_softmax(-1).topk(top_k, dim=-1)
        mass += float(values.exp().sum())
        ids.append(top)
        logprobs.append(values.log_softmax(-1))
        return top[:, -1, 0]  # the greedy next token

    with cpu_linear_kernels(teacher, enabled=kernels):
        token = keep(teacher(prompts, input_pos=torch.arange(P), cache=cache))
        for pos in range(P, P + new_tokens - 1):
            tokens.append(token[:, None])
            token = keep(teacher(token[:, None], input_pos=torch.tensor([pos]), cache=cache))
    teacher.train(was_training)
    inputs = torch.cat(tokens, 1)
    return TeacherTargets(inputs, torch.cat(ids, 1), torch.cat(logprobs, 1), mass / inputs.numel())


def continuation_prompts(text: str, n: int, prompt_len: int, tokenizer, *, seed: int) -> torch.Tensor:
    """`n` prompts (n, prompt_len) of token ids starting at random places of `text` (the first token of each
    snippet, maybe a word cut in two, dropped); deterministic for a seed."""
    snippet = 12 * prompt_len  # characters: a token is about 4 of them in this corpus
    if len(text) < snippet + 1:
        raise ValueError(f"{len(text)} characters are too few for {prompt_len}-token prompts; use more text")
    rng = random.Random(seed)  # sequential draws: the first m prompts of n are the m prompts of a smaller n
    starts = [rng.randrange(len(text) - snippet) for _ in range(n)]
    rows = []
    for start in starts:
        ids = tokenizer.encode(text[start:start + snippet])[1:1 + prompt_len]
        if len(ids) < prompt_len:
            raise ValueError(f"a {snippet}-character snippet gave fewer than {prompt_len} tokens")
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long)


def cached_continuations(teacher, prompts: torch.Tensor, new_tokens: int, folder: Path, *, top_k: int,
                         batch_size: int, on_batch: Callable[[int, int], None] | None = None) -> "TeacherTargets":
    """`teacher_continuations` of `prompts` in batches, each saved as `folder/partNNNN.safetensors` as it is
    done and reused by a rerun (a stopped run loses at most one batch; the prompts of a seed are drawn in order,
    so a rerun that asks for more keeps the earlier batches and redoes only a short last one)."""
    from llmopt.data.distill import TeacherTargets, concat_targets

    parts = []
    for i, start in enumerate(range(0, prompts.size(0), batch_size)):
        path = folder / f"part{i:04d}.safetensors"
        batch = prompts[start:start + batch_size]
        cached = TeacherTargets.load(path) if path.is_file() else None
        if cached is not None and cached.inputs.size(0) == batch.size(0):
            parts.append(cached)
        else:  # not there, or the last, short batch of a run that asked for fewer: (re)generate it
            part = teacher_continuations(teacher, batch, new_tokens, top_k=top_k)
            part.save(path)
            parts.append(TeacherTargets.load(path))  # as stored (fp16 log-probs), the same as a rerun sees
        if on_batch is not None:
            on_batch(min(start + batch_size, prompts.size(0)), prompts.size(0))
    return concat_targets(parts)


def distill(run: RunConfig, out_dir: str | Path, *, top_k: int = 32, val_windows: int = 16,
            continuations: int = 0, prompt_len: int = 33, continuation_batch: int = 32,
            continuation_rows: int = 6, val_continuations: int = 0, heldout_chars: int = 30_000,
            init_student: str | Path | None = None, data_only: bool = False,
            on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Distill `run.init_from` (the teacher) into a new `run.model` (the student); returns the summary.

    `continuations`: that many greedy continuations by the teacher (sequence-level distillation) of
    `prompt_len`-token prompts drawn from the corpus after the text windows' part (`data.max_chars` on) and
    before its last `heldout_chars` characters, each `seq_len` tokens long with the teacher's top-k at every
    position; `continuation_rows` of every batch's rows come from them, the rest from the text windows.
    `val_continuations` held-out continuations (prompts from the last `heldout_chars` characters, where the
    benchmarks draw theirs) measure the top-1 agreement on the teacher's own greedy output. `init_student`: a
    student directory (a previous run's OUT) to start from instead of the projected embedding.
    `data_only`: stop after the teacher data is cached.
    """
    from llmopt.data import load_text
    from llmopt.data.distill import (TeacherTargets, mixed_batches, project_embedding, teacher_topk,
                                     top1_agreement, topk_distill_loss, windows)
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

    # 1b. the teacher's greedy continuations of prompts from the rest of the corpus, and of held-out prompts
    continuation_seconds, cont, val_cont = 0.0, None, None
    new_tokens = tc.seq_len - prompt_len + 1
    if continuations or val_continuations:
        if not 0 < prompt_len < tc.seq_len:
            raise ValueError(f"prompt_len must be in [1, seq_len={tc.seq_len}), got {prompt_len}")
        full = load_text(run.data.path)
        if len(full) <= heldout_chars:
            raise ValueError(f"the corpus has {len(full)} characters, not more than heldout_chars={heldout_chars}")
        t2 = time.perf_counter()
        tag = f"{Path(run.init_from).name}_{prompt_len}+{new_tokens}x{top_k}"
        if val_continuations:
            prompts = continuation_prompts(full[-heldout_chars:], val_continuations, prompt_len, tokenizer,
                                           seed=tc.seed + 1)
            val_cont = cached_continuations(teacher, prompts, new_tokens,
                                            out_dir / "teacher_targets" / f"val_continuations_{tag}_{len(full)}",
                                            top_k=top_k, batch_size=continuation_batch)
        if continuations:
            region = full[len(text):len(full) - heldout_chars]  # after the text windows and their val part
            prompts = continuation_prompts(region, continuations, prompt_len, tokenizer, seed=tc.seed)

            def cont_progress(done: int, total: int) -> None:
                if on_log is not None:
                    on_log({"continuations": done, "of": total, "elapsed_s": round(time.perf_counter() - t2, 1)})
            cont = cached_continuations(teacher, prompts, new_tokens,
                                        out_dir / "teacher_targets" / f"continuations_{tag}_seed{tc.seed}",
                                        top_k=top_k, batch_size=continuation_batch, on_batch=cont_progress)
        continuation_seconds = time.perf_counter() - t2
    if data_only:
        return {"teacher_tokens": targets.inputs.numel(), "teacher_seconds": round(teacher_seconds, 1),
                "continuation_tokens": cont.inputs.numel() if cont is not None else 0,
                "continuation_seconds": round(continuation_seconds, 1)}

    # 2. the student, its tied embedding from the teacher's
    torch.manual_seed(tc.seed)
    if init_student is not None:
        student, _ = load_pretrained(init_student)
        if student.config.vocab_size != run.model.vocab_size or student.config.dim != run.model.dim or \
                student.config.n_layer != run.model.n_layer:
            raise ValueError(f"init_student {init_student} is not a {run.model.name} (dim {run.model.dim}, "
                             f"{run.model.n_layer} layers); drop init_student or match run.model")
        student = student.float()
    else:
        student = build_model(run.model)
    with torch.no_grad():
        if init_student is None:
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
        out = {}
        for prefix, data in (("val", val), ("val_continuation", val_cont)):
            if data is None:
                continue
            with torch.no_grad():
                logits = torch.cat([student(data.inputs[i:i + 4]) for i in range(0, len(data), 4)])
                loss = float(topk_distill_loss(logits, data.topk_ids, data.topk_logprobs))
            out[f"{prefix}_distill_loss"] = round(loss, 4)
            out[f"{prefix}_top1_agreement"] = round(top1_agreement(logits, data.topk_ids), 4)
            if prefix == "val_continuation":  # on the generated positions only (what a draft is judged on)
                agree = (logits.argmax(-1) == data.topk_ids[..., 0])[:, prompt_len - 1:]
                out["val_generated_top1_agreement"] = round(float(agree.float().mean()), 4)
        student.train()
        return out

    # 3. train on the soft targets
    history = [{"step": 0, **evaluate()}]
    if on_log is not None:
        on_log(history[0])
    batches = mixed_batches(targets, cont, tc.batch_size, continuation_rows if cont is not None else 0,
                            seed=tc.seed)
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
        if tc.ckpt_every and step % tc.ckpt_every == 0 and step < tc.steps:
            # the student alone (no optimizer state): a stopped run restarts from it with --init-student
            save_pretrained_hf(student, tokenizer, out_dir / "checkpoint")
            (out_dir / "checkpoint" / "step.json").write_text(json.dumps({"step": step, "history": history}) + "\n")
            student.train()
    train_seconds = time.perf_counter() - t1

    student.eval()
    save_pretrained_hf(student, tokenizer, out_dir)
    summary = {"teacher": run.init_from, "student": run.model.to_dict(), "top_k": top_k,
               "teacher_tokens": targets.inputs.numel(), "teacher_top_k_mass": round(targets.mass, 4),
               "student_tokens": tc.steps * tc.batch_size * tc.seq_len, "threads": torch.get_num_threads(),
               "teacher_seconds": round(teacher_seconds, 1), "teacher_targets_reused": cached,
               "continuations": continuations, "continuation_tokens": cont.inputs.numel() if cont is not None else 0,
               "prompt_len": prompt_len, "continuation_rows": continuation_rows if cont is not None else 0,
               "continuation_seconds": round(continuation_seconds, 1), "init_student": str(init_student or ""),
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
    p.add_argument("--continuations", type=int, default=0,
                   help="greedy continuations by the teacher to distill on (sequence-level distillation)")
    p.add_argument("--prompt-len", type=int, default=33, help="prompt tokens of each continuation")
    p.add_argument("--continuation-batch", type=int, default=32, help="continuations generated together")
    p.add_argument("--continuation-rows", type=int, default=6,
                   help="rows of each training batch taken from the continuations (the rest: text windows)")
    p.add_argument("--val-continuations", type=int, default=16,
                   help="held-out continuations (prompts from the corpus tail) for the agreement")
    p.add_argument("--init-student", help="start from this student directory (a previous run's OUT)")
    p.add_argument("--data-only", action="store_true", help="stop after the teacher data is cached")
    args = p.parse_args(argv)
    run = apply_overrides(get_recipe(args.recipe), args.set)
    summary = distill(run, args.out, top_k=args.top_k, continuations=args.continuations,
                      prompt_len=args.prompt_len, continuation_batch=args.continuation_batch,
                      continuation_rows=args.continuation_rows, val_continuations=args.val_continuations,
                      init_student=args.init_student, data_only=args.data_only,
                      on_log=lambda r: print(json.dumps(r), flush=True))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "run", "student")}))


if __name__ == "__main__":
    main()
