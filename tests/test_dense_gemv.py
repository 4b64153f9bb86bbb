"""The dense fp32 / bf16 decode kernel (llmopt.kernels.dense_gemv) = x @ W.float().T in fp32 on every path (AVX2
and the scalar fallback, odd shapes, 1-33 rows, threads), and `cpu_linear_kernels`, which routes a model's
plain linears through it for a generation call: same greedy tokens, restored afterwards, grad falls back."""

import pytest
import torch
from torch import nn

from llmopt.inference import generate, generate_reference
from llmopt.inference.cpu_linear import MAX_ROWS, cpu_linear_kernels
from llmopt.kernels.dense_gemv import DenseGemvPlan, dense_gemv, dense_gemv_available

from kv_steps import quantized_logits as _quantized_logits, spy_one_call_steps

pytestmark = pytest.mark.skipif(not dense_gemv_available(), reason="no C compiler: the dense gemv kernel cannot build")


def _close(y, x, w):
    ref = x.double() @ w.double().t()
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("isa", ["native", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K", [(97, 384), (4, 8), (33, 13), (1, 77), (130, 1536)])
def test_matches_float64_reference(isa, dtype, N, K):
    torch.manual_seed(N * K)
    w = torch.randn(N, K).to(dtype)
    for M in (1, 2, 3, 8, 33):
        x = torch.randn(M, K)
        _close(dense_gemv(x, w, isa=isa), x, w.float())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_the_same_result(threads):
    torch.manual_seed(0)
    w, x = torch.randn(101, 256), torch.randn(3, 256)
    torch.testing.assert_close(dense_gemv(x, w, threads=threads), dense_gemv(x, w, threads=1), atol=0, rtol=0)


def test_bf16_activations_are_widened_and_plan_reads_the_stored_weight():
    torch.manual_seed(1)
    w = torch.randn(40, 64, dtype=torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    _close(dense_gemv(x, w), x.float(), w.float())
    plan = DenseGemvPlan(w)
    _close(plan(x.float().contiguous(), 1), x.float(), w.float())


def test_bad_input_errors():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="x \\(M, K\\)"):
        dense_gemv(torch.randn(2, 15), w)
    with pytest.raises(TypeError, match="fp32 or bf16"):
        DenseGemvPlan(w.double())
    with pytest.raises(TypeError, match="fp32 or bf16"):
        DenseGemvPlan(w[None])
    with pytest.raises(ValueError, match="no backward"):
        dense_gemv(torch.randn(2, 16, requires_grad=True), w)


# ---- cpu_linear_kernels -----------------------------------------------------------------------------------

class _Lora(nn.Linear):
    """A Linear subclass (as LoRA / quantized layers are): never routed."""


def test_routes_plain_linears_and_restores_them(tiny_model):
    tiny_model.eval()
    sub = _Lora(4, 4)
    tiny_model.extra_sub = sub
    linears = [m for m in tiny_model.modules() if type(m) is nn.Linear]
    with torch.no_grad(), cpu_linear_kernels(tiny_model) as n:
        assert n == len(linears) + 1 > 1  # the linears and the model's hidden_states (the stack decode step)
        assert "hidden_states" in tiny_model.__dict__
        assert all("forward" in m.__dict__ for m in linears)
        assert "forward" not in sub.__dict__
        with cpu_linear_kernels(tiny_model) as inner:  # re-entrant: the outer block keeps them
            assert inner == 0
        assert all("forward" in m.__dict__ for m in linears)
    assert not any("forward" in m.__dict__ or "hidden_states" in m.__dict__ for m in tiny_model.modules())
    del tiny_model.extra_sub
    with pytest.raises(RuntimeError), cpu_linear_kernels(tiny_model):
        raise RuntimeError("inside")
    assert not any("forward" in m.__dict__ for m in tiny_model.modules())


@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS, MAX_ROWS + 5])
def test_routed_linear_equals_f_linear_and_grad_falls_back(rows):
    torch.manual_seed(rows)
    lin = nn.Linear(48, 20)
    x = torch.randn(1, rows, 48)
    ref = lin(x)
    with cpu_linear_kernels(lin):
        y = lin(x)  # grad enabled and the weight requires grad: F.linear, differentiable
        assert y.requires_grad
        torch.testing.assert_close(y, ref, atol=0, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(lin(x), ref.detach(), atol=1e-5, rtol=1e-5)


def test_bf16_prefill_upcast_is_close_to_bf16_linear():
    torch.manual_seed(2)
    lin = nn.Linear(64, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 40, 64, dtype=torch.bfloat16)  # 80 rows: the prefill path
    ref = x.float() @ lin.weight.float().t()
    with torch.no_grad(), cpu_linear_kernels(lin):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)  # one bf16 rounding of an fp32 product


def test_generate_with_kernels_equals_reference_and_torch(tiny_model):
    tiny_model.eval()
    prompt = torch.randint(0, tiny_model.config.vocab_size, (2, 7))
    auto = generate(tiny_model, prompt, 12).tokens
    plain = generate(tiny_model, prompt, 12, kernels="torch").tokens
    ref = generate_reference(tiny_model, prompt, 12).tokens
    assert torch.equal(auto, ref) and torch.equal(plain, ref)
    assert not any("forward" in m.__dict__ for m in tiny_model.modules())
    with pytest.raises(ValueError, match="kernels must be"):
        generate(tiny_model, prompt, 2, kernels="fast")


# ---- the stack decode step (StackDecodePlan through cpu_linear_kernels) -----------------------------------

def _decode_logits(model, ids, steps, *, fast, dtype=None):
    from llmopt.inference import decode_one_token, make_cache, prefill

    cache = make_cache(model, ids.size(0), ids.size(1) + steps + 1, dtype=dtype)
    out = []
    with torch.no_grad(), cpu_linear_kernels(model, enabled=fast):
        tok = prefill(model, ids, cache).argmax(-1)[:, None]
        for i in range(steps):
            tok, logits = decode_one_token(model, tok, torch.tensor([ids.size(1) + i]), cache)
            out.append(logits.float())
    return torch.stack(out)


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_stack_decode_step_equals_the_module_path(preset):
    from llmopt.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name(preset)).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 6))
    ref = _decode_logits(model, ids, 8, fast=False)
    torch.testing.assert_close(_decode_logits(model, ids, 8, fast=True), ref, atol=2e-5, rtol=1e-5)
    # a bf16 cache under fp32 weights, and a bf16 model: within bf16 rounding of the fp32 logits
    torch.testing.assert_close(_decode_logits(model, ids, 8, fast=True, dtype=torch.bfloat16), ref, atol=0.05, rtol=0.05)
    model = model.to(torch.bfloat16)
    torch.testing.assert_close(_decode_logits(model, ids, 8, fast=True), ref, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_stack_multi_token_step_with_left_padding_equals_the_module_path(cache_dtype):
    """A k + 1-token forward (speculative verify) over a left-padded batch: the fused step's attention (keys
    scored four at a time, padded slots skipped) equals the module path."""
    from llmopt.inference import make_cache
    from llmopt.models import ModelConfig, build_model

    torch.manual_seed(2)
    model = build_model(ModelConfig.from_name("demo")).eval()
    ids = torch.randint(1, model.config.vocab_size, (2, 11))
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[1, :4] = True  # row 1 is a 7-token prompt, left-padded
    x = torch.randint(1, model.config.vocab_size, (2, 5))
    outs = []
    for fast in (False, True):
        cache = make_cache(model, 2, 24, dtype=cache_dtype)
        cache.set_key_padding(padding)
        with torch.no_grad(), cpu_linear_kernels(model, enabled=fast):
            model.hidden_states(ids, input_pos=torch.arange(11), cache=cache)
            outs.append(model.hidden_states(x, input_pos=torch.arange(11, 16), cache=cache).float())
    tol = 2e-5 if cache_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[1], outs[0], atol=tol, rtol=tol)


def test_stack_decode_scalar_build_equals_native(tiny_model):
    from llmopt.inference.cpu_linear import _stack_plan
    from llmopt.kernels.dense_gemv import StackDecodePlan

    native = _stack_plan(tiny_model)
    weights = [{k: getattr(v, "weight", v) for k, v in layer.items()} for layer in native.layers]  # plans -> tensors
    scalar = StackDecodePlan(weights, n_head=native.n_head, n_kv_head=native.n_kv_head,
                             head_dim=native.head_dim, eps=native.eps, isa="scalar")
    c = tiny_model.config
    torch.manual_seed(1)
    bufs = [[torch.randn(2, c.n_kv_head, 16, c.head_dim) for _ in range(c.n_layer)] for _ in range(2)]
    bufs2 = [[t.clone() for t in b] for b in bufs]
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, :3] = True  # a left-padded row
    x = torch.randn(2, c.dim)
    y1 = native.step(x.clone(), 9, tiny_model.rope_cos[9], tiny_model.rope_sin[9], *bufs, pad)
    y2 = scalar.step(x.clone(), 9, tiny_model.rope_cos[9], tiny_model.rope_sin[9], *bufs2, pad)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bufs[0][0][:, :, 9], bufs2[0][0][:, :, 9], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="outside the cache"):
        native.step(x.clone(), 16, tiny_model.rope_cos[0], tiny_model.rope_sin[0], *bufs)


def test_stack_decode_is_not_used_for_replaced_modules_or_hooks(tiny_model):
    from llmopt.inference.cpu_linear import _stack_plan

    assert _stack_plan(tiny_model) is not None
    handle = tiny_model.layers[0].mlp.register_forward_hook(lambda m, a, out: out)
    try:
        assert _stack_plan(tiny_model) is None
    finally:
        handle.remove()
    tiny_model.layers[1].self_attn.v_proj = _Lora(tiny_model.config.dim, tiny_model.layers[1].self_attn.v_proj.out_features,
                                                  bias=False)
    assert _stack_plan(tiny_model) is None


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_stack_decode_with_weight_only_quant_layers(bits, group):
    from llmopt.core import apply_
    from llmopt.inference.cpu_linear import _stack_plan
    from llmopt.models import ModelConfig, build_model
    from llmopt.techniques.weight_only_quant import WeightOnlyQuantConfig

    torch.manual_seed(3)
    model = build_model(ModelConfig.from_name("demo")).eval()
    apply_(model, WeightOnlyQuantConfig(bits=bits, group_size=group))
    assert _stack_plan(model) is not None  # the int8 / int4 C kernels run inside the stack call
    # 2 x 3 prompt rows: the module path's int kernels take <= 8 rows in fp32 too (more go through torch's
    # bf16-activation kernels, which would be the less exact side of the comparison)
    ids = torch.randint(0, model.config.vocab_size, (2, 3))
    torch.testing.assert_close(_decode_logits(model, ids, 6, fast=True), _decode_logits(model, ids, 6, fast=False),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_stack_halves_around_a_quantized_cache(bits):
    from llmopt.inference import decode_one_token, make_quantized_cache, prefill
    from llmopt.models import ModelConfig, build_model

    torch.manual_seed(4)
    model = build_model(ModelConfig.from_name("demo")).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 70))  # past one 64-token group: codes are read too
    out = []
    for fast in (False, True):
        cache = make_quantized_cache(model, 2, 90, bits=bits)
        logits = []
        with torch.no_grad(), cpu_linear_kernels(model, enabled=fast):
            tok = prefill(model, ids, cache).argmax(-1)[:, None]
            for i in range(6):
                tok, lg = decode_one_token(model, tok, torch.tensor([70 + i]), cache)
                logits.append(lg)
        out.append(torch.stack(logits))
    torch.testing.assert_close(out[1], out[0], atol=1e-4, rtol=1e-4)


# ---- the whole one-token step over a quantized cache in one C call (window write + attention in C) -----------

@pytest.fixture
def fused_steps(monkeypatch):
    """Counts the one-call steps (a spy: the real method runs)."""
    return spy_one_call_steps(monkeypatch)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rotate,residual,sinks", [("both", 0, 0), ("none", 8, 0), ("values", 0, 3), ("both", 8, 3)])
def test_one_call_quantized_step_equals_the_module_path(bits, rotate, residual, sinks, fused_steps):
    from llmopt.inference.quantized_cache import unpack
    from llmopt.models import ModelConfig, build_model

    torch.manual_seed(6)
    model = build_model(ModelConfig.from_name("demo")).eval()  # head_dim 32: the kernel's 8-byte chunks fit
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    pad = torch.zeros(2, 21, dtype=torch.bool)
    pad[1, :5] = True  # row 1 left-padded
    # group 16: the steps cross several group flushes (those steps take the cache's update); the rollback
    # brings quantized positions back into the window
    kw = dict(bits=bits, group_size=16, value_group=32, residual_length=residual, rotate=rotate, sink_tokens=sinks,
              pre_rope=False,  # post-RoPE keys: the layout the C kernels read
              pad=pad, truncate_at=(30, 27))
    layers, ref_cache = _quantized_logits(model, ids, 40, path="layers", **kw)
    got, cache = _quantized_logits(model, ids, 40, path="fused", **kw)
    assert len(fused_steps) > 30  # most steps ran as one C call
    # against the same GEMVs with the cache's update + torch attention: fp32 summation order (which can still
    # move an int8 code by a step at a later group flush: ~4e-5 on logits of size ~3)
    torch.testing.assert_close(got, layers, atol=2e-4, rtol=1e-4)
    assert cache.seq_len == ref_cache.seq_len and cache.quantized == ref_cache.quantized
    for layer in range(model.config.n_layer):  # the same storage, up to such a code step
        torch.testing.assert_close(cache.k_window[layer], ref_cache.k_window[layer], atol=1e-3, rtol=1e-3)
        codes = (unpack(cache.v_codes[layer], bits).int() - unpack(ref_cache.v_codes[layer], bits).int()).abs()
        assert codes.max() <= 1 and (codes > 0).float().mean() < 0.01
    # against the module path (F.linear): its k and v differ in the last bits, which can move a code by one step
    # at a group flush, so the bound is wider (logits of size ~3)
    torch.testing.assert_close(got, _quantized_logits(model, ids, 40, path="module", **kw)[0], atol=1e-3, rtol=1e-3)


def test_one_call_quantized_step_falls_back_where_it_must(fused_steps):
    from llmopt.models import ModelConfig, build_model

    torch.manual_seed(7)
    model = build_model(ModelConfig.from_name("demo")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    # value groups of 16 channels at 2 bits are 4 bytes: not the kernel's 8-byte chunks -> the per-layer path
    ref, _ = _quantized_logits(model, ids, 6, path="layers", bits=2, group_size=16, pre_rope=False)
    got, _ = _quantized_logits(model, ids, 6, path="fused", bits=2, group_size=16, pre_rope=False)
    assert not fused_steps
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # pre-RoPE keys: one call a step as well (the kernel applies RoPE to each stored key)
    ref, _ = _quantized_logits(model, ids, 6, path="layers", bits=4, group_size=16, pre_rope=True)
    got, _ = _quantized_logits(model, ids, 6, path="fused", bits=4, group_size=16, pre_rope=True)
    assert len(fused_steps) == 5  # position 15 completes a group: the cache's update
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    fused_steps.clear()
    got, _ = _quantized_logits(model, ids, 6, path="fused", bits=4, group_size=16, pre_rope=False)  # one call a step
    assert len(fused_steps) == 5  # positions 10..15; position 15 completes a group: the cache's update


def test_generate_kv_int4_tokens_unchanged(fused_steps):
    from llmopt.models import ModelConfig, build_model

    torch.manual_seed(8)
    model = build_model(ModelConfig.from_name("demo")).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 70))
    fast = generate(model, prompt, 20, kv_bits=4).tokens
    assert fused_steps
    assert torch.equal(fast, generate(model, prompt, 20, kv_bits=4, kernels="torch").tokens)
