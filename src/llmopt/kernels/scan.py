"""Mamba's selective scan as fused kernels (forward, for prefill and inference), beside the torch paths in
`llmopt.models.mamba` (`scan_sequential` is the reference, `scan_chunked` the torch autograd path):
a Triton kernel for GPUs (`selective_scan_triton`) and a C kernel for CPUs (`selective_scan_cpu`), plus the
fused C decode step (`mamba_decode_step_cpu`, the default decode step of fp32 CPU Mamba models). The CPU scan
with a backward (the default training / prefill scan on fp32 CPU) is `llmopt.kernels.scan_backward`.

The CPU kernels are C built at first use with the system C compiler (`llmopt.kernels._cbuild`: `cc -O3
-march=native -ffast-math`, so `expf` vectorizes through glibc's libmvec) and called through `ctypes`.
`selective_scan_cpu` is the forward pass of `llmopt.kernels.scan_backward` without its checkpoints: it walks
the sequence once with the transposed state (d_state, d_inner) in L1, the innermost loop along d_inner, so
each step is one vectorized pass instead of eight dispatched torch ops; it has no backward
(`selective_scan_cpu_autograd` is the same pass with one). This file's own C holds the decode steps.

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

from llmopt.kernels._cbuild import build_c_library, builds, ptr

__all__ = ["decode_step_available", "mamba_block_step_cpu", "mamba_decode_step_cpu",
           "selective_scan_cpu", "selective_scan_triton", "use_fused_scan_", "use_triton_scan_"]


def _refuse_autograd(name: str, *tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(f"{name} has no backward; train with scan='auto' (the default: on CPU the C scan with a "
                         "backward, llmopt.kernels.scan_backward) or 'chunked', or call it under torch.no_grad()")


# ---- CPU: a C kernel through ctypes -------------------------------------------------------------------
_C_SOURCE = r"""
#include <math.h>

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

/* out[b, j] = bias[j] + W[j, :] . in[b, :] for B rows (strides si, so); W (O, I) read once for all rows. */
static void matvec(const float* restrict W, const float* restrict bias, const float* restrict in, long si,
                   float* restrict out, long so, long Bsz, long O, long I) {
  for (long j = 0; j < O; j++) {
    const float* restrict wj = W + j * I;
    for (long b = 0; b < Bsz; b++) {
      const float* restrict v = in + b * si;
      float acc = 0.f;
      for (long i = 0; i < I; i++) acc += wj[i] * v[i];
      out[b * so + j] = acc + (bias ? bias[j] : 0.f);
    }
  }
}

/* One whole Mamba block for one decode step: out = x + out_proj(mixer(rmsnorm(x))), B rows of width dim.
   Weights as in torch (Linear (out, in) row-major); conv state (B, D, K-1) and SSM state (B, D, N) in place.
   scratch: B * (dim + 2 D + D + R + 2 N + D + D) floats. */
void mamba_block_step(const float* restrict x, float* restrict out, const float* restrict norm_w, float eps,
                      const float* in_w, const float* in_b, float* conv, const float* conv_w, const float* conv_b,
                      const float* xproj_w, const float* dt_w, const float* dt_b, const float* A_log,
                      const float* Dskip, float* h, const float* out_w, const float* out_b, float* scratch,
                      long Bsz, long dim, long D, long N, long K, long R) {
  const long E = R + 2 * N;
  float* u = scratch;                  /* (B, dim) normalized input */
  float* xz = u + Bsz * dim;           /* (B, 2D) */
  float* xc = xz + Bsz * 2 * D;        /* (B, D) conv + SiLU */
  float* xdbl = xc + Bsz * D;          /* (B, E) dt_in, B, C */
  float* dtl = xdbl + Bsz * E;         /* (B, D) */
  float* y = dtl + Bsz * D;            /* (B, D) */
  for (long b = 0; b < Bsz; b++) {
    const float* xb = x + b * dim;
    float ss = 0.f;
    for (long i = 0; i < dim; i++) ss += xb[i] * xb[i];
    const float r = 1.f / sqrtf(ss / (float)dim + eps);
    for (long i = 0; i < dim; i++) u[b * dim + i] = norm_w[i] * (xb[i] * r);
  }
  matvec(in_w, in_b, u, dim, xz, 2 * D, Bsz, 2 * D, dim);
  mamba_conv_step(xz, 2 * D, conv, conv_w, conv_b, xc, Bsz, D, K);
  matvec(xproj_w, 0, xc, D, xdbl, E, Bsz, E, D);
  matvec(dt_w, dt_b, xdbl, E, dtl, D, Bsz, D, R);
  mamba_ssm_step(dtl, D, A_log, xdbl + R, xdbl + R + N, E, xc, xz + D, 2 * D, Dskip, h, y, Bsz, D, N);
  matvec(out_w, out_b, y, D, out, dim, Bsz, dim, D);
  for (long b = 0; b < Bsz; b++)
    for (long i = 0; i < dim; i++) out[b * dim + i] += x[b * dim + i];
}
"""


@functools.cache
def _c_library():
    handle = build_c_library("selective_scan", _C_SOURCE, fallback="scan='chunked'")
    vp, lg = ctypes.c_void_p, ctypes.c_long
    handle.mamba_conv_step.restype = None
    handle.mamba_conv_step.argtypes = [vp, lg, vp, vp, vp, vp, lg, lg, lg]
    handle.mamba_ssm_step.restype = None
    handle.mamba_ssm_step.argtypes = [vp, lg, vp, vp, vp, lg, vp, vp, lg, vp, vp, vp, lg, lg, lg]
    handle.mamba_block_step.restype = None
    handle.mamba_block_step.argtypes = [vp, vp, vp, ctypes.c_float] + [vp] * 14 + [lg] * 6
    return handle


@functools.cache
def decode_step_available() -> bool:
    """Whether the C kernels of this file build here; False (no error) without a compiler."""
    return builds(_c_library)


def selective_scan_cpu(x, dt, A, Bm, Cm, h0=None):
    """Same contract as `llmopt.models.mamba.scan_sequential` (fp32, CPU tensors, no autograd)."""
    _refuse_autograd("selective_scan_cpu", x, dt, A, Bm, Cm, h0)
    if x.device.type != "cpu":
        raise ValueError(f"selective_scan_cpu runs on CPU tensors, got {x.device}; use selective_scan_triton on a GPU")
    from llmopt.kernels.scan_backward import _forward  # the same fused C pass, without checkpoints

    x, dt, Bm, Cm = (t.float().contiguous() for t in (x, dt, Bm, Cm))
    At = A.float().t().contiguous()  # (N, D)
    y, h, _ = _forward(x, dt, At, Bm, Cm, None if h0 is None else h0.float(), 1, keep=False)
    return y, h.transpose(1, 2).contiguous()


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
    lib.mamba_conv_step(ptr(xz), xz.stride(0), ptr(cache.conv[i]), ptr(mixer.conv1d.weight),
                        ptr(bias), ptr(xc), Bsz, D, K)
    xdbl = mixer.x_proj(xc)  # (B, dt_rank + 2 N)
    dt_lin = mixer.dt_proj(xdbl[:, :mixer.dt_rank])  # (B, D), before softplus
    Bm, Cm = xdbl[:, mixer.dt_rank:mixer.dt_rank + N], xdbl[:, mixer.dt_rank + N:]
    y = xz.new_empty(Bsz, D)
    lib.mamba_ssm_step(ptr(dt_lin), dt_lin.stride(0), ptr(mixer.A_log), ptr(Bm), ptr(Cm), xdbl.stride(0),
                       ptr(xc), ptr(xz[:, D:]), xz.stride(0), ptr(mixer.D), ptr(cache.ssm[i]), ptr(y), Bsz, D, N)
    return mixer.out_proj(y)[:, None]


def _block_weights(block) -> tuple:
    """The block's tensors in the C kernel's order, read through the modules' dicts (nn.Module.__getattr__ costs
    more than the lookups), or () when a projection is not a plain nn.Linear (LoRA, quantized, ...)."""
    mixer = block._modules["mixer"]
    mods = mixer._modules
    lin = (mods["in_proj"], mods["x_proj"], mods["dt_proj"], mods["out_proj"])
    if any(type(m) is not torch.nn.Linear for m in lin):
        return ()
    inp, xp, dtp, outp = (m._parameters for m in lin)
    conv = mods["conv1d"]._parameters
    return (block._modules["norm"]._parameters["weight"], inp["weight"], inp["bias"], conv["weight"], conv["bias"],
            xp["weight"], dtp["weight"], dtp["bias"], mixer._parameters["A_log"], mixer._parameters["D"],
            outp["weight"], outp["bias"])


def _weights_ok(weights) -> bool:
    return bool(weights) and all(w is None or (w.dtype == torch.float32 and w.device.type == "cpu"
                                               and w.is_contiguous()) for w in weights)


def mamba_block_step_cpu(block, x: torch.Tensor, cache) -> torch.Tensor | None:
    """One decode step of a whole `MambaBlock` (x (B, 1, dim) -> x + mixer(norm(x))) in ONE C call: RMSNorm, the
    four projections as matrix-vector loops, conv + SiLU, softplus + SSM step + skip + gate and the residual add,
    updating the cache's states in place. Returns None (the caller takes the torch path) unless everything is
    fp32 on the CPU, the projections are plain nn.Linear and no gradient is needed (the kernel has no backward).
    The per-call Python work is kept small (a decode step of demo_mamba is ~1 ms): the checks run once per set
    of weight addresses, cached on the block."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or cache.dtype != torch.float32:
        return None
    weights = _block_weights(block)
    addresses = tuple(0 if w is None else w.data_ptr() for w in weights)
    checked = block.__dict__.get("_c_step_checked")
    if checked is None or checked[0] != addresses:
        checked = (addresses, _weights_ok(weights))
        block.__dict__["_c_step_checked"] = checked
    if not checked[1] or (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights
                                                                                if w is not None))):
        return None
    mixer = block._modules["mixer"]
    i, D, N, K, R = mixer.layer_idx, mixer.d_inner, mixer.d_state, mixer.d_conv, mixer.dt_rank
    conv, ssm = cache.conv, cache.ssm
    if not conv[i].is_contiguous():  # the torch path may leave a strided view behind; the kernel needs rows
        conv[i] = conv[i].contiguous()
    if not ssm[i].is_contiguous():
        ssm[i] = ssm[i].contiguous()
    Bsz, dim = x.size(0), x.size(-1)
    x = x.contiguous()
    out = torch.empty_like(x)
    scratch = x.new_empty(Bsz * (dim + 5 * D + R + 2 * N))
    nw, inw, inb, cw, cb, xw, dw, db, al, dsk, ow, ob = addresses
    _c_library().mamba_block_step(x.data_ptr(), out.data_ptr(), nw, block._modules["norm"].eps, inw, inb or None,
                                  conv[i].data_ptr(), cw, cb or None, xw, dw, db, al, dsk, ssm[i].data_ptr(), ow,
                                  ob or None, scratch.data_ptr(), Bsz, dim, D, N, K, R)
    return out


def _is_mamba_mixer(module) -> bool:
    """A `llmopt.models.mamba.MambaMixer`, recognised by its attributes: kernels sit below models and do not
    import them (models/mamba.py imports this module for its CPU paths)."""
    return hasattr(module, "A_log") and hasattr(module, "scan_fn") and hasattr(module, "step_fn")


def use_fused_scan_(model) -> dict:
    """Make every Mamba layer's scan (full sequence and decode step) the fused kernel of its device. On CPU:
    scan="fused", i.e. the C scan with a backward (`llmopt.kernels.scan_backward`) for full sequences and the
    whole-block C decode step (`mamba_block_step_cpu`); that is what the default scan="auto" already picks for
    fp32 CPU models, so this only matters for a model set to "chunked" / "sequential", and it raises the
    compiler's ImportError now instead of falling back. On CUDA: the Triton kernel (inference only, no
    backward). Returns {layer fqn: kernel}."""
    from llmopt.kernels.scan_backward import _library

    changed = {}
    for name, module in model.named_modules():
        if _is_mamba_mixer(module):
            cuda = module.A_log.device.type == "cuda"
            if cuda:
                module.scan_fn = selective_scan_triton
            else:
                _library(), _c_library()  # a missing compiler: ImportError naming the fix, here and not later
                module.scan, module.scan_fn, module.step_fn = "fused", None, None
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
    changed = {}
    for name, module in model.named_modules():
        if _is_mamba_mixer(module):
            module.scan_fn = selective_scan_triton
            changed[name] = "triton"
    if not changed:
        raise ValueError("use_triton_scan_ found no MambaMixer in the model; it applies to family='mamba' models")
    return changed
