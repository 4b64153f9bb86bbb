"""Chunkwise retention (RetNet) as a Triton kernel (forward, for prefill and inference), beside the torch
forms in `llmopt.models.retnet` (`retention_recurrent` is the reference, `retention_chunkwise` the CPU path).

One program per (batch row, head) keeps the (d, d_v) state in registers and walks the sequence a chunk
at a time: inside the chunk the decay-masked (q k^T ⊙ D) v with `tl.dot`, across chunks the state
(q ⊙ γ^(j+1)) S and S <- γ^n S + (k ⊙ γ^(n-1-j))^T v, with n the chunk's real length (the last chunk may
be short). No backward: training uses the torch forms. Runs under `TRITON_INTERPRET=1` on CPU for tests.

Numerics contract: fp32 (tl.dot with allow_tf32=False); within ~1e-5 of `retention_recurrent`.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["retention_chunkwise_triton", "use_triton_retention_"]


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise ImportError("the Triton retention needs triton: pip install triton (or llmopt[gpu])") from e

    @triton.jit
    def retention_fwd(q_ptr, k_ptr, v_ptr, lg_ptr, s_ptr, o_ptr, H, T, DK, DV,
                      CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
        bh = tl.program_id(0)
        head = bh % H
        lg = tl.load(lg_ptr + head)
        j = tl.arange(0, CHUNK)
        dk = tl.arange(0, BLOCK_K)
        dv = tl.arange(0, BLOCK_V)
        s_off = bh * DK * DV + dk[:, None] * DV + dv[None, :]
        s_mask = (dk[:, None] < DK) & (dv[None, :] < DV)
        S = tl.load(s_ptr + s_off, mask=s_mask, other=0.0)
        for start in range(0, T, CHUNK):
            n = tl.minimum(T - start, CHUNK)
            rows = start + j
            rm = j < n
            qk_mask = rm[:, None] & (dk[None, :] < DK)
            v_mask = rm[:, None] & (dv[None, :] < DV)
            q = tl.load(q_ptr + (bh * T + rows[:, None]) * DK + dk[None, :], mask=qk_mask, other=0.0)
            k = tl.load(k_ptr + (bh * T + rows[:, None]) * DK + dk[None, :], mask=qk_mask, other=0.0)
            v = tl.load(v_ptr + (bh * T + rows[:, None]) * DV + dv[None, :], mask=v_mask, other=0.0)
            diff = (j[:, None] - j[None, :]).to(tl.float32)
            decay = tl.where(diff >= 0, tl.exp(tl.maximum(diff, 0.0) * lg), 0.0)
            scores = tl.dot(q, tl.trans(k), allow_tf32=False) * decay
            out = tl.dot(scores, v, allow_tf32=False)
            q_decay = q * tl.exp((j + 1).to(tl.float32) * lg)[:, None]
            out += tl.dot(q_decay, S, allow_tf32=False)
            tl.store(o_ptr + (bh * T + rows[:, None]) * DV + dv[None, :], out, mask=v_mask)
            k_decay = k * tl.where(rm, tl.exp((n - 1 - j).to(tl.float32) * lg), 0.0)[:, None]
            S = tl.exp(n.to(tl.float32) * lg) * S + tl.dot(tl.trans(k_decay), v, allow_tf32=False)
        tl.store(s_ptr + s_off, S, mask=s_mask)

    return triton, retention_fwd


def retention_chunkwise_triton(q, k, v, log_gamma, state=None, *, chunk_size: int = 32):
    """Same contract as `llmopt.models.retnet.retention_chunkwise`: (out (B, H, T, dv), state (B, H, d, dv))."""
    triton, retention_fwd = _kernel()
    B, H, T, d = q.shape
    dv = v.size(-1)
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    S = q.new_zeros(B, H, d, dv) if state is None else state.float().contiguous().clone()
    out = torch.empty(B, H, T, dv, dtype=torch.float32, device=q.device)
    chunk = max(16, triton.next_power_of_2(chunk_size))  # tl.dot needs sizes >= 16
    retention_fwd[(B * H,)](q, k, v, log_gamma.float().contiguous(), S, out, H, T, d, dv, CHUNK=chunk,
                            BLOCK_K=max(16, triton.next_power_of_2(d)), BLOCK_V=max(16, triton.next_power_of_2(dv)))
    return out, S


def use_triton_retention_(model) -> dict:
    """Make every RetNet layer's full-sequence form the Triton kernel (inference: no backward)."""
    from llmopt.models.retnet import MultiScaleRetention

    changed = {}
    for name, module in model.named_modules():
        if isinstance(module, MultiScaleRetention):
            module.retention_fn = retention_chunkwise_triton
            changed[name] = "triton"
    if not changed:
        raise ValueError("use_triton_retention_ found no MultiScaleRetention; it applies to family='retnet' models")
    return changed
