"""Decode attention straight from a quantized KV cache (KIVI layout) on CPU: one C kernel per layer.

`QuantizedKVCache.attend` in torch dequantizes a chunk of keys and values (unpack, multiply, add: several
(chunk, head_dim) passes and allocations per chunk and layer) before its two matmuls. For one query token
that is most of the decode step at 2k context. This kernel reads the packed codes once and never builds a
dequantized key or value:

- keys are quantized per channel over groups of G tokens, k[t, c] = code[t, c] * s[c] + z[c], so
  q . k_t = sum_c (q[c] s[c]) code[t, c] + sum_c q[c] z[c]: the query is scaled once per group and each
  key costs one dot product with its integer codes;
- values are quantized per token (one scale and zero per VG channels), so sum_t p_t v_t[c] =
  sum_t (p_t s_t) code_t[c] + sum_t p_t z_t: one multiply-add per code;
- the full-precision window is read as is; softmax is exact over all positions (scores are kept in a
  per-thread scratch row, max first, then exp and sum).

Work is split over (batch row, kv head) pairs with OpenMP. The outputs of the quantized part and of the
window come back separately and already normalized, so a caller whose stored values are rotated
(`rotate=`) rotates only the first. Contract: fp32, equal to dequantize-then-softmax attention within
float rounding (tests/test_kv_attention.py); fp16 scales are read as `_Float16`.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmopt.kernels._cbuild import build_c_library, builds, ptr

__all__ = ["kv_attend_decode_cpu"]

_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <omp.h>

static inline void unpack_row(const uint8_t* restrict c, float* restrict u, long D, int bits) {
  if (bits == 8) { for (long i = 0; i < D; i++) u[i] = (float)c[i]; }
  else if (bits == 4) { for (long i = 0; i < D / 2; i++) { u[2*i] = (float)(c[i] & 15); u[2*i+1] = (float)(c[i] >> 4); } }
  else { for (long i = 0; i < D / 4; i++) { uint8_t b = c[i]; u[4*i] = (float)(b & 3); u[4*i+1] = (float)((b >> 2) & 3);
                                            u[4*i+2] = (float)((b >> 4) & 3); u[4*i+3] = (float)(b >> 6); } }
}

/* q, qw: (B, H, g, D) pre-scaled queries for the stored part and the window; kc, vc: (B, H, cap, D*bits/8);
   ks, kz: (B, H, cap/G, D) fp16; vs, vz: (B, H, cap, D/VG) fp16; kw, vw: (B, H, W, D) fp32;
   keep: (B, nq + nw) bytes or NULL; out_q, out_w: (B, H, g, D); scratch: nthreads * (g * (nq + nw) + D + 2 * g * D) */
void kv_attend_decode(const float* q, const float* qw, const uint8_t* kc, const _Float16* ks, const _Float16* kz,
                      const uint8_t* vc, const _Float16* vs, const _Float16* vz, const float* kw, const float* vw,
                      const uint8_t* keep, float* out_q, float* out_w, float* scratch,
                      long B, long H, long g, long D, long cap, long W, long nq, long nw, long G, long VG, int bits,
                      int nthreads) {
  const long L = nq + nw, packed = D * bits / 8, NV = D / VG;
  const long per_thread = g * L + D + 2 * g * D;
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (long bh = 0; bh < B * H; bh++) {
    const long b = bh / H;
    float* s = scratch + (long)omp_get_thread_num() * per_thread;  /* (g, L) scores, then probabilities */
    float* u = s + g * L;           /* one unpacked code row */
    float* zs = u + D;              /* (g, NV) sums of p * value zero point */
    float* qs = zs + g * D;         /* (g, D) query scaled by a key group's scales */
    const float* qb = q + bh * g * D;
    const float* qwb = qw + bh * g * D;
    const uint8_t* kcb = kc + bh * cap * packed;
    const uint8_t* vcb = vc + bh * cap * packed;
    const _Float16* ksb = ks + bh * (cap / G) * D;
    const _Float16* kzb = kz + bh * (cap / G) * D;
    const _Float16* vsb = vs + bh * cap * NV;
    const _Float16* vzb = vz + bh * cap * NV;
    const float* kwb = kw + bh * W * D;
    const float* vwb = vw + bh * W * D;
    const uint8_t* kp = keep ? keep + b * L : 0;
    /* scores of the stored keys, a key group (G tokens, one scale and zero per channel) at a time */
    for (long t0 = 0; t0 < nq; t0 += G) {
      const _Float16* sc = ksb + (t0 / G) * D;
      const _Float16* zc = kzb + (t0 / G) * D;
      float qz[64];
      for (long j = 0; j < g; j++) {
        float z = 0.f;
        for (long c = 0; c < D; c++) { qs[j * D + c] = qb[j * D + c] * (float)sc[c]; z += qb[j * D + c] * (float)zc[c]; }
        qz[j] = z;
      }
      for (long t = t0; t < t0 + G && t < nq; t++) {
        unpack_row(kcb + t * packed, u, D, bits);
        for (long j = 0; j < g; j++) {
          float a = qz[j];
          const float* qj = qs + j * D;
          for (long c = 0; c < D; c++) a += qj[c] * u[c];
          s[j * L + t] = a;
        }
      }
    }
    for (long t = 0; t < nw; t++) {
      const float* kt = kwb + t * D;
      for (long j = 0; j < g; j++) {
        float a = 0.f;
        const float* qj = qwb + j * D;
        for (long c = 0; c < D; c++) a += qj[c] * kt[c];
        s[j * L + nq + t] = a;
      }
    }
    /* softmax per query head over all L positions (masked positions get probability 0) */
    for (long j = 0; j < g; j++) {
      float* sj = s + j * L;
      float m = -INFINITY;
      for (long t = 0; t < L; t++) if ((!kp || kp[t]) && sj[t] > m) m = sj[t];
      float total = 0.f;
      for (long t = 0; t < L; t++) { float e = (!kp || kp[t]) && m > -INFINITY ? expf(sj[t] - m) : 0.f; sj[t] = e; total += e; }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (long t = 0; t < L; t++) sj[t] *= inv;
    }
    /* values: stored part from the codes, window as is */
    float* oq = out_q + bh * g * D;
    float* ow = out_w + bh * g * D;
    for (long i = 0; i < g * D; i++) { oq[i] = 0.f; ow[i] = 0.f; }
    for (long j = 0; j < g; j++) for (long k = 0; k < NV; k++) zs[j * NV + k] = 0.f;
    for (long t = 0; t < nq; t++) {
      unpack_row(vcb + t * packed, u, D, bits);
      const _Float16* st = vsb + t * NV;
      const _Float16* zt = vzb + t * NV;
      for (long j = 0; j < g; j++) {
        const float p = s[j * L + t];
        if (p == 0.f) continue;
        float* oj = oq + j * D;
        for (long k = 0; k < NV; k++) {
          const float a = p * (float)st[k];
          zs[j * NV + k] += p * (float)zt[k];
          float* o = oj + k * VG;
          const float* uu = u + k * VG;
          for (long c = 0; c < VG; c++) o[c] += a * uu[c];
        }
      }
    }
    for (long j = 0; j < g; j++) for (long k = 0; k < NV; k++) {
      const float z = zs[j * NV + k];
      float* o = oq + j * D + k * VG;
      for (long c = 0; c < VG; c++) o[c] += z;
    }
    for (long t = 0; t < nw; t++) {
      const float* vt = vwb + t * D;
      for (long j = 0; j < g; j++) {
        const float p = s[j * L + nq + t];
        float* oj = ow + j * D;
        for (long c = 0; c < D; c++) oj[c] += p * vt[c];
      }
    }
  }
}
"""


@functools.cache
def _library():
    lib = build_c_library("kv_attention", _C_SOURCE, openmp=True, fallback="the torch path of QuantizedKVCache.attend")
    vp, lg = ctypes.c_void_p, ctypes.c_long
    lib.kv_attend_decode.restype = None
    lib.kv_attend_decode.argtypes = [vp] * 14 + [lg] * 10 + [ctypes.c_int, ctypes.c_int]
    return lib


def available() -> bool:
    """Whether the C kernel builds here (a C compiler with OpenMP)."""
    return builds(_library)


@torch.no_grad()
def kv_attend_decode_cpu(q: torch.Tensor, q_window: torch.Tensor, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                         k_window, v_window, *, n_quantized: int, n_window: int, group_size: int, value_group: int,
                         bits: int, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of pre-scaled queries q, q_window (B, H, g, D) over a layer's stored codes and its window.

    Shapes are the cache's buffers: k_codes / v_codes (B, H, cap, D*bits/8) uint8, k_scale / k_zero
    (B, H, cap/G, 1, D) fp16, v_scale / v_zero (B, H, cap, D/VG, 1) fp16, k_window / v_window (B, H, W, D)
    fp32; `keep` (B, n_quantized + n_window) bool or None. Returns the stored part's and the window's
    contributions (B, H, g, D), each already divided by the softmax total, whose sum is the attention output.
    """
    B, H, g, D = q.shape
    if g > 64:
        raise ValueError(f"kv_attend_decode_cpu handles up to 64 query heads per kv head, got {g}")
    lib = _library()
    q, q_window = q.float().contiguous(), q_window.float().contiguous()
    out_q, out_w = torch.empty_like(q), torch.empty_like(q)
    threads = max(1, min(torch.get_num_threads(), B * H))
    L = n_quantized + n_window
    scratch = torch.empty(threads * (g * L + D + 2 * g * D))
    keep_b = None if keep is None else keep.to(torch.uint8).contiguous()
    lib.kv_attend_decode(ptr(q), ptr(q_window), ptr(k_codes), ptr(k_scale), ptr(k_zero), ptr(v_codes), ptr(v_scale),
                         ptr(v_zero), ptr(k_window), ptr(v_window), ptr(keep_b), ptr(out_q), ptr(out_w), ptr(scratch),
                         B, H, g, D, k_codes.size(2), k_window.size(2), n_quantized, n_window, group_size, value_group,
                         bits, threads)
    return out_q, out_w
