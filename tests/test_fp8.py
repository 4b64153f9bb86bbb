"""FP8 emulation: per-tensor scaling onto the format's range, round-to-nearest-even cast, STE fake quant."""

import pytest
import torch

from llmopt.quant.fp8 import FP8_MAX, dequantize_fp8, fake_quantize_fp8, quantize_fp8


@pytest.mark.parametrize("fmt,mantissa_bits", [("e4m3", 3), ("e5m2", 2)])
def test_fp8_relative_error_and_range(fmt, mantissa_bits):
    torch.manual_seed(0)
    x = torch.randn(256, 64) * 3
    q = quantize_fp8(x, fmt)
    assert q.data.element_size() == 1 and q.nbytes == x.numel() + 4
    assert q.data.float().abs().max() == FP8_MAX[fmt]  # the largest value lands on the largest finite fp8
    y = dequantize_fp8(q)
    normal = x.abs() > 2 ** -6 * q.scale * 4  # away from subnormals
    rel = ((y - x).abs() / x.abs())[normal]
    assert rel.max() <= 2 ** -(mantissa_bits + 1) * (1 + 1e-3)


def test_fp8_saturates_and_zero_tensor():
    q = quantize_fp8(torch.tensor([1.0, -1000.0]), "e4m3", scale=torch.tensor(1.0))
    assert dequantize_fp8(q).tolist() == [1.0, -448.0]
    assert torch.equal(dequantize_fp8(quantize_fp8(torch.zeros(4))), torch.zeros(4))


def test_fake_fp8_forward_is_exact_and_gradient_passes_through():
    x = torch.randn(8, 8, requires_grad=True)
    y = fake_quantize_fp8(x, "e5m2")
    assert torch.equal(y, dequantize_fp8(quantize_fp8(x, "e5m2")))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="e4m3"):
        quantize_fp8(x, "e3m4")
