"""FLOPs counted, FLOPs estimated, the machine's achievable peak, and MFU.

`count_flops` runs a function under `torch.utils.flop_counter.FlopCounterMode`, which counts matmuls,
convolutions and attention (2 FLOPs per multiply-add) and ignores element-wise work. Attention is
counted as the full T x T product (no causal discount), like the PaLM formula. PyTorch's counter does
not know the CPU flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu`), so this module
registers it with the same formulas as the GPU kernels; without that, CPU counts would miss attention.

`estimate_train_flops` is the analytic cross-check (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022,
appendix B): per token, 6 N for the matmul weights N (2 forward + 4 backward) plus 12 L H Q T for
attention (L layers, H query heads of width Q, sequence length T). These are *model* FLOPs, the MFU
convention. The counter reports *executed* FLOPs: the flash-attention backward recomputes Q K^T, which
the counter adds (14 L H Q T instead of 12), and activation checkpointing adds its recomputed forward.
For the llmopt Llama on CPU, count = estimate + 2 L H Q T tokens exactly.

`measure_peak_flops` times a square matmul to estimate what this machine actually achieves (not the
datasheet peak); `mfu` divides achieved FLOP/s by it. On a shared CPU both move with the noise, so
compare MFUs from the same run only.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from llmopt.measure.timing import median_min_max

_aten = torch.ops.aten
_EXTRA_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop,
}


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of matmuls, convolutions and attention executed by `fn(*args, **kwargs)`."""
    # registered formulas are plain, shape-based: unwrap the decorator torch applied to them
    mapping = {op: getattr(f, "__wrapped__", f) for op, f in _EXTRA_FORMULAS.items()}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _loss(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "loss"):
        total, count = model.loss(idx, targets)
        return total / count
    logits = model(idx)  # (B, T, V)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def train_step_flops(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> int:
    """FLOPs of one forward + backward on (idx, targets), counted; the optimizer step is not included.

    Uses `model.loss(idx, targets)` when the model has it (the llmopt contract), else cross-entropy on
    `model(idx)`. Gradients go through `torch.autograd.grad`, so no `.grad` is left on the model.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_step_flops: the model has no trainable parameters; nothing to backpropagate")

    def step() -> None:
        torch.autograd.grad(_loss(model, idx, targets), params)

    return count_flops(step)


def matmul_weight_count(model: nn.Module) -> int:
    """N of the 6N rule: elements of every `nn.Linear` weight, a tied output head counted again.

    A tied head is used twice (embedding lookup, output matmul) but only the matmul costs FLOPs; the
    embedding lookup is not a matmul and is left out.
    """
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def estimate_train_flops(n_matmul_weights: int, tokens: int, *, n_layer: int, n_head: int, head_dim: int,
                         seq_len: int) -> int:
    """Analytic FLOPs of forward + backward: 6 N tokens + 12 L H Q T tokens (full, non-causal attention)."""
    return 6 * n_matmul_weights * tokens + 12 * n_layer * n_head * head_dim * seq_len * tokens


def measure_peak_flops(*, dtype: torch.dtype = torch.float32, size: int | None = None, seconds: float = 1.0,
                       repeats: int = 5, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Achievable matmul FLOP/s of this machine: `repeats` timed bursts of (size x size) @ (size x size).

    `size=None` picks the smallest power of two from 256 up to 4096 whose single matmul takes at least
    10 ms, so call overhead is negligible. Each burst lasts about `seconds / repeats`. Returns
    `{"peak_flops": median, "min", "max", "size", "dtype", "device", "threads"}` in FLOP/s.
    """
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one(n: int) -> float:
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up: first call allocates and picks kernels
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - start

    if size is None:
        size = 256
        while size < 4096 and one(size) < 0.01:
            size *= 2
    a, b = torch.randn(size, size, device=device).to(dtype), torch.randn(size, size, device=device).to(dtype)
    a @ b
    rates = []
    burst = seconds / max(repeats, 1)
    for _ in range(max(repeats, 1)):
        sync()
        start, calls = time.perf_counter(), 0
        while True:
            a @ b
            calls += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= burst:
                break
        rates.append(2 * size**3 * calls / elapsed)
    spread = median_min_max(rates)
    return {"peak_flops": spread.median, "min": spread.min, "max": spread.max, "size": size,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device), "threads": torch.get_num_threads()}


def mfu(flops_per_step: float, step_time_s: float, peak_flops: float) -> float:
    """Model FLOPs utilization: (flops_per_step / step_time_s) / peak_flops, a fraction in [0, ~1]."""
    if step_time_s <= 0 or peak_flops <= 0:
        raise ValueError(f"mfu needs positive step time and peak, got step_time_s={step_time_s}, peak={peak_flops}")
    return flops_per_step / step_time_s / peak_flops
