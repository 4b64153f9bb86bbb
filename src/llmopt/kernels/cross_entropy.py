"""Fused linear + cross-entropy, computed in chunks of rows so that the (N, V) logits never exist.

`fused_linear_cross_entropy(hidden, weight, targets)` has the signature of `model.loss_fn`
(`llmopt.models.loss.linear_cross_entropy`): (sum of token losses in fp32, target-token count).

The chunked path (Liger-Kernel's FLCE, Hsu et al. 2024, arXiv:2410.10989; Cut Cross-Entropy,
Wijmans et al. 2024, arXiv:2411.09009, for the analysis) computes, per chunk of `chunk_size` rows,
the logits (c, V), their logsumexp, the loss, and the gradient of the loss w.r.t. the logits
(softmax - one_hot), which it turns at once into the gradient w.r.t. the chunk's hidden rows
(c, dim) and adds into the gradient w.r.t. the weight (V, dim, accumulated in fp32). The logits
chunk is then dropped. Backward only scales the saved gradients by the incoming grad_output, so
autograd saves (N, dim) + (V, dim) and nothing of size N x V; the step does the same three matmuls
as the unfused loss. The gradients are computed during the forward only when autograd needs them.

Backends: "reference" (the full-logits loss, `F.cross_entropy(h @ W.T)`), "chunked" (the CPU path:
chunks in eager torch, in place), "triton" (the same chunks; the logsumexp, loss and in-place
softmax - one_hot of each chunk in one Triton kernel; Liger's structure). "auto" picks "triton"
on CUDA and "chunked" elsewhere.

Numerics contract: the logits of a row are the same matmul as the reference's, and the loss and
gradients are exact up to float reordering: in fp32 within 1e-5 relative of the reference
(tests/kernels/test_cross_entropy.py, also at a 256k vocabulary; typically ~1e-7); in bf16 the
weight gradient is *more* accurate than the reference's (accumulated across chunks in fp32).
"""

from __future__ import annotations

import torch

from llmopt.kernels._dispatch import resolve_backend
from llmopt.models.loss import linear_cross_entropy

__all__ = ["LogitsWorkspace", "default_chunk_size", "fused_linear_cross_entropy", "linear_cross_entropy_reference"]

BACKENDS = ("reference", "chunked", "triton")

CHUNK_BYTES = 16 * 2**20
"""Default budget for one chunk of fp32 logits: 16 MiB (128 rows at V=32k, 16 rows at V=256k)."""

linear_cross_entropy_reference = linear_cross_entropy
"""The full-logits loss the fused one must match: `F.cross_entropy((h @ W.T).float(), t, reduction="sum")`."""


def default_chunk_size(n_rows: int, vocab_size: int) -> int:
    """Rows per chunk: the largest power of two whose fp32 logits fit in CHUNK_BYTES (at least 16)."""
    rows = max(16, CHUNK_BYTES // (4 * vocab_size))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, n_rows))


class LogitsWorkspace:
    """One preallocated fp32 (rows, V) buffer that every chunk of every call reuses (`buffer_reuse`): the
    chunk's logits are written into it by `torch.mm(..., out=)` instead of a fresh allocation per chunk and per
    step. It grows (once) when a call needs more rows or another vocabulary size; `nbytes` reports it."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        b = self.buffer
        if b is None or b.shape[0] < rows or b.shape[1] != vocab or b.device != device:
            self.buffer = b = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        return b[:rows]

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()


def _chunk_loss_and_grad_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                               want_grad: bool) -> torch.Tensor:
    """Loss per row (c,) of fp32 logits (c, V); if `want_grad`, overwrite logits with d loss / d logits.

    Everything vocabulary-sized happens in place on the chunk (torch.logsumexp would allocate another (c, V)).
    """
    valid = targets != ignore_index  # (c,)
    safe = targets.masked_fill(~valid, 0)[:, None]  # (c, 1)
    target_logit = logits.gather(1, safe).squeeze(1)  # (c,)
    if not want_grad:
        return (torch.logsumexp(logits, dim=-1) - target_logit) * valid
    m = logits.amax(dim=-1, keepdim=True)  # (c, 1)
    logits.sub_(m).exp_()  # exp(x - max)
    total = logits.sum(dim=-1, keepdim=True)  # (c, 1)
    loss = ((m + total.log()).squeeze(1) - target_logit) * valid
    logits.div_(total)  # softmax
    logits.scatter_add_(1, safe, -valid[:, None].to(logits.dtype))  # - one_hot(target)
    logits.mul_(valid[:, None])  # ignored rows have no gradient
    return loss


def _chunk_loss_and_grad(logits, targets, ignore_index, want_grad, use_triton):
    if use_triton:
        from llmopt.kernels.triton.cross_entropy import cross_entropy_rows_inplace

        return cross_entropy_rows_inplace(logits, targets, ignore_index, want_grad)
    return _chunk_loss_and_grad_torch(logits, targets, ignore_index, want_grad)


def _chunked_forward(hidden, weight, targets, ignore_index, chunk_size, use_triton, need_h, need_w, workspace=None):
    """(loss sum, grad_hidden or None, grad_weight (fp32) or None), chunk by chunk."""
    n = hidden.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for start in range(0, n, chunk_size):
        h = hidden[start:start + chunk_size]  # (c, dim)
        if workspace is not None and h.dtype == torch.float32 and weight.dtype == torch.float32:
            logits = torch.mm(h, weight.t(), out=workspace.get(h.shape[0], weight.shape[0], h.device))
        else:
            logits = (h @ weight.t()).float()  # (c, V): the only vocabulary-sized tensor, one chunk at a time
        loss += _chunk_loss_and_grad(logits, targets[start:start + chunk_size], ignore_index,
                                     need_h or need_w, use_triton).sum()
        if need_h or need_w:
            g = logits.to(hidden.dtype)  # d loss / d logits (c, V)
            if need_h:
                torch.mm(g, weight, out=grad_h[start:start + chunk_size])
            if need_w:
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += (g.t() @ h).float()
        del logits
    return loss, grad_h, grad_w


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, use_triton, workspace=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_h, grad_w = _chunked_forward(hidden, weight, targets, ignore_index, chunk_size, use_triton,
                                                need_h, need_w, workspace)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)  # (N, dim) and (V, dim): nothing of size N x V
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place (as Liger does): no second (V, dim) copy at the peak, so a second backward through
        # the same graph (retain_graph=True) is refused rather than silently wrong
        if getattr(ctx, "consumed", False):
            raise RuntimeError("fused_linear_cross_entropy's backward ran twice (retain_graph=True); recompute the "
                               "loss for each backward, or use backend='reference'")
        ctx.consumed = True
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, *, backend: str = "auto",
                               chunk_size: int | None = None,
                               workspace: LogitsWorkspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, dim), weight (V, dim), targets (N,) -> (loss sum (fp32 scalar), token count (int64 scalar)).

    Same result as `F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index, reduction="sum")`
    without the (N, V) logits (see the module docstring). `chunk_size`: rows per chunk (default
    `default_chunk_size`: 16 MiB of fp32 logits). `workspace`: a `LogitsWorkspace` whose buffer holds every
    chunk's fp32 logits (no allocation per chunk; the chunked CPU path with fp32 weights).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1 or hidden.shape[0] != targets.shape[0] \
            or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, dim), weight (V, dim), targets (N,); got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)} (flatten batch and time first)")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    which = resolve_backend(backend, hidden.device, "chunked", BACKENDS)
    if which == "reference":
        return linear_cross_entropy_reference(hidden, weight, targets, ignore_index)
    count = (targets != ignore_index).sum()
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    use_triton = which == "triton"
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk, use_triton, workspace)
    else:
        loss = _chunked_forward(hidden, weight, targets, ignore_index, chunk, use_triton, False, False, workspace)[0]
    return loss, count
