"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

The adapted weight is split into a magnitude and a direction, per output row (the paper's "column"
of W in its (d, k) notation; PEFT's `lora_magnitude_vector`):

    W' = m * (W + s B A) / ||W + s B A||_row,      y = x W'^T + b,      s = alpha / r

`m` (out,) is trainable and starts at ||W||_row; `B` starts at zero, so W' = W at apply. We compute

    y = g * (x W^T + s (x A^T) B^T) + b,      g = m / ||W + s B A||_row

in one autograd Function per layer (`_DoRAFunction`); the merged weight never exists.

Norm without the merged weight: per output row i,
    ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <W_i, (BA)_i> + s^2 ||(BA)_i||^2,
    <W_i, (BA)_i> = sum_j (W A^T)_ij B_ij       (W A^T is (out, r))
    ||(BA)_i||^2  = B_i (A A^T) B_i^T            (A A^T is (r, r)),
with ||W||_row^2 cached while the frozen W is unchanged (keyed on its version counter). A W^T comes
from the base GEMM itself, run on [x; A] (N + r rows), so W is read once per forward. The whole norm
is cached while W, A and B are unchanged (their version counters), so eval, decoding and the
gradient-accumulation micro-batches after the first reuse it (and skip the extra rows).

Memory trick (DoRA §4.3): the norm is treated as a constant, i.e. detached from the graph (computed
under no_grad), as the paper and PEFT do; the gradient reaches `m` and, through the direction's
numerator, A and B, but not through the norm. This saves the backward of the norm and its saved
(out, in) tensors; the paper reports no accuracy difference.

Numerics contract: at apply m equals the norm bit for bit, so g = 1 exactly, but the [x; A] GEMM may
round x W^T differently from a GEMM of x alone: outputs equal the base model's to fp32 rounding (the
contract matrix: atol 1e-6, rtol 1e-5). Merge within 1e-5 (fp32); revert exact; with dropout, dropout
applies to the low-rank input only. Under autocast or mixed dtypes the same formula runs in plain
autograd ops (`DoRALinear._forward_autograd`, tested equal to the Function).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.core import ApplyReport, Stage, register, register_revert
from llmopt.techniques.lora import LoRAConfig, LoRALinear, add_lora_, apply_adapters, revert_adapters


@dataclass(frozen=True, kw_only=True)
class DoRAConfig(LoRAConfig):
    """DoRA: LoRA's update on a normalized direction, times a trainable per-row magnitude (Liu et al. 2024)."""

    target: tuple[str, ...] = ("all-linear",)
    """Modules to adapt. Default: every Linear but lm_head, the DoRA paper's setting (LoRA's default is q, v)."""


class _DoRAFunction(torch.autograd.Function):
    """out = g * (x W^T + s (xd A^T) B^T) + b, g = m / ||W + s B A||_row (detached), in one autograd node.

    Forward: with `fuse`, the base GEMM runs on [x; A] so that its last r rows are A W^T, the norm's only
    (r, out)-sized read of W (W is read once instead of twice); the norm comes from that in four small ops.
    Saves x, xd, xa = xd A^T, the pre-scale output and g; nothing (out, in)-sized.
    Backward: gg = grad * g; grad_m = sum_n(grad * pre) / norm; grad_x = gg W + s (gg B) A; grad_B = s gg^T xa;
    grad_A = s (gg B)^T xd: LoRA's GEMMs plus one (N, out) multiply and one column reduction.
    """

    @staticmethod
    def forward(ctx, x2d, xd, weight, bias, lora_A, lora_B, magnitude, layer, key, norm):
        n = x2d.shape[0]
        if norm is None and layer.fuse_norm_gemm:
            z = F.linear(torch.cat((x2d, lora_A)), weight)  # (N + r, out): x W^T and A W^T from one read of W
            pre, wa = z[:n], z[n:].t()
            norm = layer._norm_from_wa(wa)
            layer._norm_cache = (key, norm)
        else:
            if norm is None:
                norm = layer._norm_from_wa(F.linear(lora_A, weight).t())
                layer._norm_cache = (key, norm)
            pre = F.linear(x2d, weight)
        xa = F.linear(xd, lora_A)  # (N, r)
        pre.addmm_(xa, lora_B.t(), alpha=layer.scale)  # x W^T + s xa B^T, (N, out)
        g = magnitude / norm
        out = pre * g if bias is None else torch.addcmul(bias, pre, g)
        ctx.save_for_backward(x2d, xd, xa, pre, weight, lora_A, lora_B, g, norm)
        ctx.scale, ctx.same_input, ctx.has_bias = layer.scale, xd is x2d, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x2d, xd, xa, pre, weight, lora_A, lora_B, g, norm = ctx.saved_tensors
        s = ctx.scale
        need_x, need_xd, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:7]
        grad_x = grad_xd = grad_w = grad_bias = grad_a = grad_bb = grad_m = None
        gg = grad * g  # (N, out)
        if need_m:
            grad_m = torch.linalg.vecdot(grad, pre, dim=0) / norm
        if need_b:
            grad_bias = grad.sum(0)
        if need_w:  # only if the caller unfroze W (the norm is detached: no gradient through it)
            grad_w = gg.t() @ x2d
        t = gg @ lora_B  # (N, r)
        if need_x:
            grad_x = gg @ weight
            if ctx.same_input:
                grad_x.addmm_(t, lora_A, alpha=s)
        if need_xd and not ctx.same_input:  # dropout's input: its backward takes it to x
            grad_xd = torch.mm(t, lora_A).mul_(s)
        if need_bb:
            grad_bb = torch.mm(gg.t(), xa).mul_(s)
        if need_a:
            grad_a = torch.mm(t.t(), xd).mul_(s)
        return grad_x, grad_xd, grad_w, grad_bias, grad_a, grad_bb, grad_m, None, None, None


class DoRALinear(LoRALinear):
    """LoRALinear plus a trainable magnitude `lora_magnitude` (out,); the row norm is detached."""

    fuse_norm_gemm = True
    """Compute A W^T as r extra rows of the base GEMM ([x; A] W^T). It changes the rounding of x W^T (~1e-7
    relative), so outputs at apply equal the base model's to fp32 rounding instead of bit for bit."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int, alpha: float,
                 dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, r=r, alpha=alpha, dropout=dropout, device=device,
                         dtype=dtype)
        self.lora_magnitude = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        self._weight_sq: tuple[tuple[int, int], torch.Tensor] | None = None
        self._norm_cache: tuple[tuple[int, ...], torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0) -> DoRALinear:
        new = super().from_linear(linear, r=r, alpha=alpha, dropout=dropout)
        new.lora_magnitude = nn.Parameter(torch.empty(linear.out_features, device=linear.weight.device,
                                                      dtype=linear.weight.dtype))
        new.reset_magnitude()
        return new

    def reset_magnitude(self) -> None:
        """m = ||W + s B A||_row computed exactly as the forward does, so that g = m / norm is exactly 1."""
        with torch.no_grad():
            if not self.weight.is_meta:
                self.lora_magnitude.copy_(self.row_norm())

    def _row_sq_of_weight(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)
        if self._weight_sq is None or self._weight_sq[0] != key:
            self._weight_sq = (key, w.pow(2).sum(dim=1))
        return self._weight_sq[1]

    def _norm_key(self) -> tuple[int, ...]:
        w, a, b = self.weight, self.lora_A, self.lora_B
        return (w.data_ptr(), w._version, a.data_ptr(), a._version, b.data_ptr(), b._version)

    @torch.no_grad()
    def _row_norm_given(self, wa: torch.Tensor) -> torch.Tensor:
        return self._norm_from_wa(wa)

    def _norm_from_wa(self, wa: torch.Tensor) -> torch.Tensor:
        """The row norm from W A^T (out, r): ||W_i||^2 + s <B_i, 2 (W A^T)_i + s B_i (A A^T)>, in four ops.

        Called with grad mode off (inside the autograd Function's forward, or through `_row_norm_given`)."""
        a, b, s = self.lora_A, self.lora_B, self.scale
        u = torch.addmm(wa.to(b.dtype), b, a @ a.t(), beta=2, alpha=s)  # 2 W A^T + s B A A^T, (out, r)
        sq = torch.add(self._row_sq_of_weight(), torch.linalg.vecdot(b, u), alpha=s)
        return sq.clamp_min_(0).sqrt_()

    @torch.no_grad()
    def row_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row (out,), without the merged weight; detached (DoRA §4.3)."""
        # A W^T as F.linear(A, W): the (r, in) x (in, out) orientation of the base forward GEMM, ~1.5x
        # faster on CPU than W @ A^T, whose skinny (out, in) x (in, r) shape re-reads W poorly
        return self._row_norm_given(F.linear(self.lora_A, self.weight).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)  # (N, in)
        w, a, b, m = self.weight, self.lora_A, self.lora_B, self.lora_magnitude
        if (not torch.is_autocast_enabled(x.device.type) and x.dtype == w.dtype == a.dtype == b.dtype == m.dtype
                and (self.bias is None or self.bias.dtype == x.dtype)):
            xd = F.dropout(x2d, p=self.dropout, training=True) if self.dropout and self.training else x2d
            key = (w.data_ptr(), w._version, a.data_ptr(), a._version, b.data_ptr(), b._version)
            cache = self._norm_cache  # eval, gradient-accumulation micro-batches and decoding reuse the norm
            norm = cache[1] if cache is not None and cache[0] == key else None
            out = _DoRAFunction.apply(x2d, xd, w, self.bias, a, b, m, self, key, norm)
            return out.view(*x.shape[:-1], self.out_features)
        return self._forward_autograd(x2d).view(*x.shape[:-1], self.out_features)

    def _forward_autograd(self, x2d: torch.Tensor) -> torch.Tensor:
        """Mixed dtypes or autocast: the same formula in autograd ops (g == 1 gives the base output exactly)."""
        key = self._norm_key()
        if self._norm_cache is None or self._norm_cache[0] != key:  # eval, accumulation, decode reuse it
            self._norm_cache = (key, self.row_norm())
        norm = self._norm_cache[1]
        y = F.linear(x2d, self.weight, self.bias)  # (N, out)
        y = add_lora_(y, x2d, self.lora_A, self.lora_B, self.scale, self.dropout, self.training)
        g = (self.lora_magnitude / norm).to(y.dtype)  # (out,); gradient reaches m only
        if self.bias is None:
            out = y * g
        else:  # g (y - b) + b written so that g == 1 gives y exactly
            out = torch.addcmul(self.bias.to(y.dtype) * (1 - g), y, g)
        return out

    def merged_weight(self) -> torch.Tensor:
        """m * (W + s B A) / ||W + s B A||_row, (out, in)."""
        with torch.no_grad():
            direction = self.weight + self.delta_weight().to(self.weight.dtype)
            return direction * (self.lora_magnitude / direction.norm(dim=1)).to(direction.dtype)[:, None]

    def to_linear(self, *, merge: bool) -> nn.Linear:
        if merge:
            with torch.no_grad():
                self.weight.copy_(self.merged_weight())
        return super().to_linear(merge=False)


@register(DoRAConfig, name="dora", stage=Stage.SURGERY, workload="train")
def apply_dora(model: nn.Module, config: DoRAConfig, *, filter_fn=None) -> ApplyReport:
    """Swap the target nn.Linear modules for DoRALinear and freeze everything but the adapters."""
    def build(module: nn.Module, fqn: str) -> DoRALinear:
        return DoRALinear.from_linear(module, r=config.r, alpha=config.alpha, dropout=config.dropout)

    report = apply_adapters(model, target=config.target, exclude=config.exclude, build=build, filter_fn=filter_fn)
    report.notes.append("m = ||W||_row and B=0 at init (outputs unchanged); the row norm is detached (DoRA §4.3)")
    return report


@register_revert(DoRAConfig)
def revert_dora(model: nn.Module, report: ApplyReport) -> ApplyReport:
    """Swap DoRALinear back to nn.Linear (same Parameters, or the merged weight through merge_)."""
    return revert_adapters(model, report, {DoRALinear: lambda m, merge: m.to_linear(merge=merge)})


__all__ = ["DoRAConfig", "DoRALinear", "apply_dora", "revert_dora"]
