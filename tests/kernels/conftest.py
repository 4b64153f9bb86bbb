"""Helpers for the kernel tests: Triton runs under its CPU interpreter here (TRITON_INTERPRET=1)."""

import pytest
import torch

from llmopt.kernels._dispatch import triton_available

needs_triton = pytest.mark.skipif(not triton_available(),
                                  reason="triton is not installed (pip install 'llmopt[triton]'); Triton kernels untested")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")


def interpreted(fn: str, **kwargs):
    """Run `triton_checks:<fn>(**kwargs)` in a fresh process with TRITON_INTERPRET=1 and return its result.

    A fresh process because Triton reads TRITON_INTERPRET when it is first imported, and `torch._inductor`
    (imported by other tests) imports triton in the normal, GPU mode. In the interpreter do arithmetic in
    fp32: its bf16 math is broken.
    """
    import os

    from llmopt.measure.memory import run_in_subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = run_in_subprocess(f"triton_checks:{fn}", kwargs, timeout=600, env=env)
    assert out["ok"], f"{out['error']}\n{out.get('stderr_tail', '')}"
    return out["result"]


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    ref, out = ref.double(), out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))
