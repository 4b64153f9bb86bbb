"""The workloads `llmopt bench` runs, one repeat per fresh subprocess: train, generate, eval.

Each `run_*` function is called by `measure.memory.run_in_subprocess("llmopt.measure.workloads:run_train",
kwargs)` with JSON kwargs and returns a JSON dict of figures (names and units as in `measure.report`).
The parent adds `peak_rss_bytes` (the child's own VmHWM) and the figures that need another run of the
same round (time-to-target, greedy agreement); see `llmopt.measure.bench`.

Every run of a bench gets the same `run` config (a `RunConfig.to_dict()`), the same token ids (one
`data.pt` the parent wrote: `{"train_ids", "val_ids"}`) and the same seed, so the baseline and each
candidate differ only by the technique specs and config overrides under test.

train
    `warmup_steps` untimed optimizer steps, then `steps` timed ones, each a full step of the loop
    (`llmopt.train.loop`'s pieces: hooks, `accumulate_gradients`, unscale, clip, step). Validation loss
    at step 0, every `eval_every` steps and at the end, stamped with the cumulative *training* seconds
    (evaluation time excluded, warm-up steps included), so time-to-target can be interpolated. After
    the last evaluation, one more step is accounted (`account_training_step`) and counted for FLOPs
    (`train_step_flops`); neither is part of the curve or the timings.
generate
    Greedy `llmopt.inference.generate` of `new_tokens` after a prompt of `prompt_len` validation tokens
    (batch `batch_size`), `warmup` untimed calls then `steps` timed ones; medians of the prefill and
    decode rates.
eval
    Sliding-window perplexity (`measure.perplexity`) of the first `max_tokens` validation tokens, one
    untimed window first.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

import torch

from llmopt.measure.energy import EnergyMeter, flops_per_joule, tokens_per_joule
from llmopt.measure.memory import account_training_step, cuda_peak_bytes, reset_cuda_peak
from llmopt.measure.timing import Timer


# ---- shared ------------------------------------------------------------------------------------
def load_data(data_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_ids, val_ids) the parent saved."""
    data = torch.load(data_path, weights_only=True)
    return data["train_ids"], data["val_ids"]


def build_base_model(run) -> torch.nn.Module:
    """The run's model before techniques: pretrained weights (`init_from`) or the seeded random init."""
    from llmopt.models import build_model, load_pretrained

    if run.init_from:
        model, _ = load_pretrained(run.init_from, device=run.train.device)
        run.model = model.config
    else:
        torch.manual_seed(run.train.seed)
        model = build_model(run.model, device=run.train.device)
    return model


def apply_techniques(model: torch.nn.Module, specs: list[str], *, allow_hooks: bool) -> tuple[list, list[str]]:
    """Apply the transform specs to `model` and build the hook specs; (hooks, one line per technique)."""
    if not specs:
        return [], []
    import llmopt.techniques
    from llmopt.core import apply_, lookup, parse_technique_spec

    llmopt.load_techniques()
    transforms, hooks, lines = [], [], []
    for spec in specs:
        config = parse_technique_spec(spec)
        entry = lookup(spec.partition(":")[0].strip())
        if entry.kind == "transform":
            transforms.append(config)
        elif entry.kind == "hook" and allow_hooks:
            hook = config.build() if hasattr(config, "options") else entry.build(config=config)
            hooks.append(hook)
            lines.append(f"{entry.name}: hook {type(hook).__name__}")
        else:
            raise ValueError(f"{entry.name!r} is a {entry.kind}; this workload cannot run it")
    if transforms:
        report = apply_(model, *transforms)
        hooks = list(report.hooks) + hooks  # transforms may hand the loop hooks (curriculum, ...)
        lines = [str(report)] + lines
    return hooks, lines


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _threads(run) -> None:
    if run.train.threads:
        torch.set_num_threads(run.train.threads)


# ---- train -------------------------------------------------------------------------------------
def run_train(*, run: dict[str, Any], techniques: list[str], data_path: str, warmup_steps: int, steps: int,
              eval_every: int, peak_flops: float | None = None) -> dict[str, Any]:
    """One repeat of the train workload on the llmopt model; returns its figures."""
    from llmopt.train import RunConfig

    cfg = RunConfig.from_dict(run)
    _threads(cfg)
    train_ids, val_ids = load_data(data_path)
    model = build_base_model(cfg)
    hooks, applied = apply_techniques(model, techniques, allow_hooks=True)
    figures = train_and_measure(model, cfg, train_ids, val_ids, hooks=hooks, warmup_steps=warmup_steps,
                                steps=steps, eval_every=eval_every, peak_flops=peak_flops)
    figures["applied"] = applied
    return figures


def train_and_measure(model: torch.nn.Module, cfg, train_ids: torch.Tensor, val_ids: torch.Tensor, *, hooks: list,
                      warmup_steps: int, steps: int, eval_every: int, peak_flops: float | None) -> dict[str, Any]:
    """The measured training loop shared by llmopt runs and peers (a peer passes a model with `.loss`)."""
    from llmopt.data import BatchLoader
    from llmopt.optim.clipping import clip_gradients_
    from llmopt.train.loop import (TrainState, accumulate_gradients, autocast, build_optimizer, call_hooks,
                                   evaluate, lr_at)

    tc, oc = cfg.train, cfg.optim
    total = warmup_steps + steps
    cuda = torch.device(tc.device).type == "cuda"
    model.train()
    optimizer = build_optimizer(model, oc)
    scaler = torch.amp.GradScaler(torch.device(tc.device).type, enabled=tc.precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    state = TrainState(step=0, model=model, optimizer=optimizer, scaler=scaler, config=cfg)
    if hasattr(state, "train_ids"):  # hooks that draw their own batches read the training tokens
        state.train_ids = train_ids
    reset_cuda_peak()

    def val_loss() -> float:
        return evaluate(model, val_ids, batch_size=tc.batch_size, seq_len=tc.seq_len, batches=tc.eval_batches,
                        precision=tc.precision, device=tc.device)

    train_clock, step_times, timed_tokens, joules = 0.0, [], 0, 0.0
    meters: list[EnergyMeter] = []
    loss_curve: list[list[float]] = []
    val_curve = [[0.0, val_loss(), 0]]  # (training seconds, validation loss, step)
    call_hooks(hooks, "on_fit_start", state)
    with BatchLoader(train_ids, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed) as loader:
        for step in range(total):
            state.step, state.metrics = step, {}
            lr = lr_at(step, lr=oc.lr, min_lr=oc.min_lr, warmup_steps=oc.warmup_steps, total_steps=total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            meter = EnergyMeter()
            with Timer(cuda_sync=cuda) as timer, meter:
                micro = [call_hooks(hooks, "before_forward", state, next(loader)) for _ in range(tc.grad_accum)]
                loss, tokens = accumulate_gradients(model, micro, scaler=scaler, precision=tc.precision,
                                                    device=tc.device)
                call_hooks(hooks, "after_backward", state)
                scaler.unscale_(optimizer)
                clip_gradients_(params, tc.clip_mode, tc.grad_clip)
                call_hooks(hooks, "before_optimizer_step", state)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                call_hooks(hooks, "after_optimizer_step", state)
            train_clock += timer.seconds
            state.tokens_seen += tokens
            if step >= warmup_steps:
                step_times.append(timer.seconds)
                timed_tokens += tokens
                joules += meter.joules
                meters.append(meter)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step + 1}; lower optim.lr")
            loss_curve.append([step + 1, loss])
            if (step + 1) % eval_every == 0 or step + 1 == total:
                val_curve.append([train_clock, val_loss(), step + 1])

        # one extra step, outside the curve and the timings: exact memory accounting, then FLOPs
        optimizer.zero_grad(set_to_none=True)
        state.step = total
        x, y = call_hooks(hooks, "before_forward", state, next(loader))
        x, y = x.to(tc.device), y.to(tc.device)

    def loss_fn() -> torch.Tensor:
        with autocast(tc.precision, tc.device):
            loss_sum, count = model.loss(x, y)
        return loss_sum / count

    accounted = account_training_step(model, optimizer, loss_fn)
    optimizer.zero_grad(set_to_none=True)
    flops, flops_note = _flops(model, x, y, tc)

    step_time = _median(step_times)
    figures: dict[str, Any] = {
        "step_time_s": step_time,
        "tokens_per_s": timed_tokens / sum(step_times) if step_times else math.nan,
        "train_time_s": train_clock,
        "train_loss": loss_curve[-1][1],
        "val_loss": val_curve[-1][1],
        "params_bytes": accounted.params,
        "buffers_bytes": accounted.buffers,
        "grads_bytes": accounted.grads,
        "optimizer_state_bytes": accounted.optimizer_state,
        "activations_bytes": accounted.activations,
        "accounted_total_bytes": accounted.total,
        "flops_per_step": flops,
        "mfu": (flops / step_time / peak_flops if flops and peak_flops and step_time > 0 else None),
        "energy_j": joules,
        "energy_per_step_j": joules / len(step_times) if step_times else math.nan,
        "tokens_per_joule": tokens_per_joule(timed_tokens, joules),
        "flops_per_joule": flops_per_joule(flops * len(step_times), joules) if flops else None,
        "energy_method": meters[0].method if meters else "",
        "energy_measured": bool(meters) and all(m.measured for m in meters),
        "energy_note": meters[0].note if meters else "",
        "loss_curve": loss_curve,
        "val_curve": val_curve,
        "info": {"timed_steps": len(step_times), "warmup_steps": warmup_steps, "timed_tokens": timed_tokens,
                 "threads": torch.get_num_threads()},
    }
    if flops_note:
        figures["flops_note"] = flops_note
    if cuda:
        figures["cuda_peak_bytes"] = cuda_peak_bytes()
    return figures


def _flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, tc) -> tuple[int | None, str]:
    """Counted FLOPs of one forward + backward, or (None, why) when the counter cannot run the model."""
    from llmopt.measure.flops import train_step_flops
    from llmopt.train.loop import autocast

    try:
        with autocast(tc.precision, tc.device):
            return train_step_flops(model, x, y), ""
    except Exception as e:  # noqa: BLE001 - a compiled or exotic model may defeat the counter: say so
        return None, f"FLOP counter failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"


# ---- generate ----------------------------------------------------------------------------------
def prompt_batch(val_ids: torch.Tensor, batch_size: int, prompt_len: int) -> torch.Tensor:
    """(batch_size, prompt_len) prompts cut at evenly spaced offsets of the validation tokens."""
    span = len(val_ids) - prompt_len
    if span <= 0:
        raise ValueError(f"validation split has {len(val_ids)} tokens, fewer than the prompt length {prompt_len}")
    starts = torch.linspace(0, span, batch_size).long().tolist()
    return torch.stack([val_ids[s:s + prompt_len] for s in starts])


def run_generate(*, run: dict[str, Any], techniques: list[str], data_path: str, prompt_len: int, new_tokens: int,
                 batch_size: int, warmup: int, steps: int) -> dict[str, Any]:
    """One repeat of the generate workload (greedy) on the llmopt model."""
    from llmopt.inference import generate
    from llmopt.train import RunConfig

    cfg = RunConfig.from_dict(run)
    _threads(cfg)
    _, val_ids = load_data(data_path)
    model = build_base_model(cfg)
    _, applied = apply_techniques(model, techniques, allow_hooks=False)
    model.eval()
    prompt = prompt_batch(val_ids, batch_size, prompt_len).to(cfg.train.device)

    def call() -> tuple[float, float, list[list[int]]]:
        result = generate(model, prompt, new_tokens, temperature=0.0)
        return (result.prefill_tokens_per_second, result.decode_tokens_per_second,
                result.new_tokens.tolist())

    figures = measure_generate(call, warmup=warmup, steps=steps, new_tokens=new_tokens, batch_size=batch_size,
                               cuda=torch.device(cfg.train.device).type == "cuda")
    figures["applied"] = applied
    return figures


def measure_generate(call: Callable[[], tuple[float, float, list[list[int]]]], *, warmup: int, steps: int,
                     new_tokens: int, batch_size: int, cuda: bool) -> dict[str, Any]:
    """Run `call()` (-> prefill tok/s, decode tok/s, new token ids) warmup + steps times; the figures."""
    for _ in range(warmup):
        call()
    reset_cuda_peak()
    prefill, decode, seconds, tokens = [], [], [], []
    meter = EnergyMeter()
    with meter:
        for _ in range(steps):
            with Timer(cuda_sync=cuda) as timer:
                p, d, tokens = call()
            prefill.append(p)
            decode.append(d)
            seconds.append(timer.seconds)
    generated = batch_size * new_tokens * steps
    figures = {"prefill_tokens_per_s": _median(prefill), "decode_tokens_per_s": _median(decode),
               "generate_s": _median(seconds), "energy_j": meter.joules,
               "tokens_per_joule": tokens_per_joule(generated, meter.joules),
               "energy_method": meter.method, "energy_measured": meter.measured, "energy_note": meter.note,
               "new_token_ids": tokens,
               "info": {"new_tokens": new_tokens, "batch_size": batch_size, "timed_calls": steps,
                        "warmup_calls": warmup, "threads": torch.get_num_threads()}}
    if cuda:
        figures["cuda_peak_bytes"] = cuda_peak_bytes()
    return figures


# ---- eval --------------------------------------------------------------------------------------
def run_eval(*, run: dict[str, Any], techniques: list[str], data_path: str, window: int, stride: int,
             max_tokens: int) -> dict[str, Any]:
    """One repeat of the eval workload: sliding-window perplexity of the validation tokens."""
    from llmopt.measure.perplexity import perplexity
    from llmopt.train import RunConfig
    from llmopt.train.loop import autocast

    cfg = RunConfig.from_dict(run)
    _threads(cfg)
    _, val_ids = load_data(data_path)
    model = build_base_model(cfg)
    _, applied = apply_techniques(model, techniques, allow_hooks=False)
    model.eval()
    ids = val_ids[:max_tokens]
    cuda = torch.device(cfg.train.device).type == "cuda"
    with autocast(cfg.train.precision, cfg.train.device):
        perplexity(model, ids[:window], window=window, stride=window)  # warm-up, untimed
        reset_cuda_peak()
        meter = EnergyMeter()
        with Timer(cuda_sync=cuda) as timer, meter:
            result = perplexity(model, ids, window=window, stride=stride)
    figures = {"ppl": result["ppl"], "nll": result["nll"], "eval_s": timer.seconds,
               "eval_tokens_per_s": result["tokens"] / timer.seconds, "energy_j": meter.joules,
               "tokens_per_joule": tokens_per_joule(result["tokens"], meter.joules),
               "energy_method": meter.method, "energy_measured": meter.measured, "energy_note": meter.note,
               "applied": applied,
               "info": {"window": window, "stride": stride, "scored_tokens": result["tokens"],
                        "windows": result["windows"], "threads": torch.get_num_threads()}}
    if cuda:
        figures["cuda_peak_bytes"] = cuda_peak_bytes()
    return figures
