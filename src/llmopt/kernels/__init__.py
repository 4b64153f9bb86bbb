"""Fused kernels: for each, a pure-torch reference, the path fastest on CPU, and a Triton kernel for GPU.

One dispatch function per kernel takes `backend=`: "auto" (Triton on CUDA when triton imports,
else the CPU path), "reference", the CPU path's name, or "triton". The Triton modules live in
`llmopt.kernels.triton` and are imported only when that backend runs (triton is an optional extra;
under `TRITON_INTERPRET=1` they run on CPU tensors for tests).
"""

from llmopt.kernels._dispatch import resolve_backend, triton_available
from llmopt.kernels.attention import attention_mask, attention_reference, flash_attention
from llmopt.kernels.cross_entropy import (
    default_chunk_size,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from llmopt.kernels.pointwise import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
    rope,
    rope_reference,
    swiglu,
    swiglu_reference,
)

__all__ = ["add_rms_norm", "add_rms_norm_reference", "attention_mask", "attention_reference", "default_chunk_size",
           "flash_attention", "fused_linear_cross_entropy", "linear_cross_entropy_reference", "resolve_backend",
           "rms_norm", "rms_norm_reference", "rope", "rope_reference", "swiglu", "swiglu_reference",
           "triton_available"]
