"""Mamba's selective scan as a Triton kernel (forward, for prefill and inference), beside the torch paths
in `llmopt.models.mamba` (`scan_sequential` is the reference, `scan_chunked` the CPU path).

The kernel keeps a (BLOCK_D, d_state) slice of the state in registers and walks the sequence once,
like mamba-ssm's `selective_scan_fwd` without the CUDA build: one program per (batch row, block of
channels). It has no backward: training uses `scan_chunked` (autograd), so `use_triton_scan_` is for
inference. Runs on CPU tensors under `TRITON_INTERPRET=1` (the tests do that).

Numerics contract: fp32 recurrence in the sequential order, so within ~1e-6 of `scan_sequential`.
"""

from __future__ import annotations

import functools

import torch

from llmopt.models.mamba import scan_chunked, scan_sequential

__all__ = ["scan_chunked", "scan_sequential", "selective_scan_triton", "use_triton_scan_"]


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise ImportError("the Triton scan needs triton: pip install triton (or llmopt[gpu])") from e

    @triton.jit
    def scan_fwd(x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, h_ptr, y_ptr, T, D, N,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        dm, nm = d < D, n < N
        m2 = dm[:, None] & nm[None, :]
        A = tl.load(a_ptr + d[:, None] * N + n[None, :], mask=m2, other=0.0)
        h_off = row * D * N + d[:, None] * N + n[None, :]
        h = tl.load(h_ptr + h_off, mask=m2, other=0.0)
        for t in range(T):
            off = (row * T + t) * D + d
            x = tl.load(x_ptr + off, mask=dm, other=0.0)
            dt = tl.load(dt_ptr + off, mask=dm, other=0.0)
            Bt = tl.load(b_ptr + (row * T + t) * N + n, mask=nm, other=0.0)
            Ct = tl.load(c_ptr + (row * T + t) * N + n, mask=nm, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
            tl.store(y_ptr + off, tl.sum(h * Ct[None, :], axis=1), mask=dm)
        tl.store(h_ptr + h_off, h, mask=m2)

    return triton, scan_fwd


def selective_scan_triton(x, dt, A, Bm, Cm, h0=None, *, block_d: int = 32):
    """Same contract as `llmopt.models.mamba.scan_sequential` (fp32): (y (B, T, D), final state (B, D, N))."""
    triton, scan_fwd = _kernel()
    Bsz, T, D = x.shape
    N = A.size(1)
    x, dt, A, Bm, Cm = (t.float().contiguous() for t in (x, dt, A, Bm, Cm))
    h = x.new_zeros(Bsz, D, N) if h0 is None else h0.float().contiguous().clone()
    y = torch.empty_like(x)
    grid = (Bsz, triton.cdiv(D, block_d))
    scan_fwd[grid](x, dt, A, Bm, Cm, h, y, T, D, N, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(N))
    return y, h


def use_triton_scan_(model) -> dict:
    """Make every Mamba layer's full-sequence scan the Triton kernel (inference: the kernel has no backward).

    Returns {layer fqn: "triton"}; raises on a model with no Mamba layer.
    """
    from llmopt.models.mamba import MambaMixer

    changed = {}
    for name, module in model.named_modules():
        if isinstance(module, MambaMixer):
            module.scan_fn = selective_scan_triton
            changed[name] = "triton"
    if not changed:
        raise ValueError("use_triton_scan_ found no MambaMixer in the model; it applies to family='mamba' models")
    return changed
