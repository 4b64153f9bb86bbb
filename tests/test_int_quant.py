"""Integer quantization: int4 packing is PyTorch's CPU kernel layout, error bounds, fake quant = dequant(quant), STE."""

import pytest
import torch

from llmopt.quant.int_quant import (
    dequantize_weight,
    fake_quantize_activation_int8,
    fake_quantize_weight,
    pack_int4,
    quantize_activation_int8,
    quantize_weight,
    unpack_int4,
    weight_codes,
)


@pytest.mark.parametrize("shape", [(64, 128), (50, 96), (32, 576), (7, 8)])
def test_int4_pack_round_trip(shape):
    codes = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-shape[0] // 32) * 32, shape[1] // 2)
    assert torch.equal(unpack_int4(packed, shape), codes)


def test_int4_packing_is_the_cpu_kernel_layout():
    codes = torch.randint(-8, 8, (96, 64), dtype=torch.int8)
    assert torch.equal(pack_int4(codes), torch._convert_weight_to_int4pack_for_cpu(codes.int() + 8, 1))


@pytest.mark.parametrize("bits,group,symmetric", [(8, None, True), (8, 32, False), (4, 32, True), (4, 16, False)])
def test_quantize_error_within_half_a_step(bits, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q = quantize_weight(w, bits=bits, group_size=group, symmetric=symmetric)
    err = (dequantize_weight(q) - w).abs().view(48, -1, q.group_size)
    step = q.scale.float()[..., None]
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    lo, hi = (-127, 127) if (bits == 8 and symmetric) else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    codes = weight_codes(q)
    assert codes.min() >= lo and codes.max() <= hi


def test_bf16_scales_codes_use_the_rounded_scale():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    q = quantize_weight(w, bits=4, group_size=32, symmetric=False, scale_dtype=torch.bfloat16)
    assert q.scale.dtype == torch.bfloat16 and q.bits_per_weight == pytest.approx(4 + 32 / 32)
    # stored scale is what dequantization uses: re-quantizing the dequantized weight gives the same codes
    again = quantize_weight(dequantize_weight(q), bits=4, group_size=32, symmetric=False, scale_dtype=torch.bfloat16)
    assert (weight_codes(again).int() - weight_codes(q).int()).abs().max() <= 1


def test_fake_quant_equals_dequantized_quant_bit_for_bit_with_identity_gradient():
    torch.manual_seed(0)
    w = torch.randn(16, 64, requires_grad=True)
    fq = fake_quantize_weight(w, bits=4, group_size=32)
    assert torch.equal(fq, dequantize_weight(quantize_weight(w, bits=4, group_size=32)))
    fq.backward(torch.arange(fq.numel(), dtype=torch.float32).view_as(fq))
    assert torch.equal(w.grad, torch.arange(fq.numel(), dtype=torch.float32).view_as(fq))


def test_dynamic_int8_activation_per_token():
    x = torch.randn(3, 5, 64, requires_grad=True)
    q = quantize_activation_int8(x)
    scale = x.detach().abs().amax(-1, keepdim=True) / 127
    assert ((q - x.detach()).abs() <= scale / 2 + 1e-6).all()
    assert torch.equal(fake_quantize_activation_int8(x), q)
    fake_quantize_activation_int8(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_bad_group_size_says_what_to_do():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 96), bits=4, group_size=64)
