"""`torch.compile` as an in-place transform, with shape bucketing and a recompile counter.

PyTorch 2 (Ansel et al., ASPLOS 2024, doi:10.1145/3620665.3640366): TorchDynamo captures the
Python bytecode of a function into FX graphs, AOTAutograd derives the backward, and Inductor
generates fused C++/OpenMP (CPU) or Triton (GPU) kernels.

```python
report = apply_(model, CompileConfig())          # every decoder block compiled in place
```
Nothing wraps the user's model: `scope="blocks"` calls `nn.Module.compile()` on each block of the
repeated block list (`layers.N`), which compiles the module's `__call__` in place, so `model`,
`type(model.layers[0])` and every state_dict key stay as they were (no `_orig_mod.` prefix).
`scope="model"` compiles the model's forward and its `loss` method (one graph from embedding to
loss); `scope="loss"` compiles only `model.loss_fn` (the output projection and cross-entropy).
Blocks are the default (torchtitan's choice too): identical blocks share one compiled graph, so
compile time does not grow with depth (143 s cold for `demo` on a loaded CPU, against minutes for
the whole model), and a graph break stays inside one block. On these shared 2-core CPUs no scope gave
a measurable train-step speed-up over eager on `demo` (docs/techniques/compile.md has the figures);
the gain is expected on a GPU, where fusion removes kernel launches and memory traffic.

Variable sequence lengths recompile a static-shape graph for each new length. The report carries a
`CompileHook` whose `before_forward` pads each batch to the next of a few bucket lengths
(`bucket_pad`): inputs padded with `pad_id`, targets with -100, so the loss sum and the token count
(hence the loop's normalization) are those of the unpadded batch. The hook counts dynamo compiles
and recompiles (`state.metrics["compiles"]`, `["recompiles"]`) and estimates the compile time
(`["compile_seconds"]`: time of the steps that compiled minus the steady step time);
`compile_payback_steps` turns it into the number of steps a speed-up needs to repay it.

Numerics contract: tolerance. Inductor fuses and reorders floating-point reductions (RMSNorm,
softmax, matmul epilogues), so logits and gradients match eager to about 1e-6 in fp32, not bitwise
(tests/test_compile.py holds them to atol=1e-5, rtol=1e-4). `backend="eager"` (graph capture only) is
exact. Reversible: `revert_` restores the eager modules.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from llmopt.core import ApplyReport, Hook, Stage, TechniqueConfig, fqn_filter, register, register_revert

__all__ = ["CompileConfig", "CompileHook", "apply_compile", "bucket_lengths", "bucket_pad", "compile_events",
           "compile_payback_steps", "revert_compile"]

log = logging.getLogger("llmopt")


@dataclass(frozen=True, kw_only=True)
class CompileConfig(TechniqueConfig):
    """torch.compile in place (PyTorch 2, Ansel et al. 2024), with shape bucketing and recompile counting."""

    mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode: "reduce-overhead" adds CUDA graphs (GPU only), "max-autotune-no-cudagraphs" autotunes
    matmul and kernel configs (much longer compile)."""
    fullgraph: bool = False
    """Refuse graph breaks (raise at the first one) instead of splitting the graph around them."""
    dynamic: bool | None = False
    """False: one static-shape graph per bucket (fastest kernels; bucketing bounds the count). None: torch's
    automatic dynamic shapes after the first recompile. True: dynamic from the start."""
    scope: Literal["blocks", "model", "loss"] = "blocks"
    """What to compile: each repeated decoder block ("blocks"), the model's forward and loss method ("model"), or
    only `model.loss_fn`, the output projection + cross-entropy ("loss")."""
    include: tuple[str, ...] = ()
    """scope="blocks": compile only these blocks (fqn_filter patterns, e.g. "layers.0"); empty means all."""
    backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """Compiler backend: "inductor" generates kernels; "aot_eager" and "eager" only capture graphs (debugging a
    numerics or graph-break problem without code generation)."""
    bucketing: Literal["pow2", "multiple", "none"] = "pow2"
    """Pad sequence lengths up to bucket lengths so that variable lengths do not recompile: powers of two, multiples
    of `bucket_multiple`, or no padding. The run's train.seq_len is always a bucket, so fixed-length runs pad nothing."""
    bucket_multiple: int = 64
    """Bucket step for bucketing="multiple"."""
    min_bucket: int = 16
    """Smallest bucket length."""
    pad_id: int = 0
    """Token id the inputs are padded with (its targets are -100, so the loss never sees it)."""

    def __post_init__(self) -> None:
        if self.bucket_multiple <= 0 or self.min_bucket <= 0:
            raise ValueError(f"bucket_multiple and min_bucket must be positive, got {self.bucket_multiple} and "
                             f"{self.min_bucket}; e.g. bucket_multiple=64, min_bucket=16")
        if self.pad_id < 0:
            raise ValueError(f"pad_id must be a valid token id (>= 0), got {self.pad_id}")
        if self.include and self.scope != "blocks":
            raise ValueError(f"include selects blocks, so it needs scope='blocks' (got scope={self.scope!r})")


# ---- pure functions ---------------------------------------------------------------------------------

def bucket_lengths(max_len: int, bucketing: str = "pow2", *, multiple: int = 64, min_len: int = 16) -> tuple[int, ...]:
    """Bucket lengths up to and including `max_len`: powers of two from `min_len`, or multiples of `multiple`."""
    if bucketing == "none":
        return ()
    if bucketing == "pow2":
        lengths, n = [], 1 << max(0, (min_len - 1).bit_length())
        while n < max_len:
            lengths.append(n)
            n *= 2
    elif bucketing == "multiple":
        lengths = list(range(multiple, max_len, multiple))
        lengths = [n for n in lengths if n >= min_len]
    else:
        raise ValueError(f"bucketing must be 'pow2', 'multiple' or 'none', got {bucketing!r}")
    return tuple(lengths) + (max_len,)


def bucket_pad(batch: tuple[torch.Tensor, torch.Tensor], buckets: tuple[int, ...] | list[int], *, pad_id: int = 0,
               ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (inputs, targets) of shape (B, T) on the right to the smallest bucket >= T.

    Inputs are padded with `pad_id`, targets with `ignore_index`; with a causal model the real positions
    never attend to the padding, so the loss sum and token count equal the unpadded batch's. A batch
    longer than every bucket is returned unchanged.
    """
    x, y = batch
    T = x.shape[-1]
    target = min((b for b in buckets if b >= T), default=T)
    if target == T:
        return x, y
    pad = target - T
    return (torch.nn.functional.pad(x, (0, pad), value=pad_id),
            torch.nn.functional.pad(y, (0, pad), value=ignore_index))


def compile_payback_steps(compile_seconds: float, eager_step_seconds: float, compiled_step_seconds: float) -> float:
    """Steps after which compiling has paid for itself: compile time / time saved per step (inf if none saved)."""
    saved = eager_step_seconds - compiled_step_seconds
    return compile_seconds / saved if saved > 0 else float("inf")


# ---- compile events ---------------------------------------------------------------------------------

_EVENTS: list[tuple[int, int]] = []  # (frame id, compile number of that frame) of every dynamo compile


def _on_compile_start(args: Any) -> None:
    from torch._dynamo.callback import CallbackTrigger

    if getattr(args, "callback_trigger", None) != CallbackTrigger.DYNAMO:
        return
    compile_id = str(getattr(args, "compile_id", ""))
    if compile_id.startswith("!"):  # compiled autograd graphs are not recompiles of our frames
        return
    frame, _, number = compile_id.partition("/")
    try:
        _EVENTS.append((int(frame), int(number)))
    except ValueError:
        _EVENTS.append((-1, 0))


def _listen() -> None:
    # checked on every use: torch._dynamo.reset() clears the registered callbacks
    from torch._dynamo.callback import callback_handler

    if _on_compile_start not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_on_compile_start)


def compile_events(since: int = 0) -> tuple[int, int]:
    """(compiles, recompiles) of dynamo frames since event index `since` (process-wide). A recompile is a
    compile of a frame dynamo compiled before (a new shape or a failed guard), as dynamo counts them."""
    events = _EVENTS[since:]
    return len(events), sum(1 for _, number in events if number > 0)


# ---- the hook ---------------------------------------------------------------------------------------

class CompileHook(Hook):
    """Pads batches to bucket lengths; puts compiles, recompiles and compile time in `state.metrics`."""

    def __init__(self, buckets: tuple[int, ...], *, pad_id: int = 0) -> None:
        self.buckets = tuple(sorted(set(buckets)))
        self.pad_id = pad_id
        self.since = len(_EVENTS)
        self.step_seconds: list[float] = []
        self.compiling_steps: list[bool] = []
        self._started: float | None = None
        self._events_at_start = 0

    def on_fit_start(self, state: Any) -> None:
        seq_len = getattr(getattr(getattr(state, "config", None), "train", None), "seq_len", None)
        if self.buckets and isinstance(seq_len, int) and seq_len not in self.buckets:
            self.buckets = tuple(sorted({*(b for b in self.buckets if b < seq_len), seq_len}))

    def before_forward(self, state: Any, batch: Any) -> Any:
        _listen()
        if self._started is None:
            self._started, self._events_at_start = time.perf_counter(), len(_EVENTS)
        if not self.buckets or not isinstance(batch, (tuple, list)) or len(batch) != 2:
            return None
        return bucket_pad(tuple(batch), self.buckets, pad_id=self.pad_id)

    def after_optimizer_step(self, state: Any) -> None:
        if self._started is not None:
            self.step_seconds.append(time.perf_counter() - self._started)
            self.compiling_steps.append(len(_EVENTS) > self._events_at_start)
            self._started = None
        compiles, recompiles = compile_events(self.since)
        metrics = getattr(state, "metrics", None)
        if isinstance(metrics, dict):
            metrics["compiles"], metrics["recompiles"] = compiles, recompiles
            seconds = self.compile_seconds()
            if seconds is not None:
                metrics["compile_seconds"] = round(seconds, 3)

    def steady_step_seconds(self) -> float | None:
        """Median time of the steps that compiled nothing (None before there is one)."""
        steady = [s for s, c in zip(self.step_seconds, self.compiling_steps) if not c]
        return statistics.median(steady) if steady else None

    def compile_seconds(self) -> float | None:
        """Time of the steps that compiled, minus the steady step time for each of them."""
        steady = self.steady_step_seconds()
        if steady is None:
            return None
        return sum(max(0.0, s - steady) for s, c in zip(self.step_seconds, self.compiling_steps) if c)


# ---- apply / revert ---------------------------------------------------------------------------------

def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists whose children all share one class: the repeated decoder blocks (llmopt `layers`,
    transformers `model.layers`)."""
    found = []
    for fqn, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if not any(fqn.startswith(f + ".") for f, _ in found):
                found.append((fqn, module))
    return found


def _max_len(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@register(CompileConfig, name="compile", stage=Stage.COMPILE, workload="train")
def apply_compile(model: nn.Module, config: CompileConfig, *, filter_fn=None) -> ApplyReport:
    """Compile `model` in place per `config.scope`; the report carries the bucketing/recompile-counting hook."""
    options: dict[str, Any] = dict(backend=config.backend, fullgraph=config.fullgraph, dynamic=config.dynamic)
    if config.mode != "default":
        options["mode"] = config.mode
    changed: dict[str, tuple[str, str]] = {}
    skipped: dict[str, str] = {}
    state: dict[str, Any] = {"blocks": [], "model": False, "loss": False, "loss_fn": None}
    if config.scope == "blocks":
        select = fqn_filter(include=config.include) if config.include else None
        for list_fqn, blocks in _block_lists(model):
            for i, block in enumerate(blocks):
                fqn = f"{list_fqn}.{i}" if list_fqn else str(i)
                if (select is not None and not select(block, fqn)) or (filter_fn is not None and not filter_fn(block, fqn)):
                    skipped[fqn] = "not in include" if select is not None else "excluded by filter_fn"
                    continue
                block.compile(**options)
                state["blocks"].append(fqn)
                name = type(block).__name__
                changed[fqn] = (name, f"{name} (compiled)")
    elif config.scope == "model":
        model.compile(**options)
        state["model"] = True
        name = type(model).__name__
        changed[""] = (name, f"{name} (compiled forward)")
        if callable(getattr(model, "loss", None)) and "loss" not in model.__dict__:
            model.__dict__["loss"] = torch.compile(model.loss, **options)  # instance attribute over the method
            state["loss"] = True
            changed["loss"] = ("method", "compiled method")
    else:
        loss_fn = getattr(model, "loss_fn", None)
        if loss_fn is None:
            skipped["loss_fn"] = "the model has no loss_fn attribute to compile; use scope='blocks'"
        else:
            state["loss_fn"] = loss_fn
            model.loss_fn = torch.compile(loss_fn, **options)
            changed["loss_fn"] = (getattr(loss_fn, "__name__", type(loss_fn).__name__), "compiled")
    hooks: list[Hook] = []
    notes = []
    if changed:
        _listen()
        max_len = _max_len(model)
        buckets = bucket_lengths(max_len, config.bucketing, multiple=config.bucket_multiple,
                                 min_len=config.min_bucket) if max_len and config.bucketing != "none" else ()
        hooks.append(CompileHook(buckets, pad_id=config.pad_id))
        if config.bucketing != "none" and not max_len:
            notes.append("no max sequence length on model.config: no bucketing, variable lengths recompile")
    return ApplyReport(changed=changed, skipped=skipped, hooks=hooks, notes=notes, revert_state=state)


@register_revert(CompileConfig)
def revert_compile(model: nn.Module, report: ApplyReport) -> ApplyReport:
    """Restore the eager modules and functions that `apply_compile` compiled."""
    state = report.revert_state
    changed = {}
    for fqn in state.get("blocks", []):
        block = model.get_submodule(fqn)
        block._compiled_call_impl = None  # what nn.Module.compile set; None means the eager __call__
        changed[fqn] = report.changed[fqn][::-1]
    if state.get("model"):
        model._compiled_call_impl = None
        changed[""] = report.changed[""][::-1]
    if state.get("loss"):
        del model.__dict__["loss"]
        changed["loss"] = report.changed["loss"][::-1]
    if state.get("loss_fn") is not None:
        model.loss_fn = state["loss_fn"]
        changed["loss_fn"] = report.changed["loss_fn"][::-1]
    return ApplyReport(changed=changed)
