"""Memory, two ways (DESIGN.md §7): measured and accounted.

Measured
    `peak_rss_bytes()` is the high-water resident set of this process. On Linux it reads `VmHWM` from
    /proc/self/status, because `getrusage().ru_maxrss` survives `exec`: a child forked from a big parent
    reports at least the parent's size. `run_in_subprocess` runs one function in a fresh interpreter
    and reads the child's own peak at its exit, so each repeat of a bench starts from nothing.
    `cuda_peak_bytes()` is `torch.cuda.max_memory_allocated` (None without CUDA).

Accounted
    `account_training_step` counts the bytes a training step holds: parameters, buffers, gradients,
    optimizer state and the activations autograd saves for backward (through
    `torch.autograd.graph.saved_tensors_hooks`). Every figure is a sum over unique storages, so tied
    weights, views and a tensor saved by several ops count once; tensor subclasses (quantized weights)
    are opened with `__tensor_flatten__` down to the plain tensors that hold memory. Unlike RSS these
    numbers are exact and identical from run to run, whatever else the machine is doing.
    Not counted: allocator caching and fragmentation, temporaries freed during the step, and tensors
    kept alive outside autograd (e.g. the inputs a non-reentrant checkpoint keeps for recomputation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from llmopt.measure._child import peak_rss_bytes  # noqa: F401  (public here; defined torch-free there)


# ---- measured ----------------------------------------------------------------------------

def cuda_peak_bytes(device: int | torch.device | None = None) -> int | None:
    """`torch.cuda.max_memory_allocated(device)`, or None when CUDA is not available."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated(device))


def reset_cuda_peak(device: int | torch.device | None = None) -> None:
    """Reset the CUDA peak counter (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_in_subprocess(fn_path: str, kwargs: dict[str, Any] | None = None, *, timeout: float | None = None,
                      env: dict[str, str] | None = None) -> dict[str, Any]:
    """Call `module:function(**kwargs)` in a fresh Python process and return what it measured.

    The kwargs and the function's return value travel as JSON. The child's stdout and stderr are
    captured. Returns `{"ok": True, "result", "peak_rss_bytes", "wall_s", "fn_wall_s"}`, where
    `peak_rss_bytes` is the child's VmHWM read just before it exits, `wall_s` the whole child process
    as the parent saw it (interpreter start included) and `fn_wall_s` the function call alone. On any
    failure (exception, crash, timeout, unserializable result) returns `{"ok": False, "error": <one
    line>, "stderr_tail": <last lines of the child's stderr>, "peak_rss_bytes": int|None, "wall_s"}`.
    The child sees this process's `sys.path`, so functions in test modules and source trees import.
    """
    if ":" not in fn_path:
        raise ValueError(f"fn_path must look like 'package.module:function', got {fn_path!r}")
    with tempfile.TemporaryDirectory(prefix="llmopt-child-") as tmp:
        in_path, out_path = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(in_path, "w") as f:
            json.dump({"fn": fn_path, "kwargs": kwargs or {}, "sys_path": [p for p in sys.path if p]}, f)
        child_env = dict(os.environ if env is None else env)
        src_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [src_root, child_env.get("PYTHONPATH", "")]))
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "llmopt.measure._child", in_path, out_path],
                                  capture_output=True, text=True, timeout=timeout, env=child_env)
        except subprocess.TimeoutExpired as e:
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return {"ok": False, "error": f"{fn_path} timed out after {timeout:g} s", "stderr_tail": _tail(stderr),
                    "peak_rss_bytes": None, "wall_s": time.perf_counter() - start}
        wall = time.perf_counter() - start
        out: dict[str, Any] | None = None
        if os.path.exists(out_path):
            with open(out_path) as f:
                out = json.load(f)
    if out is None:
        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        last = next((ln for ln in reversed(proc.stderr.strip().splitlines()) if ln.strip()), "no output")
        return {"ok": False, "error": f"{fn_path}: child process died ({how}) before reporting: {last.strip()}",
                "stderr_tail": _tail(proc.stderr), "peak_rss_bytes": None, "wall_s": wall}
    if not out.get("ok"):
        return {"ok": False, "error": f"{fn_path}: {out.get('error', 'unknown error')}",
                "stderr_tail": _tail(proc.stderr), "peak_rss_bytes": out.get("peak_rss_bytes"), "wall_s": wall}
    return {"ok": True, "result": out["result"], "peak_rss_bytes": out["peak_rss_bytes"], "wall_s": wall,
            "fn_wall_s": out["fn_wall_s"]}


# ---- accounted ---------------------------------------------------------------------------

def plain_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding `t`'s memory: `t` itself, or a subclass's inner tensors, recursively."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from plain_tensors(getattr(t, name))
    else:
        yield t


def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    """(device, data pointer, nbytes) of the storage behind `t`; None for tensors that hold no memory."""
    if t.device.type == "meta":
        return None
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.nbytes() == 0:
        return None
    return (str(t.device), storage.data_ptr(), storage.nbytes())


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: set | None = None) -> tuple[int, set]:
    """Sum of nbytes over the unique storages behind `tensors` (minus `exclude`); also the keys seen."""
    seen: set = set()
    for t in tensors:
        for leaf in plain_tensors(t):
            key = _storage_key(leaf)
            if key is not None and (exclude is None or key not in exclude):
                seen.add(key)
    return sum(k[2] for k in seen), seen


def _state_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _state_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _state_tensors(v)


@dataclass(frozen=True)
class AccountedMemory:
    """Bytes held by one training step, each a sum over unique storages (see the module docstring)."""

    params: int
    """Parameters (tied weights once)."""
    buffers: int
    """Registered buffers that are not parameters (e.g. rotary tables)."""
    grads: int
    """`.grad` of the parameters after backward."""
    optimizer_state: int
    """Tensors in `optimizer.state` after the step (moments, step counters, quantization scales)."""
    activations: int
    """Tensors saved for backward during the forward, excluding parameters and buffers."""
    saved_parameters: int
    """Of the tensors saved for backward, the bytes that are parameters or buffers (already counted)."""

    @property
    def total(self) -> int:
        """params + buffers + grads + optimizer_state + activations."""
        return self.params + self.buffers + self.grads + self.optimizer_state + self.activations

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def _python_tensor_keys() -> dict:
    """{storage key: storage} of every tensor object the garbage collector tracks (each a plain tensor)."""
    import gc

    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    found: dict = {}
    for obj in gc.get_objects():
        kind = type(obj)  # type(), not isinstance: some proxies warn on __class__
        if not issubclass(kind, torch.Tensor) or issubclass(kind, (FakeTensor, FunctionalTensor)):
            continue
        try:  # fake/functional tensors that torch.compile keeps around have no data pointer
            for leaf in plain_tensors(obj):
                key = _storage_key(leaf)
                if key is not None and key not in found:
                    found[key] = leaf.untyped_storage()
        except (RuntimeError, NotImplementedError, AttributeError):
            continue
    return found


def saved_activation_bytes(fn: Callable[[], Any], model_tensors: Iterable[torch.Tensor] = ()) -> tuple[Any, int, int]:
    """Run `fn()` under saved-tensor hooks: (its return value, activation bytes, saved model-tensor bytes).

    A storage saved several times counts once; storages of `model_tensors` (parameters, buffers) are
    counted separately as the second number. Besides what autograd saves through the hooks, tensors that
    `fn` created and that are still alive as Python objects when it returns are counted: selective
    activation checkpointing (`torch.utils.checkpoint.create_selective_checkpoint_contexts`) keeps the
    outputs it must save in its own cache, out of sight of saved-tensor hooks.
    """
    _, model_keys = storage_bytes(model_tensors)
    saved: dict = {}
    keep_alive: list = []  # hold storages so a freed one cannot reappear at the same address

    def pack(t: torch.Tensor) -> torch.Tensor:
        for leaf in plain_tensors(t):
            key = _storage_key(leaf)
            if key is not None and key not in saved:
                saved[key] = True
                keep_alive.append(leaf.untyped_storage())
        return t

    before = _python_tensor_keys()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = fn()
    returned = {_storage_key(leaf) for t in (value if isinstance(value, (tuple, list)) else (value,))
                if isinstance(t, torch.Tensor) for leaf in plain_tensors(t)}
    for key, storage in _python_tensor_keys().items():
        if key not in before and key not in returned and key not in saved:
            saved[key] = True
            keep_alive.append(storage)
    del before
    activations = sum(k[2] for k in saved if k not in model_keys)
    of_model = sum(k[2] for k in saved if k in model_keys)
    del keep_alive
    return value, activations, of_model


def account_training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          step_fn: Callable[[], torch.Tensor]) -> AccountedMemory:
    """Run one training step and account its memory exactly.

    `step_fn()` runs the forward and returns the scalar loss; this function then calls `backward()`,
    counts gradients, calls `optimizer.step()` and counts the optimizer state. It does not zero the
    gradients, so the caller's loop decides. The model's weights change, as in any training step.
    """
    params = list(model.parameters())
    buffers = list(model.buffers())
    value, activations, saved_params = saved_activation_bytes(step_fn, params + buffers)
    loss = value
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
        raise TypeError("step_fn must run the forward and return the scalar loss tensor (requiring grad); "
                        f"got {type(value).__name__}. For llmopt models: `lambda: (lambda s, n: s / n)(*model.loss(x, y))`")
    loss.backward()
    param_bytes, param_keys = storage_bytes(params)
    buffer_bytes, _ = storage_bytes(buffers, exclude=param_keys)
    grad_bytes, grad_keys = storage_bytes(p.grad for p in params if p.grad is not None)
    optimizer.step()
    state_bytes, _ = storage_bytes((t for s in optimizer.state.values() for t in _state_tensors(s)),
                                   exclude=param_keys | grad_keys)
    return AccountedMemory(params=param_bytes, buffers=buffer_bytes, grads=grad_bytes, optimizer_state=state_bytes,
                           activations=activations, saved_parameters=saved_params)
