"""C int8/int4 decode kernels (llmopt.kernels.int_gemv) = x @ dequantize(codes).T in fp32, every path:
AVX2 and the scalar fallback, group sizes aligned or not, odd shapes, several rows, threads, and the
IntWeightOnlyLinear dispatch (few rows -> C kernel, more -> torch kernels, grad -> dequant, no compiler -> torch)."""

import copy
import pickle

import pytest
import torch

import llmopt.techniques.weight_only_quant as woq
from llmopt.kernels import int_gemv as ig
from llmopt.kernels.int_gemv import IntGemvPlan, int4_gemv, int4_kernel_scales, int8_gemv, int_gemv_available
from llmopt.quant.int_quant import dequantize_weight, quantize_weight
from llmopt.techniques.weight_only_quant import IntWeightOnlyLinear

pytestmark = pytest.mark.skipif(not int_gemv_available(), reason="no C compiler: the int gemv kernels cannot build")

ISAS = ["native", "scalar"]


def _reference(x, q):
    return x.double() @ dequantize_weight(q).double().t()


def _close(y, ref):
    # fp32 accumulation in another order than the float64 reference: relative to the output's scale
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * max(1.0, ref.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group,symmetric,scale_dtype", [
    (None, True, torch.bfloat16),    # per channel (the default config)
    (None, False, torch.float32),    # per channel with zeros
    (32, True, torch.float32),
    (64, False, torch.bfloat16),
    (128, True, torch.bfloat16),
    (24, False, torch.float32),      # not a multiple of 32: the eight-wide loop
    (6, True, torch.float32),        # not a multiple of 8: the scalar tail
])
@pytest.mark.parametrize("N,K", [(97, 384), (8, 768), (33, 384)])
def test_int8_matches_dequantized_reference(isa, group, symmetric, scale_dtype, N, K):
    torch.manual_seed(N + K)
    q = quantize_weight(torch.randn(N, K), bits=8, group_size=group, symmetric=symmetric, scale_dtype=scale_dtype)
    for M in (1, 2, 3, 8):
        x = torch.randn(M, K)
        _close(int8_gemv(x, q.codes, q.scale, q.zero, q.group_size, isa=isa), _reference(x, q))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group,symmetric,scale_dtype", [
    (32, False, torch.bfloat16),     # the default int4 config
    (64, False, torch.float32),
    (128, True, torch.bfloat16),
    (48, False, torch.bfloat16),     # a group size torch's int4 kernel does not take
    (2, False, torch.float32),       # smallest group
])
@pytest.mark.parametrize("N,K", [(96, 384), (50, 192), (7, 96), (65, 768)])
def test_int4_matches_dequantized_reference(isa, group, symmetric, scale_dtype, N, K):
    if K % group:
        pytest.skip("group does not divide K")
    torch.manual_seed(N * K)
    q = quantize_weight(torch.randn(N, K), bits=4, group_size=group, symmetric=symmetric, scale_dtype=scale_dtype)
    sz = int4_kernel_scales(q.scale, q.zero, q.codes.shape[0])
    assert sz.dtype == scale_dtype and sz.shape == (q.codes.shape[0] // 32, K // group, 2, 32)
    for M in (1, 2, 3, 8):
        x = torch.randn(M, K)
        _close(int4_gemv(x, q.codes, sz, q.shape, group, isa=isa), _reference(x, q))


@pytest.mark.parametrize("bits", [8, 4])
def test_threads_give_the_same_result_and_plan_equals_function(bits):
    torch.manual_seed(0)
    q = quantize_weight(torch.randn(300, 256), bits=bits, group_size=None if bits == 8 else 32,
                        symmetric=bits == 8, scale_dtype=torch.bfloat16)
    x = torch.randn(3, 256)
    if bits == 8:
        one, two = (int8_gemv(x, q.codes, q.scale, q.zero, threads=t) for t in (1, 2))
        plan = IntGemvPlan(8, q.codes, q.scale, q.zero, q.shape, q.group_size)
    else:
        sz = int4_kernel_scales(q.scale, q.zero, q.codes.shape[0])
        one, two = (int4_gemv(x, q.codes, sz, q.shape, 32, threads=t) for t in (1, 2))
        plan = IntGemvPlan(4, q.codes, sz, None, q.shape, 32)
    assert torch.equal(one, two)  # rows are split over threads, each row's sum is the same
    assert torch.equal(plan(x, 1), one)
    assert torch.equal(pickle.loads(pickle.dumps(plan))(x, 1), one)


def test_bad_input_is_refused_with_a_message():
    q = quantize_weight(torch.randn(16, 64), bits=8)
    with pytest.raises(ValueError, match="shape"):
        int8_gemv(torch.randn(1, 32), q.codes, q.scale)
    with pytest.raises(TypeError, match="fp32"):
        int8_gemv(torch.randn(1, 64, dtype=torch.bfloat16), q.codes, q.scale)
    with pytest.raises(ValueError, match="no backward"):
        int8_gemv(torch.randn(1, 64, requires_grad=True), q.codes, q.scale)
    with pytest.raises(ValueError, match="isa"):
        ig._lib("avx512")


def _linear(bits, group, N=80, K=192, bias=True):
    torch.manual_seed(1)
    lin = torch.nn.Linear(K, N, bias=bias)
    q = quantize_weight(lin.weight, bits=bits, group_size=group, symmetric=bits == 8, scale_dtype=torch.bfloat16)
    return IntWeightOnlyLinear(q, lin.bias), q, lin.bias


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 48), (8, 64)])
def test_linear_dispatches_decode_rows_to_the_c_kernel(bits, group):
    module, q, bias = _linear(bits, group)
    x = torch.randn(2, 3, 192)  # 6 rows <= GEMV_MAX_ROWS
    with torch.no_grad():
        y = module(x)
    assert module.__dict__["_gemv_plan_cache"][-1] is not None
    torch.testing.assert_close(y, (x @ dequantize_weight(q).t() + bias).detach(), atol=1e-5, rtol=1e-5)


def test_linear_keeps_torch_kernels_for_many_rows_and_dequant_for_grad():
    module, q, bias = _linear(4, 32)
    ref_w = dequantize_weight(q)
    x = torch.randn(woq.GEMV_MAX_ROWS + 1, 192)
    with torch.no_grad():
        y = module(x)
    assert "_gemv_plan_cache" not in module.__dict__ and "_kernel_scales_cache" in module.__dict__
    torch.testing.assert_close(y, x @ ref_w.t() + bias.detach(), atol=0.05, rtol=0.02)  # bf16 activations
    xg = torch.randn(1, 192, requires_grad=True)
    out = module(xg)
    out.sum().backward()  # the dequant path has a backward
    torch.testing.assert_close(xg.grad, ref_w.sum(0, keepdim=True), atol=1e-5, rtol=1e-5)
    assert "_gemv_plan_cache" not in module.__dict__


def test_linear_falls_back_to_torch_without_a_compiler(monkeypatch):
    module, q, bias = _linear(8, None)
    monkeypatch.setattr(woq, "int_gemv_available", lambda: False)
    x = torch.randn(1, 192)
    with torch.no_grad():
        y = module(x)
    assert module.__dict__["_gemv_plan_cache"][-1] is None
    torch.testing.assert_close(y, x @ dequantize_weight(q).t() + bias.detach(), atol=0.05, rtol=0.02)


def test_build_failure_is_an_import_error(monkeypatch, tmp_path):
    from llmopt.kernels._cbuild import build_c_library

    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    with pytest.raises(ImportError, match="dequant"):
        build_c_library("int_gemv_nocc", ig._C_SOURCE + "\n/* never built */", openmp=True, fallback=ig._FALLBACK)


def test_plan_follows_load_state_dict_and_survives_deepcopy():
    module, q, _ = _linear(4, 32)
    x = torch.randn(1, 192)
    with torch.no_grad():
        before = module(x)
        other, _, _ = _linear(4, 32, bias=True)
        other.qscale.mul_(2)  # a different weight
        module.load_state_dict(other.state_dict())
        after = module(x)
        expected = other(x)
        clone = copy.deepcopy(module)
        again = clone(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)
    torch.testing.assert_close(again, expected)


def test_linear_fast_path_keeps_shapes_and_refuses_a_wrong_width():
    module, q, bias = _linear(8, None)
    w = dequantize_weight(q)
    with torch.no_grad():
        one = torch.randn(192)
        torch.testing.assert_close(module(one), one @ w.t() + bias, atol=1e-5, rtol=1e-5)  # 1-D in, 1-D out
        strided = torch.randn(4, 2, 192).transpose(0, 1)  # not contiguous: copied first
        torch.testing.assert_close(module(strided), strided @ w.t() + bias, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError):
            module(torch.randn(1, 96))  # 96 * 1 <= 8 * 192 values, but not rows of 192
