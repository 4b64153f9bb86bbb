"""Mixed-precision training: bf16/fp16 autocast over fp32 master weights, bf16 weights with fp32 masters, or an
`auto` policy that measures the host and keeps fp32 when lower precision does not pay.

Micikevicius et al. 2018, "Mixed Precision Training" (arXiv:1710.03740): fp32 master weights, half-precision
compute, dynamic loss scaling for fp16.

```python
report = apply_(model, MixedPrecisionConfig(precision="bf16"))   # autocast bf16 inside model.forward / model.loss
fit(..., hooks=report.hooks)                                     # fp16 and bf16_weights hand the loop a hook
```
How it reaches the loop: the technique is self-contained, so it works in `llmopt.train`, in
`llmopt bench` and in a user's own loop. It wraps the model's `forward` and `loss` (instance
attributes; parameter names unchanged) in `torch.autocast(device, dtype)`; `model.llmopt_precision`
records what was chosen. Keep the loop's own `train.precision=fp32` with it (the hook refuses a
run that also sets train.precision, which would autocast twice and scale the loss twice).
- "bf16": autocast bf16; weights, gradients and optimizer state stay fp32 (the masters). No loss
  scaling (bf16 has fp32's exponent range).
- "fp16": autocast fp16 plus dynamic loss scaling: `model.loss` multiplies the gradient flowing back
  from the loss by the current scale (the value returned is not scaled, so logged losses are true);
  `DynamicLossScaleHook.after_backward` divides the gradients back, and on inf/nan drops them
  (the optimizer then skips every parameter), halves the scale and counts the skip; after
  `growth_interval` clean steps it doubles the scale (GradScaler's rule).
- "bf16_weights": the parameters themselves become bf16 (half the weight and gradient memory, no
  per-step casts); `MasterWeightsHook` keeps fp32 master copies, gives them to the optimizer (so its
  state is fp32 too), copies the clipped bf16 gradients into them before the step and rounds the
  updated masters back into the bf16 weights after it. The masters live in the hook's state_dict, so
  a resumed run continues from the fp32 values.
- "auto": first measures the host: a bf16 against an fp32 matmul of the model's own (tokens x dim x
  hidden) shape, interleaved, a few milliseconds. Where bf16 is over 2x slower (no bf16 matrix units:
  most CPUs), bf16 cannot win and the model stays fp32 without being run. Otherwise it times
  `auto_steps` forward+backward passes of the actual model on a probe batch, fp32 and bf16 autocast
  interleaved, and picks bf16 only if its median is at least `auto_margin` faster and its loss is
  within `auto_tolerance` (relative) of fp32's (CPU autocast is often slower than fp32:
  pytorch/pytorch#86270). When fp32 is chosen nothing is wrapped: the model is the untouched fp32
  model, so auto cannot lose to fp32 beyond the probe's one-off cost. The figures are in the notes.

Numerics contract: tolerance. Logits and gradients are those of bf16/fp16 matmuls (about 3 and 2-3
significant digits), held to an SQNR in the contract matrix; the loss itself is computed in fp32.
Reversible (bf16/fp16/auto restore the fp32 functions exactly; bf16_weights casts back to fp32, which
keeps the bf16 rounding of the weights).
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from llmopt.core import ApplyReport, Hook, Stage, TechniqueConfig, register, register_revert

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class MixedPrecisionConfig(TechniqueConfig):
    """Mixed precision: bf16/fp16 autocast with fp32 masters, bf16 weights with fp32 masters, or auto (measured)."""

    precision: Literal["bf16", "fp16", "bf16_weights", "auto"] = "bf16"
    """Compute policy (see the module docstring)."""
    init_scale: float = 2.0 ** 16
    """fp16: initial loss scale."""
    growth_interval: int = 2000
    """fp16: clean steps before the loss scale doubles."""
    auto_steps: int = 3
    """auto: timed forward+backward passes per precision (after one untimed each)."""
    auto_batch_size: int = 4
    """auto: probe batch size."""
    auto_seq_len: int = 128
    """auto: probe sequence length (capped at the model's max_seq_len)."""
    auto_tolerance: float = 0.01
    """auto: largest relative difference of the probe loss, bf16 vs fp32, that still allows bf16."""
    auto_margin: float = 0.05
    """auto: bf16 must be at least this much faster (relative) to be chosen."""

    def __post_init__(self) -> None:
        if self.init_scale <= 0 or self.growth_interval <= 0:
            raise ValueError("init_scale and growth_interval must be positive")
        if self.auto_steps <= 0 or self.auto_batch_size <= 0 or self.auto_seq_len <= 1:
            raise ValueError("auto_steps, auto_batch_size must be positive and auto_seq_len above 1")


def _device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by the hook's current loss scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, hook: DynamicLossScaleHook) -> torch.Tensor:
        ctx.scale = hook.scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _autocast_call(original, device_type: str, dtype: torch.dtype | None, *args: Any, **kwargs: Any):
    if dtype is None:
        return original(*args, **kwargs)
    with torch.autocast(device_type=device_type, dtype=dtype):
        return original(*args, **kwargs)


def _scaled_loss(original, device_type: str, dtype: torch.dtype, hook: DynamicLossScaleHook, *args, **kwargs):
    with torch.autocast(device_type=device_type, dtype=dtype):
        loss_sum, count = original(*args, **kwargs)
    if loss_sum.requires_grad:
        loss_sum = _ScaleGradient.apply(loss_sum, hook)
    return loss_sum, count


def _refuse_double_precision(state: Any) -> None:
    precision = getattr(getattr(getattr(state, "config", None), "train", None), "precision", "fp32")
    if precision != "fp32":
        raise ValueError(f"the mixed_precision technique is applied and train.precision={precision!r} is set too; "
                         "keep train.precision=fp32 (the technique autocasts inside the model)")


class DynamicLossScaleHook(Hook):
    """fp16 loss scaling: unscale after backward, skip the step on inf/nan, grow/shrink the scale."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        self.scale, self.growth_interval = float(init_scale), growth_interval
        self.good_steps, self.skipped = 0, 0

    def on_fit_start(self, state: Any) -> None:
        _refuse_double_precision(state)

    def after_backward(self, state: Any) -> None:
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            for p in state.model.parameters():
                p.grad = None  # the optimizer skips parameters without a gradient: the step is skipped
            self.scale /= 2
            self.good_steps = 0
            self.skipped += 1
        else:
            torch._foreach_mul_(grads, 1.0 / self.scale) if grads else None
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2
        state.metrics["loss_scale"] = self.scale
        state.metrics["skipped_steps"] = self.skipped

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scale, self.good_steps, self.skipped = (float(state_dict["scale"]), int(state_dict["good_steps"]),
                                                     int(state_dict["skipped"]))


class MasterWeightsHook(Hook):
    """bf16 weights, fp32 masters: the optimizer steps the masters; the weights get the rounded result."""

    def __init__(self) -> None:
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._loaded: list[torch.Tensor] | None = None

    def on_fit_start(self, state: Any) -> None:
        _refuse_double_precision(state)
        optimizer = state.optimizer
        masters: dict[int, torch.Tensor] = {}
        loaded = iter(self._loaded) if self._loaded is not None else None
        self.pairs = []
        for group in optimizer.param_groups:
            new_params = []
            for p in group["params"]:
                if id(p) not in masters:
                    source = next(loaded) if loaded is not None else p.detach()
                    master = source.detach().to(torch.float32).clone().requires_grad_(True)
                    masters[id(p)] = master
                    self.pairs.append((p, master))
                    if p in optimizer.state:  # a resumed optimizer: its state belongs to the master now
                        optimizer.state[master] = optimizer.state.pop(p)
                new_params.append(masters[id(p)])
            group["params"] = new_params
        self._loaded = None

    def before_optimizer_step(self, state: Any) -> None:
        for p, master in self.pairs:  # after unscaling and clipping
            master.grad = None if p.grad is None else p.grad.to(torch.float32)
            p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, state: Any) -> None:
        for p, master in self.pairs:
            p.copy_(master)
            master.grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"masters": [m.detach().clone() for _, m in self.pairs]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict.get("masters", []))
        if self.pairs:  # already started: copy in place
            with torch.no_grad():
                for (p, master), value in zip(self.pairs, self._loaded):
                    master.copy_(value)
                    p.copy_(value)
            self._loaded = None


def measure_precisions(model: nn.Module, *, steps: int, batch_size: int, seq_len: int) -> dict[str, dict[str, float]]:
    """Median forward+backward seconds and probe loss per precision ("fp32", "bf16"), interleaved."""
    config = getattr(model, "config", None)
    seq_len = min(seq_len, getattr(config, "max_seq_len", seq_len))
    vocab = getattr(config, "vocab_size", 2)
    device_type = _device_type(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(next(model.parameters()).device)
    idx, targets = x[:, :-1], x[:, 1:]
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    losses: dict[str, float] = {}
    for i in range(steps + 1):
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)) if i % 2 == 0 else \
                (("bf16", torch.bfloat16), ("fp32", None)):
            t0 = time.perf_counter()
            loss_sum, n = _autocast_call(model.loss, device_type, dtype, idx, targets)
            (loss_sum / n).backward()
            elapsed = time.perf_counter() - t0
            losses[name] = float(loss_sum.detach() / n)
            if i > 0:
                times[name].append(elapsed)
        if i > 0 and min(times["bf16"]) > 2 * max(times["fp32"]):
            break  # bf16 autocast is far slower here (16x measured on one CPU): more passes only cost time
    model.zero_grad(set_to_none=True)
    return {name: {"seconds": statistics.median(times[name]), "loss": losses[name]} for name in times}


def host_bf16_ratio(model: nn.Module, *, tokens: int = 512, repeats: int = 5) -> float:
    """Median time of a bf16 matmul over an fp32 one at the model's (tokens x dim) @ (dim x hidden) shape,
    interleaved: above ~2 the host has no fast bf16 path and autocast cannot pay off."""
    config = getattr(model, "config", None)
    dim = int(getattr(config, "dim", 0) or getattr(config, "hidden_size", 0) or 256)
    hidden = int(getattr(config, "hidden_dim", 0) or getattr(config, "intermediate_size", 0) or 4 * dim)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, dim, generator=g).to(device)
    b = torch.randn(dim, hidden, generator=g).to(device)
    pairs = {"fp32": (a, b), "bf16": (a.bfloat16(), b.bfloat16())}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(repeats + 1):
        for name in ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32"):
            x, w = pairs[name]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            x @ w
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["bf16"]) / statistics.median(times["fp32"])


def _wrap(model: nn.Module, name: str, fn) -> None:
    if name in model.__dict__:
        raise ValueError(f"model.{name} is already replaced on the instance (compiled or wrapped); apply "
                         "mixed_precision before compile, or revert_ the other technique first")
    setattr(model, name, fn)


@register(MixedPrecisionConfig, name="mixed_precision", stage=Stage.SURGERY, workload="train")
def apply_mixed_precision(model: nn.Module, config: MixedPrecisionConfig, *, filter_fn=None) -> ApplyReport:
    """Autocast model.forward/model.loss (bf16, fp16 + loss scaling), bf16 weights + fp32 masters, or auto."""
    report = ApplyReport()
    device_type = _device_type(model)
    precision = config.precision
    if precision == "auto":
        if any(p.is_meta for p in model.parameters()):
            raise ValueError("precision='auto' times the model, which a meta-device model cannot run; choose bf16, "
                             "fp16 or bf16_weights, or apply after the weights are materialized")
        host = host_bf16_ratio(model)
        if host > 2.0:
            precision = "fp32"
            report.notes.append(f"auto: host check: a bf16 matmul at the model's shape takes {host:.1f}x the fp32 "
                                "one (no fast bf16 path here), so bf16 autocast cannot win: chose fp32 without "
                                "probing the model; the model is left untouched")
        else:
            figures = measure_precisions(model, steps=config.auto_steps, batch_size=config.auto_batch_size,
                                         seq_len=config.auto_seq_len)
            ratio = figures["bf16"]["seconds"] / figures["fp32"]["seconds"]
            drift = abs(figures["bf16"]["loss"] - figures["fp32"]["loss"]) / max(abs(figures["fp32"]["loss"]), 1e-12)
            precision = "bf16" if ratio <= 1 - config.auto_margin and drift <= config.auto_tolerance else "fp32"
            report.notes.append(f"auto: host check bf16/fp32 matmul {host:.2f}x; fp32 "
                                f"{figures['fp32']['seconds'] * 1e3:.1f} ms, bf16 autocast "
                                f"{figures['bf16']['seconds'] * 1e3:.1f} ms per forward+backward (bf16/fp32 = "
                                f"{ratio:.2f}), loss drift {drift:.2e}: chose {precision}")
    model.llmopt_precision = precision
    if precision == "fp32":  # auto kept fp32: nothing to wrap, the model runs exactly as before
        report.changed["llmopt_precision"] = ("unset", "fp32 (auto kept it; forward and loss untouched)")
        return report
    if precision in ("bf16", "fp16"):
        dtype = DTYPES.get(precision)
        hook = None
        if precision == "fp16":
            hook = DynamicLossScaleHook(config.init_scale, config.growth_interval)
            report.hooks.append(hook)
            loss = functools.partial(_scaled_loss, model.loss, device_type, dtype, hook)
        else:
            loss = functools.partial(_autocast_call, model.loss, device_type, dtype)
        _wrap(model, "forward", functools.partial(_autocast_call, model.forward, device_type, dtype))
        _wrap(model, "loss", loss)
        label = f"autocast {precision}"
        report.changed["forward"] = ("forward", f"forward [{label}]")
        report.changed["loss"] = ("loss", f"loss [{label}]")
        if precision == "fp16":
            report.notes.append("fp16: run report.hooks in the loop (dynamic loss scaling); keep train.precision=fp32")
    else:  # bf16_weights
        for fqn, p in model.named_parameters():
            if p.is_floating_point() and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
                report.changed[fqn] = ("fp32 parameter", "bf16 parameter")
        report.hooks.append(MasterWeightsHook())
        report.notes.append("bf16 weights; fp32 masters and optimizer state live in the hook (run report.hooks)")
    return report


@register_revert(MixedPrecisionConfig)
def revert_mixed_precision(model: nn.Module, report: ApplyReport) -> ApplyReport:
    restored = ApplyReport()
    for name in ("forward", "loss"):
        if model.__dict__.pop(name, None) is not None:
            restored.changed[name] = report.changed[name][::-1]
    for fqn, p in model.named_parameters():
        if fqn in report.changed and p.dtype == torch.bfloat16:
            p.data = p.data.to(torch.float32)
            restored.changed[fqn] = ("bf16 parameter", "fp32 parameter")
    model.__dict__.pop("llmopt_precision", None)
    return restored


__all__ = ["DynamicLossScaleHook", "MasterWeightsHook", "MixedPrecisionConfig", "apply_mixed_precision",
           "host_bf16_ratio", "measure_precisions", "revert_mixed_precision"]
