"""Decode-shaped linears on CPU through `llmopt.kernels.dense_gemv`, for the length of a generation call.

    with cpu_linear_kernels(model, draft):    # generate / speculative_generate do this (kernels="auto")
        ...

Inside the block every plain `nn.Linear` of the models (exactly that type: LoRA, quantized and other
replaced layers keep their own forward) whose weight is an fp32 or bf16 CPU tensor computes, when autograd
is off and the call has at most `max_rows` rows of activations (decode: one row per sequence; speculative
verify: k + 1; short prompts), `x @ W^T` with the C kernel, which reads the stored weight once per call and
accumulates in fp32. Longer inputs (prefill) keep `F.linear`, except bf16 weights on a CPU without native
bf16 matrix instructions (AVX-512 BF16 / AMX): there `F.linear` goes through a slow generic bf16 path, so
the product is computed in fp32 from the widened weight (exact widening; fp32 accumulation, as bf16
`F.linear` also accumulates) and rounded to bf16 once.

Why: on SmolLM2-135M at one thread, `benchmarks/bench_inference.py hf` measures the decode step with these
kernels against transformers (docs/inference.md). Numerics: the same products up to fp32 summation order
(greedy tokens equal `generate_reference` in the tests). On exit the modules' own `forward` is back; the
patch is an instance attribute, so a model is never changed outside the block, and nothing is patched when
the kernel does not build here (no C compiler) or the weights are elsewhere than the CPU.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cpu_linear_kernels", "native_bf16_matmul"]

MAX_ROWS = 32
"""Rows of activations up to which the C kernel beats `F.linear` at SmolLM2's shapes on this CPU (fp32: MKL's
small-M GEMM; bf16: no native bf16)."""


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX), where torch's bf16 GEMM is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def _fast_forward(module: nn.Linear, plan, threads: int, upcast_bf16: bool):
    weight, bias, N, K = module.weight, module.bias, plan.N, plan.K

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) or x.device.type != "cpu":
            return F.linear(x, weight, bias)
        M = x.numel() // K
        if M <= MAX_ROWS:
            xf = x if x.dtype == torch.float32 else x.float()
            y = plan.run(xf.contiguous(), (*x.shape[:-1], N), M, threads)
            if bias is not None:
                y += bias
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        if upcast_bf16:
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
        return F.linear(x, weight, bias)

    return forward


@contextlib.contextmanager
def cpu_linear_kernels(*models: nn.Module | None, enabled: bool = True):
    """Route the plain `nn.Linear` layers of `models` (None entries are skipped) through the CPU decode kernel
    inside the block; a no-op when `enabled` is False, the kernel does not build here, or nothing qualifies.
    Re-entrant: layers already routed by an outer block are left to it."""
    patched: list[nn.Linear] = []
    if enabled:
        from llmopt.kernels.dense_gemv import DenseGemvPlan, dense_gemv_available

        if dense_gemv_available():
            threads = torch.get_num_threads()
            upcast = not native_bf16_matmul()
            for model in models:
                if model is None:
                    continue
                for module in model.modules():
                    w = getattr(module, "weight", None)
                    if (type(module) is not nn.Linear or "forward" in module.__dict__ or w is None
                            or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16)):
                        continue
                    plan = DenseGemvPlan(w)
                    module.forward = _fast_forward(module, plan, threads, upcast and w.dtype == torch.bfloat16)
                    patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
