"""Fused RMSNorm, residual add + RMSNorm, SwiGLU and rotary embedding (Liger-Kernel's set, arXiv:2410.10989).

Each op has a pure-torch reference with exactly the math of `llmopt.models.llama` (so
`backend="reference"` is bit-identical to the stock model), a "compiled" CPU path (the reference
under `torch.compile`: Inductor fuses each op's forward and backward into one loop over the data,
where eager makes a pass per elementwise op and saves each intermediate), and a Triton kernel
pair (forward, backward) with a custom autograd Function that saves only the inputs (and RMSNorm's
per-row 1/rms). "auto" picks Triton on CUDA, "compiled" elsewhere.

Numerics contract: fp32 within ~1e-6 relative of the reference (reduction order differs in the
compiled and Triton paths); bf16 within bf16 rounding (Triton computes in fp32 internally).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from llmopt.kernels._dispatch import resolve_backend
from llmopt.models.llama import apply_rope

__all__ = ["add_rms_norm", "add_rms_norm_reference", "rms_norm", "rms_norm_reference", "rope", "rope_reference",
           "swiglu", "swiglu_reference"]

BACKENDS = ("reference", "compiled", "triton")


# ---- references: the model's own math ---------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)), normalized in fp32 and scaled in the input dtype (as `llama.RMSNorm`)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): a block's residual add and the next norm."""
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding, rotate_half layout: q (B, nh, T, hd), k (B, nkv, T, hd), cos/sin (T, hd)."""
    return apply_rope(q, k, cos, sin)


# ---- compiled CPU path --------------------------------------------------------------------------------

@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=None)


# ---- dispatch -----------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension; see the module docstring for backends."""
    which = resolve_backend(backend, x.device, "compiled", BACKENDS)
    if which == "reference":
        return rms_norm_reference(x, weight, eps)
    if which == "compiled":
        return _compiled(rms_norm_reference)(x, weight, eps)
    from llmopt.kernels.triton.pointwise import rms_norm_triton

    return rms_norm_triton(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass."""
    which = resolve_backend(backend, x.device, "compiled", BACKENDS)
    if which == "reference":
        return add_rms_norm_reference(x, residual, weight, eps)
    if which == "compiled":
        return _compiled(add_rms_norm_reference)(x, residual, weight, eps)
    from llmopt.kernels.triton.pointwise import add_rms_norm_triton

    return add_rms_norm_triton(x, residual, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up, saving only gate and up for backward."""
    which = resolve_backend(backend, gate.device, "compiled", BACKENDS)
    if which == "reference":
        return swiglu_reference(gate, up)
    if which == "compiled":
        return _compiled(swiglu_reference)(gate, up)
    from llmopt.kernels.triton.pointwise import swiglu_triton

    return swiglu_triton(gate, up)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto"
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k (rotate_half layout), cos/sin (T, hd) gathered at the positions."""
    which = resolve_backend(backend, q.device, "compiled", BACKENDS)
    if which == "reference":
        return rope_reference(q, k, cos, sin)
    if which == "compiled":
        return _compiled(rope_reference)(q, k, cos, sin)
    from llmopt.kernels.triton.pointwise import rope_triton

    return rope_triton(q, cos, sin), rope_triton(k, cos, sin)
