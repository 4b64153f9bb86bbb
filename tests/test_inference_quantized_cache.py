"""QuantizedKVCache (KIVI layout): error bounds, byte formula, chunked attention, rollback, generation."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmopt.inference import generate, generate_reference, make_cache, prefill
from llmopt.inference.quantized_cache import (QuantizedKVCache, make_quantized_cache, pack, quantize_groups,
                                              unpack)
from llmopt.inference.speculative import DraftModelProposer, speculative_generate

from kv_steps import quantized_logits, spy_one_call_steps


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantization_error_within_half_a_step(bits):
    x = torch.randn(2, 3, 64, 8, generator=torch.Generator().manual_seed(1)) * 3
    codes, scale, zero = quantize_groups(x, bits, dim=2)
    back = codes.float() * scale.float() + zero.float()
    step = (x.amax(2, keepdim=True) - x.amin(2, keepdim=True)) / (2 ** bits - 1)
    # half a step, plus the fp16 rounding of the scale and zero point (relative 2^-11, times the code)
    bound = step / 2 + (2 ** bits) * scale.float() * 2 ** -10 + zero.float().abs() * 2 ** -10
    assert ((back - x).abs() <= bound).all()


def _filled(bits, residual=0, group=8, length=40, seed=2, rotate="none"):
    """A cache of one layer with `length` random tokens written in chunks, and the dense k, v it saw (min-max
    rounding at every width, whose half-step bound the tests check)."""
    gen = torch.Generator().manual_seed(seed)
    cache = QuantizedKVCache(1, 2, 2, 64, 8, bits=bits, group_size=group, residual_length=residual, chunk_size=16,
                             rotate=rotate, key_clip="minmax", value_clip="minmax")
    k = torch.randn(2, 2, length, 8, generator=gen)
    v = torch.randn(2, 2, length, 8, generator=gen)
    for start, end in [(0, 13), (13, 14), (14, 30), (30, length)]:
        pos = torch.arange(start, end)
        cache.attn_mask(pos)
        cache.update(0, pos, k[:, :, start:end], v[:, :, start:end])
    return cache, k, v


@pytest.mark.parametrize("rotate", ["none", "both"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_layout_and_stored_values_within_bounds(bits, rotate):
    cache, k, v = _filled(bits, residual=4, group=8, rotate=rotate)
    # 40 tokens, window >= 4: 32 quantized (4 key groups), 8 kept in full precision
    assert cache.quantized == [32] and cache.seq_len == 40
    dk, dv = cache.dequantize(0, 0, 32, rotated=True)  # as stored: the bounds hold in the rotated basis
    window_k = k[:, :, 32:]
    if rotate == "both":  # stored = k H, v H (H orthonormal); the window stays unrotated
        k, v = k @ cache.H, v @ cache.H
    step_k = (k[:, :, :32].view(2, 2, 4, 8, 8).amax(3) - k[:, :, :32].view(2, 2, 4, 8, 8).amin(3)) / (2 ** bits - 1)
    err_k = (dk - k[:, :, :32]).abs().view(2, 2, 4, 8, 8).amax(3)
    assert (err_k <= step_k * 0.51 + 1e-3).all()  # keys: per channel over each group of 8 tokens
    step_v = (v[:, :, :32].amax(-1) - v[:, :, :32].amin(-1)) / (2 ** bits - 1)
    assert ((dv - v[:, :, :32]).abs().amax(-1) <= step_v * 0.51 + 1e-3).all()  # values: per token
    assert torch.equal(cache.k_window[0][:, :, :8], window_k)  # the window is exact


@pytest.mark.parametrize("bits", [8, 4])
def test_chunked_attention_equals_sdpa_on_the_dequantized_cache(bits):
    cache, k, v = _filled(bits, residual=0, group=8)
    dk, dv = cache.dequantize(0, 0, cache.quantized[0])
    keys = torch.cat([dk, cache.k_window[0][:, :, : 40 - cache.quantized[0]]], 2)
    values = torch.cat([dv, cache.v_window[0][:, :, : 40 - cache.quantized[0]]], 2)
    q = torch.randn(2, 4, 3, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.arange(40)[None, :] <= torch.arange(37, 40)[:, None]  # (3, 40): the last 3 positions
    got = cache.attend(0, q, mask)
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _logits_fed(model, ids, cache, pieces):
    """Logits of ids (1, n) fed through `cache` in pieces of the given sizes."""
    out, start = [], 0
    with torch.no_grad():
        for size in pieces:
            end = min(start + size, ids.size(1))
            out.append(model(ids[:, start:end], input_pos=torch.arange(start, end), cache=cache))
            start = end
    return torch.cat(out, 1)


@pytest.mark.parametrize("bits,group,residual,sinks,extra", [
    (4, 8, 0, 0, {}), (2, 8, 5, 0, {}), (2, 8, 0, 3, {}), (4, 16, 3, 4, {}),
    (2, 8, 0, 3, dict(pre_rope=True, key_clip="mse", value_clip="unbiased")), (4, 8, 5, 0, dict(pre_rope=True))])
def test_decode_view_chunks_equal_token_by_token(tiny_model, bits, group, residual, sinks, extra):
    """A multi-token forward sees the cache as token-by-token decoding would: the same logits."""
    ids = torch.randint(0, 320, (1, 60), generator=torch.Generator().manual_seed(7))

    def cache(view=True):
        return make_quantized_cache(tiny_model, 1, 64, bits=bits, group_size=group, residual_length=residual,
                                    sink_tokens=sinks, decode_view=view, chunk_size=16, **extra)

    one_by_one = _logits_fed(tiny_model, ids, cache(), [1] * 60)
    chunked = _logits_fed(tiny_model, ids, cache(), [13, 1, 30, 16])
    torch.testing.assert_close(chunked, one_by_one, atol=1e-4, rtol=1e-4)
    stored_view = _logits_fed(tiny_model, ids, cache(view=False), [13, 1, 30, 16])
    assert (stored_view - one_by_one).abs().max() > 1e-3  # the plain view differs: the test can tell


def test_sink_tokens_layout_bytes_and_rollback():
    """The first S positions are read from a full-precision copy once their group is quantized."""
    gen = torch.Generator().manual_seed(8)
    cache = QuantizedKVCache(1, 1, 2, 64, 8, bits=2, group_size=8, residual_length=0, sink_tokens=3, rotate="none",
                             kernel="torch", key_clip="minmax", value_clip="minmax")
    k, v = torch.randn(1, 2, 37, 8, generator=gen), torch.randn(1, 2, 37, 8, generator=gen)
    k[:, :, :3] *= 20  # large sinks: they must not widen the first key group's range
    for start, end in [(0, 2), (2, 14), (14, 37)]:
        pos = torch.arange(start, end)
        cache.attn_mask(pos)
        cache.update(0, pos, k[:, :, start:end], v[:, :, start:end])
    assert cache.quantized == [32]  # 4 groups of 8 in codes, 32..36 in the window
    assert torch.equal(cache.k_window[0][:, :, :3], k[:, :, :3])
    assert torch.equal(cache.v_window[0][:, :, :3], v[:, :, :3])
    assert torch.equal(cache.k_window[0][:, :, 3:8], k[:, :, 32:37])
    dk, dv = cache.dequantize(0, 0, 32)
    ranges = [k[:, :, 3:8]] + [k[:, :, s:s + 8] for s in (8, 16, 24)]  # group 0's range leaves the sinks out
    for g, part in enumerate(ranges):
        step = (part.amax(2) - part.amin(2)) / 3
        lo = 3 if g == 0 else 8 * g
        assert ((dk[:, :, lo:8 * g + 8] - k[:, :, lo:8 * g + 8]).abs().amax(2) <= step * 0.51 + 1e-3).all()
    # bytes: the window and the sinks' copy at the cache dtype, the rest as codes
    dense = 2 * 2 * 8 * 4
    assert cache.bytes_at(37) == 32 * cache.quantized_bytes_per_token + (5 + 3) * dense
    assert cache.bytes_at(3) == 3 * dense
    # attention: SDPA over exact sinks + dequantized codes + window
    q = torch.randn(1, 4, 1, 8, generator=gen)

    def sdpa(keys, values):
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)

    want = sdpa(torch.cat([k[:, :, :3], dk[:, :, 3:], k[:, :, 32:]], 2),
                torch.cat([v[:, :, :3], dv[:, :, 3:], v[:, :, 32:]], 2))
    torch.testing.assert_close(cache.attend(0, q, None), want, atol=1e-5, rtol=1e-5)
    cache.truncate(20)  # into the codes: 16..19 return to the window at their quantized values
    assert cache.quantized == [16] and torch.equal(cache.k_window[0][:, :, 3:7], dk[:, :, 16:20])
    cache.truncate(5)  # into the sinks' group: the sinks come back exact, 3 and 4 at their quantized values
    assert cache.quantized == [0] and cache.seq_len == 5
    assert torch.equal(cache.k_window[0][:, :, 3:6], k[:, :, :3])
    assert torch.equal(cache.k_window[0][:, :, 6:8], dk[:, :, 3:5])
    want = sdpa(torch.cat([k[:, :, :3], dk[:, :, 3:5]], 2), torch.cat([v[:, :, :3], dv[:, :, 3:5]], 2))
    torch.testing.assert_close(cache.attend(0, q, None), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sink_tokens"):
        QuantizedKVCache(1, 1, 1, 16, 8, sink_tokens=9, group_size=8)


def test_byte_formula():
    cache = QuantizedKVCache(3, 2, 4, 256, 64, bits=4, group_size=64, residual_length=16)
    # per layer and kv head: codes 2 * 64 / 2 bytes, key scales+zeros 2 * 2 * 64 / 64, value 2 * 2 * 1
    per_token = 3 * 4 * (64 + 4 + 4)
    assert cache.quantized_bytes_per_token == per_token
    dense = 2 * 3 * 4 * 64 * 4  # fp32 window
    assert cache.bytes_at(200) == 128 * per_token + 72 * dense  # (200 - 16) // 64 = 2 groups quantized
    assert cache.bytes_at(10) == 10 * dense
    q_cap = 256
    allocated = 3 * 2 * 4 * (2 * q_cap * 32 + 2 * 4 * 64 * 2 + 2 * q_cap * 1 * 2 + 2 * (16 + 64) * 64 * 4)
    assert cache.nbytes == allocated
    fp16 = 2 * 3 * 4 * 64 * 2
    assert QuantizedKVCache(3, 1, 4, 2048, 64, torch.float16, bits=4).bytes_per_token / fp16 < 0.30
    assert QuantizedKVCache(3, 1, 4, 2048, 64, torch.float16, bits=2).bytes_per_token / fp16 < 0.17


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_generation_runs_and_int8_stays_close(tiny_model, bits):
    prompt = torch.randint(0, 320, (2, 50), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = tiny_model(prompt)
        cache = make_quantized_cache(tiny_model, 2, 64, bits=bits, group_size=8)
        logits = prefill(tiny_model, prompt[:, :20], cache)
        chunk = tiny_model(prompt[:, 20:50], input_pos=torch.arange(20, 50), cache=cache)
    err = (chunk - full[:, 20:50]).abs().max().item()
    assert math.isfinite(err) and err < {8: 0.02, 4: 0.2, 2: 1.0}[bits]
    torch.testing.assert_close(logits, full[:, 19], atol={8: 0.02, 4: 0.2, 2: 1.0}[bits], rtol=0)
    result = generate(tiny_model, prompt[:, :10], 12, kv_bits=bits)
    assert result.tokens.shape == (2, 22)


def test_large_window_is_exact(tiny_model):
    """Nothing reaches the quantized store while the window holds it: greedy equals the oracle."""
    prompt = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(5))
    cache = make_quantized_cache(tiny_model, 1, 40, bits=2, residual_length=64)
    got = generate(tiny_model, prompt, 20, cache=cache)
    assert cache.quantized == [0, 0]
    assert torch.equal(got.tokens, generate_reference(tiny_model, prompt, 20).tokens)


def test_rollback_into_quantized_region_and_speculative(tiny_model):
    cache, k, v = _filled(4, residual=0, group=8)
    before = cache.dequantize(0, 24, 32)
    cache.truncate(27)  # back into the last quantized group: it returns to the window at its quantized values
    assert cache.quantized == [24] and cache.seq_len == 27
    torch.testing.assert_close(cache.k_window[0][:, :, :3], before[0][:, :, :3])
    with pytest.raises(ValueError, match="already quantized"):
        cache.attn_mask(torch.tensor([20]))
    # speculative decoding over a quantized target cache: the same tokens as plain decoding with it
    prompt = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(6))
    plain = generate(tiny_model, prompt, 24, cache=make_quantized_cache(tiny_model, 1, 64, bits=4, group_size=8))
    spec = speculative_generate(tiny_model, prompt, 24, proposer=DraftModelProposer(tiny_model), k=3,
                                adaptive=False, cache=make_quantized_cache(tiny_model, 1, 64, bits=4, group_size=8))
    # verify forwards see chunks where plain decode sees single tokens; with decode_view (the default) each
    # verified position sees the cache as plain decoding did, so the tokens agree
    assert torch.equal(spec.tokens, plain.tokens)


def test_left_padding_with_quantized_cache(tiny_model):
    rows = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    batched = generate(tiny_model, rows, 8, kv_bits=8)
    for b, row in enumerate(rows):
        single = generate(tiny_model, [row], 8, kv_bits=8)
        assert torch.equal(batched.new_tokens[b], single.new_tokens[0])


def test_errors(tiny_model):
    with pytest.raises(ValueError, match="8, 4 or 2"):
        QuantizedKVCache(1, 1, 1, 16, 8, bits=3)
    with pytest.raises(ValueError, match="dynamic only"):
        QuantizedKVCache(1, 1, 1, 16, 8, static=True)
    with pytest.raises(ValueError, match="divide head_dim"):
        QuantizedKVCache(1, 1, 1, 16, 12, group_size=8)
    with pytest.raises(ValueError, match="not both"):
        generate(tiny_model, [1, 2], 3, kv_bits=4, cache=make_cache(tiny_model, 1))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_mse_clip_never_worse_than_min_max(bits):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 64, 16, generator=gen) * torch.rand(1, 1, 1, 16, generator=gen) * 4
    x[0, 0, 3, 0] = 40.0  # an outlier: clipping it pays at 2 bits
    errors = {}
    for clip in ("minmax", "mse"):
        codes, scale, zero = quantize_groups(x, bits, dim=2, clip=clip)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
        assert scale.dtype == zero.dtype == torch.float16 and scale.shape == (3, 4, 1, 16)
        errors[clip] = (codes.float() * scale.float() + zero.float() - x).square().sum(2)
    assert (errors["mse"] <= errors["minmax"] * (1 + 1e-6)).all()  # per group, as stored (fp16 scale and zero)
    if bits == 2:  # Gaussian groups: the MSE-optimal range is about 0.6 of min-max, about half the error
        assert errors["mse"].sum() < 0.7 * errors["minmax"].sum()
    with pytest.raises(ValueError, match="clip must be one of"):
        quantize_groups(x, bits, dim=2, clip="max")


@pytest.mark.parametrize("key_clip,value_clip", [("mse", "minmax"), ("minmax", "unbiased"), ("unbiased", "mse")])
def test_clipped_cache_stores_the_clipped_quantizer(key_clip, value_clip):
    """The cache stores exactly what `quantize_groups(..., clip=key_clip / value_clip)` gives for the rotated keys
    and values; truncate brings stored positions back into the window at their stored values."""
    gen = torch.Generator().manual_seed(3)
    cache = QuantizedKVCache(1, 2, 2, 64, 8, bits=2, group_size=8, chunk_size=16, rotate="both", key_clip=key_clip,
                             value_clip=value_clip)
    k, v = torch.randn(2, 2, 24, 8, generator=gen), torch.randn(2, 2, 24, 8, generator=gen)
    cache.attn_mask(torch.arange(24))
    cache.update(0, torch.arange(24), k, v)
    kq, ks, kz = quantize_groups((k @ cache.H).view(2, 2, 3, 8, 8), 2, dim=3, clip=key_clip)
    vq, vs, vz = quantize_groups((v @ cache.H).view(2, 2, 24, 1, 8), 2, dim=4, clip=value_clip)
    assert cache.quantized == [24]
    assert torch.equal(cache.k_scale[0][:, :, :3], ks) and torch.equal(cache.k_zero[0][:, :, :3], kz)
    assert torch.equal(cache.v_scale[0][:, :, :24], vs) and torch.equal(cache.v_zero[0][:, :, :24], vz)
    assert torch.equal(unpack(cache.k_codes[0][:, :, :24], 2), kq.view(2, 2, 24, 8))
    assert torch.equal(unpack(cache.v_codes[0][:, :, :24], 2), vq.view(2, 2, 24, 8))
    dk, dv = cache.dequantize(0, 16, 24)
    cache.truncate(20)  # positions 16..19 come back into the window at their stored values
    assert cache.quantized == [16]
    torch.testing.assert_close(cache.k_window[0][:, :, :4], dk[:, :, :4])
    torch.testing.assert_close(cache.v_window[0][:, :, :4], dv[:, :, :4])
    with pytest.raises(ValueError, match="key_clip must be one of"):
        QuantizedKVCache(1, 1, 1, 16, 8, bits=2, group_size=8, key_clip="max")


@pytest.mark.parametrize("rotate", ["none", "both"])
def test_pre_rope_keys(tiny_model, rotate):
    """pre_rope=True stores each key group rotated back by its positions' RoPE angles (per channel, as KVQuant),
    reads it with RoPE again: stored keys within half a step of the pre-RoPE keys, attention equal to SDPA over
    the dequantized cache, the same bytes, and the C kernel not taken (it reads keys as stored)."""
    from llmopt.models.llama import rotate_half

    cos, sin = tiny_model.rope_cos, tiny_model.rope_sin
    D = tiny_model.config.head_dim
    gen = torch.Generator().manual_seed(9)
    cache = QuantizedKVCache(1, 1, 2, 64, D, bits=4, group_size=8, chunk_size=16, rotate=rotate, rope=(cos, sin))
    plain = QuantizedKVCache(1, 1, 2, 64, D, bits=4, group_size=8, chunk_size=16, rotate=rotate)
    pre = torch.randn(1, 2, 37, D, generator=gen) + 3 * torch.randn(1, 2, 1, D, generator=gen)  # channel offsets
    k = pre * cos[:37] + rotate_half(pre) * sin[:37]  # what the model writes: keys after RoPE
    v = torch.randn(1, 2, 37, D, generator=gen)
    for c in (cache, plain):
        c.attn_mask(torch.arange(37))
        c.update(0, torch.arange(37), k, v)
    assert cache.quantized == [32] and cache.bytes_at(37) == plain.bytes_at(37) and cache.nbytes == plain.nbytes
    stored = pre[:, :, :32] @ cache.H if rotate == "both" else pre[:, :, :32]
    dk_stored = (unpack(cache.k_codes[0][:, :, :32], 4).view(1, 2, 4, 8, D).float() * cache.k_scale[0][:, :, :4].float()
                 + cache.k_zero[0][:, :, :4].float()).view(1, 2, 32, D)
    step = (stored.view(1, 2, 4, 8, D).amax(3) - stored.view(1, 2, 4, 8, D).amin(3)) / 15
    assert ((dk_stored - stored).abs().view(1, 2, 4, 8, D).amax(3) <= step * 0.51 + 1e-3).all()
    dk, dv = cache.dequantize(0, 0, 32)
    back = dk_stored @ cache.H if rotate == "both" else dk_stored
    torch.testing.assert_close(dk, back * cos[:32] + rotate_half(back) * sin[:32], atol=1e-5, rtol=1e-5)
    # per-channel groups fit pre-RoPE keys with channel offsets better than post-RoPE ones
    assert (dk - k[:, :, :32]).square().sum() < 0.5 * (plain.dequantize(0, 0, 32)[0] - k[:, :, :32]).square().sum()
    q = torch.randn(1, 4, 1, D, generator=gen)
    cache.attn_mask(torch.tensor([37]))
    assert not cache._use_kernel(q, None)
    kn, vn = torch.randn(1, 2, 1, D, generator=gen), torch.randn(1, 2, 1, D, generator=gen)
    cache.update(0, torch.tensor([37]), kn, vn)
    want = F.scaled_dot_product_attention(q, torch.cat([dk, k[:, :, 32:], kn], 2),
                                          torch.cat([dv, v[:, :, 32:], vn], 2), enable_gqa=True)
    torch.testing.assert_close(cache.attend(0, q, None), want, atol=1e-5, rtol=1e-5)
    cache.truncate(30)  # back into the codes: 24..29 return to the window with RoPE applied
    torch.testing.assert_close(cache.k_window[0][:, :, :6], dk[:, :, 24:30])
    with pytest.raises(ValueError, match="rope must be"):
        QuantizedKVCache(1, 1, 2, 64, D, bits=4, group_size=8, rope=(cos[:10], sin[:10]))


def test_unbiased_clip_error_is_zero_mean_and_uncorrelated():
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(6)) * 2 + 1
    for bits in (4, 2):
        codes, scale, zero = quantize_groups(x, bits, dim=1, clip="unbiased")
        err = codes.float() * scale.float() + zero.float() - x
        xc = x - x.mean(1, keepdim=True)
        assert err.mean(1).abs().max() < 2e-3 * x.std()  # fp16 rounding of the zero point
        assert ((err * xc).sum(1) / xc.square().sum(1)).abs().max() < 2e-3  # no shrinking toward the mean
        minmax = quantize_groups(x, bits, dim=1)
        minmax_err = minmax[0].float() * minmax[1].float() + minmax[2].float() - x
        if bits == 2:
            assert err.square().sum() < 0.7 * minmax_err.square().sum()


@pytest.mark.parametrize("clip", ["minmax", "unbiased"])
def test_fp8_scales_bytes_and_reading(clip):
    """scale_format="fp8": one-byte scales (e4m3), fp16 zero points; bytes counted from what is stored; min-max
    keeps its half-step bound (the scale is rounded up); the torch path reads it (the C kernel is not taken)."""
    gen = torch.Generator().manual_seed(10)
    cache = QuantizedKVCache(2, 1, 2, 64, 16, bits=2, group_size=8, value_group=8, chunk_size=16, rotate="none",
                             scale_format="fp8", key_clip=clip, value_clip=clip)
    assert cache.k_scale[0].dtype == cache.v_scale[0].dtype == torch.float8_e4m3fn
    assert cache.k_zero[0].dtype == torch.float16
    per_token = 2 * 2 * (2 * 16 * 2 / 8 + 3 * 16 / 8 + 3 * 16 / 8)  # layers * heads * (codes + keys + values)
    assert cache.quantized_bytes_per_token == per_token
    window = 2 * 2 * 2 * 16 * 4  # fp32 k and v, 2 layers, 2 heads
    assert cache.nbytes == 2 * 2 * (2 * 64 * 4 + 8 * 16 * 3 + 64 * 2 * 3) + 8 * window
    assert cache.bytes_at(37) == 32 * per_token + 5 * window
    k, v = torch.randn(1, 2, 37, 16, generator=gen) * 3, torch.randn(1, 2, 37, 16, generator=gen)
    cache.attn_mask(torch.arange(37))
    for layer in range(2):
        cache.update(layer, torch.arange(37), k, v)
    dk, dv = cache.dequantize(0, 0, 32)
    if clip == "minmax":
        groups = k[:, :, :32].view(1, 2, 4, 8, 16)
        step = (groups.amax(3) - groups.amin(3)).clamp_min(3 * 2 ** -6) / 3 * 17 / 15  # e4m3 rounds within 1/16
        assert ((dk - k[:, :, :32]).abs().view(1, 2, 4, 8, 16).amax(3) <= step * 0.51 + 1e-2).all()
    q = torch.randn(1, 4, 1, 16, generator=gen)
    cache.attn_mask(torch.tensor([37]))
    assert not cache._use_kernel(q, None)
    cache.update(0, torch.tensor([37]), k[:, :, 36:37], v[:, :, 36:37])
    want = F.scaled_dot_product_attention(q, torch.cat([dk, k[:, :, 32:], k[:, :, 36:37]], 2),
                                          torch.cat([dv, v[:, :, 32:], v[:, :, 36:37]], 2), enable_gqa=True)
    torch.testing.assert_close(cache.attend(0, q, None), want, atol=1e-5, rtol=1e-5)
    cache.kernel = "c"
    with pytest.raises(ValueError, match="fp16 scales and post-RoPE keys only"):
        cache.attend(0, q, None)
    with pytest.raises(ValueError, match="scale_format must be"):
        QuantizedKVCache(1, 1, 1, 16, 8, group_size=8, scale_format="bf16")


def test_defaults_by_bits(tiny_model):
    """2 bits: pre-RoPE keys and the unbiased clip for keys and values (torch path); 8 and 4 bits: post-RoPE
    keys, min-max, the C kernel's layout. The explicit options override the defaults."""
    for bits in (8, 4, 2):
        cache = make_quantized_cache(tiny_model, 1, 32, bits=bits, group_size=8)
        assert (cache.key_clip, cache.value_clip) == (("unbiased",) * 2 if bits == 2 else ("minmax",) * 2)
        assert (cache.rope is not None) == (bits == 2) and cache.scale_format == "fp16"
        assert cache.sink_tokens == (4 if bits == 2 else 0)
        assert QuantizedKVCache(1, 1, 1, 16, 8, bits=bits, group_size=8).rope is None
    cache = make_quantized_cache(tiny_model, 1, 32, bits=2, group_size=8, pre_rope=False, key_clip="minmax",
                                 sink_tokens=0)
    assert cache.rope is None and (cache.key_clip, cache.value_clip) == ("minmax", "unbiased")
    assert cache.sink_tokens == 0


# ---- pre-RoPE keys through the one-call C decode step of generate (kernels.kv_attention) ----------------------

def _fed_logits(model, ids, steps, *, fused, **kw):
    """`quantized_logits` through the C stack step: one C call a step (`fused`) or the C layer halves around the
    cache's update and torch attend."""
    return quantized_logits(model, ids, steps, path="fused" if fused else "layers", **kw)


@pytest.fixture
def one_call_steps(monkeypatch):
    """Counts the one-call quantized decode steps (a spy: the real method runs)."""
    return spy_one_call_steps(monkeypatch)


@pytest.mark.parametrize("bits,rotate,sinks", [(2, "both", 4), (2, "none", 0), (4, "both", 4), (8, "values", 0)])
def test_one_call_step_with_pre_rope_keys_equals_the_torch_attention(bits, rotate, sinks, one_call_steps):
    from llmopt.kernels import kv_attention
    from llmopt.models import ModelConfig, build_model

    if not kv_attention.available():
        pytest.skip("no C compiler with OpenMP here")
    torch.manual_seed(6)
    model = build_model(ModelConfig.from_name("demo")).eval()  # head_dim 32: at 2 bits one register a code slot
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    pad = torch.zeros(2, 21, dtype=torch.bool)
    pad[1, :5] = True  # row 1 left-padded
    # group 16: 40 steps cross several group flushes (those steps take the cache's update), and a rollback
    kw = dict(bits=bits, group_size=16, value_group=32, rotate=rotate, sink_tokens=sinks, pre_rope=True, pad=pad,
              truncate_at=(30, 27))
    ref, ref_cache = _fed_logits(model, ids, 40, fused=False, **kw)
    assert not one_call_steps
    got, cache = _fed_logits(model, ids, 40, fused=True, **kw)
    assert cache.rope is not None and len(one_call_steps) > 30  # most steps were one C call
    # the same GEMVs; attention sums in another order, which can move a code by a step at a later flush
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
    assert cache.quantized == ref_cache.quantized
    for layer in range(model.config.n_layer):
        codes = (unpack(cache.k_codes[layer], bits).int() - unpack(ref_cache.k_codes[layer], bits).int()).abs()
        assert codes.max() <= 1 and (codes > 0).float().mean() < 0.01


def test_generate_kv_int2_defaults_tokens_unchanged_by_the_one_call_step(one_call_steps):
    """`generate(kv_bits=2)` with its defaults (pre-RoPE keys, 4 sinks): the one-call C step gives the greedy
    tokens of the module-by-module torch path."""
    from llmopt.kernels import kv_attention
    from llmopt.models import ModelConfig, build_model

    if not kv_attention.available():
        pytest.skip("no C compiler with OpenMP here")
    torch.manual_seed(8)
    model = build_model(ModelConfig.from_name("demo")).eval()
    with torch.no_grad():  # wider weights than the init's: greedy text that depends on the context (not one token)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    prompt = torch.randint(0, model.config.vocab_size, (2, 70))
    fast = generate(model, prompt, 30, kv_bits=2)
    assert len(one_call_steps) > 20  # the flushes at 79 and 95 take the per-layer path
    assert all(len(set(row.tolist())) > 20 for row in fast.tokens[:, 70:])
    slow = generate(model, prompt, 30, kv_bits=2, kernels="torch")
    assert torch.equal(fast.tokens, slow.tokens)
