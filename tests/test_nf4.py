"""NF4 quantization: error bound, bits per parameter, double quantization, bitsandbytes layout."""

import pytest
import torch

from llmopt.quant.nf4 import (NF4_LEVELS, bits_per_parameter, dequantize_absmax, dequantize_nf4,
                              dequantize_nf4_codes, nf4_error_bound, quantize_nf4)


@pytest.mark.parametrize("shape", [(64, 96), (33, 7), (576, 1536)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("scale", ["absmax", "mse"])
def test_error_within_bound(shape, double_quant, scale):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    q = quantize_nf4(w, double_quant=double_quant, scale=scale)
    err = (dequantize_nf4(q) - w).abs()
    assert (err <= nf4_error_bound(w, q)).all()
    assert dequantize_nf4(q).shape == w.shape


def test_levels_are_exact_and_zero_block_is_zero():
    q = quantize_nf4(torch.zeros(2, 64))
    assert torch.equal(dequantize_nf4(q), torch.zeros(2, 64))
    # values that are exactly levels times the absmax come back exactly
    w = (NF4_LEVELS.repeat(4) * 2.0).view(1, 64)
    assert torch.equal(dequantize_nf4(quantize_nf4(w, double_quant=False)), w)


def test_bits_per_parameter_including_all_scales():
    w = torch.randn(576, 1536)
    q = quantize_nf4(w)
    expected = (w.numel() / 2 * 8 + (w.numel() // 64) * 8 + -(-(w.numel() // 64) // 256) * 32 + 32) / w.numel()
    assert bits_per_parameter(q) == pytest.approx(expected, rel=1e-12)
    assert bits_per_parameter(q) <= 4.2
    assert bits_per_parameter(quantize_nf4(w, double_quant=False)) == pytest.approx(4.5)


def test_double_quant_round_trip_of_scales():
    torch.manual_seed(1)
    w = torch.randn(300, 256) * torch.rand(300, 1)  # blocks with very different absmax
    exact = quantize_nf4(w, double_quant=False).absmax
    q = quantize_nf4(w, double_quant=True)
    assert q.absmax.dtype == torch.int8 and q.absmax.numel() == exact.numel()
    restored = dequantize_absmax(q)
    groups = torch.nn.functional.pad(exact - exact.mean(), (0, (-exact.numel()) % 256)).view(-1, 256)
    half_step = (groups.abs().amax(1) / 127 / 2).repeat_interleave(256)[:exact.numel()]
    assert ((restored - exact).abs() <= half_step * (1 + 1e-5) + 1e-7).all()
    # the same codes as without double quantization: they are chosen with the exact absmax
    assert torch.equal(q.codes, quantize_nf4(w, double_quant=False).codes)


def test_meta_free_dequantize_of_codes_dtype():
    w = torch.randn(8, 64)
    q = quantize_nf4(w, double_quant=False)
    bf16 = dequantize_nf4_codes(q.codes, q.absmax, q.shape, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), dequantize_nf4(q), rtol=1e-2, atol=1e-2)


def test_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed (pip install llmopt[peers])")
    torch.manual_seed(0)
    w = torch.randn(96, 320) * 0.05
    codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.codes, codes.view(-1))  # same levels, rounding, nibble order
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4_codes(codes.view(-1), state.absmax, tuple(w.shape)),
                       bnbf.dequantize_4bit(codes, state))
    # with double quantization both stay within the NF4 bound (bnb stores scales with its dynamic 8-bit map)
    codes2, state2 = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = dequantize_nf4(quantize_nf4(w))
    theirs = bnbf.dequantize_4bit(codes2, state2)
    bound = nf4_error_bound(w, quantize_nf4(w))
    assert ((ours - w).abs() <= bound).all()
    assert (theirs - ours).abs().max() < 0.01 * w.abs().max()


def test_mse_scale_same_format_less_error():
    torch.manual_seed(0)
    w = torch.randn(576, 1536) * 0.02
    w[::7, ::5] *= 4  # heavy-tailed blocks, where a scale below the absmax pays off
    for double_quant in (False, True):
        a, m = (quantize_nf4(w, double_quant=double_quant, scale=s) for s in ("absmax", "mse"))
        assert [(t.dtype, t.shape) for t in a.tensors()] == [(t.dtype, t.shape) for t in m.tensors()]
        assert bits_per_parameter(a) == bits_per_parameter(m)
        err_a, err_m = ((dequantize_nf4(q) - w).square().sum() for q in (a, m))
        assert err_m < 0.95 * err_a
    # per block, without double quantization, never worse than absmax (absmax is the first candidate)
    a, m = (quantize_nf4(w, double_quant=False, scale=s) for s in ("absmax", "mse"))
    per_block = [(dequantize_nf4(q) - w).square().view(-1, 64).sum(1) for q in (a, m)]
    assert (per_block[1] <= per_block[0]).all()
    with pytest.raises(ValueError, match="scale must be"):
        quantize_nf4(w, scale="max")


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(torch.randn(4, 64), block_size=63)
    with pytest.raises(TypeError, match="floating"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int32))
