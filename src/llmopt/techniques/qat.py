"""Quantization-aware training: fake-quantized Linear layers with a straight-through estimator, then `convert_qat_`
to real quantized modules whose outputs equal the fake-quantized model's bit for bit.

Jacob et al. 2018 (arXiv:1712.05877) for fake quantization with STE; the int8-activation / int4-weight
recipe is torchao's `Int8DynActInt4WeightQATQuantizer`; FP8 formats after Micikevicius et al. 2022.

```python
apply_(model, QATConfig(weight="int4", group_size=32))   # prepare: Linear -> FakeQuantLinear
train(model)                                               # weights stay fp32 and train
report = convert_qat_(model)          # FakeQuantLinear -> QuantizedLinear (packed int4 codes / fp8 bytes)
```
`FakeQuantLinear` is an `nn.Linear` (same `weight`/`bias` parameters, same state-dict names) whose
forward quantizes and dequantizes the input (int8: dynamic, one scale per token, asymmetric with a zero
point by default, or symmetric; fp8: dynamic per-tensor scale) and the weight (int4/int8 group-wise or
per channel, by default on the full-range grid with fp32 scales; fp8 per tensor), then multiplies. Gradients pass straight through the rounding (`llmopt.quant.int_quant.straight_through`).

Numerics contract: changes outputs at prepare (the quantization error: the contract matrix holds it
to an SQNR). `convert_qat_` builds `QuantizedLinear` modules holding `IntWeightOnlyLinear` storage (int8,
or int4 packed two per byte, scales in `scale_dtype`) or fp8 bytes plus a scale, and computes
`linear(quant(x), dequantize(stored)) + bias` with the same functions and the same op order as the fake
forward, so converted == fake-quantized bitwise (tests/test_qat.py). `revert_` (before convert) gives the
original nn.Linear modules back, exactly. Embeddings and `lm_head` stay in full precision by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.core import ApplyReport, Stage, TechniqueConfig, fqn_filter, register, register_revert, replace_modules
from llmopt.quant.fp8 import dequantize_fp8, fake_quantize_fp8, quantize_fp8
from llmopt.quant.int_quant import (
    SCALE_GRADS,
    dequantize_weight,
    empty_int_weight,
    fake_quantize_activation_int8,
    fake_quantize_activation_int8_asym,
    fake_quantize_weight,
    quantize_activation_int8,
    quantize_activation_int8_asym,
    quantize_weight,
)
from llmopt.techniques.weight_only_quant import SCALE_DTYPES, IntWeightOnlyLinear

WEIGHT_FORMATS = ("int4", "int8", "fp8_e4m3", "fp8_e5m2")
ACTIVATION_FORMATS = ("none", "int8", "int8_asym", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True, kw_only=True)
class QATConfig(TechniqueConfig):
    """Quantization-aware training: fake-quantized Linear layers (STE), convertible to real quantized modules."""

    weight: Literal["int4", "int8", "fp8_e4m3", "fp8_e5m2"] = "int4"
    """Weight format: int4/int8 codes with group-wise (or per-channel) scales, or fp8 with one per-tensor scale."""
    group_size: int | None = 32
    """int weights: input values per scale; None means per output channel."""
    symmetric: bool = True
    """int weights: symmetric codes (scale only) or asymmetric (scale + zero)."""
    activations: Literal["none", "int8", "int8_asym", "fp8_e4m3", "fp8_e5m2"] = "int8_asym"
    """Input quantization: dynamic int8 per token (symmetric, or asymmetric with a zero point: "int8_asym",
    the default: measured the better QAT recipe with the two defaults below), dynamic fp8 per tensor, or none
    (weight-only QAT)."""
    scale_dtype: Literal["fp32", "bf16"] = "fp32"
    """int weights: dtype of the stored scales (the fake quantization uses the same rounded scales)."""
    scale_grad: Literal["none", "absmax"] = "none"
    """int weights, symmetric: how the gradient treats each group's dynamic scale (absmax / qmax). "none": plain
    straight-through, the scale is a constant. "absmax": the gradient through the scale also reaches the weight
    that sets it, so that weight moves for its effect on the whole group's grid (the forward, and so the converted
    model, is the same either way)."""
    full_range: bool | None = None
    """int weights, symmetric: scale absmax / (qmax + 0.5) and all 2**bits codes (int4: [-8, 7]; torchao's
    MappingType.SYMMETRIC), instead of absmax / qmax; weights clamped to the code range get no gradient.
    None (default): on wherever it applies (symmetric int weights, scale_grad="none"). With fp32 scales and
    int8_asym activations it is the recipe that recovers 0.81 of the PTQ gap on SmolLM2 (0.57 with absmax / qmax,
    bf16 scales and symmetric activations; docs/techniques/qat.md); False gives the absmax / qmax grid, the
    better grid for post-training quantization without training."""
    include: tuple[str, ...] = ("all-linear",)
    """fqn_filter patterns of the Linear layers to quantize ("all-linear": every Linear but lm_head)."""
    exclude: tuple[str, ...] = ()
    """fqn_filter patterns to leave in full precision."""

    def __post_init__(self) -> None:
        if self.weight not in WEIGHT_FORMATS:
            raise ValueError(f"weight must be one of {WEIGHT_FORMATS}, got {self.weight!r}")
        if self.activations not in ACTIVATION_FORMATS:
            raise ValueError(f"activations must be one of {ACTIVATION_FORMATS}, got {self.activations!r}")
        if self.scale_grad not in SCALE_GRADS:
            raise ValueError(f"scale_grad must be one of {SCALE_GRADS}, got {self.scale_grad!r}")
        if self.scale_grad != "none" and (self.bits is None or not self.symmetric):
            raise ValueError(f"scale_grad={self.scale_grad!r} applies to symmetric int weights; use weight='int4' or "
                             "'int8' with symmetric=True, or scale_grad='none'")
        if self.full_range is True and (self.bits is None or not self.symmetric or self.scale_grad != "none"):
            raise ValueError("full_range applies to symmetric int weights with scale_grad='none'; use weight='int4' "
                             "or 'int8', symmetric=True, or full_range=False")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 2):
            raise ValueError(f"group_size must be a positive even number or None, got {self.group_size}")

    @property
    def uses_full_range(self) -> bool:
        """Whether the full-range grid is on (full_range, or None where it applies)."""
        if self.full_range is None:
            return self.bits is not None and self.symmetric and self.scale_grad == "none"
        return self.full_range

    @property
    def bits(self) -> int | None:
        return {"int4": 4, "int8": 8}.get(self.weight)


def quantize_input(x: torch.Tensor, activations: str, *, fake: bool) -> torch.Tensor:
    """The activation rounding shared by the fake-quantized and the converted module."""
    if activations == "none":
        return x
    if activations == "int8":
        return fake_quantize_activation_int8(x) if fake else quantize_activation_int8(x)
    if activations == "int8_asym":
        return fake_quantize_activation_int8_asym(x) if fake else quantize_activation_int8_asym(x)
    fmt = activations.removeprefix("fp8_")
    if fake:
        return fake_quantize_fp8(x, fmt)
    return dequantize_fp8(quantize_fp8(x, fmt), x.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x (..., in) @ weight.T + bias, as one 2-D matmul then the bias: one op order for fake and converted."""
    y = F.linear(x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], out_features)


class FakeQuantLinear(nn.Linear):
    """nn.Linear that fake-quantizes its input and weight in the forward (straight-through gradients)."""

    def __init__(self, linear: nn.Linear, config: QATConfig) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.qat = config

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig) -> FakeQuantLinear:
        return cls(linear, config)

    def fake_weight(self) -> torch.Tensor:
        c = self.qat
        if c.bits is not None:
            return fake_quantize_weight(self.weight, bits=c.bits, group_size=c.group_size, symmetric=c.symmetric,
                                        scale_dtype=SCALE_DTYPES[c.scale_dtype], scale_grad=c.scale_grad,
                                        full_range=c.uses_full_range)
        return fake_quantize_fp8(self.weight, c.weight.removeprefix("fp8_"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(quantize_input(x, self.qat.activations, fake=True), self.fake_weight(), self.bias,
                       self.out_features)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        c = self.qat
        group = f", group {c.group_size}" if c.bits is not None else ""
        return f"{super().extra_repr()}, weight {c.weight}{group}, activations {c.activations}"


class QuantizedLinear(nn.Module):
    """A converted FakeQuantLinear: int codes (an `IntWeightOnlyLinear`, `.int_linear`) or fp8 bytes + scale,
    and the same activation rounding. Inference only (no trainable weight)."""

    def __init__(self, fake: FakeQuantLinear) -> None:
        super().__init__()
        c = fake.qat
        self.in_features, self.out_features, self.activations, self.weight_format = \
            fake.in_features, fake.out_features, c.activations, c.weight
        weight = fake.weight.detach()
        self.bias = nn.Parameter(fake.bias.detach(), requires_grad=False) if fake.bias is not None else None
        self.int_linear = None
        if c.bits is not None:
            kwargs = dict(bits=c.bits, group_size=c.group_size, symmetric=c.symmetric,
                          scale_dtype=SCALE_DTYPES[c.scale_dtype], full_range=c.uses_full_range)
            q = (empty_int_weight(tuple(weight.shape), device="meta", **kwargs) if weight.is_meta
                 else quantize_weight(weight, **kwargs))
            # kernel="dequant", no chunking: the exact arithmetic of the fake forward
            self.int_linear = IntWeightOnlyLinear(q, None, kernel="dequant", chunk_rows=max(1, self.out_features),
                                                  dtype=weight.dtype)
        else:
            fmt = c.weight.removeprefix("fp8_")
            if weight.is_meta:
                data, scale = torch.empty(weight.shape, dtype=quantize_fp8(torch.zeros(1), fmt).data.dtype,
                                          device="meta"), torch.empty((), device="meta")
            else:
                q = quantize_fp8(weight, fmt)
                data, scale = q.data, q.scale
            self.register_buffer("fp8_weight", data)
            self.register_buffer("fp8_scale", scale)
            self.fp8_format = fmt

    def dequantized_weight(self) -> torch.Tensor:
        if self.int_linear is not None:
            return dequantize_weight(self.int_linear.int_weight, self.int_linear.dtype)
        return self.fp8_weight.float() * self.fp8_scale

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()

    def quantized_bytes(self) -> int:
        if self.int_linear is not None:
            return self.int_linear.quantized_bytes()
        return self.fp8_weight.numel() + 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(quantize_input(x, self.activations, fake=False), self.dequantized_weight(), self.bias,
                       self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight {self.weight_format}, "
                f"activations {self.activations}")


@register(QATConfig, name="qat", stage=Stage.SURGERY, workload="train")
def apply_qat(model: nn.Module, config: QATConfig, *, filter_fn=None) -> ApplyReport:
    """prepare: swap the target nn.Linear layers for FakeQuantLinear (same parameters)."""
    select = fqn_filter(include=config.include, exclude=config.exclude)

    def combined(module: nn.Module, fqn: str) -> bool:
        return select(module, fqn) and (filter_fn is None or filter_fn(module, fqn))

    combined.skip_reason = select.skip_reason  # type: ignore[attr-defined]
    report = ApplyReport()

    def build(linear: nn.Module, fqn: str) -> nn.Module:
        K = linear.in_features
        if config.bits is not None and config.group_size is not None and K % config.group_size:
            from llmopt.core import SkipModule

            raise SkipModule(f"group_size {config.group_size} does not divide in_features {K}")
        return FakeQuantLinear.from_linear(linear, config)

    report.changed = replace_modules(model, {nn.Linear: build}, filter_fn=combined, skipped=report.skipped)
    if report.changed:
        report.notes.append(f"weights {config.weight}" + (f" group {config.group_size}" if config.bits else "")
                            + f", activations {config.activations}; train, then convert_qat_(model)")
    return report


@register_revert(QATConfig)
def revert_qat(model: nn.Module, report: ApplyReport) -> ApplyReport:
    """FakeQuantLinear -> nn.Linear holding the same (trained) parameters."""
    restored = ApplyReport()
    restored.changed = replace_modules(model, {FakeQuantLinear: lambda m, fqn: m.to_linear()})
    return restored


def convert_qat_(model: nn.Module) -> ApplyReport:
    """After QAT training: FakeQuantLinear -> QuantizedLinear (real int/fp8 storage), in place; bit-exact outputs."""
    report = ApplyReport(technique="qat convert")
    fp = q = 0
    converted: list[QuantizedLinear] = []

    def build(m: FakeQuantLinear, fqn: str) -> QuantizedLinear:
        nonlocal fp, q
        new = QuantizedLinear(m)
        fp += m.weight.numel() * m.weight.element_size()
        if not m.weight.is_meta:
            q += new.quantized_bytes()
        converted.append(new)
        return new

    report.changed = replace_modules(model, {FakeQuantLinear: build})
    if not report.changed:
        raise ValueError("convert_qat_ found no FakeQuantLinear: apply_(model, QATConfig(...)) first")
    if q:
        report.notes.append(f"quantized weights {q / 2**20:.2f} MiB vs {fp / 2**20:.2f} MiB ({q / fp:.3f}x)")
    return report


__all__ = ["FakeQuantLinear", "QATConfig", "QuantizedLinear", "apply_qat", "convert_qat_", "quantize_input",
           "revert_qat"]
