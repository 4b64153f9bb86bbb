"""The C decode-attention kernel over a quantized KV cache equals the torch path (dequantize, then softmax)."""

import pytest
import torch

from llmopt.inference.quantized_cache import QuantizedKVCache
from llmopt.kernels import kv_attention
from llmopt.models.llama import rope_tables

pytestmark = pytest.mark.skipif(not kv_attention.available(), reason="no C compiler with OpenMP here")


def _filled(bits, rotate, group, residual, length, batch=2, kernel="torch", value_group=None, sinks=0,
            pre_rope=False):
    torch.manual_seed(0)
    rope = rope_tables(64, 256, 10000.0) if pre_rope else None  # keys stored before RoPE (KVQuant)
    cache = QuantizedKVCache(3, batch, 2, 256, 64, bits=bits, group_size=group, residual_length=residual,
                             chunk_size=128, rotate=rotate, kernel=kernel, value_group=value_group,
                             sink_tokens=sinks, rope=rope)
    for layer in range(3):
        k = torch.randn(batch, 2, length, 64) * torch.linspace(0.2, 3, 64)  # channels of different ranges
        v = torch.randn(batch, 2, length, 64)
        cache.attn_mask(torch.arange(length)) if layer == 0 else None
        cache.update(layer, torch.arange(length), k, v)
    return cache


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rotate", ["none", "values", "both"])
@pytest.mark.parametrize("group,residual,length", [(64, 0, 200), (32, 40, 131), (64, 0, 30)])
def test_kernel_equals_the_torch_path(bits, rotate, group, residual, length):
    cache = _filled(bits, rotate, group, residual, length)
    cache.attn_mask(torch.tensor([length]))  # one decode position
    q = torch.randn(2, 6, 1, 64)  # 6 query heads over 2 kv heads
    for layer in range(3):
        cache.update(layer, torch.tensor([length]), torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
        cache.kernel = "torch"
        ref = cache.attend(layer, q, None)
        cache.kernel = "c"
        out = cache.attend(layer, q, None)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-5)  # fp32 sums in another order


@pytest.mark.parametrize("value_group", [16, 32])
def test_kernel_with_smaller_value_groups(value_group):
    cache = _filled(4, "both", 64, 0, 150, value_group=value_group)
    assert cache.v_scale[0].shape[3] == 64 // value_group
    cache.attn_mask(torch.tensor([150]))
    cache.update(0, torch.tensor([150]), torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    q = torch.randn(2, 6, 1, 64)
    cache.kernel = "torch"
    ref = cache.attend(0, q, None)
    cache.kernel = "c"
    torch.testing.assert_close(cache.attend(0, q, None), ref, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("length", [150, 3])  # past the sinks; inside them (no codes yet)
def test_kernel_with_sink_tokens(bits, length):
    cache = _filled(bits, "both", 64, 0, length, sinks=4)
    assert cache.quantized[0] == (128 if length == 150 else 0)  # 2 groups of 64 (the sinks read from their copy)
    cache.attn_mask(torch.tensor([length]))
    cache.update(0, torch.tensor([length]), torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    q = torch.randn(2, 6, 1, 64)
    mask = torch.ones(2, 1, 1, length + 1, dtype=torch.bool)
    mask[0, ..., :2] = False  # a padded row: the kernel reorders the mask to codes, sinks, window
    for m in (None, mask):
        cache.kernel = "torch"
        ref = cache.attend(0, q, m)
        cache.kernel = "c"
        torch.testing.assert_close(cache.attend(0, q, m), ref, rtol=1e-4, atol=5e-5)


def test_kernel_honours_a_key_padding_mask():
    cache = _filled(4, "none", 64, 0, 150)
    cache.attn_mask(torch.tensor([150]))
    cache.update(0, torch.tensor([150]), torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    mask = torch.ones(2, 1, 1, 151, dtype=torch.bool)
    mask[0, ..., :37] = False  # row 0 is left-padded by 37 positions
    q = torch.randn(2, 6, 1, 64)
    cache.kernel = "torch"
    ref = cache.attend(0, q, mask)
    cache.kernel = "c"
    torch.testing.assert_close(cache.attend(0, q, mask), ref, rtol=1e-4, atol=5e-5)  # fp32 sums in another order


def test_rotation_is_exact_before_rounding():
    from llmopt.inference.quantized_cache import hadamard

    H = hadamard(64)
    torch.testing.assert_close(H @ H, torch.eye(64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


def test_auto_falls_back_to_torch_without_the_kernel(monkeypatch):
    cache = _filled(4, "both", 64, 0, 100, kernel="auto")
    cache.attn_mask(torch.tensor([100]))
    cache.update(0, torch.tensor([100]), torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
    q = torch.randn(2, 6, 1, 64)
    with_kernel = cache.attend(0, q, None)
    monkeypatch.setattr(kv_attention, "available", lambda: False)  # stands in for a machine without a compiler
    called = []
    monkeypatch.setattr(cache, "_attend_kernel", lambda *a: called.append(a))
    without = cache.attend(0, q, None)
    assert not called
    torch.testing.assert_close(without, with_kernel, rtol=1e-4, atol=5e-5)


# ---- the decode-layer kernel of the fused stack step (QuantizedDecodeAttention): write + attend in C ----------

def _decode_attention(cache, n_head=6, isa="native"):
    return kv_attention.QuantizedDecodeAttention(
        cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale, cache.v_zero, cache.k_window,
        cache.v_window, n_head=n_head, bits=cache.bits, group_size=cache.group_size, value_group=cache.value_group,
        sink_tokens=cache.sink_tokens, rotation=cache.H, rotate_keys=cache.rotate == "both", isa=isa,
        rope=cache.rope)


def _layer_step_against_update_attend(cache, length, pad=None, isa="native"):
    """One decode token at `length` through the kernel (on a copy's buffers) and through update + torch attend."""
    import copy

    fused = copy.deepcopy(cache)
    attention = _decode_attention(fused, isa=isa)
    if pad is not None:
        cache.set_key_padding(pad)
        fused.set_key_padding(pad)
    mask = cache.attn_mask(torch.tensor([length]))
    fused.attn_mask(torch.tensor([length]))
    assert all(cache.stored_after(q, length + 1) == q for q in cache.quantized)  # no group leaves the window
    keep = kv_attention.decode_keep(None if mask is None else mask[:, 0, 0], batch=2, length=length + 1,
                                    n_quantized=cache.quantized[0], sink_tokens=cache.sink_tokens)
    attention.set_step(length, cache.quantized, keep)
    for layer in range(3):
        q, k, v = torch.randn(2, 6, 1, 64), torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)
        out = attention(layer, q[:, :, 0], k[:, :, 0], v[:, :, 0])
        cache.update(layer, torch.tensor([length]), k, v)
        cache.kernel = "torch"
        torch.testing.assert_close(out, cache.attend(layer, q, mask)[:, :, 0], rtol=1e-4, atol=5e-5)
        # the write: the window (and sink copy) hold what update wrote
        torch.testing.assert_close(fused.k_window[layer], cache.k_window[layer], rtol=0, atol=0)
        torch.testing.assert_close(fused.v_window[layer], cache.v_window[layer], rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rotate", ["none", "values", "both"])
@pytest.mark.parametrize("group,residual,length,sinks", [(64, 0, 200, 0), (32, 40, 131, 0), (64, 0, 30, 0),
                                                         (64, 0, 150, 4), (64, 0, 2, 4), (32, 8, 77, 4)])
def test_decode_layer_kernel_equals_update_then_attend(bits, rotate, group, residual, length, sinks):
    cache = _filled(bits, rotate, group, residual, length, sinks=sinks)
    _layer_step_against_update_attend(cache, length)


@pytest.mark.parametrize("sinks", [0, 4])
def test_decode_layer_kernel_with_key_padding_and_value_groups(sinks):
    torch.manual_seed(2)
    cache = _filled(4, "both", 64, 0, 150, value_group=32, sinks=sinks)
    pad = torch.zeros(2, 150, dtype=torch.bool)
    pad[1, :37] = True  # row 1 left-padded by 37 positions
    _layer_step_against_update_attend(cache, 150, pad)


def test_decode_layer_kernel_scalar_build_equals_native():
    cache = _filled(2, "both", 64, 0, 150, sinks=4)
    _layer_step_against_update_attend(cache, 150, isa="scalar")


# ---- pre-RoPE keys (KVQuant, the int2 default): the kernel applies RoPE to each stored key -------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("rotate", ["none", "values", "both"])
@pytest.mark.parametrize("group,residual,length,sinks", [(64, 0, 200, 0), (32, 40, 131, 0), (64, 0, 30, 0),
                                                         (64, 0, 150, 4), (64, 0, 2, 4), (32, 8, 77, 4)])
def test_decode_layer_kernel_with_pre_rope_keys_equals_update_then_attend(bits, rotate, group, residual, length,
                                                                          sinks):
    cache = _filled(bits, rotate, group, residual, length, sinks=sinks, pre_rope=True)
    _layer_step_against_update_attend(cache, length)


@pytest.mark.parametrize("isa", ["native", "scalar"])
@pytest.mark.parametrize("sinks", [0, 4])
def test_decode_layer_kernel_with_pre_rope_keys_over_group_flushes(isa, sinks):
    """Decode steps one by one from 70 to 170 (group 32: flushes at 96, 128, 160, which the cache's update does)
    with a left-padded row: the kernel on the others, against update + torch attend on a twin cache."""
    import copy

    torch.manual_seed(3)
    ref = _filled(2, "both", 32, 0, 70, sinks=sinks, pre_rope=True)
    pad = torch.zeros(2, 70, dtype=torch.bool)
    pad[1, :9] = True  # row 1 left-padded by 9 positions
    ref.set_key_padding(pad)
    fused = copy.deepcopy(ref)
    attention = _decode_attention(fused, isa=isa)
    kernel_steps = 0
    for pos in range(70, 170):
        mask = ref.attn_mask(torch.tensor([pos]))
        fused.attn_mask(torch.tensor([pos]))
        flush = any(fused.stored_after(q, pos + 1) != q for q in fused.quantized)
        if not flush:
            keep = kv_attention.decode_keep(mask[:, 0, 0], batch=2, length=pos + 1, n_quantized=fused.quantized[0],
                                            sink_tokens=fused.sink_tokens)
            attention.set_step(pos, fused.quantized, keep)
        for layer in range(3):
            q, k, v = torch.randn(2, 6, 1, 64), torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)
            ref.update(layer, torch.tensor([pos]), k, v)
            want = ref.attend(layer, q, mask)
            if flush:  # the step that quantizes a group: the cache's own update (the kernel never quantizes)
                fused.update(layer, torch.tensor([pos]), k, v)
                got = fused.attend(layer, q, mask)
            else:
                got = attention(layer, q[:, :, 0], k[:, :, 0], v[:, :, 0])[:, :, None]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-5)
        kernel_steps += not flush
        assert fused.quantized == ref.quantized
        for layer in range(3):  # the same storage: flushes of identical windows give identical codes
            assert torch.equal(fused.k_codes[layer], ref.k_codes[layer])
            assert torch.equal(fused.k_window[layer], ref.k_window[layer])
    assert ref.quantized[0] == 160 and kernel_steps == 97


def test_decode_layer_kernel_pre_rope_rejects_what_it_cannot_do():
    cache = _filled(2, "both", 64, 0, 150, sinks=4, pre_rope=True)
    with pytest.raises(ValueError, match="Sylvester"):  # the fast transform is the Sylvester-Hadamard matrix
        kv_attention.QuantizedDecodeAttention(
            cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale, cache.v_zero, cache.k_window,
            cache.v_window, n_head=6, bits=2, group_size=64, value_group=64, sink_tokens=4,
            rotation=torch.linalg.qr(torch.randn(64, 64))[0], rotate_keys=True, rope=cache.rope)
    with pytest.raises(ValueError, match="rope must be"):
        kv_attention.QuantizedDecodeAttention(
            cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale, cache.v_zero, cache.k_window,
            cache.v_window, n_head=6, bits=2, group_size=64, value_group=64, sink_tokens=4, rotation=cache.H,
            rotate_keys=True, rope=(cache.rope[0][:100], cache.rope[1][:100]))
    # 96 channels at 2 bits: 24-byte rows, a channel's RoPE partner 12 bytes away, inside a register
    assert "pre-RoPE" in kv_attention.QuantizedDecodeAttention.unsupported(
        n_head=2, n_kv_head=1, head_dim=96, bits=2, value_group=32, window_dtype=torch.float32, pre_rope=True)
    assert kv_attention.QuantizedDecodeAttention.unsupported(
        n_head=2, n_kv_head=1, head_dim=32, bits=2, value_group=32, window_dtype=torch.float32, pre_rope=True) is None


def test_decode_layer_kernel_rejects_what_it_cannot_do():
    cache = _filled(4, "both", 64, 0, 127)  # 64 stored, 63 in the window of 64 slots
    attention = _decode_attention(cache)
    with pytest.raises(ValueError, match="flushed first"):
        attention.set_step(128, cache.quantized)  # a 65th window token: the cache's update quantizes a group first
    with pytest.raises(ValueError, match="keep must be"):
        attention.set_step(126, [64] * 3, torch.ones(2, 5, dtype=torch.bool))
    small = QuantizedKVCache(1, 1, 2, 64, 8, bits=2, group_size=8)  # 8 channels at 2 bits: 2 bytes a row
    with pytest.raises(ValueError, match="8-byte"):
        _decode_attention(small, n_head=2)
