"""FP8 (OCP formats e4m3fn and e5m2) with per-tensor scaling, emulated on any device (Micikevicius et al. 2022,
"FP8 Formats for Deep Learning", arXiv:2209.05433).

`quantize_fp8(x, fmt)` divides by a per-tensor scale `amax / max_representable` (so the largest magnitude
lands on the format's largest finite value), saturates, and casts to `torch.float8_e4m3fn` /
`torch.float8_e5m2` (round to nearest even, done by PyTorch's cast on CPU as on GPU); `dequantize_fp8`
multiplies back in fp32. Storage is one byte per value plus one fp32 scale. No fp8 matmul is used:
on CPU the arithmetic is the dequantized fp32 (that is what "emulated" means); on a GPU of compute
capability 8.9+ `torch._scaled_mm` would run the same numbers natively.

Fake quantization (`fake_quantize_fp8`) returns `dequantize_fp8(quantize_fp8(x))` with a straight-through
gradient, so a QAT model converted to fp8 storage gives bit-identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.quant.int_quant import straight_through

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
"""Format name -> torch dtype."""
FP8_MAX = {name: float(torch.finfo(dtype).max) for name, dtype in FP8_DTYPES.items()}
"""Largest finite value: e4m3fn 448, e5m2 57344."""


@dataclass(frozen=True)
class Fp8Tensor:
    data: torch.Tensor
    """float8 values (x / scale), same shape as x."""
    scale: torch.Tensor
    """fp32 scalar: x ~= data * scale."""
    fmt: str
    """"e4m3" or "e5m2"."""

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def _dtype(fmt: str) -> torch.dtype:
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fp8 format must be one of {sorted(FP8_DTYPES)}, got {fmt!r}")
    return FP8_DTYPES[fmt]


def fp8_scale(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-tensor fp32 scale amax / max_representable (1 for an all-zero tensor)."""
    _dtype(fmt)
    amax = x.detach().abs().amax().float()
    return torch.where(amax > 0, amax / FP8_MAX[fmt], torch.ones_like(amax))


def quantize_fp8(x: torch.Tensor, fmt: str = "e4m3", scale: torch.Tensor | None = None) -> Fp8Tensor:
    """Scale, saturate to the format's range and cast (round to nearest even)."""
    dtype = _dtype(fmt)
    scale = fp8_scale(x, fmt) if scale is None else scale.float()
    y = (x.detach().float() / scale).clamp_(-FP8_MAX[fmt], FP8_MAX[fmt])
    return Fp8Tensor(data=y.to(dtype), scale=scale, fmt=fmt)


def dequantize_fp8(q: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.data.float() * q.scale).to(dtype)


def fake_quantize_fp8(x: torch.Tensor, fmt: str = "e4m3") -> torch.Tensor:
    """dequantize_fp8(quantize_fp8(x)) in x's dtype, straight-through gradient."""
    with torch.no_grad():
        dq = dequantize_fp8(quantize_fp8(x, fmt), x.dtype)
    return straight_through(x, dq)


__all__ = ["FP8_DTYPES", "FP8_MAX", "Fp8Tensor", "dequantize_fp8", "fake_quantize_fp8", "fp8_scale", "quantize_fp8"]
