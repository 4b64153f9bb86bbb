"""Mamba's selective scan on the CPU with a backward: a C forward that keeps the state every K steps, and a C
reverse scan that recomputes each K-step chunk's states from its checkpoint and accumulates the gradients.

    h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t      (state (D, N) per batch row, A (D, N) diagonal)
    y_t = C_t . h_t

What "chunked" means here: the forward is ONE fused sequential pass over the sequence (like
`selective_scan_cpu` in `llmopt.kernels.scan`), not a parallel scan; "chunks" are only the checkpoint
interval of the backward. Saved for the backward: the inputs plus ceil(T / K) states, i.e.
B * ceil(T / K) * N * D * 4 bytes (K = 64, T = 2,048, D = 512, N = 16: 1 MiB per batch row per layer),
instead of the (B, T, D, N) states autograd through a torch scan keeps. The backward, per batch row and
chunk (last to first): recompute the chunk's K + 1 states into a (K + 1, N, D) buffer, then walk the chunk
backwards with the running state gradient g (N, D):

    g += C_t dy_t                         dC_t = sum_d dy_t h_t
    dB_t = sum_d g (dt_t x_t)             d(dt x)_t = sum_n g B_t  -> dx_t, ddt_t
    q = g * exp(dt_t A) * h_{t-1}         ddt_t += sum_n q A,  dA += q dt_t
    g = g * exp(dt_t A)                   (g at t = 0 is dh0)

The same math as autograd through `llmopt.models.mamba.scan_sequential`, in another summation order (tested
within 1e-5 relative). fp32 CPU tensors only; `selective_scan_cpu_autograd` refuses anything else with one
line, and `cpu_scan_available()` tells callers (the Mamba mixer's scan="auto") whether to use it or fall back
to the torch chunked scan. Built with the system C compiler at first use (`llmopt.kernels._cbuild`); with
OpenMP the batch rows run in parallel (one thread per row, torch's thread count).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmopt.kernels._cbuild import build_c_library, builds, ptr

__all__ = ["cpu_scan_available", "selective_scan_cpu_autograd", "CHECKPOINT_EVERY"]

CHECKPOINT_EVERY = 64
"""Default steps between saved states (the backward recomputes at most this many states per chunk)."""

_C_SOURCE = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>
/* Layouts: x, dt, y, dx, ddt: (B, T, D); At, dAt: (N, D) = A^T; Bm, Cm, dB, dC: (B, T, N);
   h, dhT, dh0: (B, N, D) = state^T; ck: (B, nck, N, D), nck = ceil(T / K). */

static void fwd_row(const float* restrict x, const float* restrict dt, const float* restrict At,
                    const float* restrict Bm, const float* restrict Cm, float* restrict h, float* restrict y,
                    float* restrict ck, float* restrict w, long T, long D, long N, long K) {
  for (long t = 0; t < T; t++) {
    if (ck && t % K == 0) memcpy(ck + (t / K) * N * D, h, sizeof(float) * N * D);
    const float* xt = x + t * D;
    const float* dtt = dt + t * D;
    const float* bt = Bm + t * N;
    const float* ct = Cm + t * N;
    float* yt = y + t * D;
    for (long d = 0; d < D; d++) { w[d] = dtt[d] * xt[d]; yt[d] = 0.f; }
    for (long n = 0; n < N; n++) {
      const float* a = At + n * D;
      float* hn = h + n * D;
      const float bn = bt[n], cn = ct[n];
      for (long d = 0; d < D; d++) {
        const float v = expf(dtt[d] * a[d]) * hn[d] + w[d] * bn;
        hn[d] = v;
        yt[d] += v * cn;
      }
    }
  }
}

void scan_fwd_ckpt(const float* x, const float* dt, const float* At, const float* Bm, const float* Cm,
                   float* h, float* y, float* ck, long Bsz, long T, long D, long N, long K) {
  const long nck = (T + K - 1) / K;
  #pragma omp parallel for schedule(static)
  for (long b = 0; b < Bsz; b++) {
    float* w = (float*)malloc(sizeof(float) * D);
    fwd_row(x + b * T * D, dt + b * T * D, At, Bm + b * T * N, Cm + b * T * N, h + b * N * D, y + b * T * D,
            ck ? ck + b * nck * N * D : 0, w, T, D, N, K);
    free(w);
  }
}

/* One (step, state index n) of the reverse scan, vectorized along d (a separate function: restrict on its own
   arguments is what lets gcc vectorize it; inlined into the loop nest it did not). */
__attribute__((noinline))
static void bwd_n(float* restrict gn, const float* restrict dyt, const float* restrict dtt, const float* restrict a,
                  const float* restrict hpn, float* restrict dw, float* restrict ddtt, float* restrict dan, float cn,
                  float bn, long D) {
  for (long d = 0; d < D; d++) {
    const float gv = gn[d] + cn * dyt[d];
    dw[d] += gv * bn;
    const float e = expf(dtt[d] * a[d]);
    const float q = gv * e * hpn[d];
    ddtt[d] += q * a[d];
    dan[d] += q * dtt[d];
    gn[d] = gv * e;
  }
}

/* dAt_parts: (B, N, D) per-row partial dA^T (summed by the caller), so rows can run in parallel. */
void scan_bwd(const float* x, const float* dt, const float* At, const float* Bm, const float* Cm, const float* ck,
              const float* dy, const float* dhT, float* dx, float* ddt, float* dAt_parts, float* dB, float* dC,
              float* dh0, long Bsz, long T, long D, long N, long K) {
  const long nck = (T + K - 1) / K, ND = N * D;
  #pragma omp parallel for schedule(static)
  for (long b = 0; b < Bsz; b++) {
    float* hbuf = (float*)malloc(sizeof(float) * (K + 1) * ND);
    float* w = (float*)malloc(sizeof(float) * 2 * D);
    float* dw = w + D;
    float* restrict g = dh0 + b * ND;
    float* restrict dA = dAt_parts + b * ND;
    if (dhT) memcpy(g, dhT + b * ND, sizeof(float) * ND); else memset(g, 0, sizeof(float) * ND);
    memset(dA, 0, sizeof(float) * ND);
    for (long c = nck - 1; c >= 0; c--) {
      const long t0 = c * K, L = (T - t0 < K) ? T - t0 : K;
      memcpy(hbuf, ck + (b * nck + c) * ND, sizeof(float) * ND);
      for (long i = 0; i < L; i++) {  /* recompute the chunk's states h_{t0} .. h_{t0+L-1} into hbuf[1..L] */
        const long row = b * T + t0 + i;
        const float* restrict xt = x + row * D;
        const float* restrict dtt = dt + row * D;
        const float* restrict bt = Bm + row * N;
        const float* restrict hp = hbuf + i * ND;
        float* restrict hc = hbuf + (i + 1) * ND;
        for (long d = 0; d < D; d++) w[d] = dtt[d] * xt[d];
        for (long n = 0; n < N; n++) {
          const float* restrict a = At + n * D;
          const float bn = bt[n];
          for (long d = 0; d < D; d++) hc[n * D + d] = expf(dtt[d] * a[d]) * hp[n * D + d] + w[d] * bn;
        }
      }
      for (long i = L - 1; i >= 0; i--) {  /* reverse through the chunk */
        const long row = b * T + t0 + i;
        const float* restrict xt = x + row * D;
        const float* restrict dtt = dt + row * D;
        const float* restrict bt = Bm + row * N;
        const float* restrict ct = Cm + row * N;
        const float* restrict dyt = dy + row * D;
        const float* restrict hp = hbuf + i * ND;
        const float* restrict hc = hbuf + (i + 1) * ND;
        float* restrict dxt = dx + row * D;
        float* restrict ddtt = ddt + row * D;
        float* restrict dbt = dB + row * N;
        float* restrict dct = dC + row * N;
        for (long d = 0; d < D; d++) { w[d] = dtt[d] * xt[d]; dw[d] = 0.f; ddtt[d] = 0.f; }
        for (long n = 0; n < N; n++) {
          const float* restrict a = At + n * D;
          float* restrict gn = g + n * D;
          float* restrict dan = dA + n * D;
          const float* restrict hpn = hp + n * D;
          const float* restrict hcn = hc + n * D;
          const float bn = bt[n], cn = ct[n];
          float sc = 0.f, sb = 0.f;  /* dC_t[n] and dB_t[n], with g before this step's update */
          for (long d = 0; d < D; d++) { sc += dyt[d] * hcn[d]; sb += (gn[d] + cn * dyt[d]) * w[d]; }
          dct[n] = sc;
          dbt[n] = sb;
          bwd_n(gn, dyt, dtt, a, hpn, dw, ddtt, dan, cn, bn, D);
        }
        for (long d = 0; d < D; d++) { dxt[d] = dw[d] * dtt[d]; ddtt[d] += dw[d] * xt[d]; }
      }
    }
    free(hbuf);
    free(w);
  }
}
"""


@functools.cache
def _library():
    handle = build_c_library("selective_scan_bwd", _C_SOURCE, openmp=True, fallback="scan='chunked'")
    vp, lg = ctypes.c_void_p, ctypes.c_long
    handle.scan_fwd_ckpt.restype = None
    handle.scan_fwd_ckpt.argtypes = [vp] * 8 + [lg] * 5
    handle.scan_bwd.restype = None
    handle.scan_bwd.argtypes = [vp] * 14 + [lg] * 5
    return handle


@functools.cache
def cpu_scan_available() -> bool:
    """Whether the C scan (forward with checkpoints + backward) builds here; False (no error) without a compiler."""
    return builds(_library)


def _forward(x, dt, At, Bm, Cm, h0, K: int, keep: bool):
    Bsz, T, D = x.shape
    N = At.size(0)
    h = x.new_zeros(Bsz, N, D)  # the kernel updates the state in place: a fresh buffer, h0 is never written
    if h0 is not None:
        h.copy_(h0.transpose(1, 2))
    y = torch.empty_like(x)
    ck = x.new_empty(Bsz, (T + K - 1) // K, N, D) if keep else None
    _library().scan_fwd_ckpt(ptr(x), ptr(dt), ptr(At), ptr(Bm), ptr(Cm), ptr(h), ptr(y), ptr(ck), Bsz, T, D, N, K)
    return y, h, ck


class _SelectiveScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, Bm, Cm, h0, K):
        x, dt, Bm, Cm = (t.contiguous() for t in (x, dt, Bm, Cm))
        At = A.t().contiguous()  # (N, D)
        y, h, ck = _forward(x, dt, At, Bm, Cm, h0, K, keep=True)
        ctx.save_for_backward(x, dt, At, Bm, Cm, ck)
        ctx.K, ctx.has_h0 = K, h0 is not None
        return y, h.transpose(1, 2)

    @staticmethod
    def backward(ctx, dy, dh):
        x, dt, At, Bm, Cm, ck = ctx.saved_tensors
        Bsz, T, D = x.shape
        N = At.size(0)
        dy = torch.zeros_like(x) if dy is None else dy.float().contiguous()
        dhT = None if dh is None else dh.float().transpose(1, 2).contiguous()  # (B, N, D)
        dx, ddt = torch.empty_like(x), torch.empty_like(x)
        dB, dC = torch.empty_like(Bm), torch.empty_like(Cm)
        dA_parts, dh0 = x.new_empty(Bsz, N, D), x.new_empty(Bsz, N, D)
        _library().scan_bwd(ptr(x), ptr(dt), ptr(At), ptr(Bm), ptr(Cm), ptr(ck), ptr(dy), ptr(dhT), ptr(dx), ptr(ddt),
                            ptr(dA_parts), ptr(dB), ptr(dC), ptr(dh0), Bsz, T, D, N, ctx.K)
        dA = dA_parts.sum(0).t()
        return dx, ddt, dA, dB, dC, (dh0.transpose(1, 2) if ctx.has_h0 else None), None


def selective_scan_cpu_autograd(x, dt, A, Bm, Cm, h0=None, *, checkpoint_every: int = CHECKPOINT_EVERY):
    """Same contract as `llmopt.models.mamba.scan_sequential` (x/dt (B, T, D), A (D, N), Bm/Cm (B, T, N),
    h0 (B, D, N) or None -> y (B, T, D), final state (B, D, N)), with a backward. fp32 CPU tensors only.
    Without autograd no checkpoints are kept (the plain fused forward)."""
    tensors = (x, dt, A, Bm, Cm) + (() if h0 is None else (h0,))
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        raise ValueError("selective_scan_cpu_autograd takes fp32 CPU tensors, got "
                         f"{sorted({f'{t.dtype}/{t.device}' for t in tensors})}; use scan='chunked' for other ones")
    if int(checkpoint_every) <= 0:
        raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _SelectiveScanCPU.apply(x, dt, A, Bm, Cm, h0, int(checkpoint_every))
    x, dt, Bm, Cm = (t.contiguous() for t in (x, dt, Bm, Cm))
    y, h, _ = _forward(x, dt, A.t().contiguous(), Bm, Cm, h0, int(checkpoint_every), keep=False)
    return y, h.transpose(1, 2).contiguous()
