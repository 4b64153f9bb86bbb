"""FlashAttention-2 in Triton (Dao 2023, arXiv:2307.08691): forward, and backward as a dK/dV kernel
(one program per key block and key/value head, looping over the query heads of its group, so GQA
needs no atomics) plus a dQ kernel. Causal, sliding-window and document masks; fp32 arithmetic."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _allowed(offs_m, offs_n, T, doc_ptr, b, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, WINDOW,
             HAS_DOC: tl.constexpr):
    ok = (offs_m[:, None] < T) & (offs_n[None, :] < T)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_WINDOW:
        ok = ok & (offs_m[:, None] - offs_n[None, :] < WINDOW)
    if HAS_DOC:
        dq = tl.load(doc_ptr + b * T + offs_m, mask=offs_m < T, other=-1)
        dk = tl.load(doc_ptr + b * T + offs_n, mask=offs_n < T, other=-2)
        ok = ok & (dq[:, None] == dk[None, :])
    return ok


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, doc_ptr, T, H, G, scale, WINDOW,
                HD: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    hk = h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < HD
    q_base = bh.to(tl.int64) * T * HD
    kv_base = (b * (H // G) + hk).to(tl.int64) * T * HD
    q = tl.load(q_ptr + q_base + offs_m[:, None] * HD + offs_d[None, :], mask=(offs_m[:, None] < T) & md[None, :],
                other=0.0).to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo = 0
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, start_m + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m - WINDOW + 1) // BLOCK_N * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + kv_base + offs_n[:, None] * HD + offs_d[None, :],
                    mask=(offs_n[:, None] < T) & md[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_base + offs_n[:, None] * HD + offs_d[None, :],
                    mask=(offs_n[:, None] < T) & md[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale
        ok = _allowed(offs_m, offs_n, T, doc_ptr, b, CAUSAL, HAS_WINDOW, WINDOW, HAS_DOC)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(o_ptr + q_base + offs_m[:, None] * HD + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < T) & md[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * T + offs_m, m_i + tl.log(l_i), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, doc_ptr, T, H, G, scale,
                     WINDOW, HD: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_DOC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    Hk = H // G
    b, hk = bhk // Hk, bhk % Hk
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < HD
    kv_base = bhk.to(tl.int64) * T * HD
    kv_mask = (offs_n[:, None] < T) & md[None, :]
    k = tl.load(k_ptr + kv_base + offs_n[:, None] * HD + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + kv_base + offs_n[:, None] * HD + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = 0
    hi = T
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(T, start_n + BLOCK_N + WINDOW - 1)
    for gi in range(0, G):
        bh = (b * H + hk * G + gi).to(tl.int64)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_mask = (offs_m[:, None] < T) & md[None, :]
            q = tl.load(q_ptr + bh * T * HD + offs_m[:, None] * HD + offs_d[None, :], mask=q_mask,
                        other=0.0).to(tl.float32)
            do = tl.load(do_ptr + bh * T * HD + offs_m[:, None] * HD + offs_d[None, :], mask=q_mask,
                         other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + bh * T + offs_m, mask=offs_m < T, other=float("inf"))
            delta = tl.load(delta_ptr + bh * T + offs_m, mask=offs_m < T, other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            ok = _allowed(offs_m, offs_n, T, doc_ptr, b, CAUSAL, HAS_WINDOW, WINDOW, HAS_DOC)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p), do)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dk += tl.dot(tl.trans(ds), q)
    tl.store(dk_ptr + kv_base + offs_n[:, None] * HD + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=kv_mask)
    tl.store(dv_ptr + kv_base + offs_n[:, None] * HD + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, doc_ptr, T, H, G, scale, WINDOW,
                   HD: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DOC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    md = offs_d < HD
    q_base = bh.to(tl.int64) * T * HD
    kv_base = (b * (H // G) + h // G).to(tl.int64) * T * HD
    q_mask = (offs_m[:, None] < T) & md[None, :]
    q = tl.load(q_ptr + q_base + offs_m[:, None] * HD + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + q_base + offs_m[:, None] * HD + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo = 0
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, start_m + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m - WINDOW + 1) // BLOCK_N * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < T) & md[None, :]
        k = tl.load(k_ptr + kv_base + offs_n[:, None] * HD + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_base + offs_n[:, None] * HD + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale
        ok = _allowed(offs_m, offs_n, T, doc_ptr, b, CAUSAL, HAS_WINDOW, WINDOW, HAS_DOC)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds, k)
    tl.store(dq_ptr + q_base + offs_m[:, None] * HD + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=q_mask)


def _blocks(device: torch.device, head_dim: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":  # the interpreter: small tiles keep the tests fast
        return 16, 16, block_d
    return (64, 64, block_d) if block_d <= 64 else (64, 32, block_d)


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, causal, window, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        G = H // k.shape[1]
        bm, bn, bd = _blocks(q.device, D)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        doc = doc_ids.contiguous() if doc_ids is not None else q  # a dummy pointer when unused
        _fwd_kernel[(triton.cdiv(T, bm), B * H)](q, k, v, out, lse, doc, T, H, G, scale, window or 0, HD=D,
                                                 CAUSAL=causal, HAS_WINDOW=window is not None,
                                                 HAS_DOC=doc_ids is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        ctx.save_for_backward(q, k, v, out, lse, doc_ids)
        ctx.options = (causal, window, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, doc_ids = ctx.saved_tensors
        causal, window, scale = ctx.options
        do = do.contiguous()
        B, H, T, D = q.shape
        G = H // k.shape[1]
        bm, bn, bd = _blocks(q.device, D)
        delta = (do.float() * out.float()).sum(-1).contiguous()  # (B, nh, T)
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # rows that see nothing: p = 0
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        doc = doc_ids.contiguous() if doc_ids is not None else q
        common = dict(HD=D, CAUSAL=causal, HAS_WINDOW=window is not None, HAS_DOC=doc_ids is not None,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        _bwd_dkdv_kernel[(triton.cdiv(T, bn), B * k.shape[1])](q, k, v, do, lse, delta, dk, dv, doc, T, H, G, scale,
                                                               window or 0, **common)
        _bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](q, k, v, do, lse, delta, dq, doc, T, H, G, scale, window or 0,
                                                    **common)
        return dq, dk, dv, None, None, None, None


def flash_attention_triton(q, k, v, *, causal, window, doc_ids, scale):
    return _TritonAttention.apply(q, k, v, doc_ids, causal, window, scale)
