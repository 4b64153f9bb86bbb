"""Triton forward/backward kernels for RMSNorm (+ residual add), SwiGLU and RoPE; fp32 arithmetic inside."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# ---- RMSNorm ----------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_fwd(x_ptr, r_ptr, h_ptr, w_ptr, y_ptr, rstd_ptr, D, eps, HAS_RESIDUAL: tl.constexpr,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(r_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        x = x.to(h_ptr.dtype.element_ty)  # the residual stream in its own dtype, as eager rounds it
        tl.store(h_ptr + row * D + cols, x, mask=m)
        x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    x_hat = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * D + cols, (w * x_hat).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    dy = tl.load(dy_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    x_hat = x * rstd
    g = dy * w
    dx = rstd * (g - x_hat * (tl.sum(g * x_hat, 0) / D))
    tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return x2, x2.shape[0], x2.shape[1]


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        x2, n, d = _rows(x)
        r2 = _rows(residual)[0] if residual is not None else x2
        h = torch.empty_like(x2) if residual is not None else x2
        y = torch.empty((n, d), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        _rms_norm_fwd[(n,)](x2, r2, h, weight, y, rstd, d, eps, HAS_RESIDUAL=residual is not None,
                            BLOCK=triton.next_power_of_2(d))
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_residual = residual is not None
        y = y.view(*x.shape[:-1], d)
        return (y, h.view_as(x)) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(h.shape).contiguous()
        dx = torch.empty_like(h)
        n, d = h.shape
        _rms_norm_bwd[(n,)](dy2, h, weight, rstd, dx, d, BLOCK=triton.next_power_of_2(d))
        dw = (dy2.float() * (h.float() * rstd[:, None])).sum(0).to(weight.dtype)
        dx = dx.view(dy.shape)
        if ctx.has_residual:
            if dh is not None:
                dx = dx + dh
            return dx, dx, dw, None
        return dx, None, dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, None, weight, eps)


def add_rms_norm_triton(x, residual, weight, eps):
    return _RMSNorm.apply(x, residual, weight, eps)


# ---- SwiGLU -------------------------------------------------------------------------------------------

@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    silu = g * tl.sigmoid(g)
    silu = silu.to(y_ptr.dtype.element_ty).to(tl.float32)  # eager rounds silu(g) to the input dtype
    tl.store(y_ptr + offs, (silu * u).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(du_ptr + offs, (dy * silu).to(du_ptr.dtype.element_ty), mask=m)
    tl.store(dg_ptr + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=m)


_POINTWISE_BLOCK = 1024


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd[(triton.cdiv(n, _POINTWISE_BLOCK),)](gate, up, y, n, BLOCK=_POINTWISE_BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd[(triton.cdiv(n, _POINTWISE_BLOCK),)](dy.contiguous(), gate, up, dg, du, n, BLOCK=_POINTWISE_BLOCK)
        return dg, du


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)


# ---- RoPE ---------------------------------------------------------------------------------------------

@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, T, HALF: tl.constexpr, BLOCK: tl.constexpr,
                 BACKWARD: tl.constexpr):
    # forward:  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2    (y = x cos + rotate_half(x) sin)
    # backward: dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1   (the transpose)
    row = tl.program_id(0).to(tl.int64)
    t = row % T
    cols = tl.arange(0, BLOCK)
    m = cols < HALF
    base = row * 2 * HALF
    x1 = tl.load(x_ptr + base + cols, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + HALF + cols, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * 2 * HALF + cols, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * 2 * HALF + HALF + cols, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * 2 * HALF + cols, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * 2 * HALF + HALF + cols, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_ptr + base + cols, y1.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(y_ptr + base + HALF + cols, y2.to(y_ptr.dtype.element_ty), mask=m)


def _rope_launch(x, cos, sin, backward):
    x = x.contiguous()
    hd, T = x.shape[-1], x.shape[-2]
    y = torch.empty_like(x)
    rows = x.numel() // hd
    _rope_kernel[(rows,)](x, cos.to(x.dtype).contiguous(), sin.to(x.dtype).contiguous(), y, T, HALF=hd // 2,
                          BLOCK=triton.next_power_of_2(hd // 2), BACKWARD=backward)
    return y


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rope_launch(dy, cos, sin, True), None, None


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, hd) rotated by cos/sin (T, hd)."""
    return _RoPE.apply(x, cos, sin)
