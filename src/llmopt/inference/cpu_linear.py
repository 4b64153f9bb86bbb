"""The CPU decode path of a generation call: the whole decode step of a stock Llama stack in one C call, and the
remaining plain linears through `llmopt.kernels.dense_gemv`, for the length of the call.

    with cpu_linear_kernels(model, draft):    # generate / speculative_generate do this (kernels="auto")
        ...

The stack step: when every block, attention, MLP and RMSNorm of a Llama `Transformer` is the stock class, its
projections are bias-free plain `nn.Linear` (fp32 or bf16) or `weight_only_quant` layers on their C kernels,
and no hook is registered, `model.hidden_states` is replaced for the block: a forward of up to `MAX_ROWS`
rows with the dense `KVCache` runs as one `StackDecodePlan.step` (norms, projections, RoPE, cache write,
attention, MLP, residuals, every layer). A one-token fp32 forward with a `QuantizedKVCache` is one C call as well
(`StackDecodePlan.step_with_c_attention`: the window write and the attention over the packed codes run in C,
`llmopt.kernels.kv_attention.QuantizedDecodeAttention`) on every step where no group leaves the window; the
steps that quantize a group (one in `group_size`), caches asking for the torch attention, subclasses and
layouts the kernel does not take run the C layer halves around the cache's own `update` / `attend`. Anything
else takes the stock forward.

The linears: every plain `nn.Linear` of the models (exactly that type: LoRA, quantized and other replaced layers
keep their own forward) whose weight is an fp32 or bf16 CPU tensor computes, when autograd is off and the call
has at most `MAX_ROWS` rows of activations (decode: one row per sequence; speculative verify: k + 1; short
prompts), `x @ W^T` with the C kernel, which reads the stored weight once per call and accumulates in fp32.
Longer inputs (prefill) keep `F.linear`, except bf16 weights on a CPU without native bf16 matrix instructions
(AVX-512 BF16 / AMX): there `F.linear` goes through a slow generic bf16 path, so the product is computed in fp32
from the widened weight (exact widening; fp32 accumulation, as bf16 `F.linear` also accumulates) and rounded to
bf16 once.

Why and how much: docs/inference.md ("The decode step on CPU"; `benchmarks/bench_inference.py hf`). Numerics: the
same products up to fp32 summation order (tests/test_dense_gemv.py). On exit the modules' own `forward` and the
model's own `hidden_states` are back; the patches are instance attributes, so a model is never changed outside
the block, and nothing is patched when the kernel does not build here (no C compiler) or the weights are
elsewhere than the CPU.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cpu_linear_kernels", "native_bf16_matmul"]

MAX_ROWS = 32
"""Rows of activations up to which the C kernel beats `F.linear` at SmolLM2's shapes on this CPU (fp32: MKL's
small-M GEMM; bf16: no native bf16)."""


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX-512 BF16 or AMX), where torch's bf16 GEMM is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def _fast_forward(module: nn.Linear, plan, threads: int, upcast_bf16: bool):
    weight, bias, N, K = module.weight, module.bias, plan.N, plan.K

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) or x.device.type != "cpu":
            return F.linear(x, weight, bias)
        M = x.numel() // K
        if M <= MAX_ROWS:
            xf = x if x.dtype == torch.float32 else x.float()
            y = plan.run(xf.contiguous(), (*x.shape[:-1], N), M, threads)
            if bias is not None:
                y += bias
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        if upcast_bf16:
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
        return F.linear(x, weight, bias)

    return forward


def _has_hooks(model: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _routable(module: nn.Module) -> bool:
    """A plain `nn.Linear` with an fp32 / bf16 CPU weight, not already routed by an outer block."""
    w = getattr(module, "weight", None)
    return (type(module) is nn.Linear and "forward" not in module.__dict__ and w is not None
            and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16))


def _projection(module: nn.Module, dense: dict):
    """What the stack kernel multiplies by for this projection: the `DenseGemvPlan` of a bias-free routable
    `nn.Linear` (from `dense`), or the prepared int8 / int4 plan of a `weight_only_quant` layer on its C decode
    kernel; None when the module is anything else (LoRA, another kernel, a bias, another device), which keeps
    the module path."""
    if type(module) is nn.Linear:
        return dense.get(module) if module.bias is None else None
    plan_fn = getattr(module, "_gemv_plan", None)
    if plan_fn is None or getattr(module, "kernel", None) != "auto" or getattr(module, "bias", 0) is not None:
        return None
    return plan_fn()


def _stack_plan(model: nn.Module, dense: dict | None = None):
    """A `StackDecodePlan` over the model's blocks when every piece is a stock one (Llama `Transformer`, `Block`,
    `Attention`, `FeedForward`, `RMSNorm`; projections per `_projection`; no hooks): a technique that replaced
    anything else (flash attention, LoRA, fused ops, ...) keeps the module-by-module path. None otherwise.
    `dense`: the `DenseGemvPlan` of each routable Linear, when the caller has built them already."""
    from llmopt.kernels.dense_gemv import DenseGemvPlan, StackDecodePlan
    from llmopt.models.llama import Attention, Block, FeedForward, RMSNorm, Transformer

    from llmopt.models.feature_draft import FeatureDraft

    if type(model) not in (Transformer, FeatureDraft) or _has_hooks(model) or type(model.norm) is not RMSNorm:
        return None
    if dense is None:
        dense = {m: DenseGemvPlan(m.weight) for m in model.modules() if _routable(m)}
    layers = []
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        norms = (block.input_layernorm, block.post_attention_layernorm)
        if (type(block) is not Block or type(attn) is not Attention or type(mlp) is not FeedForward
                or any(type(n) is not RMSNorm for n in norms)):
            return None
        modules = dict(wq=attn.q_proj, wk=attn.k_proj, wv=attn.v_proj, wo=attn.o_proj, wg=mlp.gate_proj,
                       wu=mlp.up_proj, wd=mlp.down_proj)
        layer = {k: _projection(m, dense) for k, m in modules.items()}
        if any(v is None for v in layer.values()):
            return None
        layer.update(n1=norms[0].weight, n2=norms[1].weight)
        layers.append(layer)
    tensors = [getattr(t, "weight", t) for layer in layers for t in layer.values()  # norms, and dense plans' weights
               if isinstance(t, (torch.Tensor, DenseGemvPlan))]
    eps = {n.eps for b in model.layers for n in (b.input_layernorm, b.post_attention_layernorm)}
    if (len(eps) != 1 or len({t.dtype for t in tensors}) != 1 or tensors[0].dtype not in (torch.float32, torch.bfloat16)
            or any(t.device.type != "cpu" for t in tensors)):
        return None
    c = model.config
    return StackDecodePlan(layers, n_head=c.n_head, n_kv_head=c.n_kv_head, head_dim=c.head_dim, eps=eps.pop())


def _quantized_attention(cache, pos: int, mask, bound: dict):
    """The C attention of a `QuantizedKVCache` for the one-token step at `pos` (after `attn_mask`), set up for
    this step, or None when the step needs the cache's own Python path: a group leaves the window at this step
    (the cache's `update` quantizes it), the cache is a subclass or asks for the torch attention
    (`kernel="torch"`), its layout does not fit the kernel, or a mask the kernel does not take. `bound["last"]`
    keeps the kernel object of the last cache seen (its buffers' addresses are bound once per cache)."""
    from llmopt.inference.quantized_cache import QuantizedKVCache
    from llmopt.kernels import kv_attention

    if type(cache) is not QuantizedKVCache or cache.device.type != "cpu":
        return None
    # the cache's own rule for its C attention kernel (kernel= setting, fp16 scales, fp32, the mask), which reads
    # the same layout as this one; this one also reads pre-RoPE keys (it applies RoPE per stored key)
    if not cache._use_kernel(torch.empty(0), mask, pre_rope_ok=True):
        return None
    S, W, q_end = cache.sink_tokens, cache.k_window[0].size(2), cache.quantized
    if any(cache.stored_after(q, pos + 1) != q or S + pos - q >= W for q in q_end):
        return None  # a flush step: the cache's update quantizes the group (or raises)
    if S and len(set(q_end)) != 1:
        return None
    key = (cache.k_codes[0].data_ptr(), cache.k_window[0].data_ptr(), cache.v_window[-1].data_ptr())
    attention = bound.get("last")
    if attention is None or attention[0] is not cache or attention[1].key != key:
        if not kv_attention.available() or kv_attention.QuantizedDecodeAttention.unsupported(
                n_head=cache.n_kv_head * bound["group"], n_kv_head=cache.n_kv_head, head_dim=cache.head_dim,
                bits=cache.bits, value_group=cache.value_group, window_dtype=cache.dtype,
                pre_rope=cache.rope is not None):
            return None
        attention = (cache, kv_attention.QuantizedDecodeAttention(
            cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale, cache.v_zero, cache.k_window,
            cache.v_window, n_head=cache.n_kv_head * bound["group"], bits=cache.bits, group_size=cache.group_size,
            value_group=cache.value_group, sink_tokens=S, rotation=cache.H, rotate_keys=cache.rotate == "both",
            threads=bound["threads"], rope=cache.rope))
        bound["last"] = attention
    keep = None if mask is None else mask[:, 0, 0, :pos + 1]
    keep = kv_attention.decode_keep(keep, batch=cache.batch_size, length=pos + 1, n_quantized=q_end[0],
                                    sink_tokens=S)
    attention[1].set_step(pos, q_end, keep)
    return attention[1]


def _dense_step_position(cache, input_pos: torch.Tensor | None, B: int, T: int, device: torch.device) -> int | None:
    """The first of the T positions when the fused stack step can take B rows of them through `cache` (a dense
    fp32 / bf16 `KVCache` of batch B, consecutive positions, at most MAX_ROWS rows x tokens, CPU, no grad);
    None otherwise (the caller takes the module path)."""
    from llmopt.inference.cache import KVCache

    if (cache is None or type(cache) is not KVCache or input_pos is None or B * T > MAX_ROWS
            or torch.is_grad_enabled() or device.type != "cpu"
            or cache.dtype not in (torch.float32, torch.bfloat16) or input_pos.numel() != T
            or B != cache.batch_size):
        return None
    pos = int(input_pos[0])
    if T > 1 and not torch.equal(input_pos, torch.arange(pos, pos + T)):
        return None  # the kernel takes consecutive positions
    return pos


def _fast_hidden_states(model: nn.Module, plan, threads: int):
    from llmopt.inference.cache import KVCache

    stock = type(model).hidden_states
    dtype = model.norm.weight.dtype
    bound = {"group": model.config.n_head // model.config.n_kv_head, "threads": threads}

    def hidden_states(idx: torch.Tensor, *, input_pos: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        B, T = idx.shape
        if (T == 1 and cache is not None and hasattr(cache, "attend") and input_pos is not None and dtype == torch.float32
                and not torch.is_grad_enabled() and idx.device.type == "cpu" and B == cache.batch_size):
            # a cache that attends over its own storage (QuantizedKVCache)
            mask = cache.attn_mask(input_pos)
            x = model.embed_tokens(idx).float().contiguous()
            pos = int(input_pos[0])
            cos, sin = model.rope_cos[pos:pos + 1], model.rope_sin[pos:pos + 1]
            attention = _quantized_attention(cache, pos, mask, bound)
            if attention is not None:  # the whole step in one C call, the window write and attention included
                plan.step_with_c_attention(x, cos, sin, attention, threads)
                cache._fresh = None  # what update would have left: no multi-token write to view
                return model.norm(x)

            def attend(layer, q, k, v):  # otherwise the layer halves around the cache's own update / attend
                cache.update(layer, input_pos, k, v)
                return cache.attend(layer, q, mask)

            plan.step_with_attention(x, pos, cos, sin, attend, threads)
            return model.norm(x)
        pos = _dense_step_position(cache, input_pos, B, T, idx.device)
        if pos is None:
            return stock(model, idx, input_pos=input_pos, cache=cache)
        cache.attn_mask(input_pos)  # validates the positions and advances seq_len, as the stock forward does
        x = model.embed_tokens(idx).float().contiguous()  # (B, T, dim)
        plan.step(x, pos, model.rope_cos[pos:pos + T], model.rope_sin[pos:pos + T], cache.k, cache.v,
                  cache.key_padding, threads)
        return model.norm(x.to(dtype))

    return hidden_states


def _fast_feature_draft(model: nn.Module, plan, threads: int):
    """`FeatureDraft.forward_cached` with its blocks in one fused C step (fp32 or bf16 weights, a dense `KVCache`,
    consecutive positions, at most MAX_ROWS rows x tokens; arithmetic in fp32 as in the target's step); anything
    else takes the module path."""
    stock = type(model).forward_cached
    dtype = model.dtype

    def forward_cached(features: torch.Tensor, next_tokens: torch.Tensor, *, prev_tokens: torch.Tensor | None = None,
                       input_pos: torch.Tensor, cache):
        B, T = next_tokens.shape
        pos = _dense_step_position(cache, input_pos, B, T, features.device)
        if pos is None:
            return stock(model, features, next_tokens, prev_tokens=prev_tokens, input_pos=input_pos, cache=cache)
        x = model.mix(features, next_tokens, prev_tokens).float().contiguous()  # checks prev_tokens first
        cache.attn_mask(input_pos)  # validates the positions and advances seq_len, as the stock forward does
        plan.step(x, pos, model.rope_cos[pos:pos + T], model.rope_sin[pos:pos + T], cache.k, cache.v,
                  cache.key_padding, threads)
        return model.norm(x.to(dtype))

    return forward_cached


@contextlib.contextmanager
def cpu_linear_kernels(*models: nn.Module | None, enabled: bool = True, stack: bool = True):
    """Route the plain `nn.Linear` layers of `models` (None entries are skipped) through the CPU decode kernel
    inside the block; a no-op when `enabled` is False, the kernel does not build here, or nothing qualifies.
    Re-entrant: layers already routed by an outer block are left to it."""
    patched: list[nn.Module] = []  # routed linears (forward) and models (hidden_states)
    if enabled:
        from llmopt.kernels.dense_gemv import DenseGemvPlan, dense_gemv_available

        if dense_gemv_available():
            threads = torch.get_num_threads()
            upcast = not native_bf16_matmul()
            for model in models:
                if model is None:
                    continue
                linears = [m for m in model.modules() if _routable(m)]
                dense = {m: DenseGemvPlan(m.weight) for m in linears}  # one plan per weight, shared with the stack
                plan = (_stack_plan(model, dense) if stack and "hidden_states" not in model.__dict__
                        and "forward_cached" not in model.__dict__ else None)
                if plan is not None and hasattr(model, "forward_cached"):  # a FeatureDraft head
                    model.forward_cached = _fast_feature_draft(model, plan, threads)
                    patched.append(model)
                elif plan is not None:
                    model.hidden_states = _fast_hidden_states(model, plan, threads)
                    patched.append(model)
                for module in linears:
                    module.forward = _fast_forward(module, dense[module], threads,
                                                   upcast and module.weight.dtype == torch.bfloat16)
                    patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("hidden_states", None)
            module.__dict__.pop("forward_cached", None)
