"""The 8-bit AdamW step as one fused CPU kernel (C through ctypes), for `llmopt.optim.AdamW8bit`.

The state format is the optimizer's (Dettmers et al. 2022, arXiv 2110.02861): each moment is uint8 codes
of a sorted 256-entry codebook, one fp32 absmax per block of `block_size` elements, the codes padded to
whole blocks. The torch path of `AdamW8bit._step_8bit` makes ~20 eager passes over every chunk (decode
gathers, the update, block maxima, scalings, fp16 casts, table lookups). Here each block is one pass in
L1: decode both moments and form m' = m / (1 - b1), v' = v / (1 - b2) from the gradient, update the fp32
parameter in place, take the block max |m'| and max v', then re-encode both (scale by 2**14 / max, round
to fp16, look the fp16 bit pattern up in the 65,536-entry nearest-code table) and store max * (1 - b).
OpenMP splits the blocks over `threads` (default `torch.get_num_threads()`; the build links the libgomp
torch has loaded, so there is one pool).

Numerics contract: every operation is the torch path's, in its order and fp32 rounding: the same fused
multiply-adds as torch's `addcmul` kernels (x86-64 builds of torch contract `a + b * c` into an FMA; the
source pins `fp-contract=off` and writes each FMA as `fmaf`), the same division (no reciprocal), the same
fp16 rounding (round to nearest even; a bit-exact software conversion where the CPU lacks F16C) and the
lookup tables and codebooks the caller passes in. So codes and block maxima equal the torch path's bit
for bit on finite values (tested over several steps and odd sizes, and the software fp16 conversion
against torch's on a million bit patterns). The parameters differ by the square root alone: the kernel's
`sqrtf` is IEEE-exact, torch's CPU `sqrt` (MKL vector math) is one ulp off in about a fifth of the
elements, so an updated parameter is within a few ulp of the torch path's. `-ffast-math` is switched off
for this source by a GCC pragma (reassociation, reciprocals and finite-only assumptions would change the
rounding; clang ignores the pragma, and the tests would show any drift). NaN and inf are not matched
element for element (the block max skips NaN where torch's `amax` keeps it).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from llmopt.kernels._cbuild import build_c_library, builds, ptr

__all__ = ["adamw8bit_kernel_available", "adamw8bit_step_cpu", "fp16_bits_soft", "kernel_applies",
           "require_adamw8bit_kernel"]

_C_SOURCE = r"""
#pragma GCC optimize ("no-fast-math", "fp-contract=off", "no-math-errno")
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* fp32 -> fp16 bit pattern, round to nearest even (what torch's .to(torch.float16) does), in integer code. */
static inline uint16_t half_bits_soft(float f) {
  uint32_t x; memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          /* rounds past 65504: inf */
  if (a < 0x38800000u) {                                            /* fp16 subnormal or zero */
    if (a < 0x33000000u) return (uint16_t)sign;                     /* below half the smallest: 0 */
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;                                 /* 14..24 */
    uint32_t h = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1u))) h++;
    return (uint16_t)(sign | h);
  }
  a += 0xc8000fffu + ((a >> 13) & 1u);                              /* rebias and round to nearest even */
  return (uint16_t)(sign | (a >> 13));
}

static inline uint16_t half_bits(float f) {
#if defined(__F16C__)
  return (uint16_t)_cvtss_sh(f, 0);
#else
  return half_bits_soft(f);
#endif
}

/* The software conversion on its own, for the test that checks it against torch on CPUs with F16C. */
void fp16_bits_soft(const float* x, uint16_t* out, long n) {
  for (long i = 0; i < n; i++) out[i] = half_bits_soft(x[i]);
}

/* One block: decode, update the parameter, re-encode. n = valid elements (< bs only in the last block);
   gz: bs floats holding the gradient zero-padded (only read when n < bs). bm, bv: bs floats scratch. */
static void step_block(float* restrict p, const float* restrict g, uint8_t* restrict cm, float* restrict am,
                       uint8_t* restrict cv, float* restrict av, const float* restrict code_m,
                       const float* restrict code_v, const uint8_t* restrict lut_m, const uint8_t* restrict lut_v,
                       long n, long bs, float r1, float r2, float omb1, float omb2, float decay, float step_size,
                       float eps_hat, float* restrict bm, float* restrict bv, float* restrict gz) {
  if (n < bs) {
    memcpy(gz, g, (size_t)n * sizeof(float));
    memset(gz + n, 0, (size_t)(bs - n) * sizeof(float));
    g = gz;
  }
  const float sm = *am * r1, sv = *av * r2;   /* the block scales of m' and v' */
  float max_m = 0.0f, min_m = 0.0f, max_v = 0.0f;
  long i0 = 0;
#if defined(__AVX2__) && defined(__FMA__)
  {
    const __m256 vsm = _mm256_set1_ps(sm), vsv = _mm256_set1_ps(sv);
    __m256 hi_m = _mm256_setzero_ps(), lo_m = _mm256_setzero_ps(), hi_v = _mm256_setzero_ps();
    for (; i0 + 8 <= bs; i0 += 8) {
      const __m256 gi = _mm256_loadu_ps(g + i0);
      const __m256i im = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(cm + i0)));
      const __m256i iv = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(cv + i0)));
      const __m256 m = _mm256_fmadd_ps(_mm256_i32gather_ps(code_m, im, 4), vsm, gi);
      const __m256 v = _mm256_fmadd_ps(gi, gi, _mm256_mul_ps(_mm256_i32gather_ps(code_v, iv, 4), vsv));
      _mm256_storeu_ps(bm + i0, m);
      _mm256_storeu_ps(bv + i0, v);
      hi_m = _mm256_max_ps(hi_m, m);
      lo_m = _mm256_min_ps(lo_m, m);
      hi_v = _mm256_max_ps(hi_v, v);
    }
    float t[8];
    _mm256_storeu_ps(t, hi_m); for (int k = 0; k < 8; k++) max_m = t[k] > max_m ? t[k] : max_m;
    _mm256_storeu_ps(t, lo_m); for (int k = 0; k < 8; k++) min_m = t[k] < min_m ? t[k] : min_m;
    _mm256_storeu_ps(t, hi_v); for (int k = 0; k < 8; k++) max_v = t[k] > max_v ? t[k] : max_v;
  }
#endif
  for (long i = i0; i < bs; i++) {
    const float gi = g[i];
    const float m = fmaf(code_m[cm[i]], sm, gi);          /* torch.addcmul(g, c_m, s_m): g + c_m * s_m, one FMA */
    const float v = fmaf(gi, gi, code_v[cv[i]] * sv);     /* (c_v * s_v).addcmul_(g, g) */
    bm[i] = m; bv[i] = v;
    max_m = m > max_m ? m : max_m;
    min_m = m < min_m ? m : min_m;
    max_v = v > max_v ? v : max_v;
  }
  for (long i = 0; i < n; i++) {
    const float denom = sqrtf(bv[i]) + eps_hat;
    const float q = p[i] * decay;
    p[i] = q + step_size * bm[i] / denom;                  /* p.mul_(decay).addcdiv_(m', denom, value=step_size) */
  }
  const float amax_m = max_m > -min_m ? max_m : -min_m;
  const float inv_m = 16384.0f / (amax_m > 0x1p-100f ? amax_m : 0x1p-100f);
  const float inv_v = 16384.0f / (max_v > 0x1p-100f ? max_v : 0x1p-100f);
  long i = 0;
#if defined(__F16C__) && defined(__AVX2__)
  const __m256 vim = _mm256_set1_ps(inv_m), viv = _mm256_set1_ps(inv_v);
  for (; i + 8 <= bs; i += 8) {
    uint16_t hm[8], hv[8];
    _mm_storeu_si128((__m128i*)hm, _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(bm + i), vim), 0));
    _mm_storeu_si128((__m128i*)hv, _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(bv + i), viv), 0));
    for (int k = 0; k < 8; k++) { cm[i + k] = lut_m[hm[k]]; cv[i + k] = lut_v[hv[k]]; }
  }
#endif
  for (; i < bs; i++) {
    cm[i] = lut_m[half_bits(bm[i] * inv_m)];
    cv[i] = lut_v[half_bits(bv[i] * inv_v)];
  }
  *am = amax_m * omb1;
  *av = max_v * omb2;
}

int adamw8bit_step(float* p, const float* g, uint8_t* cm, float* am, uint8_t* cv, float* av,
                   const float* code_m, const float* code_v, const uint8_t* lut_m, const uint8_t* lut_v,
                   long numel, long bs, float r1, float r2, float omb1, float omb2, float decay, float step_size,
                   float eps_hat, int threads) {
  const long nblocks = (numel + bs - 1) / bs;
  int failed = 0;
  #pragma omp parallel num_threads(threads) if (threads > 1 && nblocks >= 64) reduction(|:failed)
  {
    float* scratch = (float*)malloc((size_t)(3 * bs) * sizeof(float));
    if (scratch == NULL) {
      failed = 1;
    } else {
      #pragma omp for schedule(static)
      for (long b = 0; b < nblocks; b++) {
        const long s = b * bs, n = numel - s < bs ? numel - s : bs;
        step_block(p + s, g + s, cm + s, am + b, cv + s, av + b, code_m, code_v, lut_m, lut_v, n, bs, r1, r2,
                   omb1, omb2, decay, step_size, eps_hat, scratch, scratch + bs, scratch + 2 * bs);
      }
      free(scratch);
    }
  }
  return failed;
}
"""


@functools.cache
def _library() -> ctypes.CDLL:
    lib = build_c_library("adam8bit", _C_SOURCE, openmp=True,
                          fallback="AdamW8bit(..., backend='torch') (the eager torch path)")
    f = lib.adamw8bit_step
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_long] * 2 + [ctypes.c_float] * 7 + [ctypes.c_int]
    lib.fp16_bits_soft.restype = None
    lib.fp16_bits_soft.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
    return lib


def fp16_bits_soft(x: torch.Tensor) -> torch.Tensor:
    """int16 bit patterns of fp32 `x` rounded to fp16 by the kernel's integer fallback (used where the CPU has
    no F16C); equal to `x.half().view(torch.int16)` (tested)."""
    x = x.detach().float().contiguous().cpu()
    out = torch.empty(x.shape, dtype=torch.int16)
    _library().fp16_bits_soft(ptr(x), ptr(out), x.numel())
    return out


@functools.cache
def adamw8bit_kernel_available() -> bool:
    """Whether the C kernel builds here (a C compiler on PATH or in $CC); built once, cached."""
    return builds(_library)


def require_adamw8bit_kernel() -> None:
    """Build the kernel now; raise the build's ImportError (what to install, what to use instead) if it fails."""
    _library()


def kernel_applies(p: torch.Tensor) -> bool:
    """Whether the kernel can step this parameter: a contiguous fp32 CPU tensor with an fp32 gradient."""
    return (p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() and p.grad is not None
            and p.grad.dtype == torch.float32)


def adamw8bit_step_cpu(p: torch.Tensor, grad: torch.Tensor, m_codes: torch.Tensor, m_absmax: torch.Tensor,
                       v_codes: torch.Tensor, v_absmax: torch.Tensor, *, m_code: torch.Tensor,
                       v_code: torch.Tensor, m_lut: torch.Tensor, v_lut: torch.Tensor, block_size: int,
                       beta1: float, beta2: float, decay: float, step_size: float, eps_hat: float,
                       threads: int | None = None) -> None:
    """One 8-bit AdamW step of `p` in place, its moments' codes and block maxima updated in place.

    m_codes / v_codes: uint8, numel of p padded to whole blocks; m_absmax / v_absmax: fp32, one per block
    (the stored maxima of m and v). m_code / v_code: the sorted fp32 codebooks (256); m_lut / v_lut: uint8
    tables of 65,536 entries, the nearest code of each fp16 bit pattern of x * 2**14 / max. The update is
    p <- p * decay + step_size * m' / (sqrt(v') + eps_hat) with m' = m / (1 - beta1), v' = v / (1 - beta2)
    (AdamW's constants folded as in `AdamW8bit._step_8bit`).
    """
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (p, grad)) or not p.is_contiguous() \
            or grad.shape != p.shape:
        raise ValueError("adamw8bit_step_cpu needs a contiguous fp32 CPU parameter with an fp32 gradient of its "
                         "shape; use AdamW8bit(..., backend='torch') for other tensors")
    n, bs = p.numel(), int(block_size)
    nb = -(-n // bs)
    for name, t, dtype, size in (("m_codes", m_codes, torch.uint8, nb * bs), ("v_codes", v_codes, torch.uint8, nb * bs),
                                 ("m_absmax", m_absmax, torch.float32, nb), ("v_absmax", v_absmax, torch.float32, nb),
                                 ("m_code", m_code, torch.float32, 256), ("v_code", v_code, torch.float32, 256),
                                 ("m_lut", m_lut, torch.uint8, 1 << 16), ("v_lut", v_lut, torch.uint8, 1 << 16)):
        if t.dtype != dtype or t.numel() != size or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"adamw8bit_step_cpu: {name} must be a contiguous {dtype} CPU tensor of {size} "
                             f"elements, got {t.dtype} {tuple(t.shape)} on {t.device}")
    grad = grad.contiguous()
    failed = _library().adamw8bit_step(
        ptr(p), ptr(grad), ptr(m_codes), ptr(m_absmax), ptr(v_codes), ptr(v_absmax), ptr(m_code), ptr(v_code),
        ptr(m_lut), ptr(v_lut), n, bs, beta1 / (1 - beta1), beta2 / (1 - beta2), 1 - beta1, 1 - beta2, decay,
        step_size, eps_hat, torch.get_num_threads() if threads is None else int(threads))
    if failed:
        raise MemoryError(f"adamw8bit_step_cpu could not allocate {3 * bs * 4} bytes of scratch per thread")
