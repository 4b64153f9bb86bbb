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

`QuantizedDecodeAttention` is the same attention as a C callback for the one-call decode step of a Llama stack
(`llmopt.kernels.dense_gemv.StackDecodePlan.step_with_c_attention`): per layer it also writes the token's key
and value into the window and applies the Hadamard rotations, so a step has no Python between layers. Its
inner loops read 8 packed bytes at a time, widen them to 32 bits and shift/mask each code slot (a byte of
b-bit codes holds channels 8/b apart in the query's reordered layout), and keep the accumulators in
registers for up to 4 query heads per kv head (measured at 2k context on SmolLM2's shapes: about 0.45x the
time of `kv_attend_decode`, whose per-channel unpacking and in-memory sums it replaces).

Pre-RoPE keys (`QuantizedDecodeAttention(rope=...)`, KVQuant, the int2 default of `make_quantized_cache`): the codes
hold keys before RoPE (Hadamard-rotated), so a key group's scales can no longer be folded into one query: each
stored key is dequantized, rotated back by a fast Walsh-Hadamard transform and given RoPE at its position before
its dot products with the g query heads (`key_scores_rope`, the row kept in registers; a layer call at 2k context
on SmolLM2's shapes takes about 1.34x the time of the post-RoPE one, docs/techniques/kv_cache_quant.md). The window and the sink copies hold post-RoPE keys, as `QuantizedKVCache.update`
writes them; values are unchanged.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmopt.kernels._cbuild import build_c_library, builds, ptr

__all__ = ["QuantizedDecodeAttention", "decode_keep", "kv_attend_decode_cpu"]

_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <string.h>

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

/* ---- one decode token of a whole layer's attention against the cache, inside the stack step -----------------
   (llmopt.kernels.dense_gemv's llama_decode_attn calls kvq_decode_layer between a layer's two halves). Writes the
   token's k, v into the full-precision window (and into the sink slot when pos < S), then attends over the codes
   [0, q_end) and the window slots [0, S + L - q_end), in that order (the order `keep` uses). The codes are read
   8 bytes at a time, each byte widened to 32 bits, shifted and masked per code slot: a byte of bits-bit codes
   holds channels pb*i + k (pb = 8 / bits codes a byte, k = 0 .. pb-1), so the query is laid out once per key
   group in that order, [k][i], and the value sums are kept in it and put back in channel order at the end.
   Needs the packed row (D * bits / 8 bytes) and each value group's bytes (VG / pb) in multiples of 8. */
#ifdef __AVX2__
#include <immintrin.h>
typedef __m256 v8; typedef __m256i v8i;
static inline v8 v_zero(void) { return _mm256_setzero_ps(); }
static inline v8 v_set1(float a) { return _mm256_set1_ps(a); }
static inline v8 v_load(const float* p) { return _mm256_loadu_ps(p); }
static inline void v_store(float* p, v8 a) { _mm256_storeu_ps(p, a); }
static inline v8 v_fma(v8 a, v8 b, v8 c) { return _mm256_fmadd_ps(a, b, c); }
static inline v8i v_widen(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline v8 v_codes(v8i w, int shift, int mask) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, _mm256_set1_epi32(shift)), _mm256_set1_epi32(mask)));
}
static inline float v_hsum(v8 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline v8 v_add(v8 a, v8 b) { return _mm256_add_ps(a, b); }
static inline v8 v_sub(v8 a, v8 b) { return _mm256_sub_ps(a, b); }
static inline v8 v_mul(v8 a, v8 b) { return _mm256_mul_ps(a, b); }
static inline v8 v_swap4(v8 a) { return _mm256_permute2f128_ps(a, a, 1); }  /* lane i <- lane i ^ 4 */
static inline v8 v_swap2(v8 a) { return _mm256_permute_ps(a, 0x4E); }       /* lane i <- lane i ^ 2 */
static inline v8 v_swap1(v8 a) { return _mm256_permute_ps(a, 0xB1); }       /* lane i <- lane i ^ 1 */
#else
typedef struct { float f[8]; } v8; typedef struct { int32_t i[8]; } v8i;
static inline v8 v_zero(void) { v8 r; for (int i = 0; i < 8; i++) r.f[i] = 0.f; return r; }
static inline v8 v_set1(float a) { v8 r; for (int i = 0; i < 8; i++) r.f[i] = a; return r; }
static inline v8 v_load(const float* p) { v8 r; for (int i = 0; i < 8; i++) r.f[i] = p[i]; return r; }
static inline void v_store(float* p, v8 a) { for (int i = 0; i < 8; i++) p[i] = a.f[i]; }
static inline v8 v_fma(v8 a, v8 b, v8 c) { for (int i = 0; i < 8; i++) c.f[i] += a.f[i] * b.f[i]; return c; }
static inline v8i v_widen(const uint8_t* p) { v8i r; for (int i = 0; i < 8; i++) r.i[i] = p[i]; return r; }
static inline v8 v_codes(v8i w, int shift, int mask) { v8 r; for (int i = 0; i < 8; i++) r.f[i] = (float)((w.i[i] >> shift) & mask); return r; }
static inline float v_hsum(v8 v) { float s = 0.f; for (int i = 0; i < 8; i++) s += v.f[i]; return s; }
static inline v8 v_add(v8 a, v8 b) { for (int i = 0; i < 8; i++) a.f[i] += b.f[i]; return a; }
static inline v8 v_sub(v8 a, v8 b) { for (int i = 0; i < 8; i++) a.f[i] -= b.f[i]; return a; }
static inline v8 v_mul(v8 a, v8 b) { for (int i = 0; i < 8; i++) a.f[i] *= b.f[i]; return a; }
static inline v8 v_swapn(v8 a, int n) { v8 r; for (int i = 0; i < 8; i++) r.f[i] = a.f[i ^ n]; return r; }
static inline v8 v_swap4(v8 a) { return v_swapn(a, 4); }
static inline v8 v_swap2(v8 a) { return v_swapn(a, 2); }
static inline v8 v_swap1(v8 a) { return v_swapn(a, 1); }
#endif

/* The two inner loops, written for a compile-time number of query heads per kv head (g) and code width (bits),
   so that the accumulators stay in registers; kvq_keys / kvq_values pick the instance (any other g: the same
   loops with the accumulators in memory). Scores: s[j * Lk + t] = qp_j . codes_t + qz_j for t in [t0, t1).
   Values: for the 8-byte chunk at i0, oq[j][kk * P + i0 ..] = sum_t ps[j * n + t] * codes_t (the chunk's codes
   at slot kk). */
static inline __attribute__((always_inline)) void key_scores(const uint8_t* kcb, const float* qp, const float* qz,
    float* s, long Lk, long t0, long t1, long P, long D, const long g, const int bits) {
  const int pb = 8 / bits, mask = (1 << bits) - 1;
  for (long t = t0; t < t1; t++) {
    const uint8_t* row = kcb + t * P;
    v8 acc[64];
    for (long j = 0; j < g; j++) acc[j] = v_zero();
    for (long i0 = 0; i0 < P; i0 += 8) {
      const v8i w = v_widen(row + i0);
      for (int kk = 0; kk < pb; kk++) {
        const v8 f = v_codes(w, kk * bits, mask);
        for (long j = 0; j < g; j++) acc[j] = v_fma(f, v_load(qp + j * D + kk * P + i0), acc[j]);
      }
    }
    for (long j = 0; j < g; j++) s[j * Lk + t] = v_hsum(acc[j]) + qz[j];
  }
}
static inline __attribute__((always_inline)) void value_chunk(const uint8_t* vcb, const float* ps, float* oq,
    long n, long P, long D, long i0, const long g, const int bits) {
  const int pb = 8 / bits, mask = (1 << bits) - 1;
  v8 acc[64][4];
  for (long j = 0; j < g; j++) for (int kk = 0; kk < pb; kk++) acc[j][kk] = v_zero();
  for (long t = 0; t < n; t++) {
    const v8i w = v_widen(vcb + t * P + i0);
    for (int kk = 0; kk < pb; kk++) {
      const v8 f = v_codes(w, kk * bits, mask);
      for (long j = 0; j < g; j++) acc[j][kk] = v_fma(f, v_set1(ps[j * n + t]), acc[j][kk]);
    }
  }
  for (long j = 0; j < g; j++) for (int kk = 0; kk < pb; kk++) v_store(oq + j * D + kk * P + i0, acc[j][kk]);
}
/* Scores of stored pre-RoPE keys t in [t0, t1) of one key group (KVQuant layout): each code row is dequantized
   with the group's scales and zeros (sl, zl), in the [k][i] order like the query; rotated back by the Hadamard
   matrix when keys are rotated (`hadamard`: a fast Walsh-Hadamard transform, butterflies across registers, then
   within one; H[a][b] = (-1)^popcount(a & b) / sqrt(D) is unchanged by the same permutation of the index bits of a
   and b, and the [k][i] order is such a permutation of the channel order, so the transform needs no reordering;
   the 1 / sqrt(D) is in the query); then given RoPE at its position t, k cos_t + rotate_half(k) sin_t, with the
   model's tables in the same order (rc, rs: rs carries rotate_half's sign), and dotted with the g queries ql.
   Channel c's RoPE partner c +- D/2 sits P/2 code slots away in the [k][i] order: the register RP/2 further on
   within the slot's RP registers, or, with one register a slot (P = 8), the other half of the same register. */
static inline __attribute__((always_inline)) void key_scores_rope(const uint8_t* kcb, const float* ql,
    const float* sl, const float* zl, const float* rc, const float* rs, int hadamard, float* s, long Lk, long t0,
    long t1, long D, const long R, const long g, const int bits) {
  const int pb = 8 / bits, mask = (1 << bits) - 1;
  const long P = R * bits, RP = R / pb;  /* bytes a row (R = D / 8 registers); registers of one code slot */
  static const float sg1[8] = {1, -1, 1, -1, 1, -1, 1, -1}, sg2[8] = {1, 1, -1, -1, 1, 1, -1, -1},
                     sg4[8] = {1, 1, 1, 1, -1, -1, -1, -1};
  for (long t = t0; t < t1; t++) {
    const uint8_t* cr = kcb + t * P;
    v8 x[32];  /* the key row, [k][i] order (registers when R is a compile-time constant) */
    for (long i0 = 0; i0 < P; i0 += 8) {
      const v8i w = v_widen(cr + i0);
      for (int kk = 0; kk < pb; kk++) {
        const long r = kk * RP + i0 / 8;
        x[r] = v_fma(v_codes(w, kk * bits, mask), v_load(sl + 8 * r), v_load(zl + 8 * r));
      }
    }
    if (hadamard) {
      for (long st = 1; st < R; st <<= 1)
        for (long r = 0; r < R; r++) if (!(r & st)) {
          const v8 a = x[r], b = x[r + st];
          x[r] = v_add(a, b);
          x[r + st] = v_sub(a, b);
        }
      const v8 s1 = v_load(sg1), s2 = v_load(sg2), s4 = v_load(sg4);
      for (long r = 0; r < R; r++) {
        x[r] = v_fma(x[r], s1, v_swap1(x[r]));
        x[r] = v_fma(x[r], s2, v_swap2(x[r]));
        x[r] = v_fma(x[r], s4, v_swap4(x[r]));
      }
    }
    const float* ct = rc + t * D;
    const float* stab = rs + t * D;
    v8 acc[64];
    for (long j = 0; j < g; j++) acc[j] = v_zero();
    for (long r = 0; r < R; r++) {
      const v8 xp = RP > 1 ? x[r - r % RP + (r % RP + RP / 2) % RP] : v_swap4(x[r]);
      const v8 kr = v_fma(xp, v_load(stab + 8 * r), v_mul(x[r], v_load(ct + 8 * r)));
      for (long j = 0; j < g; j++) acc[j] = v_fma(kr, v_load(ql + j * D + 8 * r), acc[j]);
    }
    for (long j = 0; j < g; j++) s[j * Lk + t] = v_hsum(acc[j]);
  }
}
#define KVQ_BY_G(F, bits, ...) switch (g) { case 1: F(__VA_ARGS__, 1, bits); break; case 2: F(__VA_ARGS__, 2, bits); break; \
  case 3: F(__VA_ARGS__, 3, bits); break; case 4: F(__VA_ARGS__, 4, bits); break; default: F(__VA_ARGS__, g, bits); }
#define KVQ_BY_BITS(F, ...) if (bits == 8) { KVQ_BY_G(F, 8, __VA_ARGS__) } else if (bits == 4) { KVQ_BY_G(F, 4, __VA_ARGS__) } \
  else { KVQ_BY_G(F, 2, __VA_ARGS__) }
static void kvq_keys(const uint8_t* kcb, const float* qp, const float* qz, float* s, long Lk, long t0, long t1, long P,
                     long D, long g, int bits) { KVQ_BY_BITS(key_scores, kcb, qp, qz, s, Lk, t0, t1, P, D) }
static void kvq_keys_rope(const uint8_t* kcb, const float* ql, const float* sl, const float* zl, const float* rc,
                          const float* rs, int hadamard, float* s, long Lk, long t0, long t1, long D, long g,
                          int bits) {  /* D = 32 and 64 get their own instances (the key row in registers) */
  if (D == 64) { KVQ_BY_BITS(key_scores_rope, kcb, ql, sl, zl, rc, rs, hadamard, s, Lk, t0, t1, D, 8) }
  else if (D == 32) { KVQ_BY_BITS(key_scores_rope, kcb, ql, sl, zl, rc, rs, hadamard, s, Lk, t0, t1, D, 4) }
  else { const long R = D / 8; KVQ_BY_BITS(key_scores_rope, kcb, ql, sl, zl, rc, rs, hadamard, s, Lk, t0, t1, D, R) }
}
static void kvq_values(const uint8_t* vcb, const float* ps, float* oq, long n, long P, long D, long i0, long g,
                       int bits) { KVQ_BY_BITS(value_chunk, vcb, ps, oq, n, P, D, i0) }

typedef struct { const uint8_t *kc, *vc; const _Float16 *ks, *kz, *vs, *vz; float *kw, *vw; long q_end; } kvq_layer_t;
typedef struct {
  long B, H, g, D, cap, W, S, G, VG, bits, rotate, pos;  /* rotate: 0 none, 1 values, 2 values and keys */
  const float* hmat;          /* (D, D) orthonormal, symmetric; NULL without rotation */
  const uint8_t* keep;        /* (B, S + pos + 1) in kernel order, or NULL: every position */
  float* scratch;             /* per thread: kvq_scratch floats */
  long scratch_per_thread, max_threads;
  const kvq_layer_t* layers;
  const float *rcos, *rsin;   /* keys stored before RoPE: (cap, D) tables in the [k][i] order (rsin signed); else NULL */
} kvq_t;

long kvq_scratch(long g, long D, long VG, long max_keys) { return 2 * g * max_keys + 6 * g * D + g * (D / VG) + 4 * D + 64; }

static inline void matvec_h(const float* h, const float* x, float* y, long D) {  /* y = x @ H */
  for (long c = 0; c < D; c++) y[c] = 0.f;
  for (long d = 0; d < D; d++) { const float a = x[d]; const float* hr = h + d * D; for (long c = 0; c < D; c++) y[c] += a * hr[c]; }
}

void kvq_decode_layer(const kvq_t* c, long layer, const float* q, const float* k, const float* v, float* att,
                      int nthreads) {
  const kvq_layer_t* ly = c->layers + layer;
  const long B = c->B, H = c->H, g = c->g, D = c->D, W = c->W, S = c->S, G = c->G, VG = c->VG, pos = c->pos;
  const long qe = ly->q_end, nw = S + pos + 1 - qe, Lk = qe + nw;
  const int bits = (int)c->bits, pb = 8 / bits;
  const long P = D * bits / 8, NV = D / VG, vgb = VG / pb;  /* bytes a row; bytes of one value group */
  const float scale = 1.0f / sqrtf((float)D);
  if (nthreads > c->max_threads) nthreads = (int)c->max_threads;
  for (long bh = 0; bh < B * H; bh++) {  /* the write: the window slot, and the sink's copy */
    memcpy(ly->kw + (bh * W + S + pos - qe) * D, k + bh * D, D * sizeof(float));
    memcpy(ly->vw + (bh * W + S + pos - qe) * D, v + bh * D, D * sizeof(float));
    if (pos < S) {
      memcpy(ly->kw + (bh * W + pos) * D, k + bh * D, D * sizeof(float));
      memcpy(ly->vw + (bh * W + pos) * D, v + bh * D, D * sizeof(float));
    }
  }
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (long bh = 0; bh < B * H; bh++) {
    const long b = bh / H, h = bh % H;
    float* s = c->scratch + (long)omp_get_thread_num() * c->scratch_per_thread;  /* (g, Lk) scores */
    float* qw = s + g * Lk;        /* (g, D) scaled query, channel order (the window) */
    float* qr = qw + g * D;        /* (g, D) the same rotated when keys are (the codes) */
    float* qp = qr + g * D;        /* (g, D) qr times a key group's scales, [k][i] order */
    float* oq = qp + g * D;        /* (g, D) value sums of the codes, [k][i] order */
    float* ot = oq + g * D;        /* (g, D) the codes' output in channel order */
    float* ow = ot + g * D;        /* (g, D) the window's output */
    float* pz = ow + g * D;        /* (g, NV) sums of p * value zero point */
    float* tmp = pz + g * NV;      /* (D) */
    float* ps = tmp + D;           /* (g, q_end) p * value scale, one value group at a time */
    float qz[64];
    const uint8_t* kp = c->keep ? c->keep + b * Lk : 0;
    for (long j = 0; j < g; j++) {
      const float* qj = q + ((b * H + h) * g + j) * D;
      for (long i = 0; i < D; i++) qw[j * D + i] = qj[i] * scale;
      if (c->rotate == 2 && !c->rcos) matvec_h(c->hmat, qw + j * D, qr + j * D, D);
      else memcpy(qr + j * D, qw + j * D, D * sizeof(float));
    }
    /* scores of the codes, a key group at a time */
    const uint8_t* kcb = ly->kc + bh * c->cap * P;
    if (c->rcos) {  /* pre-RoPE keys: each key is dequantized, rotated back and given RoPE (key_scores_rope) */
      float* sl = s + 2 * g * Lk + 6 * g * D + g * NV + D;  /* past ps (at most g * Lk floats) */
      float* zl = sl + D;
      const float hs = c->rotate == 2 ? 1.0f / sqrtf((float)D) : 1.0f;  /* the Hadamard transform's norm */
      for (long j = 0; j < g; j++)
        for (long ch = 0; ch < D; ch++) qp[j * D + (ch % pb) * P + ch / pb] = qw[j * D + ch] * hs;
      for (long t0 = 0; t0 < qe; t0 += G) {
        const _Float16* ksc = ly->ks + (bh * (c->cap / G) + t0 / G) * D;
        const _Float16* kzc = ly->kz + (bh * (c->cap / G) + t0 / G) * D;
        for (long ch = 0; ch < D; ch++) { sl[(ch % pb) * P + ch / pb] = (float)ksc[ch]; zl[(ch % pb) * P + ch / pb] = (float)kzc[ch]; }
        kvq_keys_rope(kcb, qp, sl, zl, c->rcos, c->rsin, c->rotate == 2, s, Lk, t0, t0 + G < qe ? t0 + G : qe, D, g,
                      bits);
      }
    }
    else for (long t0 = 0; t0 < qe; t0 += G) {
      const _Float16* ksc = ly->ks + (bh * (c->cap / G) + t0 / G) * D;
      const _Float16* kzc = ly->kz + (bh * (c->cap / G) + t0 / G) * D;
      for (long j = 0; j < g; j++) {
        float z = 0.f;
        for (long ch = 0; ch < D; ch++) {
          const float a = qr[j * D + ch];
          qp[j * D + (ch % pb) * P + ch / pb] = a * (float)ksc[ch];
          z += a * (float)kzc[ch];
        }
        qz[j] = z;
      }
      kvq_keys(kcb, qp, qz, s, Lk, t0, t0 + G < qe ? t0 + G : qe, P, D, g, bits);
    }
    /* scores of the window slots */
    const float* kwb = ly->kw + bh * W * D;
    for (long t = 0; t < nw; t++)
      for (long j = 0; j < g; j++) {
        float a = 0.f;
        for (long i = 0; i < D; i++) a += qw[j * D + i] * kwb[t * D + i];
        s[j * Lk + qe + t] = a;
      }
    /* softmax over the kept positions */
    for (long j = 0; j < g; j++) {
      float* sj = s + j * Lk;
      float m = -3.0e38f;
      int any = 0;
      for (long t = 0; t < Lk; t++) if (!kp || kp[t]) { any = 1; if (sj[t] > m) m = sj[t]; }
      float total = 0.f;
      for (long t = 0; t < Lk; t++) { const float e = (!kp || kp[t]) ? expf(sj[t] - m) : 0.f; sj[t] = e; total += e; }
      const float inv = any && total > 0.f ? 1.f / total : 0.f;
      for (long t = 0; t < Lk; t++) sj[t] *= inv;
    }
    /* values of the codes: sum_t p_t s_t code_t + sum_t p_t z_t per value group */
    for (long i = 0; i < g * D; i++) oq[i] = 0.f;
    for (long i = 0; i < g * NV; i++) pz[i] = 0.f;
    const uint8_t* vcb = ly->vc + bh * c->cap * P;
    const _Float16* vsb = ly->vs + bh * c->cap * NV;
    const _Float16* vzb = ly->vz + bh * c->cap * NV;
    for (long j = 0; j < g; j++)
      for (long m = 0; m < NV; m++) {
        float z = 0.f;
        for (long t = 0; t < qe; t++) z += s[j * Lk + t] * (float)vzb[t * NV + m];
        pz[j * NV + m] = z;
      }
    for (long m = 0; m < NV; m++) {  /* the value group's chunks: p * its scale per token, then the codes */
      for (long j = 0; j < g; j++) for (long t = 0; t < qe; t++) ps[j * qe + t] = s[j * Lk + t] * (float)vsb[t * NV + m];
      for (long i0 = m * vgb; i0 < (m + 1) * vgb; i0 += 8) kvq_values(vcb, ps, oq, qe, P, D, i0, g, bits);
    }
    for (long j = 0; j < g; j++) {
      for (long ch = 0; ch < D; ch++) tmp[ch] = oq[j * D + (ch % pb) * P + ch / pb] + pz[j * NV + ch / VG];
      if (c->rotate) matvec_h(c->hmat, tmp, ot + j * D, D);
      else memcpy(ot + j * D, tmp, D * sizeof(float));
    }
    /* values of the window slots */
    for (long i = 0; i < g * D; i++) ow[i] = 0.f;
    const float* vwb = ly->vw + bh * W * D;
    for (long t = 0; t < nw; t++)
      for (long j = 0; j < g; j++) {
        const float p = s[j * Lk + qe + t];
        for (long i = 0; i < D; i++) ow[j * D + i] += p * vwb[t * D + i];
      }
    for (long j = 0; j < g; j++) {
      float* out = att + ((b * H + h) * g + j) * D;
      for (long i = 0; i < D; i++) out[i] = ot[j * D + i] + ow[j * D + i];
    }
  }
}
"""


@functools.cache
def _library(isa: str = "native"):
    """Built for this CPU ("native"), or "scalar": the plain-loop build a CPU without AVX2 gets (for the tests)."""
    if isa not in ("native", "scalar"):
        raise ValueError(f"isa must be 'native' or 'scalar', got {isa!r}")
    source = _C_SOURCE if isa == "native" else "#undef __AVX2__\n" + _C_SOURCE
    lib = build_c_library("kv_attention" if isa == "native" else "kv_attention_scalar", source, openmp=True,
                          fallback="the torch path of QuantizedKVCache.attend")
    vp, lg = ctypes.c_void_p, ctypes.c_long
    lib.kv_attend_decode.restype = None
    lib.kv_attend_decode.argtypes = [vp] * 14 + [lg] * 10 + [ctypes.c_int, ctypes.c_int]
    lib.kvq_decode_layer.restype = None
    lib.kvq_decode_layer.argtypes = [vp, lg, vp, vp, vp, vp, ctypes.c_int]
    lib.kvq_scratch.restype = lg
    lib.kvq_scratch.argtypes = [lg, lg, lg, lg]
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


class _KvqLayer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("kc", "vc", "ks", "kz", "vs", "vz", "kw", "vw")] + [("q_end", ctypes.c_long)]


class _Kvq(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_long) for n in ("B", "H", "g", "D", "cap", "W", "S", "G", "VG", "bits", "rotate", "pos")]
                + [("hmat", ctypes.c_void_p), ("keep", ctypes.c_void_p), ("scratch", ctypes.c_void_p),
                   ("scratch_per_thread", ctypes.c_long), ("max_threads", ctypes.c_long), ("layers", ctypes.c_void_p),
                   ("rcos", ctypes.c_void_p), ("rsin", ctypes.c_void_p)])


def _sylvester(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order n (what the pre-RoPE path's fast transform computes)."""
    h = torch.ones(1, 1)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.size(0) ** 0.5


def _slot_order_rope(cos: torch.Tensor, sin: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables (n, D) with their channels in the kernel's [k][i] order (index k * P + i holds channel
    (8 / bits) * i + k, P = D * bits / 8), sin multiplied by rotate_half's sign (-1 on the first half of the
    channels), so that RoPE of a key row x in that order is x * cos + partner(x) * sin."""
    D = cos.size(1)
    pb, P = 8 // bits, D * bits // 8
    idx = torch.arange(D)
    channel = pb * (idx % P) + idx // P
    sign = torch.where(channel < D // 2, -1.0, 1.0)
    return cos.float()[:, channel].contiguous(), (sin.float()[:, channel] * sign).contiguous()


class QuantizedDecodeAttention:
    """A quantized KV cache's one-token decode step as a C callback: per layer, write the token's k and v into
    the full-precision window (and the sink copy), then attend over the codes and the window with the rotation
    applied to the query (keys rotated) and to the codes' output (values rotated), as `QuantizedKVCache.attend`
    does. `llmopt.kernels.dense_gemv.StackDecodePlan.step_with_c_attention` calls it between each layer's two
    halves, so a decode step is one C call.

    The buffers are a `QuantizedKVCache`'s per-layer lists (`k_codes` ... `v_window`; shapes as
    `kv_attend_decode_cpu` documents). It never quantizes: the caller runs it only on steps where no group leaves
    the window (`QuantizedKVCache.stored_after(q_end, pos + 1) == q_end` for every layer) and takes the cache's
    own `update` on the others. `set_step(pos, q_end, keep)` before each step: the position written, the stored
    positions per layer, and `keep` (B, S + pos + 1) bool in kernel order (codes, sink slots, window) or None.
    `unsupported(...)` says why a layout does not fit the kernel (fp32 window, packed rows and value groups in
    whole 8-byte chunks, at most 64 query heads per kv head; pre-RoPE keys: rows of 8 or a multiple of 16 bytes).

    `rope=(cos, sin)`: the cache stores keys before RoPE (`QuantizedKVCache(rope=...)`, KVQuant), with these
    tables (the model's `rope_cos` / `rope_sin`, at least one row per storable position). The window and the sink
    copies hold keys after RoPE, as the cache's `update` writes them (the token's key is written as given, post-RoPE;
    only a flushed group, which `update` does, is rotated back before it is quantized), so only the codes change:
    each stored key is dequantized, rotated back by the Hadamard matrix when keys are rotated (a fast
    Walsh-Hadamard transform, so `rotation` must be the Sylvester-Hadamard matrix `QuantizedKVCache` uses) and given
    RoPE at its position, k cos + rotate_half(k) sin, before the dot product with the (unrotated) query, as
    `QuantizedKVCache.dequantize` does. More key-side work than post-RoPE codes, which fold the group's scales
    into the query instead (a layer call about 1.34x as long at 2k on SmolLM2's shapes)."""

    def __init__(self, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_window, v_window, *, n_head: int,
                 bits: int, group_size: int, value_group: int, sink_tokens: int, rotation: torch.Tensor | None,
                 rotate_keys: bool, threads: int = 1, isa: str = "native",
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        B, H, cap, P = k_codes[0].shape
        D = k_window[0].shape[3]
        why = self.unsupported(n_head=n_head, n_kv_head=H, head_dim=D, bits=bits, value_group=value_group,
                               window_dtype=k_window[0].dtype, pre_rope=rope is not None)
        if why:
            raise ValueError(f"QuantizedDecodeAttention: {why}; use QuantizedKVCache.attend")
        n = len(k_codes)
        bufs = (k_codes, v_codes, k_scale, k_zero, v_scale, v_zero, k_window, v_window)
        if any(len(b) != n or not all(t.is_contiguous() and t.device.type == "cpu" for t in b) for b in bufs):
            raise ValueError(f"QuantizedDecodeAttention takes {n} contiguous CPU buffers of each kind")
        self._bufs = bufs  # keeps the tensors alive while C holds their addresses
        self.key = tuple(t.data_ptr() for t in (k_codes[0], k_window[0], v_window[-1]))
        self._lib = _library(isa)
        self.hmat = None if rotation is None else rotation.float().contiguous()
        self.rope = None
        if rope is not None:
            cos, sin = rope
            if cos.shape != sin.shape or cos.dim() != 2 or cos.size(0) < cap or cos.size(1) != D:
                raise ValueError(f"rope must be (cos, sin) tables of shape (>= {cap} positions, head_dim={D}), got "
                                 f"{tuple(cos.shape)} and {tuple(sin.shape)}")
            if rotate_keys and (self.hmat is None or self.hmat.shape != (D, D)
                                or not torch.allclose(self.hmat, _sylvester(D), atol=1e-6)):
                raise ValueError("pre-RoPE keys with rotated keys need rotation = the Sylvester-Hadamard matrix "
                                 "(QuantizedKVCache's hadamard(head_dim)); use QuantizedKVCache.attend")
            self.rope = _slot_order_rope(cos[:cap], sin[:cap], bits)
        self.n_layer = n
        self.layers = (_KvqLayer * n)(*(_KvqLayer(*(b[i].data_ptr() for b in bufs), 0) for i in range(n)))
        W, g = k_window[0].shape[2], n_head // H
        self.threads = max(1, min(int(threads), B * H))
        self.max_keys = cap + W
        per = self._lib.kvq_scratch(g, D, value_group, self.max_keys)
        self._scratch = torch.empty(self.threads * per)
        self._keep: torch.Tensor | None = None
        self.state = _Kvq(B, H, g, D, cap, W, sink_tokens, group_size, value_group, bits,
                          0 if rotation is None else (2 if rotate_keys else 1), 0,
                          None if self.hmat is None else self.hmat.data_ptr(), None, self._scratch.data_ptr(), per,
                          self.threads, ctypes.addressof(self.layers),
                          *((None, None) if self.rope is None else (t.data_ptr() for t in self.rope)))
        self.c_call = (ctypes.cast(self._lib.kvq_decode_layer, ctypes.c_void_p).value, ctypes.addressof(self.state))
        """(address of the C function, address of its state), for `StackDecodePlan.step_with_c_attention`."""

    @staticmethod
    def unsupported(*, n_head: int, n_kv_head: int, head_dim: int, bits: int, value_group: int,
                    window_dtype: torch.dtype, pre_rope: bool = False) -> str | None:
        """Why a cache layout does not fit the kernel, or None when it does."""
        per_byte = 8 // bits
        if window_dtype != torch.float32:
            return f"the window must be fp32, got {window_dtype}"
        if n_head % n_kv_head or n_head // n_kv_head > 64:
            return f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head}, at most 64 times it"
        if head_dim * bits % 64 or value_group % (8 * per_byte) or head_dim % value_group:
            return (f"head_dim={head_dim} at {bits} bits and value_group={value_group} must pack into whole 8-byte "
                    "chunks (head_dim * bits and value_group * bits multiples of 64)")
        if pre_rope and head_dim > 256:
            return f"pre-RoPE keys need head_dim <= 256 (a key row of 32 registers), got {head_dim}"
        if pre_rope and head_dim * bits != 64 and head_dim * bits % 128:
            return (f"pre-RoPE keys need head_dim * bits = 64 or a multiple of 128 (a channel's RoPE partner in the "
                    f"same register or a whole register away), got head_dim={head_dim} at {bits} bits")
        return None

    def set_step(self, pos: int, q_end, keep: torch.Tensor | None = None) -> None:
        st = self.state
        if keep is not None:
            if keep.shape != (st.B, st.S + pos + 1):
                raise ValueError(f"keep must be ({st.B}, {st.S + pos + 1}), got {tuple(keep.shape)}")
            self._keep = keep.to(torch.uint8).contiguous()
        else:
            self._keep = None
        if len(q_end) != self.n_layer:
            raise ValueError(f"q_end needs {self.n_layer} entries, got {len(q_end)}")
        for i, q in enumerate(q_end):
            if not (0 <= q <= min(pos, st.cap) and q % st.G == 0 and st.S + pos - q < st.W):
                raise ValueError(f"layer {i}: {q} stored positions and position {pos} do not fit the window of "
                                 f"{st.W - st.S} slots (a group must be flushed first: QuantizedKVCache.update)")
            self.layers[i].q_end = q
        st.pos = pos
        st.keep = None if self._keep is None else self._keep.data_ptr()

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threads: int = 1) -> torch.Tensor:
        """One layer outside the stack step (tests): q (B, n_head, D), k and v (B, n_kv_head, D) fp32, after
        `set_step`; writes k, v into the window and returns the attention output (B, n_head, D)."""
        st = self.state
        q, k, v = (t.float().contiguous() for t in (q, k, v))
        if q.shape != (st.B, st.H * st.g, st.D) or k.shape != (st.B, st.H, st.D) or v.shape != k.shape:
            raise ValueError(f"q (B, n_head, D), k and v (B, n_kv_head, D) expected, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        if not 0 <= layer < self.n_layer:
            raise ValueError(f"layer {layer} out of range [0, {self.n_layer})")
        out = torch.empty_like(q)
        self._lib.kvq_decode_layer(ctypes.byref(st), layer, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                   max(1, min(int(threads), self.threads)))
        return out


def decode_keep(keep: torch.Tensor | None, *, batch: int, length: int, n_quantized: int,
                sink_tokens: int) -> torch.Tensor | None:
    """The kernels' `keep` (codes, then sink slots, then window) from a per-position one: `keep` (B, length) bool
    (True = attend) or None (every position), for a cache holding `length` positions, the first `n_quantized` in
    codes, with `sink_tokens` full-precision sink slots (read instead of their codes once quantized, never
    before). None when every position is kept and there are no sinks."""
    S = sink_tokens
    if not S:
        return keep
    keep = torch.ones(batch, length, dtype=torch.bool) if keep is None else keep
    n_sink = min(S, n_quantized)
    sinks = torch.zeros(batch, S, dtype=torch.bool, device=keep.device)
    sinks[:, :n_sink] = keep[:, :n_sink]
    codes = keep[:, :n_quantized].clone()
    codes[:, :n_sink] = False  # the sinks' codes are never read
    return torch.cat([codes, sinks, keep[:, n_quantized:]], 1)
