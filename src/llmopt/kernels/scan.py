"""Mamba's selective scan as fused kernels (forward, for prefill and inference), beside the torch paths in
`llmopt.models.mamba` (`scan_sequential` is the reference, `scan_chunked` the torch autograd path):
a Triton kernel for GPUs (`selective_scan_triton`) and a C kernel for CPUs (`selective_scan_cpu`), plus the
fused C decode step (`mamba_decode_step_cpu`, the default decode step of fp32 CPU Mamba models). The CPU scan
with a backward (the default training / prefill scan on fp32 CPU) is `llmopt.kernels.scan_backward`.

The CPU kernel is forty lines of C built at first use with the system C compiler (`cc -O3 -march=native
-ffast-math`, so `expf` vectorizes through glibc's libmvec) into `~/.cache/llmopt/kernels/` (or
`$LLMOPT_CACHE_DIR/kernels`), and called through `ctypes`: no torch headers, a build of about a second.
It walks the sequence once with the transposed state (d_state, d_inner) in L1, the innermost loop along
d_inner, so each step is one vectorized pass instead of eight dispatched torch ops. `selective_scan_cpu` has
no backward; `llmopt.kernels.scan_backward.selective_scan_cpu_autograd` is the same pass with one.

The kernel keeps a (BLOCK_D, d_state) slice of the state in registers and walks the sequence once,
like mamba-ssm's `selective_scan_fwd` without the CUDA build: one program per (batch row, block of
channels). It has no backward: training on a GPU uses `scan_chunked` (autograd), so `use_triton_scan_` is for
inference. Runs on CPU tensors under `TRITON_INTERPRET=1` (the tests do that).

Numerics contract: fp32 recurrence in the sequential order, so within ~1e-6 of `scan_sequential` (the C
kernel's `expf` from libmvec is within 4 ulp).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmopt.kernels._cbuild import build_c_library
from llmopt.models.mamba import scan_chunked, scan_sequential

__all__ = ["decode_step_available", "mamba_decode_step_cpu", "scan_chunked", "scan_sequential", "selective_scan_cpu",
           "selective_scan_triton", "use_fused_scan_", "use_triton_scan_"]


def _refuse_autograd(name: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(f"{name} has no backward; train with scan='auto' (the default: on CPU the C scan with a "
                         "backward, llmopt.kernels.scan_backward) or 'chunked', or call it under torch.no_grad()")


# ---- CPU: a C kernel through ctypes -------------------------------------------------------------------
_C_SOURCE = r"""
#include <math.h>
/* x, dt, y: (B, T, D); At: (N, D) = A^T; Bm, Cm: (B, T, N); h: (B, N, D) = state^T, in/out; w: (D) scratch */
void selective_scan_fwd(const float* restrict x, const float* restrict dt, const float* restrict At,
                        const float* restrict Bm, const float* restrict Cm, float* restrict h,
                        float* restrict y, float* restrict w, long Bsz, long T, long D, long N) {
  for (long b = 0; b < Bsz; b++) {
    float* hb = h + b * N * D;
    for (long t = 0; t < T; t++) {
      const long row = b * T + t;
      const float* xt = x + row * D;
      const float* dtt = dt + row * D;
      const float* bt = Bm + row * N;
      const float* ct = Cm + row * N;
      float* yt = y + row * D;
      for (long d = 0; d < D; d++) { w[d] = dtt[d] * xt[d]; yt[d] = 0.f; }
      for (long n = 0; n < N; n++) {
        const float* a = At + n * D;
        float* hn = hb + n * D;
        const float bn = bt[n], cn = ct[n];
        for (long d = 0; d < D; d++) {  /* h = exp(dt A) h + dt x B;  y += C h */
          const float v = expf(dtt[d] * a[d]) * hn[d] + w[d] * bn;
          hn[d] = v;
          yt[d] += v * cn;
        }
      }
    }
  }
}

/* Decode step, part 1: the causal conv over the last d_conv inputs, then SiLU.
   x: (B, D) new input (stride sx between rows); conv: (B, D, K-1) state, shifted in place; w: (D, K); bias: (D) or 0;
   xc: (B, D) out. */
void mamba_conv_step(const float* restrict x, long sx, float* restrict conv, const float* restrict w,
                     const float* restrict bias, float* restrict xc, long Bsz, long D, long K) {
  for (long b = 0; b < Bsz; b++) {
    for (long d = 0; d < D; d++) {
      float* st = conv + (b * D + d) * (K - 1);
      const float* wd = w + d * K;
      const float xv = x[b * sx + d];
      float acc = bias ? bias[d] : 0.f;
      for (long k = 0; k < K - 1; k++) acc += st[k] * wd[k];
      acc += xv * wd[K - 1];
      for (long k = 0; k + 1 < K - 1; k++) st[k] = st[k + 1];
      if (K > 1) st[K - 2] = xv;
      xc[b * D + d] = acc / (1.f + expf(-acc));
    }
  }
}

/* Decode step, part 2: dt = softplus(dt_lin), h = exp(dt A) h + dt x B, y = (C.h + Dskip x) silu(z).
   dt_lin: (B, D) (stride sdt); A_log: (D, N); Bm, Cm: (B, N) (stride sbc); xc: (B, D); z: (B, D) (stride sz);
   Dskip: (D); h: (B, D, N) in place; y: (B, D) out. */
void mamba_ssm_step(const float* restrict dt_lin, long sdt, const float* restrict A_log, const float* restrict Bm,
                    const float* restrict Cm, long sbc, const float* restrict xc, const float* restrict z, long sz,
                    const float* restrict Dskip, float* restrict h, float* restrict y, long Bsz, long D, long N) {
  for (long b = 0; b < Bsz; b++) {
    const float* bt = Bm + b * sbc;
    const float* ct = Cm + b * sbc;
    for (long d = 0; d < D; d++) {
      const float u = dt_lin[b * sdt + d];
      const float dt = u > 20.f ? u : log1pf(expf(u));  /* torch's softplus threshold */
      const float xv = xc[b * D + d], w = dt * xv;
      const float* al = A_log + d * N;
      float* hd = h + (b * D + d) * N;
      float acc = 0.f;
      for (long n = 0; n < N; n++) {
        const float v = expf(-dt * expf(al[n])) * hd[n] + w * bt[n];
        hd[n] = v;
        acc += v * ct[n];
      }
      const float zv = z[b * sz + d];
      y[b * D + d] = (acc + Dskip[d] * xv) * (zv / (1.f + expf(-zv)));
    }
  }
}
"""


@functools.cache
def _c_library():
    handle = build_c_library("selective_scan", _C_SOURCE, fallback="scan='chunked'")
    handle.selective_scan_fwd.restype = None
    handle.selective_scan_fwd.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_long] * 4
    vp, lg = ctypes.c_void_p, ctypes.c_long
    handle.mamba_conv_step.restype = None
    handle.mamba_conv_step.argtypes = [vp, lg, vp, vp, vp, vp, lg, lg, lg]
    handle.mamba_ssm_step.restype = None
    handle.mamba_ssm_step.argtypes = [vp, lg, vp, vp, vp, lg, vp, vp, lg, vp, vp, vp, lg, lg, lg]
    return handle


@functools.cache
def decode_step_available() -> bool:
    """Whether the C kernels of this file build here; False (no error) without a compiler."""
    try:
        _c_library()
    except (ImportError, OSError):
        return False
    return True


def selective_scan_cpu(x, dt, A, Bm, Cm, h0=None):
    """Same contract as `llmopt.models.mamba.scan_sequential` (fp32, CPU tensors, no autograd)."""
    _refuse_autograd("selective_scan_cpu", x, dt, A, Bm, Cm, h0)
    if x.device.type != "cpu":
        raise ValueError(f"selective_scan_cpu runs on CPU tensors, got {x.device}; use selective_scan_triton on a GPU")
    lib = _c_library()
    Bsz, T, D = x.shape
    N = A.size(1)
    x, dt, Bm, Cm = (t.float().contiguous() for t in (x, dt, Bm, Cm))
    At = A.float().t().contiguous()  # (N, D)
    h = x.new_zeros(Bsz, N, D)  # the kernel updates the state in place: always a fresh buffer, h0 is never written
    if h0 is not None:
        h.copy_(h0.transpose(1, 2))
    y, w = torch.empty_like(x), x.new_empty(D)
    ptr = [ctypes.c_void_p(t.data_ptr()) for t in (x, dt, At, Bm, Cm, h, y, w)]
    lib.selective_scan_fwd(*ptr, Bsz, T, D, N)
    return y, h.transpose(1, 2).contiguous()


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@torch.no_grad()
def mamba_decode_step_cpu(mixer, hidden: torch.Tensor, cache) -> torch.Tensor | None:
    """One decode step of a `MambaMixer` (hidden (B, 1, dim) -> (B, 1, dim)) with two C kernels around its three
    projections: conv + SiLU, then softplus + the SSM step + skip + gate, reading and updating the cache's
    states in place. Returns None (the caller takes the torch path) for anything but fp32 CPU tensors."""
    i, D, N, K = mixer.layer_idx, mixer.d_inner, mixer.d_state, mixer.d_conv
    if hidden.dtype != torch.float32 or hidden.device.type != "cpu" or cache.dtype != torch.float32:
        return None
    lib = _c_library()
    Bsz = hidden.size(0)
    for states in (cache.conv, cache.ssm):  # the torch path may leave a strided view behind; the kernels need rows
        if not states[i].is_contiguous():
            states[i] = states[i].contiguous()
    xz = mixer.in_proj(hidden[:, 0])  # (B, 2 D): x then z
    xc = xz.new_empty(Bsz, D)
    bias = mixer.conv1d.bias
    lib.mamba_conv_step(_ptr(xz), xz.stride(0), _ptr(cache.conv[i]), _ptr(mixer.conv1d.weight),
                        _ptr(bias) if bias is not None else None, _ptr(xc), Bsz, D, K)
    xdbl = mixer.x_proj(xc)  # (B, dt_rank + 2 N)
    dt_lin = mixer.dt_proj(xdbl[:, :mixer.dt_rank])  # (B, D), before softplus
    Bm, Cm = xdbl[:, mixer.dt_rank:mixer.dt_rank + N], xdbl[:, mixer.dt_rank + N:]
    y = xz.new_empty(Bsz, D)
    lib.mamba_ssm_step(_ptr(dt_lin), dt_lin.stride(0), _ptr(mixer.A_log), _ptr(Bm), _ptr(Cm), xdbl.stride(0),
                       _ptr(xc), _ptr(xz[:, D:]), xz.stride(0), _ptr(mixer.D), _ptr(cache.ssm[i]), _ptr(y), Bsz, D, N)
    return mixer.out_proj(y)[:, None]


def use_fused_scan_(model) -> dict:
    """Make every Mamba layer's scan (full sequence and decode step) the fused kernel of its device: on CPU the C
    scan with a backward (`selective_scan_cpu_autograd`, also what scan='auto' picks for fp32) and the decode
    step between the projections (`mamba_decode_step_cpu`); on CUDA the Triton kernel (inference only, no
    backward). Returns {layer fqn: kernel}."""
    from llmopt.kernels.scan_backward import selective_scan_cpu_autograd
    from llmopt.models.mamba import MambaMixer

    changed = {}
    for name, module in model.named_modules():
        if isinstance(module, MambaMixer):
            cuda = module.A_log.device.type == "cuda"
            module.scan_fn = selective_scan_triton if cuda else selective_scan_cpu_autograd
            module.step_fn = None if cuda else mamba_decode_step_cpu
            changed[name] = "triton" if cuda else "cpu"
    if not changed:
        raise ValueError("use_fused_scan_ found no MambaMixer in the model; it applies to family='mamba' models")
    return changed


# ---- GPU: Triton --------------------------------------------------------------------------------------


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
    _refuse_autograd("selective_scan_triton", x, dt, A, Bm, Cm, h0)
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
