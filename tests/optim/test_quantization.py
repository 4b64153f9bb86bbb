"""Block-wise dynamic 8-bit quantization: the maps, the nearest-code contract, blocks and padding."""

import pytest
import torch

from llmopt.optim.quantization import HALF_SCALE, dequantize_blockwise, dynamic_map, quant_map, quantize_blockwise


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape_and_bitsandbytes_equality(signed):
    code = dynamic_map(signed)
    assert code.numel() == 256 and bool((code[1:] >= code[:-1]).all())
    assert code.max() == 1.0 and (code == 0).any()
    assert (code < 0).any() == signed
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(code, F.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_is_nearest_code_within_the_stated_band(signed):
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-6, 0, 64).unsqueeze(1)  # blocks of very different scales
    if not signed:
        x = x.abs()
    codes, absmax = quantize_blockwise(x, signed=signed)
    y = dequantize_blockwise(codes, absmax, x.shape, signed=signed)
    code = dynamic_map(signed)
    normalized = x / absmax.unsqueeze(1)
    exact = code[(normalized.unsqueeze(-1) - code).abs().argmin(-1)] * absmax.unsqueeze(1)
    # the stated contract: nearest code, or the neighbour inside a 2**-10 relative band around a decision point
    assert ((y - x).abs() <= (exact - x).abs() + 2 ** -10 * x.abs() * 1.01 + 1e-30).all()
    assert (y.abs().amax(1) >= 0.99 * absmax).all()  # each block's max maps to +1.0 (or -0.993)
    assert torch.equal(absmax, x.abs().amax(1))
    agree = (y == exact).float().mean()
    assert agree > 0.99


def test_zero_blocks_padding_and_odd_sizes():
    x = torch.zeros(1000)
    x[600:700] = torch.linspace(-1, 1, 100)
    codes, absmax = quantize_blockwise(x, block_size=256)
    assert codes.numel() == 1024 and absmax.numel() == 4
    y = dequantize_blockwise(codes, absmax, (1000,), block_size=256)
    assert torch.equal(y[:512], torch.zeros(512))  # zero blocks stay exactly zero
    assert y[699] == 1.0  # a block's max element is exact


@pytest.mark.parametrize("signed", [True, False])
def test_lookup_table_is_the_nearest_code_of_every_half(signed):
    qmap = quant_map(signed)
    assert qmap.lut.numel() == 2 ** 16 and qmap.lut.dtype == torch.uint8
    halves = torch.arange(2 ** 16, dtype=torch.int32).to(torch.uint16).view(torch.float16).float()
    keep = halves.isfinite() & (halves.abs() <= HALF_SCALE)  # what x * HALF_SCALE / absmax can produce
    values = halves[keep] / HALF_SCALE
    dist = (values.unsqueeze(1) - qmap.code).abs()
    got = dist.gather(1, qmap.lut[keep].long().unsqueeze(1)).squeeze(1)
    # the table entry is a nearest code (a value on a decision point, up to fp32 rounding, may go either way)
    assert (got <= dist.amin(1) + 1e-7).all()
