"""Int8 / int4 weight-only matrix products for decode shapes (a few rows of fp32 activations) on CPU: C
kernels that read the stored integer codes directly and accumulate in fp32.

    y = int8_gemv(x, codes, scale, zero, group_size)            # codes (N, K) int8, scale/zero (N, K // g)
    y = int4_gemv(x, packed, int4_kernel_scales(scale, zero), (N, K), group_size)   # packed (Np, K // 2) uint8

`x` is (M, K) fp32 with M small (decode: 1 row per sequence); `y` is (M, N) fp32. The weight is `code * scale
(+ zero)` per group of `group_size` inputs of one output row, exactly what `llmopt.quant.int_quant`
stores, so the result equals `x @ dequantize_weight(q).T` up to fp32 summation order. Scales and zeros may
be fp32 or bf16 (read as stored; bf16 -> fp32 is exact).

Why not PyTorch's fused kernels: `torch._weight_int8pack_mm` (fed bf16 activations, because its fp32 path is
slow) and `torch._weight_int4pack_mm_for_cpu` are compute-bound at 1x576 x 576x1536 on one core, and round the
activations to bf16. These kernels are written for one row of activations and eight-wide AVX2 + FMA:
- int8: blocks of eight output rows. 32 codes of a row come in one load and are sign-extended to four vectors
  of eight floats with shifts only (`(v << 24) >> 24`, ...: lane-crossing byte shuffles are the bottleneck of
  the obvious `vpmovsxbd` loop), so vector j holds inputs `k + 4 i + j`; the activations are permuted alike once
  per call. One accumulator per row, a software prefetch of the next block's rows (the hardware prefetcher
  does not follow eight interleaved row streams), and per group `y += s * sum(code * x) + z * sum(x)`.
- int4: the packed layout (PyTorch's CPU int4 layout: blocks of 32 rows, the 16 bytes at `16 k` of a block
  hold input k of its 32 rows, low nibbles rows 0-15, high nibbles rows 16-31) is read as it is: per input k,
  two 8-byte loads widened to 32-bit lanes, the nibbles split with a mask and a shift, four vectors of eight
  floats FMA'd with the broadcast activation into 32 per-row accumulators (two inputs per iteration with
  their own accumulators for one activation row). At the end of a group,
  `y += s * sum(nib * x) + (z - 8 s) * sum(x)` (nibble = code + 8). The per-group scales and zeros of a block
  are read from a copy in the layout (blocks, groups, 2, 32) (`int4_kernel_scales`, built once by the caller).
Activation rows are taken in pairs per block of weights, so M = 2..8 reads the weights from memory once (the
block is in L1 for the next pair). OpenMP splits the output rows over `threads` (default
`torch.get_num_threads()`), sharing torch's libgomp. Any group size dividing K works (int4: even), not only
32/64/128/256; int8 groups that are not a multiple of 32 (8) take the eight-wide (scalar) loop.

Without AVX2 the same C source compiles to plain loops (the fallback); without a C compiler
`int_gemv_available()` is False and callers keep their torch path. No autograd: inference only.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmopt.kernels._cbuild import build_c_library, builds

__all__ = ["IntGemvPlan", "int4_gemv", "int4_kernel_scales", "int8_gemv", "int_gemv_available", "kernel_isa"]

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static inline float bf16_to_f(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float load_s(const void* p, long i, int bf16) {
  return bf16 ? bf16_to_f(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

int int_gemv_isa(void) {
#ifdef __AVX2__
  return 2;
#else
  return 0;
#endif
}

/* xs[m * G + gi] = sum of x[m, gi*g : (gi+1)*g] */
static void group_sums(const float* x, long M, long K, long g, float* xs) {
  const long G = K / g;
  for (long m = 0; m < M; m++)
    for (long gi = 0; gi < G; gi++) {
      const float* xp = x + m * K + gi * g;
      float s = 0.f;
      for (long k = 0; k < g; k++) s += xp[k];
      xs[m * G + gi] = s;
    }
}

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline __m256 i8x8_to_f(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#endif

#define INT8_R 8
/* ---- int8: codes (N, K) row-major; scale, zero (N, G) -------------------------------------------------------
   Rows [r0, r0 + R) against activation rows [m0, m0 + MC); R, MC are compile-time constants at each call
   (R * MC <= 8 accumulators, enough independent FMA chains to hide the FMA latency). */
static inline __attribute__((always_inline)) void int8_rows(
    const float* restrict x, const float* restrict xp, const int8_t* restrict codes, const void* scale,
    const void* zero, int sbf16, const float* xs, float* restrict y, long M, long N, long K, long g, long r0, long m0,
    const int R, const int MC) {
  const long G = K / g;
  float out[2][INT8_R];  /* fixed sizes (MC <= 2, R <= INT8_R): a VLA would live on the stack */
  for (int m = 0; m < MC; m++) for (int r = 0; r < R; r++) out[m][r] = 0.f;
  for (long gi = 0; gi < G; gi++) {
    const long k0 = gi * g;
    float part[2][INT8_R];
#ifdef __AVX2__
    __m256 acc[2][INT8_R];
    for (int m = 0; m < MC; m++) for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_ps();
    long k = k0;
    if (xp) for (; k + 32 <= k0 + g; k += 32) {
      /* 32 codes of a row in one load; the four bytes of each 32-bit lane sign-extended with shifts (no shuffles),
         so vector j holds inputs k + 4 i + j: xp holds x permuted alike */
      __m256 xv[2][4];
      for (int m = 0; m < MC; m++)
        for (int j = 0; j < 4; j++) xv[m][j] = _mm256_loadu_ps(xp + (m0 + m) * K + k + 8 * j);
      for (int r = 0; r < R; r++) {
        const int8_t* row = codes + (r0 + r) * K;
        __builtin_prefetch(row + INT8_R * K + k);  /* the next block's row, one line ahead */
        const __m256i v = _mm256_loadu_si256((const __m256i*)(row + k));
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
        for (int m = 0; m < MC; m++) {  /* one add carried across iterations, not four FMAs */
          __m256 t = _mm256_mul_ps(w0, xv[m][0]);
          t = _mm256_fmadd_ps(w1, xv[m][1], t);
          t = _mm256_fmadd_ps(w2, xv[m][2], t);
          acc[m][r] = _mm256_add_ps(acc[m][r], _mm256_fmadd_ps(w3, xv[m][3], t));
        }
      }
    }
    for (; k + 8 <= k0 + g; k += 8) {
      __m256 xv[2];
      for (int m = 0; m < MC; m++) xv[m] = _mm256_loadu_ps(x + (m0 + m) * K + k);
      for (int r = 0; r < R; r++) {
        const int8_t* row = codes + (r0 + r) * K;
        if ((k & 63) == 0) __builtin_prefetch(row + INT8_R * K + k);  /* the next block's row, one line ahead */
        const __m256 w = i8x8_to_f(row + k);
        for (int m = 0; m < MC; m++) acc[m][r] = _mm256_fmadd_ps(w, xv[m], acc[m][r]);
      }
    }
    for (int m = 0; m < MC; m++) for (int r = 0; r < R; r++) part[m][r] = hsum8(acc[m][r]);
#else
    for (int m = 0; m < MC; m++) for (int r = 0; r < R; r++) part[m][r] = 0.f;
    long k = k0;
#endif
    for (; k < k0 + g; k++)
      for (int r = 0; r < R; r++) {
        const float w = (float)codes[(r0 + r) * K + k];
        for (int m = 0; m < MC; m++) part[m][r] += w * x[(m0 + m) * K + k];
      }
    for (int r = 0; r < R; r++) {
      const float s = load_s(scale, (r0 + r) * G + gi, sbf16);
      const float z = zero ? load_s(zero, (r0 + r) * G + gi, sbf16) : 0.f;
      for (int m = 0; m < MC; m++) out[m][r] += s * part[m][r] + (zero ? z * xs[(m0 + m) * G + gi] : 0.f);
    }
  }
  for (int m = 0; m < MC; m++) for (int r = 0; r < R; r++) y[(m0 + m) * N + r0 + r] = out[m][r];
}

static void int8_block(const float* x, const float* xp, const int8_t* codes, const void* scale, const void* zero,
                       int sbf16, const float* xs, float* y, long M, long N, long K, long g, long r0) {
  if (N - r0 >= INT8_R) {
    long m0 = 0;
    for (; m0 + 2 <= M; m0 += 2) {  /* two activation rows x four weight rows, twice: rows stay in L1 */
      int8_rows(x, xp, codes, scale, zero, sbf16, xs, y, M, N, K, g, r0, m0, 4, 2);
      int8_rows(x, xp, codes, scale, zero, sbf16, xs, y, M, N, K, g, r0 + 4, m0, 4, 2);
    }
    if (m0 < M) int8_rows(x, xp, codes, scale, zero, sbf16, xs, y, M, N, K, g, r0, m0, INT8_R, 1);
  } else {
    for (long r = r0; r < N; r++)
      for (long m0 = 0; m0 < M; m0++) int8_rows(x, xp, codes, scale, zero, sbf16, xs, y, M, N, K, g, r, m0, 1, 1);
  }
}

/* y (M, N) = x (M, K) @ (codes * scale + zero)^T, per group of g inputs; zero may be NULL. */
void int8_gemv(const float* x, const int8_t* codes, const void* scale, const void* zero, int sbf16, float* y,
               long M, long N, long K, long g, int nthreads) {
  const long G = K / g;
  float xs_stack[1024];
  float* xs = NULL;
  if (zero) {
    xs = M * G <= 1024 ? xs_stack : (float*)malloc(sizeof(float) * M * G);
    group_sums(x, M, K, g, xs);
  }
  float xp_stack[4096];
  float* xp = NULL;  /* x with each 32 inputs permuted to (j, i) -> k + 4 i + j, for the shift-decoding loop */
#ifdef __AVX2__
  if (g % 32 == 0) {
    xp = M * K <= 4096 ? xp_stack : (float*)malloc(sizeof(float) * M * K);
    for (long m = 0; m < M; m++)
      for (long k = 0; k < K; k += 32)
        for (int j = 0; j < 4; j++)
          for (int i = 0; i < 8; i++) xp[m * K + k + 8 * j + i] = x[m * K + k + 4 * i + j];
  }
#endif
  const long nblk = (N + INT8_R - 1) / INT8_R;
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (long b = 0; b < nblk; b++) int8_block(x, xp, codes, scale, zero, sbf16, xs, y, M, N, K, g, b * INT8_R);
  if (xs && xs != xs_stack) free(xs);
  if (xp && xp != xp_stack) free(xp);
}

/* ---- int4: packed (Np, K/2), blocks of 32 rows; sz: (Np/32, G, 2, 32) scale then zero, per block and group ----
   One block of 32 rows against activation rows [m0, m0 + MC). U = inputs per iteration, each with its own four
   accumulators per activation row (U = 2 for one row: eight independent FMA chains). */
static inline __attribute__((always_inline)) void int4_rows(
    const float* restrict x, const uint8_t* restrict blk, const void* sz, int sbf16, const float* xs,
    float* restrict y, long M, long N, long K, long g, long b, long m0, const int MC, const int U) {
  const long G = K / g;
  float out[2][32];  /* fixed sizes (MC <= 2, U <= 2): a VLA would live on the stack */
  for (int m = 0; m < MC; m++) for (int j = 0; j < 32; j++) out[m][j] = 0.f;
  for (long gi = 0; gi < G; gi++) {
    const long k0 = gi * g;
    float part[2][32];
#ifdef __AVX2__
    __m256 acc[2][2][4];
    for (int u = 0; u < U; u++)
      for (int m = 0; m < MC; m++) for (int j = 0; j < 4; j++) acc[u][m][j] = _mm256_setzero_ps();
    const __m256i mask = _mm256_set1_epi32(0x0F);
    for (long k = k0; k < k0 + g; k += U) {  /* g is even, so U = 2 never crosses a group */
      __builtin_prefetch(blk + 16 * k + 1024);
      for (int u = 0; u < U; u++) {
        /* bytes 0-7 and 8-15 widened to 32-bit lanes (two shuffles), then the nibbles split with shifts and masks */
        const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 16 * (k + u))));
        const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(blk + 16 * (k + u) + 8)));
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v0, mask));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(v1, mask));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
        for (int m = 0; m < MC; m++) {
          const __m256 xb = _mm256_broadcast_ss(x + (m0 + m) * K + k + u);
          acc[u][m][0] = _mm256_fmadd_ps(w0, xb, acc[u][m][0]);
          acc[u][m][1] = _mm256_fmadd_ps(w1, xb, acc[u][m][1]);
          acc[u][m][2] = _mm256_fmadd_ps(w2, xb, acc[u][m][2]);
          acc[u][m][3] = _mm256_fmadd_ps(w3, xb, acc[u][m][3]);
        }
      }
    }
    for (int m = 0; m < MC; m++)
      for (int j = 0; j < 4; j++) {
        __m256 a = acc[0][m][j];
        if (U == 2) a = _mm256_add_ps(a, acc[1][m][j]);
        _mm256_storeu_ps(part[m] + 8 * j, a);
      }
#else
    for (int m = 0; m < MC; m++) for (int j = 0; j < 32; j++) part[m][j] = 0.f;
    for (long k = k0; k < k0 + g; k++) {
      const uint8_t* p = blk + 16 * k;
      for (int m = 0; m < MC; m++) {
        const float xv = x[(m0 + m) * K + k];
        for (int j = 0; j < 16; j++) {
          part[m][j] += (float)(p[j] & 15) * xv;
          part[m][16 + j] += (float)(p[j] >> 4) * xv;
        }
      }
    }
#endif
    const long off = (b * G + gi) * 64;  /* 2 x 32 entries per block and group */
    for (int j = 0; j < 32; j++) {
      const float s = load_s(sz, off + j, sbf16), c = load_s(sz, off + 32 + j, sbf16) - 8.f * s;
      for (int m = 0; m < MC; m++) out[m][j] += s * part[m][j] + c * xs[(m0 + m) * G + gi];
    }
  }
  const long nr = N - 32 * b < 32 ? N - 32 * b : 32;
  for (int m = 0; m < MC; m++) memcpy(y + (m0 + m) * N + 32 * b, out[m], sizeof(float) * nr);
}

static void int4_block(const float* x, const uint8_t* packed, const void* sz, int sbf16, const float* xs, float* y,
                       long M, long N, long K, long g, long b) {
  const uint8_t* blk = packed + b * 16 * K;
  long m0 = 0;  /* pairs of activation rows (more would spill the accumulators); the block stays in L1 */
  for (; m0 + 2 <= M; m0 += 2) int4_rows(x, blk, sz, sbf16, xs, y, M, N, K, g, b, m0, 2, 1);
  if (m0 < M) int4_rows(x, blk, sz, sbf16, xs, y, M, N, K, g, b, m0, 1, 2);
}

void int4_gemv(const float* x, const uint8_t* packed, const void* sz, int sbf16, float* y,
               long M, long N, long K, long g, int nthreads) {
  const long G = K / g;
  float xs_stack[1024];
  float* xs = M * G <= 1024 ? xs_stack : (float*)malloc(sizeof(float) * M * G);
  group_sums(x, M, K, g, xs);
  const long nblk = (N + 31) / 32;
  #pragma omp parallel for num_threads(nthreads) schedule(static) if(nthreads > 1)
  for (long b = 0; b < nblk; b++) int4_block(x, packed, sz, sbf16, xs, y, M, N, K, g, b);
  if (xs != xs_stack) free(xs);
}

/* One entry for a prepared weight (`IntGemvPlan`): fewer ctypes arguments per call on the decode path. */
typedef struct { long bits; const void* codes; const void* scale; const void* zero; long sbf16, N, K, g; } plan_t;
void int_gemv_plan(const plan_t* p, const float* x, float* y, long M, int nthreads) {
  if (p->bits == 8)
    int8_gemv(x, (const int8_t*)p->codes, p->scale, p->zero, (int)p->sbf16, y, M, p->N, p->K, p->g, nthreads);
  else int4_gemv(x, (const uint8_t*)p->codes, p->scale, (int)p->sbf16, y, M, p->N, p->K, p->g, nthreads);
}
"""

_FALLBACK = "kernel='dequant' (or the torch int8/int4 kernels), which need no compiler"


@functools.cache
def _lib(isa: str = "native") -> ctypes.CDLL:
    """The kernels built for this CPU ("native": AVX2 + FMA where the CPU has them), or "scalar": the plain-loop
    fallback that a CPU without AVX2 gets (built here too, so the tests cover it)."""
    if isa not in ("native", "scalar"):
        raise ValueError(f"isa must be 'native' or 'scalar', got {isa!r}")
    source = _C_SOURCE if isa == "native" else "#undef __AVX2__\n" + _C_SOURCE
    lib = build_c_library(f"int_gemv_{isa}", source, openmp=True, fallback=_FALLBACK)
    vp, lg, i = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.int8_gemv.restype = lib.int4_gemv.restype = None
    lib.int8_gemv.argtypes = [vp, vp, vp, vp, i, vp, lg, lg, lg, lg, i]
    lib.int4_gemv.argtypes = [vp, vp, vp, i, vp, lg, lg, lg, lg, i]
    lib.int_gemv_isa.restype = i
    lib.int_gemv_plan.restype = None
    lib.int_gemv_plan.argtypes = [vp, vp, vp, lg, i]
    return lib


@functools.cache
def int_gemv_available() -> bool:
    """True when the C kernels build (a C compiler is on PATH); callers otherwise keep their torch path."""
    return builds(_lib)


def kernel_isa(isa: str = "native") -> str:
    """"avx2" when the kernels were compiled with AVX2 + FMA, "scalar" for the plain-loop fallback."""
    return "avx2" if _lib(isa).int_gemv_isa() == 2 else "scalar"


def _scale_flag(scale: torch.Tensor) -> int:
    if scale.dtype == torch.bfloat16:
        return 1
    if scale.dtype == torch.float32:
        return 0
    raise TypeError(f"int gemv scales must be float32 or bfloat16, got {scale.dtype}; convert them with .float()")


def _check_x(x: torch.Tensor, K: int, name: str) -> torch.Tensor:
    if x.dim() != 2 or x.size(1) != K:
        raise ValueError(f"{name} takes x of shape (M, {K}), got {tuple(x.shape)}; reshape it to (-1, {K})")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"{name} takes fp32 CPU activations, got {x.dtype} on {x.device}; use the dequant path")
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError(f"{name} has no backward; call it under torch.no_grad() or use the dequant path")
    return x.contiguous()


def _threads(threads: int | None) -> int:
    return torch.get_num_threads() if threads is None else max(1, int(threads))


def int8_gemv(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
              group_size: int | None = None, *, threads: int | None = None, isa: str = "native") -> torch.Tensor:
    """(M, N) fp32 = x (M, K) fp32 @ (codes * scale + zero)^T, codes int8 (N, K), scale/zero (N, K // group_size)."""
    N, K = codes.shape
    g = K if group_size is None else group_size
    if (codes.dtype != torch.int8 or K % g or scale.shape != (N, K // g)
            or (zero is not None and zero.shape != scale.shape)):
        raise ValueError(f"int8_gemv takes int8 codes (N, K) and scales (N, K // group_size); got codes "
                         f"{codes.dtype} {tuple(codes.shape)}, scale {tuple(scale.shape)}, group_size {group_size}")
    x = _check_x(x, K, "int8_gemv")
    flag = _scale_flag(scale)
    if zero is not None and zero.dtype != scale.dtype:
        zero = zero.to(scale.dtype)
    codes, scale = codes.contiguous(), scale.contiguous()
    zero = None if zero is None else zero.contiguous()
    y = torch.empty(x.size(0), N, dtype=torch.float32)
    _lib(isa).int8_gemv(x.data_ptr(), codes.data_ptr(), scale.data_ptr(), None if zero is None else zero.data_ptr(),
                     flag, y.data_ptr(), x.size(0), N, K, g, _threads(threads))
    return y


def int4_kernel_scales(scale: torch.Tensor, zero: torch.Tensor | None, padded_rows: int) -> torch.Tensor:
    """The (blocks, groups, 2, 32) copy of per-group scales and zeros (N, G) that `int4_gemv` reads: for each
    block of 32 rows and each group, the 32 scales then the 32 zeros, in the scales' dtype (a missing zero,
    symmetric codes, is 0; padding rows get 0). Build it once per weight and keep it."""
    N, G = scale.shape
    z = torch.zeros_like(scale) if zero is None else zero.to(scale.dtype)
    sz = torch.stack((scale, z), dim=0)  # (2, N, G)
    if padded_rows > N:
        sz = torch.nn.functional.pad(sz, (0, 0, 0, padded_rows - N))
    return sz.view(2, padded_rows // 32, 32, G).permute(1, 3, 0, 2).contiguous()


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, kernel_scales: torch.Tensor, shape: tuple[int, int],
              group_size: int, *, threads: int | None = None, isa: str = "native") -> torch.Tensor:
    """(M, N) fp32 = x (M, K) fp32 @ W^T for W = `code * scale + zero` stored as `pack_int4` codes (Np, K // 2)
    and `int4_kernel_scales(scale, zero, Np)`; shape = (N, K)."""
    N, K = shape
    Np = packed.shape[0]
    G = K // group_size if group_size > 0 else 0
    if (packed.dtype != torch.uint8 or packed.shape != (Np, K // 2) or Np % 32 or Np < N or G == 0
            or K % group_size or kernel_scales.shape != (Np // 32, G, 2, 32)):
        raise ValueError(f"int4_gemv takes packed uint8 codes (Np, K // 2) with Np a multiple of 32 and kernel scales "
                         f"(Np // 32, K // group_size, 2, 32) from int4_kernel_scales; got {packed.dtype} "
                         f"{tuple(packed.shape)}, scales {tuple(kernel_scales.shape)}, shape {shape}, "
                         f"group_size {group_size}")
    x = _check_x(x, K, "int4_gemv")
    flag = _scale_flag(kernel_scales)
    packed, kernel_scales = packed.contiguous(), kernel_scales.contiguous()
    y = torch.empty(x.size(0), N, dtype=torch.float32)
    _lib(isa).int4_gemv(x.data_ptr(), packed.data_ptr(), kernel_scales.data_ptr(), flag, y.data_ptr(),
                     x.size(0), N, K, group_size, _threads(threads))
    return y


class _Plan(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_long), ("codes", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("zero", ctypes.c_void_p), ("sbf16", ctypes.c_long), ("N", ctypes.c_long), ("K", ctypes.c_long),
                ("g", ctypes.c_long)]


class IntGemvPlan:
    """A weight prepared for repeated decode calls: `plan(x)` is `int8_gemv` / `int4_gemv` of that weight with the
    argument checks done once (the per-call cost of a ctypes call grows with its arguments, and a decode step
    makes ~200 of them). Holds references to the tensors it points to; rebuild it when they change.

    int8: `IntGemvPlan(8, codes, scale, zero, (N, K), g)`; int4: `IntGemvPlan(4, packed, kernel_scales, None,
    (N, K), g)` with `kernel_scales = int4_kernel_scales(scale, zero, packed.shape[0])`."""

    def __init__(self, bits: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 shape: tuple[int, int], group_size: int) -> None:
        N, K = shape
        if bits == 8:
            if codes.dtype != torch.int8 or tuple(codes.shape) != (N, K) or scale.shape != (N, K // group_size):
                raise ValueError(f"int8 plan takes codes (N, K) int8 and scales (N, K // g); got {tuple(codes.shape)}, "
                                 f"{tuple(scale.shape)}")
            if zero is not None and zero.dtype != scale.dtype:
                zero = zero.to(scale.dtype)
        elif bits == 4:
            Np = codes.shape[0]
            if codes.dtype != torch.uint8 or codes.shape != (Np, K // 2) or Np % 32 or Np < N or \
                    scale.shape != (Np // 32, K // group_size, 2, 32) or zero is not None:
                raise ValueError(f"int4 plan takes packed codes (Np, K // 2) and int4_kernel_scales "
                                 f"(Np // 32, G, 2, 32) with zero=None; got {tuple(codes.shape)}, {tuple(scale.shape)}")
        else:
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        if K % group_size:
            raise ValueError(f"group_size {group_size} does not divide K={K}")
        self._args = (bits, codes, scale, zero, (N, K), group_size)  # for copy / pickle: rebuilt, never the pointers
        self.tensors = [t.contiguous() for t in (codes, scale) + ((zero,) if zero is not None else ())]
        zp = self.tensors[2].data_ptr() if zero is not None else None
        self.N, self.K = N, K
        self._plan = _Plan(bits, self.tensors[0].data_ptr(), self.tensors[1].data_ptr(), zp, _scale_flag(scale),
                           N, K, group_size)
        self._ref = ctypes.byref(self._plan)
        self._fn = _lib().int_gemv_plan
        self.c_call = (ctypes.cast(self._fn, ctypes.c_void_p).value, ctypes.addressof(self._plan))
        """(address of the C function, address of its plan): `llmopt.kernels.dense_gemv.StackDecodePlan` calls it."""

    def __reduce__(self):
        return IntGemvPlan, self._args

    def __call__(self, x2d: torch.Tensor, threads: int) -> torch.Tensor:
        """x2d: contiguous fp32 CPU (M, K), no autograd (the caller checks; nothing is checked here)."""
        return self.run(x2d, (x2d.shape[0], self.N), x2d.shape[0], threads)

    def run(self, x: torch.Tensor, out_shape: tuple[int, ...], M: int, threads: int) -> torch.Tensor:
        """The decode fast path: x contiguous fp32 CPU holding M rows of K (any leading shape), the output
        (M * N values) allocated as `out_shape`; nothing is checked here (a reshape costs as much as the call)."""
        y = torch.empty(out_shape)
        self._fn(self._ref, x.data_ptr(), y.data_ptr(), M, threads)
        return y
