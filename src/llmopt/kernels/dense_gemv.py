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

__all__ = ["DenseGemvPlan", "dense_gemv", "dense_gemv_available"]

_C_SOURCE = r"""
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
