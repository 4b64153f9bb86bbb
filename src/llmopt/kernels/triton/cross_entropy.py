"""Row-wise cross-entropy over a chunk of fp32 logits, writing d loss / d logits in place (Liger's CE kernel)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows_kernel(logits_ptr, stride, targets_ptr, loss_ptr, V, ignore_index,
                               BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    # online logsumexp over the vocabulary, BLOCK columns at a time
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    valid = target != ignore_index
    safe = tl.where(valid, target, 0)
    target_logit = tl.load(ptr + safe).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - target_logit, 0.0))
    if WRITE_GRAD:
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == safe, 1.0, 0.0)
            g = tl.where(valid, g, 0.0)
            tl.store(ptr + cols, g, mask=cols < V)


def cross_entropy_rows_inplace(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                               want_grad: bool) -> torch.Tensor:
    """Loss per row (c,) of fp32 logits (c, V); with `want_grad`, logits become softmax - one_hot (0 if ignored)."""
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    c, V = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    block = min(triton.next_power_of_2(V), 4096)
    _cross_entropy_rows_kernel[(c,)](logits, logits.stride(0), targets.contiguous(), loss, V, ignore_index,
                                     BLOCK=block, WRITE_GRAD=want_grad, num_warps=8)
    return loss
