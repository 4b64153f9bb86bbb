"""Dense fp32 / bf16 weight matrix products for decode shapes (a few rows of activations) on CPU: a C kernel
that streams the weight once and accumulates in fp32.

    plan = DenseGemvPlan(weight)          # weight (N, K) fp32 or bf16, contiguous CPU
    y = plan(x2d, threads)                # x2d (M, K) fp32, M small; y (M, N) fp32

Why: decoding one token multiplies every weight matrix by one row of activations, so it is bound by reading
the weights. On a CPU without native bf16 (AVX2 + FMA, no AVX-512 BF16 / AMX), PyTorch's bf16 `linear`
converts through oneDNN's generic path, and its fp32 path at M = 1 (MKL sgemv) does not reach the memory
bandwidth either (measured on SmolLM2's shapes, one thread: the fp32 kernel below takes ~0.8x of
`F.linear`'s time). The kernel:
- takes four weight rows at a time against up to two activation rows (eight fp32 accumulators, eight
  independent FMA chains), so for M = 2..8 the four rows are read from memory once and from L1 after;
- reads bf16 weights as they are stored, widening eight at a time to fp32 with a zero-extend and a 16-bit
  shift (bf16 -> fp32 is exact), so a bf16 model reads half the bytes of an fp32 one;
- prefetches the next block's rows, and splits the row blocks over `threads` with OpenMP (torch's libgomp).
The result equals `x @ weight.float().T` up to fp32 summation order.

Without AVX2 the same source compiles to plain loops; without a C compiler `dense_gemv_available()` is False
and callers keep `F.linear`. No autograd: inference only.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmopt.kernels._cbuild import build_c_library, builds

__all__ = ["DenseGemvPlan", "StackDecodePlan", "dense_gemv", "dense_gemv_available"]

_C_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline __m256 load8(const void* w, long i, const int bf16) {
  if (bf16) {
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps((const float*)w + i);
}
#endif
static inline float load1(const void* w, long i, const int bf16) {
  if (bf16) { uint32_t u = (uint32_t)((const uint16_t*)w)[i] << 16; float f; memcpy(&f, &u, 4); return f; }
  return ((const float*)w)[i];
}

/* y[m0 .. m0+MC) x rows [r0, r0+R): R <= 4, MC <= 2, compile-time constants at each call site. */
static inline __attribute__((always_inline)) void rows(
    const float* restrict x, const void* restrict w, float* restrict y, long N, long K, long r0, long m0,
    const int R, const int MC, const int bf16) {
  const long es = bf16 ? 2 : 4;
  float part[2][4];
  long k = 0;
#ifdef __AVX2__
  __m256 acc[2][4];
  for (int m = 0; m < MC; m++) for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 xv[2];
    for (int m = 0; m < MC; m++) xv[m] = _mm256_loadu_ps(x + (m0 + m) * K + k);
    for (int r = 0; r < R; r++) {
      const long off = (r0 + r) * K + k;
      if ((k * es & 63) == 0) __builtin_prefetch((const char*)w + (off + 4 * K) * es);  /* next block, same k */
      const __m256 wv = load8(w, off, bf16);
      for (int m = 0; m < MC; m++) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < MC; m++) for (int r = 0; r < R; r++) part[m][r] = hsum8(acc[m][r]);
#else
  for (int m = 0; m < MC; m++) for (int r = 0; r < R; r++) part[m][r] = 0.f;
#endif
  for (; k < K; k++)
    for (int r = 0; r < R; r++) {
      const float wk = load1(w, (r0 + r) * K + k, bf16);
      for (int m = 0; m < MC; m++) part[m][r] += wk * x[(m0 + m) * K + k];
    }
  for (int m = 0; m < MC; m++) for (int r = 0; r < R; r++) y[(m0 + m) * N + r0 + r] = part[m][r];
}

static void block(const float* x, const void* w, float* y, long M, long N, long K, long r0, const int bf16) {
  if (N - r0 >= 4) {
    long m0 = 0;
    for (; m0 + 2 <= M; m0 += 2) rows(x, w, y, N, K, r0, m0, 4, 2, bf16);  /* the 4 rows stay in L1 */
    if (m0 < M) rows(x, w, y, N, K, r0, m0, 4, 1, bf16);
  } else {
    for (long r = r0; r < N; r++)
      for (long m0 = 0; m0 < M; m0++) rows(x, w, y, N, K, r, m0, 1, 1, bf16);
  }
}

int dense_gemv_isa(void) {
#ifdef __AVX2__
  return 2;
#else
  return 0;
#endif
}

/* ---- one decode step of a stack of Llama blocks (B rows, one token each, all at position pos) ----------------
   Per layer: x += o(attn(rope(q(n1(x))), rope(k(n1(x))) -> cache, v(n1(x)) -> cache)); x += down(silu(gate(n2(x)))
   * up(n2(x))). Weights and norm weights fp32 or bf16 (wbf16), the cache fp32 or bf16 (cbf16), arithmetic fp32;
   x is fp32 (B, dim) in and out. Attention: keys [0, pos] of the row, minus the slots pad marks (its own kept). */
/* A projection is a C function and its prepared weight: dense_gemv (below) over a dense plan, or another kernel with
   the same signature (llmopt.kernels.int_gemv's int_gemv_plan over an int8 / int4 plan). */
typedef void (*gemv_fn)(const void* plan, const float* x, float* y, long M, int nthreads);
typedef struct { gemv_fn fq, fk, fv, fo, fg, fu, fd; const void *pq, *pk, *pv, *po, *pg, *pu, *pd, *n1, *n2; void *kc, *vc; } layer_t;
typedef struct { long n_layer, dim, n_head, n_kv, hd, inter, max_len, nbf16, cbf16; float eps; } cfg_t;

static inline void store_c(void* c, long i, float v, int bf16) {
  if (bf16) {
    uint32_t u; memcpy(&u, &v, 4);
    u += 0x7FFF + ((u >> 16) & 1);  /* round to nearest even */
    ((uint16_t*)c)[i] = (uint16_t)(u >> 16);
  } else ((float*)c)[i] = v;
}

/* Plain loops the compiler vectorizes (-O3 -ffast-math): the attention's per-key dot products and updates. */
static inline float dot_f32(const float* restrict a, const float* restrict b, long n) {
  float s = 0.f;
  for (long i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}
static inline float dot_bf16(const float* restrict a, const uint16_t* restrict b, long n) {
  float s = 0.f;
  for (long i = 0; i < n; i++) { uint32_t u = (uint32_t)b[i] << 16; float f; memcpy(&f, &u, 4); s += a[i] * f; }
  return s;
}
/* Raw scores s[j] = q . key_j for keys j in [0, n) stored contiguously (hd floats / bf16 each): four keys at a time
   on AVX2 (four independent FMA chains instead of one latency-bound chain per key). */
static inline void key_scores(const float* restrict q, const void* restrict kc, long n, long hd, int cb,
                              float* restrict s) {
  long j = 0;
#ifdef __AVX2__
  if (hd % 8 == 0) {
    for (; j + 4 <= n; j += 4) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      const long o = j * hd;
      for (long i = 0; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(qv, load8(kc, o + i, cb), a0);
        a1 = _mm256_fmadd_ps(qv, load8(kc, o + hd + i, cb), a1);
        a2 = _mm256_fmadd_ps(qv, load8(kc, o + 2 * hd + i, cb), a2);
        a3 = _mm256_fmadd_ps(qv, load8(kc, o + 3 * hd + i, cb), a3);
      }
      s[j] = hsum8(a0); s[j + 1] = hsum8(a1); s[j + 2] = hsum8(a2); s[j + 3] = hsum8(a3);
    }
  }
#endif
  for (; j < n; j++)
    s[j] = cb ? dot_bf16(q, (const uint16_t*)kc + j * hd, hd) : dot_f32(q, (const float*)kc + j * hd, hd);
}
static inline void axpy_f32(float* restrict y, float p, const float* restrict v, long n) {
  for (long i = 0; i < n; i++) y[i] += p * v[i];
}
static inline void axpy_bf16(float* restrict y, float p, const uint16_t* restrict v, long n) {
  for (long i = 0; i < n; i++) { uint32_t u = (uint32_t)v[i] << 16; float f; memcpy(&f, &u, 4); y[i] += p * f; }
}

static void rmsnorm(const float* x, const void* w, int wbf16, float* out, long B, long D, float eps) {
  for (long b = 0; b < B; b++) {
    const float* xb = x + b * D;
    float ss = 0.f;
    for (long i = 0; i < D; i++) ss += xb[i] * xb[i];
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (long i = 0; i < D; i++) out[b * D + i] = load1(w, i, wbf16) * (xb[i] * r);
  }
}

static void rope(float* v, long nheads, long hd, const float* cs, const float* sn) {
  const long h2 = hd / 2;
  for (long h = 0; h < nheads; h++) {
    float* p = v + h * hd;
    for (long i = 0; i < h2; i++) {
      const float a = p[i], b = p[i + h2];
      p[i] = a * cs[i] - b * sn[i];
      p[i + h2] = b * cs[i + h2] + a * sn[i + h2];
    }
  }
}

long llama_decode_work(const cfg_t* c, long B) {  /* floats of scratch llama_decode needs */
  const long D = c->dim, I = c->inter;
  return B * (2 * c->n_head * c->hd + 2 * c->n_kv * c->hd + D + 2 * I + (D > I ? D : I)) + B * c->n_head * (c->max_len + 16);
}

/* The two halves of a layer around attention, for R = B * T rows (row b * T + t: row b's token at pos + t).
   pre: xn = n1(x); q, k, v = projections of xn; RoPE on q and k with cs, sn (T, hd).
   post: x += o(att); x += down(silu(gate(n2(x))) * up(n2(x))). work: R * (D + 2 I + max(D, I)) floats. */
void llama_layer_pre(const cfg_t* c, const layer_t* ly, const float* x, float* q, float* k, float* v, long R, long T,
                     const float* cs, const float* sn, float* xn, int nthreads) {
  const long D = c->dim, nh = c->n_head, nkv = c->n_kv, hd = c->hd;
  rmsnorm(x, ly->n1, (int)c->nbf16, xn, R, D, c->eps);
  ly->fq(ly->pq, xn, q, R, nthreads);
  ly->fk(ly->pk, xn, k, R, nthreads);
  ly->fv(ly->pv, xn, v, R, nthreads);
  for (long r = 0; r < R; r++) {
    const long t = r % T;
    rope(q + r * nh * hd, nh, hd, cs + t * hd, sn + t * hd);
    rope(k + r * nkv * hd, nkv, hd, cs + t * hd, sn + t * hd);
  }
}

void llama_layer_post(const cfg_t* c, const layer_t* ly, float* x, const float* att, long R, float* work, int nthreads) {
  const long D = c->dim, I = c->inter;
  float *xn = work, *g = xn + R * D, *u = g + R * I, *o = u + R * I;
  ly->fo(ly->po, att, o, R, nthreads);
  for (long i = 0; i < R * D; i++) x[i] += o[i];
  rmsnorm(x, ly->n2, (int)c->nbf16, xn, R, D, c->eps);
  ly->fg(ly->pg, xn, g, R, nthreads);
  ly->fu(ly->pu, xn, u, R, nthreads);
  for (long i = 0; i < R * I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
  ly->fd(ly->pd, g, o, R, nthreads);
  for (long i = 0; i < R * D; i++) x[i] += o[i];
}

void llama_decode(const cfg_t* c, const layer_t* L, float* x, long B, long T, long pos, const float* cs,
                  const float* sn, const uint8_t* pad, float* work, int nthreads) {
  /* x: (B * T, dim), row b * T + t is row b's token at position pos + t; cs, sn: (T, hd) */
  const long D = c->dim, nh = c->n_head, nkv = c->n_kv, hd = c->hd, I = c->inter, ML = c->max_len;
  const long R = B * T;
  const int cb = (int)c->cbf16;
  float *q = work, *k = q + R * nh * hd, *v = k + R * nkv * hd, *att = v + R * nkv * hd;
  float *post = att + R * nh * hd, *sc = post + R * (D + 2 * I + (D > I ? D : I));
  const float scale = 1.0f / sqrtf((float)hd);
  const long grp = nh / nkv;
  for (long l = 0; l < c->n_layer; l++) {
    const layer_t* ly = L + l;
    llama_layer_pre(c, ly, x, q, k, v, R, T, cs, sn, post, nthreads);
    for (long r = 0; r < R; r++) {
      const long b = r / T, t = r % T;
      for (long h = 0; h < nkv; h++)
        for (long i = 0; i < hd; i++) {
          const long at = ((b * nkv + h) * ML + pos + t) * hd + i;
          store_c(ly->kc, at, k[(r * nkv + h) * hd + i], cb);
          store_c(ly->vc, at, v[(r * nkv + h) * hd + i], cb);
        }
    }
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
    for (long rh = 0; rh < R * nh; rh++) {
      const long r = rh / nh, h = rh % nh, b = r / T, kvh = h / grp, own = pos + r % T;
      const float* qv = q + rh * hd;
      float* s = sc + rh * (ML + 16);
      const long base = (b * nkv + kvh) * ML * hd;
      float mx = -3.0e38f;  /* finite: -ffast-math assumes no infinities */
#define SKIP(j) (pad && pad[b * ML + (j)] && (j) != own)
      key_scores(qv, cb ? (const void*)((const uint16_t*)ly->kc + base) : (const void*)((const float*)ly->kc + base),
                 own + 1, hd, cb, s);  /* padded slots too (written keys, finite): skipped below */
      for (long j = 0; j <= own; j++) {
        if (SKIP(j)) continue;
        s[j] *= scale;
        if (s[j] > mx) mx = s[j];
      }
      float den = 0.f;
      for (long j = 0; j <= own; j++) {
        if (SKIP(j)) { s[j] = 0.f; continue; }
        s[j] = expf(s[j] - mx);
        den += s[j];
      }
#undef SKIP
      float* out = att + rh * hd;
      for (long i = 0; i < hd; i++) out[i] = 0.f;
      for (long j = 0; j <= own; j++) {
        const float p = s[j] / den;
        if (p == 0.f) continue;
        if (cb) axpy_bf16(out, p, (const uint16_t*)ly->vc + base + j * hd, hd);
        else axpy_f32(out, p, (const float*)ly->vc + base + j * hd, hd);
      }
    }
    llama_layer_post(c, ly, x, att, R, post, nthreads);
  }
}

/* One-token decode step of the stack over a cache that attends itself: per layer the two halves above around
   fa(ctx, layer, q, k, v, att, nthreads), which writes k, v (B, n_kv, hd) into its cache and returns the attention
   output att (B, n_head, hd) for queries q (B, n_head, hd), after RoPE (llmopt.kernels.kv_attention's
   kvq_decode_layer over a quantized cache). work: llama_decode_work floats. */
typedef void (*attn_fn)(const void* ctx, long layer, const float* q, const float* k, const float* v, float* att,
                        int nthreads);
void llama_decode_attn(const cfg_t* c, const layer_t* L, float* x, long B, const float* cs, const float* sn,
                       attn_fn fa, const void* ctx, float* work, int nthreads) {
  const long nh = c->n_head, nkv = c->n_kv, hd = c->hd;
  float *q = work, *k = q + B * nh * hd, *v = k + B * nkv * hd, *att = v + B * nkv * hd;
  float *post = att + B * nh * hd;
  for (long l = 0; l < c->n_layer; l++) {
    llama_layer_pre(c, L + l, x, q, k, v, B, 1, cs, sn, post, nthreads);
    fa(ctx, l, q, k, v, att, nthreads);
    llama_layer_post(c, L + l, x, att, B, post, nthreads);
  }
}

typedef struct { const void* w; long bf16, N, K; } plan_t;

/* y (M, N) = x (M, K) @ w^T; w (N, K) row-major fp32 or bf16. */
void dense_gemv(const plan_t* p, const float* x, float* y, long M, int nthreads) {
  const long N = p->N, K = p->K, nblk = (N + 3) / 4;
  if (p->bf16) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
    for (long b = 0; b < nblk; b++) block(x, p->w, y, M, N, K, 4 * b, 1);
  } else {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
    for (long b = 0; b < nblk; b++) block(x, p->w, y, M, N, K, 4 * b, 0);
  }
}
"""

_FALLBACK = "torch.nn.functional.linear (the default when no compiler is found)"


@functools.cache
def _lib(isa: str = "native") -> ctypes.CDLL:
    """Built for this CPU ("native": AVX2 + FMA where present), or "scalar": the plain-loop fallback a CPU without
    AVX2 gets (built here too, so the tests cover it)."""
    if isa not in ("native", "scalar"):
        raise ValueError(f"isa must be 'native' or 'scalar', got {isa!r}")
    source = _C_SOURCE if isa == "native" else "#undef __AVX2__\n" + _C_SOURCE
    lib = build_c_library(f"dense_gemv_{isa}", source, openmp=True, fallback=_FALLBACK)
    lib.dense_gemv.restype = None
    lib.dense_gemv.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.dense_gemv_isa.restype = ctypes.c_int
    lib.llama_decode.restype = None
    vp = ctypes.c_void_p
    lib.llama_decode.argtypes = [vp, vp, vp, ctypes.c_long, ctypes.c_long, ctypes.c_long, vp, vp, vp, vp, ctypes.c_int]
    lib.llama_layer_pre.restype = lib.llama_layer_post.restype = None
    lib.llama_layer_pre.argtypes = [vp, vp, vp, vp, vp, vp, ctypes.c_long, ctypes.c_long, vp, vp, vp, ctypes.c_int]
    lib.llama_layer_post.argtypes = [vp, vp, vp, vp, ctypes.c_long, vp, ctypes.c_int]
    lib.llama_decode_attn.restype = None
    lib.llama_decode_attn.argtypes = [vp, vp, vp, ctypes.c_long, vp, vp, vp, vp, vp, ctypes.c_int]
    lib.llama_decode_work.restype = ctypes.c_long
    lib.llama_decode_work.argtypes = [vp, ctypes.c_long]
    return lib


@functools.cache
def dense_gemv_available() -> bool:
    """True when the C kernel builds here (a C compiler is on PATH); callers otherwise keep `F.linear`."""
    return builds(_lib)


class _Plan(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("bf16", ctypes.c_long), ("N", ctypes.c_long), ("K", ctypes.c_long)]


class DenseGemvPlan:
    """A weight prepared for repeated decode calls (the checks done once; a decode step makes ~200 calls).
    Holds a reference to the weight it points to: rebuild it when the weight tensor is replaced."""

    def __init__(self, weight: torch.Tensor, *, isa: str = "native") -> None:
        if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"DenseGemvPlan takes a 2-D fp32 or bf16 CPU weight, got {weight.dtype} "
                            f"{tuple(weight.shape)} on {weight.device}; use F.linear for other weights")
        self.weight = weight.detach().contiguous()
        self.N, self.K = self.weight.shape
        self._plan = _Plan(self.weight.data_ptr(), int(weight.dtype == torch.bfloat16), self.N, self.K)
        self._ref = ctypes.byref(self._plan)
        self._fn = _lib(isa).dense_gemv
        self.c_call = (ctypes.cast(self._fn, ctypes.c_void_p).value, ctypes.addressof(self._plan))
        """(address of the C function, address of its plan), for `StackDecodePlan`."""

    def __call__(self, x2d: torch.Tensor, threads: int) -> torch.Tensor:
        """x2d: contiguous fp32 CPU (M, K); returns (M, N) fp32. Nothing is checked here (see `dense_gemv`)."""
        return self.run(x2d, (x2d.shape[0], self.N), x2d.shape[0], threads)

    def run(self, x: torch.Tensor, out_shape: tuple[int, ...], M: int, threads: int) -> torch.Tensor:
        """x contiguous fp32 CPU holding M rows of K (any leading shape); the M * N outputs allocated as
        `out_shape`. The decode fast path: no checks."""
        y = torch.empty(out_shape)
        self._fn(self._ref, x.data_ptr(), y.data_ptr(), M, threads)
        return y


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, *, threads: int | None = None,
               isa: str = "native") -> torch.Tensor:
    """(M, N) fp32 = x (M, K) @ weight (N, K)^T for an fp32 or bf16 CPU weight; x is cast to fp32."""
    if weight.dim() != 2 or x.dim() != 2 or x.size(1) != weight.size(1):
        raise ValueError(f"dense_gemv takes x (M, K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise ValueError("dense_gemv has no backward; call it under torch.no_grad() or use F.linear")
    if x.device.type != "cpu":
        raise TypeError(f"dense_gemv runs on CPU tensors, got x on {x.device}; use F.linear")
    plan = DenseGemvPlan(weight, isa=isa)
    return plan(x.float().contiguous(), torch.get_num_threads() if threads is None else max(1, int(threads)))


class _Layer(ctypes.Structure):
    _fields_ = ([(f"f{n}", ctypes.c_void_p) for n in "qkvogud"] + [(f"p{n}", ctypes.c_void_p) for n in "qkvogud"]
                + [(n, ctypes.c_void_p) for n in ("n1", "n2", "kc", "vc")])


class _Cfg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_long) for n in ("n_layer", "dim", "n_head", "n_kv", "hd", "inter", "max_len", "nbf16",
                                             "cbf16")] + [("eps", ctypes.c_float)]


_PROJ = ("wq", "wk", "wv", "wo", "wg", "wu", "wd")


def _as_plan(w, isa: str):
    """A projection for the stack: a dense fp32 / bf16 weight becomes a `DenseGemvPlan`; an object with
    `c_call` (address of a C function `void f(const void* plan, const float* x, float* y, long M, int threads)`
    and of its plan, as `DenseGemvPlan` and `llmopt.kernels.int_gemv.IntGemvPlan` have) is taken as it is."""
    if isinstance(w, torch.Tensor):
        return DenseGemvPlan(w, isa=isa)
    if not hasattr(w, "c_call"):
        raise TypeError(f"StackDecodePlan takes weight tensors or prepared plans with c_call, got {type(w).__name__}")
    return w


class StackDecodePlan:
    """One decode step of a stack of Llama blocks (pre-norm attention with RoPE and GQA, SwiGLU MLP, no biases)
    in a single C call: RMSNorm, the q/k/v GEMVs, RoPE, the cache write, attention over the row's keys [0, pos],
    the o GEMV and residual, RMSNorm, gate/up GEMVs, SiLU * up, the down GEMV and residual, for every layer.

    `layers`: per layer a dict of the projections `wq wk wv wo wg wu wd` (each a dense (out, in) fp32 / bf16
    weight as nn.Linear stores it, or a prepared plan with `c_call`, e.g. an int8 / int4 `IntGemvPlan`) and the
    RMSNorm weights `n1 n2` (fp32 or bf16). Arithmetic is fp32 (a bf16 model's residual stream is kept in fp32
    inside the call). `step(x, pos, cos, sin, k_bufs, v_bufs, pad)` updates x (B, T, dim) fp32 in place and writes
    the keys / values at pos .. pos + T - 1 into the per-layer buffers (B, n_kv, max_len, head_dim) (fp32 or bf16);
    `step_with_attention` leaves attention and the cache to a callback. Holds references to the weights; the
    buffers are bound per call (cheaply, when they changed)."""

    def __init__(self, layers: list[dict], *, n_head: int, n_kv_head: int, head_dim: int, eps: float,
                 isa: str = "native") -> None:
        norms = {layer[k].dtype for layer in layers for k in ("n1", "n2")}
        if len(norms) != 1 or next(iter(norms)) not in (torch.float32, torch.bfloat16):
            raise TypeError("StackDecodePlan takes RMSNorm weights that are all fp32 or all bf16")
        self.layers = [{**{k: _as_plan(layer[k], isa) for k in _PROJ},
                        **{k: layer[k].detach().contiguous() for k in ("n1", "n2")}} for layer in layers]
        first = self.layers[0]
        self.dim, self.inter = first["n1"].shape[0], first["wg"].N
        self.nbf16 = first["n1"].dtype == torch.bfloat16
        self.n_head, self.n_kv_head, self.head_dim, self.eps = n_head, n_kv_head, head_dim, float(eps)
        shapes = {"wq": (n_head * head_dim, self.dim), "wk": (n_kv_head * head_dim, self.dim),
                  "wv": (n_kv_head * head_dim, self.dim), "wo": (self.dim, n_head * head_dim),
                  "wg": (self.inter, self.dim), "wu": (self.inter, self.dim), "wd": (self.dim, self.inter)}
        if n_head % n_kv_head or head_dim % 2 or any((layer[k].N, layer[k].K) != shapes[k]
                                                       for layer in self.layers for k in _PROJ):
            raise ValueError(f"StackDecodePlan: n_head={n_head} must be a multiple of n_kv_head={n_kv_head}, head_dim "
                             f"even, and the projections of Llama's shapes {shapes}")
        self._lib = _lib(isa)
        self._bound: tuple | None = None
        self._scratch: torch.Tensor | None = None
        self._free: tuple | None = None  # (cfg, layers) without cache buffers, for step_with_attention

    def _bind(self, k_bufs, v_bufs, batch: int) -> None:
        key = (batch, tuple(t.data_ptr() for t in k_bufs), tuple(t.data_ptr() for t in v_bufs))
        if self._bound is not None and self._bound[0] == key:
            return
        max_len = k_bufs[0].shape[2]
        for t in (*k_bufs, *v_bufs):
            if (t.shape != (batch, self.n_kv_head, max_len, self.head_dim) or not t.is_contiguous()
                    or t.dtype not in (torch.float32, torch.bfloat16) or t.dtype != k_bufs[0].dtype):
                raise ValueError(f"StackDecodePlan: cache buffers must be contiguous ({batch}, {self.n_kv_head}, L, "
                                 f"{self.head_dim}) fp32 or bf16, all alike; got {tuple(t.shape)} {t.dtype}")
        if len(k_bufs) != len(self.layers) or len(v_bufs) != len(self.layers):
            raise ValueError(f"StackDecodePlan: {len(self.layers)} layers, got {len(k_bufs)} cache buffers")
        cfg = self._cfg(max_len, k_bufs[0].dtype == torch.bfloat16)
        self._bound = (key, cfg, self._layer_array(k_bufs, v_bufs), max_len, (k_bufs, v_bufs))

    def _cfg(self, max_len: int, cache_bf16: bool) -> _Cfg:
        return _Cfg(len(self.layers), self.dim, self.n_head, self.n_kv_head, self.head_dim, self.inter, max_len,
                    int(self.nbf16), int(cache_bf16), self.eps)

    def _layer_array(self, k_bufs=None, v_bufs=None) -> ctypes.Array:
        """The C layer table: each projection's (function, plan), the norm weights, and the cache buffers (NULL
        without them: `step_with_attention`)."""
        arr = (_Layer * len(self.layers))()
        for i, layer in enumerate(self.layers):
            calls = [layer[k].c_call for k in _PROJ]
            kc, vc = (None, None) if k_bufs is None else (k_bufs[i].data_ptr(), v_bufs[i].data_ptr())
            arr[i] = _Layer(*(f for f, _ in calls), *(p for _, p in calls), layer["n1"].data_ptr(),
                            layer["n2"].data_ptr(), kc, vc)
        return arr

    def _check_x(self, x: torch.Tensor) -> tuple[int, int]:
        B, T = x.shape[:2]
        if x.dtype != torch.float32 or not x.is_contiguous() or x.shape != (B, T, self.dim):
            raise ValueError(f"StackDecodePlan takes x (B, T, {self.dim}) contiguous fp32, got {tuple(x.shape)} {x.dtype}")
        return B, T

    def step(self, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor, k_bufs, v_bufs,
             pad: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
        """x (B, T, dim) fp32 contiguous: each row's T tokens at positions pos .. pos + T - 1 (T = 1: decode; a
        few: speculative verify, short prompts), updated in place and returned; cos/sin (T, head_dim) at those
        positions; pad (B, max_len) bool (True = a slot no query attends, its own kept) or None. Queries see
        their row's keys up to their own position."""
        if x.dim() == 2:
            x = x[:, None]
        B, T = self._check_x(x)
        self._bind(k_bufs, v_bufs, B)
        _, cfg, arr, max_len, _ = self._bound
        if not (0 <= pos and pos + T <= max_len):
            raise ValueError(f"positions {pos}..{pos + T - 1} are outside the cache's {max_len} slots")
        work = self._work(cfg, B * T)
        cos, sin = cos.float().reshape(T, self.head_dim).contiguous(), sin.float().reshape(T, self.head_dim).contiguous()
        pad_t = None if pad is None else pad.to(torch.uint8).contiguous()
        self._lib.llama_decode(ctypes.byref(cfg), arr, x.data_ptr(), B, T, pos, cos.data_ptr(), sin.data_ptr(),
                               None if pad_t is None else pad_t.data_ptr(), work.data_ptr(),
                               torch.get_num_threads() if threads is None else max(1, int(threads)))
        return x

    def step_with_attention(self, x: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor, attend,
                            threads: int | None = None) -> torch.Tensor:
        """The same step with attention (and the cache write) done by `attend(layer, q, k, v)` in between: q
        (B, n_head, T, head_dim), k and v (B, n_kv_head, T, head_dim), fp32, after RoPE; it returns the attention
        output (B, n_head, T, head_dim). Two C calls per layer (norm + projections + RoPE; o + residual + MLP),
        for caches that attend over their own storage (the quantized KV cache)."""
        B, T = self._check_x(x)
        if self._free is None:
            self._free = (self._cfg(1, False), self._layer_array())
        cfg, arr = self._free
        R, nh, nkv, hd = B * T, self.n_head, self.n_kv_head, self.head_dim
        q, k, v = torch.empty(B, T, nh, hd), torch.empty(B, T, nkv, hd), torch.empty(B, T, nkv, hd)
        work = self._work(cfg, R)
        cos, sin = cos.float().reshape(T, hd).contiguous(), sin.float().reshape(T, hd).contiguous()
        n = torch.get_num_threads() if threads is None else max(1, int(threads))
        lib, ref = self._lib, ctypes.byref(cfg)
        for i in range(len(self.layers)):
            layer = ctypes.byref(arr, i * ctypes.sizeof(_Layer))
            lib.llama_layer_pre(ref, layer, x.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), R, T,
                                cos.data_ptr(), sin.data_ptr(), work.data_ptr(), n)
            att = attend(i, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, nh, T, hd)
            att = att.transpose(1, 2).contiguous()
            lib.llama_layer_post(ref, layer, x.data_ptr(), att.data_ptr(), R, work.data_ptr(), n)
        return x

    def step_with_c_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention,
                              threads: int | None = None) -> torch.Tensor:
        """The one-token step (x (B, 1, dim) fp32, updated in place and returned; cos/sin (1, head_dim) at the
        position) in one C call, with attention and the cache write done by a C callback between each layer's
        halves: `attention.c_call` = (address of `void f(const void* ctx, long layer, const float* q, const
        float* k, const float* v, float* att, int threads)`, address of ctx), q and att (B, n_head, head_dim),
        k and v (B, n_kv_head, head_dim), after RoPE (`llmopt.kernels.kv_attention.QuantizedDecodeAttention`,
        set up for this position)."""
        B, T = self._check_x(x)
        if T != 1:
            raise ValueError(f"step_with_c_attention takes one token per row, got {T}")
        if self._free is None:
            self._free = (self._cfg(1, False), self._layer_array())
        cfg, arr = self._free
        work = self._work(cfg, B)
        hd = self.head_dim
        cos, sin = cos.float().reshape(1, hd).contiguous(), sin.float().reshape(1, hd).contiguous()
        fn, ctx = attention.c_call
        self._lib.llama_decode_attn(ctypes.byref(cfg), arr, x.data_ptr(), B, cos.data_ptr(), sin.data_ptr(), fn, ctx,
                                    work.data_ptr(), torch.get_num_threads() if threads is None else max(1, int(threads)))
        return x

    def _work(self, cfg, rows: int) -> torch.Tensor:
        n = self._lib.llama_decode_work(ctypes.byref(cfg), rows)
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = torch.empty(n)
        return self._scratch
