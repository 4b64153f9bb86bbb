"""Backend choice shared by every kernel: `backend="auto"` picks Triton on CUDA, else the CPU path."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    """Whether `import triton` works (the optional `triton` extra)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True under `TRITON_INTERPRET=1`, where Triton kernels run on CPU tensors (slowly, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_triton(device: torch.device) -> None:
    """Raise with the fix when the Triton backend cannot run on `device`."""
    if not triton_available():
        raise ImportError("backend='triton' needs the triton package: pip install 'llmopt[triton]' "
                          "(or use backend='auto', which picks the CPU path)")
    if device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"backend='triton' runs on CUDA tensors (got {device.type}); on CPU use backend='auto', "
                           "or set TRITON_INTERPRET=1 to run the kernel in Triton's (slow) interpreter for testing")


def resolve_backend(backend: str, device: torch.device, cpu_path: str, choices: tuple[str, ...]) -> str:
    """The concrete backend: `auto` -> "triton" on CUDA when triton imports, else `cpu_path`."""
    if backend not in ("auto", *choices):
        raise ValueError(f"backend must be one of {('auto', *choices)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() and "triton" in choices else cpu_path
    if backend == "triton":
        require_triton(device)
    return backend
