"""QLoRA: LoRA on a frozen base stored as NF4 with double quantization (Dettmers et al. 2023, arXiv:2305.14314).

`apply_(model, QLoRAConfig(r=8))` replaces each target nn.Linear (default: q_proj and v_proj, as
LoRA) by a `QLoRALinear`, and every other Linear that `quantize` names (default: all of them but
`lm_head`, as bitsandbytes' `load_in_4bit` does) by a frozen `NF4Linear`. The weights are quantized
with `llmopt.quant.nf4` (16 NF4 levels, absmax blocks of 64, absmax double-quantized to int8 in
blocks of 256 with fp32 scales: ~4.13 bits per parameter, counted exactly in the report) and the fp
weights are dropped; `lora_A`/`lora_B` train on top, in the weight's original dtype.

The base matmul is `NF4Matmul`, a custom autograd Function that dequantizes the weight inside the
forward and again inside the backward: no dequantized (out, in) weight is saved for backward, and
the input is not saved either (the frozen weight needs no gradient). `compute_dtype="bf16"` runs the
dequantization and the base matmul in bf16 (the adapters stay in the model's dtype).

Numerics contract: the output equals LoRA on the dequantized weight (fp32: to rounding); against
the original model it differs by the NF4 error (the contract tolerance: `nf4_error_bound`). At apply
the adapters add an exact zero. `merge_` dequantizes, adds s B A and requantizes: the merged model
holds `NF4Linear` modules whose outputs are within the NF4 bound of the unmerged ones. `revert_`
gives `nn.Linear` modules (adapted and quantize-only alike) holding the dequantized weight (the quantization error stays: the
original weights were not kept, that is the point of QLoRA). Embeddings and `lm_head` stay
unquantized.

`backend="bnb"` uses bitsandbytes' `Linear4bit` for the base instead (an optional peer:
`pip install llmopt[peers]`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from llmopt.core import ApplyReport, Stage, fqn_filter, register, register_revert, replace_modules
from llmopt.quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4
from llmopt.techniques.lora import LoRAConfig, add_lora_, apply_adapters, revert_adapters

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class QLoRAConfig(LoRAConfig):
    """QLoRA: LoRA on a frozen NF4 base with double-quantized scales (Dettmers et al. 2023)."""

    target: tuple[str, ...] = ("all-linear",)
    """Modules to adapt. Default: every Linear but lm_head, the QLoRA paper's setting (adapters on all linear
    layers are what recovers 16-bit fine-tuning quality on a 4-bit base; LoRA's own default is q, v)."""

    compute_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the dequantized weight and the base matmul."""
    block_size: int = 64
    """Weights per absmax block."""
    double_quant: bool = True
    """Quantize the absmax scales to int8 (blocks of 256) as well."""
    nf4_scale: Literal["absmax", "mse"] = "absmax"
    """Block scale: "absmax" (bitsandbytes' codes byte for byte) or "mse" (the multiple of the block's absmax with
    the least squared weight error; same format and bits). "mse" lowers the weight error by ~16% on SmolLM2 but
    raised the held-out loss gap (1.039x -> 1.066x of bf16 at step 0): it clips the outliers that matter most.
    backend="bnb" always uses absmax."""
    quantize: tuple[str, ...] = ("all-linear",)
    """Linear modules stored as frozen NF4 without an adapter (same patterns as `target`; `exclude` applies).
    The targets are always quantized; `()` quantizes the targets only. Default: every Linear but `lm_head`."""
    backend: Literal["llmopt", "bnb"] = "llmopt"
    """`llmopt`: our NF4 (any device); `bnb`: bitsandbytes' Linear4bit (optional peer, `pip install llmopt[peers]`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size <= 0 or self.block_size % 2:
            raise ValueError(f"block_size must be a positive even number, got {self.block_size}; use 64")
        if self.nf4_scale not in ("absmax", "mse"):
            raise ValueError(f"nf4_scale must be 'absmax' or 'mse', got {self.nf4_scale!r}")
        if self.backend == "bnb" and self.block_size != 64:
            raise ValueError("backend='bnb' is used with block_size=64 here; drop block_size or use backend='llmopt'")


class NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized from NF4 in the forward and again in the backward (nothing fp saved)."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, q: NF4Weight, dtype: torch.dtype, *tensors: torch.Tensor) -> torch.Tensor:
        # the NF4 tensors are passed again as *tensors so that they are saved as tensors (visible to hooks)
        ctx.q, ctx.dtype, ctx.x_dtype = q, dtype, x2d.dtype
        ctx.save_for_backward(*tensors)
        weight = dequantize_nf4(q, dtype)  # (out, in), freed after this line's matmul
        return x2d.to(dtype) @ weight.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            codes, absmax, *rest = ctx.saved_tensors
            q = dataclasses.replace(ctx.q, codes=codes, absmax=absmax, absmax_scale=rest[0] if rest else None,
                                    absmax_offset=rest[1] if rest else None)
            grad_x = (grad.to(ctx.dtype) @ dequantize_nf4(q, ctx.dtype)).to(ctx.x_dtype)
        return (grad_x, None, None) + (None,) * len(ctx.saved_tensors)


class NF4Linear(nn.Module):
    """A frozen Linear whose weight is stored as NF4 buffers (`nf4_codes`, `nf4_absmax`, ...)."""

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None, *, compute_dtype: torch.dtype = torch.float32,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.block_size, self.dq_block_size = q.block_size, q.dq_block_size
        self.compute_dtype, self.dtype = compute_dtype, dtype
        self.nf4_scale = "absmax"  # how the block scales were chosen; merge_ requantizes the same way
        self.register_buffer("nf4_codes", q.codes)
        self.register_buffer("nf4_absmax", q.absmax)
        self.register_buffer("nf4_absmax_scale", q.absmax_scale)
        self.register_buffer("nf4_absmax_offset", q.absmax_offset)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, compute_dtype: torch.dtype,
                    block_size: int = 64, double_quant: bool = True, scale: str = "absmax") -> NF4Linear:
        new = cls(_quantize(weight, block_size, double_quant, scale), bias, compute_dtype=compute_dtype,
                  dtype=weight.dtype)
        new.nf4_scale = scale
        return new

    @property
    def nf4(self) -> NF4Weight:
        return NF4Weight(codes=self.nf4_codes, absmax=self.nf4_absmax, absmax_scale=self.nf4_absmax_scale,
                         absmax_offset=self.nf4_absmax_offset, shape=(self.out_features, self.in_features),
                         block_size=self.block_size, dq_block_size=self.dq_block_size)

    def nf4_bytes(self) -> int:
        """Bytes that store the base weight (codes and every level of scales)."""
        return self.nf4.nbytes

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.nf4, dtype or self.dtype)

    def to_linear(self) -> nn.Linear:
        """nn.Linear holding the dequantized weight (the NF4 error stays; adapters, if any, are dropped)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=self.dtype)
        linear.weight = nn.Parameter(self.dequantized_weight())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach())
        return linear

    def base_forward(self, x2d: torch.Tensor) -> torch.Tensor:
        q = self.nf4
        y = NF4Matmul.apply(x2d, q, self.compute_dtype, *q.tensors())
        y = y.to(x2d.dtype)
        return y if self.bias is None else y.add_(self.bias.to(y.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block {self.block_size}, double_quant={self.nf4_absmax_scale is not None}, "
                f"compute_dtype={self.compute_dtype}")


def _quantize(weight: torch.Tensor, block_size: int, double_quant: bool, scale: str = "absmax") -> NF4Weight:
    if not weight.is_meta:
        return quantize_nf4(weight, block_size=block_size, double_quant=double_quant, scale=scale)
    # meta model: the right shapes, no values (quantize_nf4 on a real tensor of the same shape would match)
    template = quantize_nf4(torch.zeros(1, block_size), block_size=block_size, double_quant=double_quant)
    n = weight.numel()
    n_blocks = -(-n // block_size)
    n_scales = -(-n_blocks // template.dq_block_size) if double_quant else 0
    meta = dict(device="meta")
    return NF4Weight(codes=torch.empty(n_blocks * block_size // 2, dtype=torch.uint8, **meta),
                     absmax=torch.empty(n_blocks, dtype=template.absmax.dtype, **meta),
                     absmax_scale=torch.empty(n_scales, **meta) if double_quant else None,
                     absmax_offset=torch.empty((), **meta) if double_quant else None,
                     shape=tuple(weight.shape), block_size=block_size)


class QLoRALinear(NF4Linear):
    """NF4Linear plus trainable `lora_A` (r, in) and `lora_B` (out, r), B zero at init."""

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None, *, r: int, alpha: float, dropout: float = 0.0,
                 compute_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(q, bias, compute_dtype=compute_dtype, dtype=dtype)
        self.r, self.alpha, self.dropout, self.scale = r, alpha, dropout, alpha / r
        device = q.codes.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)  # (N, in)
        y = self.base_forward(x2d)  # (N, out), fresh tensor in x's dtype
        y = add_lora_(y, x2d, self.lora_A, self.lora_B, self.scale, self.dropout, self.training)
        return y.view(*x.shape[:-1], self.out_features)

    def to_nf4_linear(self) -> NF4Linear:
        """Dequantize -> add s B A -> requantize (same block size and double quantization)."""
        with torch.no_grad():
            merged = self.dequantized_weight(torch.float32) + (self.lora_B @ self.lora_A).float() * self.scale
        return NF4Linear.from_weight(merged.to(self.dtype), self.bias, compute_dtype=self.compute_dtype,
                                     block_size=self.block_size, double_quant=self.nf4_absmax_scale is not None,
                                     scale=self.nf4_scale)


class BnbQLoRALinear(nn.Module):
    """bitsandbytes Linear4bit (nf4) base plus the same adapters: the `backend="bnb"` peer."""

    def __init__(self, linear: nn.Linear, *, r: int, alpha: float, dropout: float, compute_dtype: torch.dtype,
                 double_quant: bool) -> None:
        super().__init__()
        bnb = _import_bnb()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, linear.weight.dtype
        self.r, self.alpha, self.dropout, self.scale = r, alpha, dropout, alpha / r
        self.base = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=double_quant,
                                      quant_type="nf4", device="meta")
        device = linear.weight.device
        self.base.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                             compress_statistics=double_quant, quant_type="nf4").to(device)
        if linear.bias is not None:
            self.base.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=self.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=self.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)

    def nf4_bytes(self) -> int:
        return _bnb_weight_bytes(self.base.weight)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.base.weight.data, self.base.weight.quant_state).to(dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        y = self.base(x2d).to(x.dtype)
        y = add_lora_(y, x2d, self.lora_A, self.lora_B, self.scale, self.dropout, self.training)
        return y.view(*x.shape[:-1], self.out_features)

    def to_linear(self, *, merge: bool) -> nn.Linear:
        weight = self.dequantized_weight(torch.float32)
        if merge:
            weight = weight + (self.lora_B @ self.lora_A).detach().float() * self.scale
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None, device="meta",
                           dtype=self.dtype)
        linear.weight = nn.Parameter(weight.to(self.dtype))
        if self.base.bias is not None:
            linear.bias = nn.Parameter(self.base.bias.detach())
        return linear


def _bnb_linear4bit(linear: nn.Linear, *, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    """bitsandbytes Linear4bit (nf4) holding `linear`'s weight, frozen: a quantize-only layer of backend="bnb"."""
    bnb = _import_bnb()
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                          device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False,
                                 compress_statistics=double_quant, quant_type="nf4").to(linear.weight.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return q


def _bnb_weight_bytes(w) -> int:
    """Bytes of a bitsandbytes Params4bit: packed codes, absmax and, nested, the second-level state."""
    state = w.quant_state
    total = w.numel() * w.element_size() + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        total += state.state2.absmax.numel() * 4 + state.state2.code.numel() * 4 + 4
    return total


def _bnb_to_linear(q: nn.Module) -> nn.Linear:
    import bitsandbytes.functional as bnbf

    weight = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state)
    linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight)
    if q.bias is not None:
        linear.bias = nn.Parameter(q.bias.detach())
    return linear


def _import_bnb():
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError("QLoRAConfig(backend='bnb') needs bitsandbytes: pip install llmopt[peers] "
                          "(or use the default backend='llmopt')") from e
    return bitsandbytes


@register(QLoRAConfig, name="qlora", stage=Stage.SURGERY, workload="train")
def apply_qlora(model: nn.Module, config: QLoRAConfig, *, filter_fn=None) -> ApplyReport:
    """Quantize the target nn.Linear weights to NF4 and add LoRA adapters; freeze everything else."""
    compute_dtype = COMPUTE_DTYPES[config.compute_dtype]
    if config.backend == "bnb":
        _import_bnb()

    def build(module: nn.Module, fqn: str) -> nn.Module:
        if config.backend == "bnb":
            return BnbQLoRALinear(module, r=config.r, alpha=config.alpha, dropout=config.dropout,
                                  compute_dtype=compute_dtype, double_quant=config.double_quant)
        new = QLoRALinear(_quantize(module.weight, config.block_size, config.double_quant, config.nf4_scale),
                          module.bias, r=config.r, alpha=config.alpha, dropout=config.dropout,
                          compute_dtype=compute_dtype, dtype=module.weight.dtype)
        new.nf4_scale = config.nf4_scale
        return new

    report = apply_adapters(model, target=config.target, exclude=config.exclude, build=build, filter_fn=filter_fn)
    if not report.changed:
        return report  # no target matched: nothing is quantized either (apply_ reports no effect)
    if config.quantize:  # the other Linear layers: frozen NF4, no adapter (targets are already swapped)
        def quantize_only(module: nn.Module, fqn: str) -> nn.Module | None:
            if filter_fn is not None and not filter_fn(module, fqn):
                return None
            if config.backend == "bnb":
                return _bnb_linear4bit(module, compute_dtype=compute_dtype, double_quant=config.double_quant)
            return NF4Linear.from_weight(module.weight, module.bias, compute_dtype=compute_dtype,
                                         block_size=config.block_size, double_quant=config.double_quant,
                                         scale=config.nf4_scale)

        select = fqn_filter(include=config.quantize, exclude=config.exclude)
        report.changed.update(replace_modules(model, {nn.Linear: quantize_only}, filter_fn=select,
                                              skipped=report.skipped))
    inner = {id(m.base) for m in model.modules() if isinstance(m, BnbQLoRALinear)}
    adapted = [m for m in model.modules() if isinstance(m, (NF4Linear, BnbQLoRALinear))
               or (type(m).__name__ == "Linear4bit" and id(m) not in inner)]
    logical = sum(m.in_features * m.out_features for m in adapted)
    stored = sum(m.nf4_bytes() if hasattr(m, "nf4_bytes") else _bnb_weight_bytes(m.weight) for m in adapted)
    if logical and not any(b.is_meta for m in adapted for b in m.buffers()):
        report.notes.append(f"base weights NF4{' + double quant' if config.double_quant else ''} "
                            f"({config.backend}): {8 * stored / logical:.3f} bits/param, {stored / 2**20:.1f} MiB "
                            f"vs {2 * logical / 2**20:.1f} MiB in bf16")
    if logical:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        others = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        report.notes.append(f"trainable {100 * trainable / (trainable + others + logical):.2f}% of the "
                            f"{(trainable + others + logical) / 1e6:.2f}M logical parameters (the NF4 base weights "
                            "are buffers, not parameters, in the counts above)")
    report.notes.append("embeddings and lm_head stay unquantized; B=0 at init")
    return report


@register_revert(QLoRAConfig)
def revert_qlora(model: nn.Module, report: ApplyReport) -> ApplyReport:
    """Back to nn.Linear with the dequantized weights; through merge_: dequantize, merge, requantize to NF4Linear."""
    unwrap = {QLoRALinear: lambda m, merge: m.to_nf4_linear() if merge else m.to_linear(),
              BnbQLoRALinear: lambda m, merge: m.to_linear(merge=merge),
              NF4Linear: lambda m, merge: m if merge else m.to_linear()}  # quantize-only layers stay NF4 on merge
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        unwrap[_import_bnb().nn.Linear4bit] = lambda m, merge: m if merge else _bnb_to_linear(m)
    return revert_adapters(model, report, unwrap)


__all__ = ["NF4Linear", "NF4Matmul", "QLoRAConfig", "QLoRALinear", "apply_qlora", "revert_qlora"]
