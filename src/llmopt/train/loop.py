"""The training loop: one function, every optimization a visible line.

`fit(run, out_dir)` trains the model described by a `RunConfig` and leaves in `out_dir`:
`config.json` (the resolved run config and applied techniques), `tokenizer.json`, `model.safetensors`
(final weights), `metrics.jsonl` (one JSON object per logged step and per evaluation) and
`checkpoints/step_NNNNNN/` (see `llmopt.train.checkpoint`).

What happens in one optimizer step, in order (DESIGN.md §5):
1. the learning rate of this step is set (linear warmup, then cosine to min_lr);
2. `grad_accum` micro-batches are drawn and their target tokens counted;
3. each micro-batch: hooks `before_forward` -> autocast forward -> loss sum / tokens of the whole step
   -> (scaled) backward. Normalizing by the step's tokens makes accumulation exact: k micro-batches give
   the gradient of the full batch, whatever the padding and lengths;
4. hooks `after_backward`; the loss scaler unscales; gradients are clipped once (`train.clip_mode`: global
   norm, value or AGC), logging the global grad norm before and after;
5. hooks `before_optimizer_step`; optimizer step (skipped by the scaler on inf/nan); zero grads;
   hooks `after_optimizer_step` (the `after_*` hooks run in reverse order).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from llmopt.train.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint,
                                     save_weights)
from llmopt.optim.clipping import clip_gradients_
from llmopt.train.config import RunConfig

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    """What hooks see. `metrics` is the dict logged for the current step; hooks may add to it."""

    step: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: RunConfig
    metrics: dict[str, Any] = field(default_factory=dict)
    tokens_seen: int = 0
    train_ids: torch.Tensor | None = None
    """The training token ids (read-only), for hooks that draw their own batches (difficulty curriculum)."""


@dataclass
class FitResult:
    out_dir: Path
    steps: int
    final_train_loss: float
    final_val_loss: float | None
    tokens_seen: int
    seconds: float
    history: list[dict[str, Any]]


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay from lr to min_lr at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, optim) -> torch.optim.Optimizer:
    """AdamW (foreach) over trainable parameters, weight decay on matrices only; any other `optim.name` is built
    by `llmopt.optim.build` from these groups and the model."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, foreach=True)
    try:  # optimizers registered by llmopt.optim (sgd, lamb, ...) are looked up by name; they get the model
        from llmopt.optim import build as build_registered  # for param groups by module (galore, sgd recipe)
    except ImportError:
        build_registered = None
    if build_registered is not None:
        return build_registered(optim.name, groups, optim, model=model)
    raise ValueError(f"unknown optimizer {optim.name!r} (optim.name); choose adamw or sgd")


def call_hooks(hooks: list, point: str, state: TrainState, *args):
    """Call `point` on every hook: list order for on_*/before_*, reverse order for after_*."""
    ordered = reversed(hooks) if point.startswith("after_") else hooks
    result = args[0] if args else None
    for hook in ordered:
        fn = getattr(hook, point, None)
        if fn is None:
            continue
        if point == "before_forward":
            out = fn(state, result)
            result = result if out is None else out  # a hook may return a transformed batch
        else:
            fn(state, *args)
    return result


def accumulate_gradients(model: torch.nn.Module, micro_batches: list, *, scaler: torch.amp.GradScaler | None = None,
                         precision: str = "fp32", device: str = "cpu") -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step; returns (mean token loss, tokens).

    Each micro-batch's loss *sum* is divided by the target tokens of the whole step (targets of -100 are
    padding and do not count), so the accumulated gradient equals the full batch's, exactly.
    """
    step_tokens = sum(int((y != -100).sum()) for _, y in micro_batches)
    if step_tokens == 0:
        raise ValueError("an optimizer step has no target tokens (all targets are -100)")
    loss_total = 0.0
    for x, y in micro_batches:
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            loss_sum, _ = model.loss(x, y)
        loss = loss_sum / step_tokens
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_total += float(loss.detach())
    return loss_total, step_tokens


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_ids: torch.Tensor, *, batch_size: int, seq_len: int, batches: int,
             precision: str = "fp32", device: str = "cpu") -> float:
    """Mean next-token loss over `batches` evenly spaced, fixed windows of the validation tokens."""
    n_windows = batch_size * batches
    span = len(val_ids) - seq_len - 1
    if span <= 0:
        raise ValueError(f"validation split has {len(val_ids)} tokens, fewer than train.seq_len+1={seq_len + 1}; "
                         "lower train.seq_len or raise data.val_fraction")
    starts = torch.linspace(0, span, n_windows).long()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(batches):
        s = starts[b * batch_size:(b + 1) * batch_size]
        x = torch.stack([val_ids[i:i + seq_len] for i in s.tolist()]).to(device)
        y = torch.stack([val_ids[i + 1:i + 1 + seq_len] for i in s.tolist()]).to(device)
        with autocast(precision, device):
            loss_sum, n = model.loss(x, y)
        total += float(loss_sum)
        count += int(n)
    model.train(was_training)
    return total / count


def autocast(precision: str, device: str):
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def prepare_run(run: RunConfig, out_dir: Path, *, apply_techniques: bool = True):
    """Text -> tokenizer -> token ids -> model (+ techniques). Returns (model, tokenizer, train_ids, val_ids, reports).

    With apply_techniques=False the caller applies `run.techniques` itself (the distributed trainer interleaves
    them with the pipeline split and the parallel transforms)."""
    from llmopt.data import load_text, train_tokenizer, Tokenizer
    from llmopt.models import build_model, load_pretrained

    text = load_text(run.data.path)
    if run.data.max_chars:
        text = text[:run.data.max_chars]
    cut = _split_point(text, run.data.val_fraction)
    train_text, val_text = text[:cut], text[cut:]

    if run.init_from:
        model, tokenizer = load_pretrained(run.init_from)
        run.model = model.config
    elif (out_dir / "tokenizer.json").exists():  # resuming: the tokenizer is part of the run
        tokenizer = Tokenizer.load(out_dir)
    else:
        tokenizer = train_tokenizer(train_text, kind=run.data.tokenizer,
                                    vocab_size=run.data.vocab_size or run.model.vocab_size)
    if not run.init_from:
        if tokenizer.vocab_size > run.model.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                             f"{run.model.vocab_size}; set data.vocab_size <= model.vocab_size")
        torch.manual_seed(run.train.seed)
        model = build_model(run.model, device=run.train.device)
    train_ids = torch.tensor(_encode(tokenizer, train_text), dtype=torch.long)
    val_ids = torch.tensor(_encode(tokenizer, val_text), dtype=torch.long)
    if len(train_ids) < run.train.seq_len + 2:
        raise ValueError(f"training text gives only {len(train_ids)} tokens, fewer than train.seq_len="
                         f"{run.train.seq_len}; use more text or a shorter train.seq_len")

    reports = []
    if run.techniques and apply_techniques:
        import llmopt
        from llmopt.core import apply_, parse_technique_spec

        llmopt.load_techniques()  # a spec names a registered technique: make sure every one is registered
        configs = [parse_technique_spec(spec) for spec in run.techniques]
        reports = apply_(model, *configs)
        reports = list(reports) if isinstance(reports, (list, tuple)) else [reports]
    return model, tokenizer, train_ids, val_ids, reports


def _split_point(text: str, val_fraction: float) -> int:
    """Index where the validation tail starts, moved forward to a line start (deterministic)."""
    cut = int(len(text) * (1 - val_fraction))
    nl = text.find("\n", cut)
    return cut if nl < 0 else nl + 1


def _encode(tokenizer, text: str) -> list[int]:
    # chunked where a split cannot change the tokens (same ids as one encode call, much less memory)
    return tokenizer.encode_large(text)


def fit(run: RunConfig, out_dir: str | Path, *, resume: bool = False, hooks: Iterable = (),
        on_log=None) -> FitResult:
    """Train `run` into `out_dir`. With `resume=True`, continue from the latest checkpoint there, bit-identically."""
    from llmopt.data import BatchLoader

    if run.dist.mesh:
        raise ValueError(f"dist.mesh={run.dist.mesh!r} is a distributed run: use `llmopt train ... --nproc N` or "
                         "llmopt.train.distributed.trainer.fit_distributed under torchrun")
    out_dir = Path(out_dir)
    tc, oc = run.train, run.optim
    if tc.threads:
        torch.set_num_threads(tc.threads)
    random.seed(tc.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    start_ckpt = latest_checkpoint(ckpt_dir) if resume else None
    if resume and start_ckpt is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint to resume from; drop --resume to start a new run")
    if not resume and (out_dir / "checkpoints" / "latest").exists():
        raise CheckpointError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")

    model, tokenizer, train_ids, val_ids, reports = prepare_run(run, out_dir)
    for r in reports:
        log.info("%s", r)
    hooks = list(hooks) + [h for r in reports for h in getattr(r, "hooks", [])]
    model.train()
    optimizer = build_optimizer(model, oc)
    device_type = torch.device(tc.device).type
    scaler = torch.amp.GradScaler(device_type, enabled=tc.precision == "fp16")
    loader = BatchLoader(train_ids, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed)

    step, tokens_seen = 0, 0
    if start_ckpt is not None:
        state = load_checkpoint(start_ckpt, model=model, optimizer=optimizer, scaler=scaler,
                                expected_model_config=run.model.to_dict())
        step, tokens_seen = state["step"], state["tokens_seen"]
        loader.load_state_dict(state["data"])
        for hook, hook_state in zip(hooks, state.get("hooks", [])):
            if hook_state is not None and hasattr(hook, "load_state_dict"):
                hook.load_state_dict(hook_state)
    else:
        tokenizer.save(out_dir)
        _write_config(out_dir, run, model)

    ts = TrainState(step=step, model=model, optimizer=optimizer, scaler=scaler, config=run, tokens_seen=tokens_seen,
                    train_ids=train_ids)
    history: list[dict[str, Any]] = []
    metrics_file = open(out_dir / "metrics.jsonl", "a")
    call_hooks(hooks, "on_fit_start", ts)
    params = [p for p in model.parameters() if p.requires_grad]
    t_start, t_log, tokens_at_log = time.perf_counter(), time.perf_counter(), tokens_seen
    last_loss, val_loss = float("nan"), None

    def checkpoint(at_step: int) -> None:
        save_checkpoint(ckpt_dir, step=at_step, model=model, optimizer=optimizer, run_config=run.to_dict(),
                        scaler=scaler, extra={"tokens_seen": ts.tokens_seen, "data": loader.state_dict(),
                                              "hooks": [h.state_dict() if hasattr(h, "state_dict") else None
                                                        for h in hooks]})

    progress = _progress(tc.progress, total=tc.steps, completed=step)
    with loader, progress as bar:
        task = bar.add_task("train", total=tc.steps, completed=step, loss=float("nan"), tps=0.0) if bar else None
        while step < tc.steps:
            ts.step, ts.metrics = step, {}
            lr = lr_at(step, lr=oc.lr, min_lr=oc.min_lr, warmup_steps=oc.warmup_steps, total_steps=tc.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            micro_batches = [call_hooks(hooks, "before_forward", ts, next(loader)) for _ in range(tc.grad_accum)]
            loss_total, step_tokens = accumulate_gradients(model, micro_batches, scaler=scaler,
                                                           precision=tc.precision, device=tc.device)
            call_hooks(hooks, "after_backward", ts)

            scaler.unscale_(optimizer)  # clip the true gradients, once per optimizer step
            grad_norm, grad_norm_clipped = clip_gradients_(params, tc.clip_mode, tc.grad_clip)
            call_hooks(hooks, "before_optimizer_step", ts)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            call_hooks(hooks, "after_optimizer_step", ts)

            step += 1
            ts.step = step
            ts.tokens_seen += step_tokens
            last_loss = loss_total
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss became {last_loss} at step {step}; lower optim.lr or use "
                                         "train.precision=fp32")
            is_last = step == tc.steps
            if step % tc.log_every == 0 or is_last:
                now = time.perf_counter()
                tps = (ts.tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
                t_log, tokens_at_log = now, ts.tokens_seen
                record = {"step": step, "loss": round(last_loss, 6), "lr": lr, "grad_norm": grad_norm,
                          "grad_norm_clipped": grad_norm_clipped, "tokens": ts.tokens_seen,
                          "tokens_per_s": round(tps, 1), "elapsed_s": round(now - t_start, 3),
                          "loss_scale": scaler.get_scale() if scaler.is_enabled() else None, **ts.metrics}
                _log(metrics_file, history, record, on_log)
                if bar:
                    bar.update(task, completed=step, loss=last_loss, tps=tps)
            elif bar:
                bar.update(task, completed=step, loss=last_loss)
            if step % tc.eval_every == 0 or is_last:
                val_loss = evaluate(model, val_ids, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                    batches=tc.eval_batches, precision=tc.precision, device=tc.device)
                eval_metrics = {"step": step, "val_loss": round(val_loss, 6),
                                "val_ppl": round(math.exp(min(val_loss, 50)), 3)}
                call_hooks(hooks, "on_eval", ts, eval_metrics)
                _log(metrics_file, history, eval_metrics, on_log)
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or is_last:
                checkpoint(step)
    metrics_file.close()
    save_weights(model, out_dir / "model.safetensors")
    from llmopt.techniques.adapters_io import has_adapters, save_adapters

    if has_adapters(model):  # lora/dora/qlora: the adapters alone too (a few MB), for load_adapters
        save_adapters(model, out_dir / "adapters.safetensors")
    return FitResult(out_dir=out_dir, steps=step, final_train_loss=last_loss, final_val_loss=val_loss,
                     tokens_seen=ts.tokens_seen, seconds=time.perf_counter() - t_start, history=history)


def _write_config(out_dir: Path, run: RunConfig, model: torch.nn.Module) -> None:
    from llmopt.train.checkpoint import _write_json_atomic

    applied = [c.to_dict() if hasattr(c, "to_dict") else c for c in getattr(model, "applied_techniques", [])]
    _write_json_atomic(out_dir / "config.json", {"model": run.model.to_dict(), "techniques": applied,
                                                 "run": run.to_dict()})


def _log(file, history: list, record: dict, on_log) -> None:
    file.write(json.dumps(record) + "\n")
    file.flush()
    history.append(record)
    if on_log is not None:
        on_log(record)


def _progress(enabled: bool, total: int, completed: int):
    if not enabled or os.environ.get("LLMOPT_NO_PROGRESS"):
        return contextlib.nullcontext(None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
