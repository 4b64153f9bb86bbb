"""Build a small C source into a shared library at first use and load it through `ctypes`.

The CPU kernels of llmopt (the selective scan, the int8 / int4 matrix-vector products, the 8-bit Adam
step, ...) are a few dozen lines of C each. They are compiled with the system C compiler (`cc -O3
-march=native -ffast-math`, plus `-fopenmp` when asked: the build then links the `libgomp.so.1` that torch
has already loaded, so kernels and torch share one thread pool) into `~/.cache/llmopt/kernels/` (or
`$LLMOPT_CACHE_DIR/kernels`), keyed by the source, flags, compiler and CPU model, so a changed source or
another machine rebuilds. No torch headers, no Python build step: a build takes about a second.

A missing compiler or a failed build raises ImportError with one line saying what to install or which
torch path to use instead; callers turn that into their fallback.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["build_c_library", "builds", "cached_build", "ptr"]


def _cpu_id() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu += next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def cached_build(name: str, key_parts: list[str], build) -> Path:
    """The path of a shared library built once per key: `~/.cache/llmopt/kernels/NAME_KEY.so` (or under
    `$LLMOPT_CACHE_DIR`), keyed by `key_parts` (source, compiler, flags, ...) and the CPU model. When it is
    missing, `build(tmp, out)` writes it to `out` inside a temporary directory `tmp` next to it, and it is moved
    into place atomically (a concurrent build never loads half a file)."""
    key = hashlib.sha256("\0".join([*key_parts, _cpu_id()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LLMOPT_CACHE_DIR", Path.home() / ".cache" / "llmopt")) / "kernels"
    lib = root / f"{name}_{key}.so"
    if not lib.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            out = Path(tmp) / f"{name}.so"
            build(Path(tmp), out)
            os.replace(out, lib)
    return lib


@functools.cache
def build_c_library(name: str, source: str, openmp: bool = False, fallback: str = "the torch path") -> ctypes.CDLL:
    """Compile `source` (cached) and return the loaded library. `name` names the file and the error;
    `fallback` says in the error what to use instead."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ImportError(f"the CPU kernel {name} needs a C compiler (cc or gcc on PATH, or $CC); install gcc, "
                          f"or use {fallback}")
    flags = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared"] + (["-fopenmp"] if openmp else [])

    def build(tmp: Path, out: Path) -> None:
        src, obj = tmp / f"{name}.c", tmp / f"{name}.o"
        src.write_text(source)
        # Compile and link apart: linking with -ffast-math adds crtfastmath.o (GCC < 13, even with -shared),
        # whose constructor sets flush-to-zero / denormals-are-zero for the whole process on load.
        done = subprocess.run([compiler, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        if done.returncode == 0:
            link = ["-shared", "-fPIC"] + (["-fopenmp"] if openmp else [])
            done = subprocess.run([compiler, *link, str(obj), "-o", str(out), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise ImportError(f"building the CPU kernel {name} with {compiler} failed: "
                              f"{done.stderr.strip().splitlines()[-1:]}; use {fallback}")

    return ctypes.CDLL(str(cached_build(name, [source, compiler, *flags, "link-apart"], build)))


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """The data pointer of a tensor for a ctypes call (None for a missing optional tensor)."""
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def builds(load) -> bool:
    """Whether `load()` (a kernel module's cached library loader) succeeds here: False, not an error, without a
    compiler or when the library does not load, so callers keep their torch path."""
    try:
        load()
    except (ImportError, OSError):
        return False
    return True
