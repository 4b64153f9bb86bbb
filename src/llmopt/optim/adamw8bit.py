"""AdamW with 8-bit block-wise quantized moments (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization", arXiv 2110.02861), eager and vectorized, on CPU or GPU.

Both Adam moments live as uint8 codes of the dynamic map (signed for m, unsigned for v; see
`llmopt.optim.quantization`) with one fp32 absmax per block of `block_size` (default 256) elements:
1 + 4/256 bytes per element and moment, 0.254x the state of fp32 AdamW. Each step dequantizes,
applies exactly torch.optim.AdamW's update, and quantizes again with the new block maxima.

What stays fp32 (the paper's choices): tensors with fewer than `min_8bit_size` elements (norm weights,
biases: a few KB, and the most sensitive), and the parameters of a group with `optim_bits=32`, which is
the "32-bit state" half of the paper's StableEmbedding (the other half, a LayerNorm after the
embedding and Xavier init, is an architecture change: use bitsandbytes' `StableEmbedding` for that).
`stable_embedding_param_groups(model)` builds such groups.

Two paths, one state format. On CPU, fp32 contiguous parameters go by default (`backend="auto"`) through
the fused C kernel `llmopt.kernels.adam8bit`: one pass per block in L1 (decode, update, block max,
re-encode), OpenMP over blocks with `torch.get_num_threads()` threads. Everything else (GPU tensors, fp16 /
bf16 parameters, no C compiler, `backend="torch"`) takes the eager torch path, the reference: each
parameter in chunks of `chunk_size` elements (default 262,144) with preallocated scratch. Per chunk: two
int32 index copies + `index_select` decode the codes; one `addcmul` and one `mul_`/`addcmul_` give the new
moments (kept divided by 1 - beta, see `_step_8bit`); the AdamW update; then each moment is encoded by an
amax (and amin), an in-place scale, a cast to fp16 and a 64 KB table lookup. No torch.compile, no
per-block Python loop.

Numerics contract: with every tensor under `min_8bit_size` (or `optim_bits=32`) the update is
torch.optim.AdamW's (tested to 1e-6). In 8 bits, each moment carries the quantization error of the
dynamic map (relative error about 1-4% per element, larger for values far below their block's max);
the paper and `benchmarks/bench_optimizers.py` show the loss matches fp32 AdamW. The kernel and the
torch path store bit-identical codes and block maxima for the same state and gradient; the parameters
differ only by the rounding of the square root (torch's CPU `sqrt` goes through MKL's vector math and is
off by one ulp in ~20% of elements; the kernel's is IEEE-exact), so within a few ulp (tested).
`state_dict` round trips exactly (the codes and scales are the state), and either path loads the
other's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from llmopt.kernels.adam8bit import (adamw8bit_kernel_available, adamw8bit_step_cpu, kernel_applies,
                                     require_adamw8bit_kernel)
from llmopt.optim._step import adam_state, closure_loss, params_with_grad
from llmopt.optim.quantization import (BLOCK_SIZE, block_absmax_, encode_blocks_, padded_numel, quant_map,
                                       restore_state_dtypes_)

__all__ = ["AdamW8bit", "BACKENDS", "stable_embedding_param_groups", "state_bytes"]

BACKENDS = ("auto", "torch", "cpu")
"""`auto`: the fused C kernel for contiguous fp32 CPU parameters when a C compiler is there, else the torch
path; `torch`: always the eager torch path (the reference); `cpu`: always the kernel (an error where it cannot)."""


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored as block-wise dynamic 8-bit codes (0.254x the state of AdamW)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, block_size: int = BLOCK_SIZE,
                 min_8bit_size: int = 4096, optim_bits: int = 8, chunk_size: int = 1 << 18,
                 backend: str = "auto") -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if block_size <= 0 or chunk_size % block_size:
            raise ValueError(f"chunk_size ({chunk_size}) must be a positive multiple of block_size ({block_size})")
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cpu":
            require_adamw8bit_kernel()  # fails here, with what to install, rather than at the first step
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size,
                        min_8bit_size=min_8bit_size, optim_bits=optim_bits)
        super().__init__(params, defaults)
        self.chunk_size = chunk_size
        self.backend = backend
        self._scratch: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes_(self, state_dict)  # torch casts every state tensor to the param dtype, codes too

    def _is_8bit(self, p: torch.Tensor, group: dict[str, Any]) -> bool:
        return group["optim_bits"] == 8 and p.numel() >= group["min_8bit_size"]

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        if self._is_8bit(p, group):
            n = padded_numel(p.numel(), group["block_size"])
            for name in ("exp_avg", "exp_avg_sq"):
                state[f"{name}_codes"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
                # code of 0.0 is the index of 0 in the map; with absmax 0 every code decodes to 0 anyway
                state[f"{name}_absmax"] = torch.zeros(n // group["block_size"], dtype=torch.float32,
                                                      device=p.device)
        else:
            adam_state(state, p)
        return state

    def _buffers(self, size: int, block_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (size, block_size, device)
        if key not in self._scratch:
            f = lambda n: torch.empty(n, dtype=torch.float32, device=device)  # noqa: E731
            nb = size // block_size
            self._scratch[key] = (f(size), f(size), f(size), f(size),
                                  torch.empty(size, dtype=torch.int32, device=device),
                                  torch.empty(size, dtype=torch.float16, device=device), f(nb))
        return self._scratch[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in params_with_grad(group, "AdamW8bit"):
                state = self.state[p] if self.state[p] else self._init_state(p, group)
                state["step"] += 1
                step = float(state["step"])
                bc1, bc2_sqrt = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
                if "exp_avg" in state:  # fp32 state: torch.optim.AdamW's single-tensor update
                    p.mul_(1 - lr * wd)
                    state["exp_avg"].lerp_(p.grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    denom = (state["exp_avg_sq"].sqrt() / bc2_sqrt).add_(eps)
                    p.addcdiv_(state["exp_avg"], denom, value=-lr / bc1)
                    continue
                self._step_8bit(p, state, group, lr=lr, beta1=beta1, beta2=beta2, eps=eps, wd=wd, bc1=bc1,
                                bc2_sqrt=bc2_sqrt)
        return loss

    def _uses_kernel(self, p: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        if not kernel_applies(p):
            if self.backend == "cpu":
                raise ValueError(f"AdamW8bit(backend='cpu') steps contiguous fp32 CPU parameters with fp32 gradients, "
                                 f"got a {p.dtype} parameter on {p.device}; use backend='auto' (torch path for it)")
            return False
        return adamw8bit_kernel_available()

    def _step_8bit(self, p, state, group, *, lr, beta1, beta2, eps, wd, bc1, bc2_sqrt) -> None:
        # Work with the moments divided by (1 - beta), so that each is one fused op from its codes:
        #   m' = m / (1 - b1) = g + c_m * (absmax_m * b1 / (1 - b1))     (addcmul, block scale broadcast)
        #   v' = v / (1 - b2) = c_v * (absmax_v * b2 / (1 - b2)) + g * g
        # with c_m, c_v the raw codebook values. Codes are scale-free, so m' and v' are encoded as they are
        # (scaled in place to the half range, which is why the update comes first) and only the stored absmax
        # takes the (1 - beta) back. AdamW's constants fold into eps_hat and step_size:
        #   p <- p (1 - lr wd) - lr / bc1 * m / (sqrt(v) / bc2 + eps)
        #      = p (1 - lr wd) + step_size * m' / (sqrt(v') + eps_hat)
        bs = group["block_size"]
        signed, unsigned = quant_map(True), quant_map(False)
        if not p.is_contiguous():
            raise ValueError("AdamW8bit needs contiguous parameters (call .contiguous() on the weights)")
        m_codes, m_absmax = state["exp_avg_codes"], state["exp_avg_absmax"]
        v_codes, v_absmax = state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"]
        sqrt_1mb2 = math.sqrt(1 - beta2)
        eps_hat = eps * bc2_sqrt / sqrt_1mb2
        step_size = -lr * (1 - beta1) * bc2_sqrt / (bc1 * sqrt_1mb2)
        if self._uses_kernel(p):  # the same operations fused per block in C (llmopt.kernels.adam8bit)
            adamw8bit_step_cpu(p, p.grad, m_codes, m_absmax, v_codes, v_absmax, m_code=signed.code,
                               v_code=unsigned.code, m_lut=signed.lut, v_lut=unsigned.lut, block_size=bs,
                               beta1=beta1, beta2=beta2, decay=1 - lr * wd, step_size=step_size, eps_hat=eps_hat)
            return
        flat_p, flat_g = p.view(-1), p.grad.reshape(-1)
        n = flat_p.numel()
        chunk = min(self.chunk_size, padded_numel(n, bs))
        m_buf, v_buf, g_buf, d_buf, idx_buf, half_buf, t_buf = self._buffers(chunk, bs, p.device)
        scale_m, scale_v = m_absmax * (beta1 / (1 - beta1)), v_absmax * (beta2 / (1 - beta2))
        for start in range(0, n, chunk):
            length = min(chunk, n - start)
            padded = padded_numel(length, bs)
            nb, b0 = padded // bs, start // bs
            mc, vc = m_codes[start:start + padded], v_codes[start:start + padded]
            ma, va = m_absmax[b0:b0 + nb], v_absmax[b0:b0 + nb]
            m, v, idx, half = m_buf[:padded], v_buf[:padded], idx_buf[:padded], half_buf[:padded]
            s_m, s_v, t = scale_m[b0:b0 + nb], scale_v[b0:b0 + nb], t_buf[:nb]
            pp, g = flat_p[start:start + length], flat_g[start:start + length]
            if padded > length:  # a partial last block: a zero-padded copy of the gradient keeps the padding 0
                g_buf[length:padded].zero_()
                g = g_buf[:padded]
                g[:length].copy_(flat_g[start:start + length])
            mb, vb, gb = m.view(nb, bs), v.view(nb, bs), g.view(nb, bs)
            signed.decode_(mc, idx, m)
            torch.addcmul(gb, mb, s_m.unsqueeze(1), out=mb)                     # m'
            unsigned.decode_(vc, idx, v)
            vb.mul_(s_v.unsqueeze(1)).addcmul_(gb, gb)                           # v'
            denom = torch.sqrt(v[:length], out=d_buf[:length]).add_(eps_hat)
            pp.mul_(1 - lr * wd)
            pp.addcdiv_(m[:length], denom, value=step_size)
            encode_blocks_(mb, block_absmax_(mb, ma, t), signed, mc, idx, half, t)
            encode_blocks_(vb, block_absmax_(vb, va, t, nonnegative=True), unsigned, vc, idx, half, t)
        m_absmax.mul_(1 - beta1)  # the stored scales are those of m and v, not m' and v'
        v_absmax.mul_(1 - beta2)


def stable_embedding_param_groups(model: torch.nn.Module, **group_options: Any) -> list[dict[str, Any]]:
    """Param groups for AdamW8bit with 32-bit state for `nn.Embedding` weights (the paper's StableEmbedding
    optimizer half) and 8-bit state for everything else. `group_options` go into both groups."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen: set[int] = set()
    embeds, rest = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (embeds if id(p) in embedding_ids else rest).append(p)
    if not embeds:
        raise ValueError("the model has no trainable nn.Embedding: stable_embedding_param_groups has nothing "
                         "to keep in 32 bits; use model.parameters() instead")
    return [g for g in ({"params": rest, **group_options}, {"params": embeds, "optim_bits": 32, **group_options})
            if g["params"]]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor held in `optimizer.state` (step counters included), counting tensors
    nested in lists, tuples, dicts and objects with tensor attributes (e.g. a projector)."""
    seen: set[int] = set()

    def count(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(count(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        if hasattr(value, "__dict__") and not isinstance(value, type):
            return sum(count(v) for v in vars(value).values())
        return 0

    return sum(count(s) for s in optimizer.state.values())
