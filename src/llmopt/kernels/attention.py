"""Exact attention with memory linear in sequence length, forward and backward, on CPU and GPU.

FlashAttention (Dao et al. 2022, arXiv:2205.14135; FlashAttention-2, Dao 2023, arXiv:2307.08691):
the (T, T) score matrix is never stored. The forward walks key/value blocks with an online softmax
(running max `m`, running sum `l`, rescaled accumulator) per block of queries; the backward
recomputes each score tile from q, k and the saved logsumexp. The custom autograd Function saves
only q, k, v, the output and the logsumexp (B, nh, T): O(T) memory instead of O(T^2).

Masks (combined): `causal`; `window=w` (sliding window, causal: query i sees keys i-w+1 .. i, as
Mistral's); `doc_ids` (B, T) integer document ids of packed sequences: a query sees only keys of
its own document. Tiles that the mask empties entirely are skipped (about half the work when causal).
Grouped-query attention: k, v may have fewer heads (nh a multiple of nkv); the query heads of a
group are folded into the rows of one tile, so k and v are never repeated.

Backends: "reference" (materialized scores and mask, fp32 softmax; the oracle), "tiled" (the
online-softmax implementation above in torch; the CPU path for windows and documents, and the only
trainable masked attention on CPU: flex_attention has no CPU backward), "sdpa"
(`F.scaled_dot_product_attention`, whose CPU and CUDA flash kernels cover plain causal or full
attention), "triton" (a FlashAttention-2 kernel pair, forward and backward, with the same masks).
"auto": Triton on CUDA; on CPU SDPA when there is no window or document mask, else "tiled".

Numerics contract: exact attention; in fp32 the output and gradients match the reference within
~1e-6 relative (reordered sums); bf16 inputs are computed in fp32 inside (tiled, Triton) and rounded once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llmopt.kernels._dispatch import resolve_backend

__all__ = ["attention_mask", "attention_reference", "flash_attention"]

BACKENDS = ("reference", "tiled", "sdpa", "triton")


def _check(q, k, v, window, doc_ids):
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"expected q (B, nh, T, hd) and k, v (B, nkv, T, hd); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"query and key lengths differ ({q.shape[2]} vs {k.shape[2]}); for cached decoding "
                         "use F.scaled_dot_product_attention with the cache's mask")
    if window is not None and window <= 0:
        raise ValueError(f"window must be a positive number of tokens, got {window}")
    if doc_ids is not None and (doc_ids.shape != (q.shape[0], q.shape[2]) or doc_ids.is_floating_point()):
        raise ValueError(f"doc_ids must be integer (B, T) = {(q.shape[0], q.shape[2])}, got "
                         f"{doc_ids.dtype} {tuple(doc_ids.shape)}")


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool, window: int | None,
                   doc_q: torch.Tensor | None, doc_k: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean allowed-mask (B or 1, len(q_pos), len(k_pos)), or None when everything is allowed."""
    mask = None
    if causal:
        mask = (k_pos[None, :] <= q_pos[:, None])[None]
    if window is not None:
        near = (q_pos[:, None] - k_pos[None, :] < window)[None]
        mask = near if mask is None else mask & near
    if doc_q is not None:
        same = doc_q[:, :, None] == doc_k[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def attention_reference(q, k, v, *, causal: bool = True, window: int | None = None,
                        doc_ids: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Materialized (B, nh, T, T) scores with the full mask, softmax in fp32: the oracle."""
    _check(q, k, v, window, doc_ids)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    pos = torch.arange(q.shape[2], device=q.device)
    mask = attention_mask(pos, pos, causal=causal, window=window, doc_q=doc_ids, doc_k=doc_ids)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, nh, T, T)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


# ---- tiled (online softmax) implementation in torch --------------------------------------------------

def _key_blocks(q0, q1, T, block_k, causal, window):
    """Key block starts that the causal/window mask does not empty for queries q0..q1-1."""
    lo = max(0, q0 - window + 1) if window is not None else 0
    hi = q1 if causal or window is not None else T
    return range((lo // block_k) * block_k, hi, block_k)


def _tile_mask(q0, q1, k0, k1, device, causal, window, doc_ids):
    """(allowed mask (B|1, 1, 1, Bq, Bk) or None, whether any entry is allowed)."""
    if not causal and window is None and doc_ids is None:
        return None, True
    q_pos, k_pos = torch.arange(q0, q1, device=device), torch.arange(k0, k1, device=device)
    full_causal = causal and k1 - 1 <= q0 and (window is None or q1 - 1 - k0 < window)
    if full_causal and doc_ids is None:
        return None, True
    doc_q = doc_ids[:, q0:q1] if doc_ids is not None else None
    doc_k = doc_ids[:, k0:k1] if doc_ids is not None else None
    mask = attention_mask(q_pos, k_pos, causal=causal, window=window, doc_q=doc_q, doc_k=doc_k)
    return mask[:, None, None], bool(mask.any())


def _fold(x, q0, q1, groups):
    """Rows q0..q1 of x (B, nh, T, d) as (B, nkv, groups * (q1 - q0), d) in fp32: a group's heads become rows."""
    B, H, _, d = x.shape
    return x[:, :, q0:q1].float().reshape(B, H // groups, groups * (q1 - q0), d)


def _tiled_forward(q, k, v, causal, window, doc_ids, scale, block_q, block_k):
    B, H, T, D = q.shape
    Hk = k.shape[1]
    g = H // Hk
    out = torch.empty(B, Hk, g, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hk, g, T, dtype=torch.float32, device=q.device)
    qv = q.view(B, Hk, g, T, D)
    for q0 in range(0, T, block_q):
        q1 = min(q0 + block_q, T)
        n = q1 - q0
        qb = qv[:, :, :, q0:q1].float().reshape(B, Hk, g * n, D) * scale  # (B, nkv, g*Bq, hd)
        m = torch.full((B, Hk, g * n), float("-inf"), device=q.device)
        l = torch.zeros(B, Hk, g * n, device=q.device)
        acc = torch.zeros(B, Hk, g * n, D, device=q.device)
        for k0 in _key_blocks(q0, q1, T, block_k, causal, window):
            k1 = min(k0 + block_k, T)
            mask, any_allowed = _tile_mask(q0, q1, k0, k1, q.device, causal, window, doc_ids)
            if not any_allowed:
                continue
            s = qb @ k[:, :, k0:k1].float().transpose(-1, -2)  # (B, nkv, g*Bq, Bk)
            if mask is not None:
                s = s.view(B, Hk, g, n, k1 - k0).masked_fill(~mask, float("-inf")).view(B, Hk, g * n, k1 - k0)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing allowed yet
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ v[:, :, k0:k1].float()
            m = m_new
        out[:, :, :, q0:q1] = (acc / l.clamp_min(1e-30)[..., None]).view(B, Hk, g, n, D).to(q.dtype)
        lse[:, :, :, q0:q1] = (m + torch.log(l)).view(B, Hk, g, n)  # -inf for a row that sees nothing
    return out.view(B, H, T, D), lse.view(B, H, T)


def _tiled_backward(do, q, k, v, out, lse, causal, window, doc_ids, scale, block_q, block_k):
    B, H, T, D = q.shape
    Hk = k.shape[1]
    g = H // Hk
    dq = torch.empty(B, Hk, g, T, D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(B, Hk, T, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B, Hk, T, D, dtype=torch.float32, device=q.device)
    delta = (do.float() * out.float()).sum(-1)  # (B, nh, T): rowsum(dO * O)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # rows that see nothing: p = 0
    for q0 in range(0, T, block_q):
        q1 = min(q0 + block_q, T)
        n = q1 - q0
        qb = _fold(q, q0, q1, g) * scale
        dob = _fold(do, q0, q1, g)
        lse_b = lse[:, :, q0:q1].reshape(B, Hk, g * n, 1)
        delta_b = delta[:, :, q0:q1].reshape(B, Hk, g * n, 1)
        dq_acc = torch.zeros(B, Hk, g * n, D, device=q.device)
        for k0 in _key_blocks(q0, q1, T, block_k, causal, window):
            k1 = min(k0 + block_k, T)
            mask, any_allowed = _tile_mask(q0, q1, k0, k1, q.device, causal, window, doc_ids)
            if not any_allowed:
                continue
            kb, vb = k[:, :, k0:k1].float(), v[:, :, k0:k1].float()
            s = qb @ kb.transpose(-1, -2)  # (B, nkv, g*Bq, Bk), recomputed
            if mask is not None:
                s = s.view(B, Hk, g, n, k1 - k0).masked_fill(~mask, float("-inf")).view(B, Hk, g * n, k1 - k0)
            p = torch.exp(s - lse_b)
            dv[:, :, k0:k1] += p.transpose(-1, -2) @ dob
            ds = p * (dob @ vb.transpose(-1, -2) - delta_b)
            dq_acc += ds @ kb
            dk[:, :, k0:k1] += ds.transpose(-1, -2) @ qb
        dq[:, :, :, q0:q1] = (dq_acc * scale).view(B, Hk, g, n, D).to(q.dtype)
    return dq.view(B, H, T, D), dk.to(k.dtype), dv.to(v.dtype)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, causal, window, scale, block_q, block_k):
        out, lse = _tiled_forward(q, k, v, causal, window, doc_ids, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)  # O(T): no score matrix
        ctx.options = (causal, window, scale, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        causal, window, scale, block_q, block_k = ctx.options
        dq, dk, dv = _tiled_backward(do, q, k, v, out, lse, causal, window, doc_ids, scale, block_q, block_k)
        return dq, dk, dv, None, None, None, None, None, None


# ---- dispatch -----------------------------------------------------------------------------------------

def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: int | None = None, doc_ids: torch.Tensor | None = None, scale: float | None = None,
                    backend: str = "auto", block_q: int = 256, block_k: int = 512) -> torch.Tensor:
    """Exact attention, q (B, nh, T, hd), k and v (B, nkv, T, hd) -> (B, nh, T, hd), memory O(T).

    `window`: sliding window in tokens (needs causal=True). `doc_ids` (B, T): per-token document ids
    of packed sequences. `block_q`/`block_k`: tile sizes of the "tiled" backend. See the module docstring.
    """
    _check(q, k, v, window, doc_ids)
    if window is not None and not causal:
        raise ValueError("window is a causal sliding window; pass causal=True with it")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    which = resolve_backend(backend, q.device, "tiled", BACKENDS)
    if backend == "auto" and which == "tiled" and window is None and doc_ids is None:
        which = "sdpa"  # SDPA's flash kernels cover plain causal/full attention on CPU and GPU
    if which == "reference":
        return attention_reference(q, k, v, causal=causal, window=window, doc_ids=doc_ids, scale=scale)
    if which == "sdpa":
        if window is not None or doc_ids is not None:
            raise ValueError("backend='sdpa' has no sliding-window or document masks here (its flash kernels take "
                             "no mask); use backend='tiled' or 'auto'")
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if which == "triton":
        from llmopt.kernels.triton.attention import flash_attention_triton

        return flash_attention_triton(q, k, v, causal=causal, window=window, doc_ids=doc_ids, scale=scale)
    if doc_ids is not None:
        doc_ids = doc_ids.to(q.device)
    return _TiledAttention.apply(q, k, v, doc_ids, causal, window, scale, block_q, block_k)
