"""Weight-only post-training quantization for inference: int8 per channel, int4 group-wise (packed two per byte).

```python
report = apply_(model, WeightOnlyQuantConfig(bits=8))                 # int8, one scale per output row
report = apply_(model, WeightOnlyQuantConfig(bits=4, group_size=32))  # int4, scale + zero per 32 inputs
```
Each target `nn.Linear` becomes an `IntWeightOnlyLinear` holding the codes and scales as buffers
(`llmopt.quant.int_quant`; no fp weight kept), and an `nn.Embedding` becomes an `IntWeightOnlyEmbedding`.
With tied embeddings (`lm_head.weight is embed_tokens.weight`) both modules share one quantized table,
so it is stored once, as the fp weight was. Activations stay in the model's dtype; the weight is
dequantized inside the matmul, never materialized whole:
- decode on CPU (fp32 activations, at most `GEMV_MAX_ROWS` rows, no autograd): llmopt's C kernels
  (`llmopt.kernels.int_gemv`, AVX2 + FMA, OpenMP over output rows with `torch.get_num_threads()` threads)
  read the stored int8 codes or packed int4 codes and the scales as stored, any group size, fp32 accumulation;
- int8 on CPU otherwise: `torch._weight_int8pack_mm` (a fused int8-weight GEMM), fed bf16 activations and
  scales, because its fp32 path is several times slower than fp32 matmul on this PyTorch (2.13) build;
- int4 on CPU with group size 32/64/128/256: `torch._weight_int4pack_mm_for_cpu`, reading our packed
  codes directly (the packing *is* its layout) with bf16 activations and scales;
- otherwise (other group sizes, GPUs, `kernel="dequant"`, or inputs that require grad, since the
  fused kernels have no backward): rows are unpacked and dequantized in
  chunks of `chunk_rows` and multiplied in the activation dtype.
Decoding one token is bound by reading the weights, so fewer weight bytes means more tokens/s.

Numerics contract: changes outputs. Each weight is within half a quantization step of the original
(`s/2`, s = absmax/127 per row for int8; (max-min)/15 per group for int4 asymmetric); the C decode
kernels equal `x @ dequantize(codes).T` up to fp32 summation order; the torch kernels (more rows) also
round activations to bf16. `kernel="dequant"` computes `x @ dequantize(codes).T` in the
activation dtype, which is what QAT's `convert` relies on for bit-exact outputs. Not reversible (the
fp weights are not kept): reload the checkpoint instead. Stage SURGERY; apply it to a trained model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.core import ApplyReport, Stage, TechniqueConfig, fqn_filter, register
from llmopt.kernels.int_gemv import IntGemvPlan, int4_kernel_scales, int_gemv_available
from llmopt.quant.int_quant import (
    KERNEL_GROUP_SIZES,
    IntWeight,
    dequantize_codes,
    dequantize_weight,
    empty_int_weight,
    quantize_weight,
    unpack_int4,
)

SCALE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GEMV_MAX_ROWS = 8
"""Activation rows up to which `kernel="auto"` uses the C decode kernels (more rows: PyTorch's kernels)."""


@dataclass(frozen=True, kw_only=True)
class WeightOnlyQuantConfig(TechniqueConfig):
    """Weight-only int8 (per channel) or int4 (group-wise, packed) quantization of Linear and Embedding weights."""

    bits: Literal[8, 4] = 8
    """8: int8 codes; 4: int4 codes packed two per byte."""
    group_size: int | None = None
    """Input values per scale; None means one scale per output row (per channel). int4 needs a group
    size (32 is the usual choice; a divisor of every in_features)."""
    symmetric: bool | None = None
    """Symmetric codes (scale only) or asymmetric (scale + zero); None: symmetric for int8, asymmetric for int4."""
    scale_dtype: Literal["fp32", "bf16"] = "bf16"
    """Dtype of the stored scales and zeros (bf16: 2 bytes each; the codes are chosen with the rounded scale)."""
    kernel: Literal["auto", "torch", "dequant"] = "auto"
    """"auto": on CPU, llmopt's C kernels for fp32 inputs of at most GEMV_MAX_ROWS rows (decode), PyTorch's fused
    int8/int4 weight kernels (bf16 activations) for more rows, else chunked dequantize + matmul. "torch": never
    the C kernels (the previous behaviour, for comparison). "dequant": always dequantize + matmul in the
    activation dtype (exact reference)."""
    include: tuple[str, ...] | None = None
    """fqn_filter patterns of the modules to quantize; None means every nn.Linear and nn.Embedding."""
    exclude: tuple[str, ...] = ()
    """fqn_filter patterns to leave in full precision (e.g. "lm_head")."""
    chunk_rows: int = 1024
    """Rows dequantized at a time on the fallback path (bounds the temporary)."""

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        if self.bits == 4 and self.group_size is None:
            raise ValueError("int4 weight-only quantization needs a group_size, e.g. group_size=32")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 2):
            raise ValueError(f"group_size must be a positive even number, got {self.group_size}")
        if self.chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {self.chunk_rows}")

    @property
    def is_symmetric(self) -> bool:
        return self.bits == 8 if self.symmetric is None else self.symmetric


def _register_weight(module: nn.Module, q: IntWeight) -> None:
    module.register_buffer("qcodes", q.codes)
    module.register_buffer("qscale", q.scale)
    module.register_buffer("qzero", q.zero)
    module.qshape, module.bits, module.group_size = q.shape, q.bits, q.group_size


def _int_weight(module: nn.Module) -> IntWeight:
    return IntWeight(codes=module.qcodes, scale=module.qscale, zero=module.qzero, shape=module.qshape,
                     bits=module.bits, group_size=module.group_size)


class IntWeightOnlyLinear(nn.Module):
    """A Linear whose weight is stored as int8 codes or packed int4 codes with group-wise scales (buffers)."""

    def __init__(self, q: IntWeight, bias: torch.Tensor | None, *, kernel: str = "auto", chunk_rows: int = 1024,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kernel, self.chunk_rows, self.dtype = kernel, chunk_rows, dtype
        _register_weight(self, q)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @property
    def int_weight(self) -> IntWeight:
        return _int_weight(self)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out, in) in the original dtype (for `model.loss`, export, inspection)."""
        return dequantize_weight(self.int_weight, self.dtype)

    def quantized_bytes(self) -> int:
        return self.int_weight.nbytes

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.kernel == "dequant" or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return False
        if x.requires_grad and torch.is_grad_enabled():
            return False  # the fused kernels have no derivative: training through the module dequantizes
        if self.bits == 8:
            return self.group_size == self.in_features
        return self.group_size in KERNEL_GROUP_SIZES

    def _kernel_scales(self) -> torch.Tensor:
        """The scales in the fused kernel's layout, built once and rebuilt only when qscale/qzero change.

        int8: bf16 (N,); int4: bf16 (G, Np, 2) scales and zeros, rows padded like the codes. Building the
        int4 one per call (stack + transpose + cast of every group's scale and zero) took as long as the
        matmul itself on SmolLM2's projections. The cache key is the buffers' identity and version counter,
        so `load_state_dict` (an in-place copy) or a `.to()` invalidates it; it is not in the state dict.
        """
        key = (self.qscale.data_ptr(), self.qscale._version,
               None if self.qzero is None else (self.qzero.data_ptr(), self.qzero._version))
        cached = self.__dict__.get("_kernel_scales_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            if self.bits == 8:
                scales = self.qscale[:, 0].to(torch.bfloat16).contiguous()
            else:
                zero = self.qzero if self.qzero is not None else torch.zeros_like(self.qscale)
                scales = torch.stack((self.qscale.t(), zero.t()), dim=-1).to(torch.bfloat16)  # (G, N, 2)
                if self.qcodes.shape[0] != self.out_features:  # rows padded to 32: pad the scales alike
                    scales = F.pad(scales, (0, 0, 0, self.qcodes.shape[0] - self.out_features))
                scales = scales.contiguous()
        self.__dict__["_kernel_scales_cache"] = (key, scales)
        return scales

    def _gemv_plan(self) -> IntGemvPlan | None:
        """The C decode kernel's prepared weight (int4: with its (blocks, groups, 2, 32) scale copy), cached on the
        buffers' identity and version counters (a `.to()` replaces them, `load_state_dict` bumps the versions);
        None when no C compiler is available. Read through `_buffers`: `nn.Module.__getattr__` is slow on a path
        taken ~200 times per decoded token."""
        buffers = self._buffers
        codes, scale, zero = buffers["qcodes"], buffers["qscale"], buffers["qzero"]
        versions = (codes._version, scale._version, None if zero is None else zero._version)
        cached = self.__dict__.get("_gemv_plan_cache")
        if (cached is not None and cached[0] is codes and cached[1] is scale and cached[2] is zero
                and cached[3] == versions):
            return cached[4]
        plan = None
        if int_gemv_available():
            with torch.no_grad():
                if self.bits == 8:
                    plan = IntGemvPlan(8, codes, scale, zero, self.qshape, self.group_size)
                else:
                    sz = int4_kernel_scales(scale, zero, codes.shape[0])
                    plan = IntGemvPlan(4, codes, sz, None, self.qshape, self.group_size)
        self.__dict__["_gemv_plan_cache"] = (codes, scale, zero, versions, plan)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.in_features
        if (self.kernel == "auto" and x.is_cpu and x.dtype == torch.float32 and x.numel() <= GEMV_MAX_ROWS * K
                and x.shape[-1] == K and not (x.requires_grad and torch.is_grad_enabled())):
            # decode: the C kernels, without reshape / view (each costs about as much as the kernel call)
            plan = self._gemv_plan()
            if plan is not None:
                y = plan.run(x if x.is_contiguous() else x.contiguous(), (*x.shape[:-1], self.out_features),
                             x.numel() // K, torch.get_num_threads())
                if self.bias is not None:
                    y += self.bias
                return y
        x2d = x.reshape(-1, K)  # (M, K)
        if self._use_kernel(x2d):
            xb = x2d.to(torch.bfloat16)
            if self.bits == 8:
                y = torch._weight_int8pack_mm(xb, self.qcodes, self._kernel_scales())
            else:
                y = torch._weight_int4pack_mm_for_cpu(xb, self.qcodes, self.group_size, self._kernel_scales())
                if y.shape[-1] != self.out_features:
                    y = y[:, :self.out_features]
            y = y.to(x.dtype)
        else:
            y = self._dequant_matmul(x2d)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _dequant_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """x @ W^T with W dequantized in row chunks (int4 unpacked per chunk), in x's dtype."""
        if self.out_features <= self.chunk_rows:
            return F.linear(x2d, dequantize_weight(self.int_weight, x2d.dtype))
        codes = unpack_int4(self.qcodes, self.qshape) if self.bits == 4 else self.qcodes
        outs = []
        for r in range(0, self.out_features, self.chunk_rows):
            sl = slice(r, r + self.chunk_rows)
            w = dequantize_codes(codes[sl], self.qscale[sl], None if self.qzero is None else self.qzero[sl], x2d.dtype)
            outs.append(F.linear(x2d, w))
        return torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"group_size={self.group_size}, symmetric={self.qzero is None}, kernel={self.kernel}")


class IntWeightOnlyEmbedding(nn.Module):
    """An Embedding whose table is stored like `IntWeightOnlyLinear`'s weight (rows = tokens); may share it."""

    def __init__(self, q: IntWeight, *, padding_idx: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx, self.dtype = padding_idx, dtype
        _register_weight(self, q)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_weight(_int_weight(self), self.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        K = self.embedding_dim
        if self.bits == 8:
            codes = self.qcodes[idx]  # (..., K)
        else:  # gather the rows out of the packed layout (blocks of 32 rows, two rows per byte)
            blocks = self.qcodes.view(-1, K // 4, 4, 16)
            b, h, n = idx // 32, (idx % 32) // 16, idx % 16
            raw = blocks[b, :, :, n]  # (..., K/4, 4)
            nib = torch.where(h[..., None, None].bool(), raw >> 4, raw & 15)
            codes = nib.reshape(*idx.shape, K).to(torch.int8) - 8
        flat = codes.reshape(-1, K)
        scale = self.qscale[idx].reshape(flat.shape[0], -1)
        zero = None if self.qzero is None else self.qzero[idx].reshape(flat.shape[0], -1)
        return dequantize_codes(flat, scale, zero, self.dtype).view(*idx.shape, K)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int{self.bits}, group_size={self.group_size}"


def quantize_module_weight(weight: torch.Tensor, config: WeightOnlyQuantConfig) -> IntWeight:
    kwargs = dict(bits=config.bits, group_size=config.group_size, symmetric=config.is_symmetric,
                  scale_dtype=SCALE_DTYPES[config.scale_dtype])
    if weight.is_meta:
        return empty_int_weight(tuple(weight.shape), device="meta", **kwargs)
    return quantize_weight(weight, **kwargs)


@register(WeightOnlyQuantConfig, name="weight_only_quant", stage=Stage.SURGERY, workload="generate")
def apply_weight_only_quant(model: nn.Module, config: WeightOnlyQuantConfig, *, filter_fn=None) -> ApplyReport:
    """Swap target Linear/Embedding modules for int8/int4 weight-only modules; tied weights stay shared."""
    select = fqn_filter(include=config.include, exclude=config.exclude)
    report = ApplyReport()
    shared: dict[int, IntWeight] = {}  # id(fp weight) -> its quantized form (tied embedding / lm_head)
    fp_bytes = q_bytes = 0
    targets = [(fqn, m) for fqn, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    for fqn, module in targets:
        if not select(module, fqn) or (filter_fn is not None and not filter_fn(module, fqn)):
            reason = select.skip_reason(fqn)
            if reason:
                report.skipped[fqn] = reason
            continue
        weight = module.weight
        if id(weight) not in shared:
            try:
                shared[id(weight)] = quantize_module_weight(weight, config)
            except ValueError as e:
                report.skipped[fqn] = str(e).split(";")[0]
                continue
            fp_bytes += weight.numel() * weight.element_size()
            q_bytes += shared[id(weight)].nbytes
        q = shared[id(weight)]
        if isinstance(module, nn.Linear):
            new = IntWeightOnlyLinear(q, module.bias, kernel=config.kernel, chunk_rows=config.chunk_rows,
                                      dtype=weight.dtype)
        else:
            new = IntWeightOnlyEmbedding(q, padding_idx=module.padding_idx, dtype=weight.dtype)
        parent_fqn, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(parent_fqn) if parent_fqn else model, attr, new)
        report.changed[fqn] = (type(module).__name__, type(new).__name__)
    if fp_bytes:
        kind = (f"int{config.bits} " + ("per-channel" if config.group_size is None else f"group {config.group_size}")
                + (" symmetric" if config.is_symmetric else " asymmetric") + f", {config.scale_dtype} scales")
        report.notes.append(f"{kind}: quantized weights {q_bytes / 2**20:.2f} MiB vs {fp_bytes / 2**20:.2f} MiB "
                            f"({q_bytes / fp_bytes:.3f}x, {8 * q_bytes * 4 / fp_bytes:.2f} bits/weight vs fp32)")
    if len(shared) < len(report.changed):
        report.notes.append("tied embedding and lm_head share one quantized table")
    return report


__all__ = ["IntWeightOnlyEmbedding", "IntWeightOnlyLinear", "WeightOnlyQuantConfig", "apply_weight_only_quant",
           "quantize_module_weight"]
