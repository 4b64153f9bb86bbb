"""AdamW8bit: fp32 path == torch AdamW, 8-bit close to it, chunking invariance, state bytes, round trip, peers."""

import copy
import io

import pytest
import torch

from llmopt.optim import AdamW8bit, stable_embedding_param_groups, state_bytes


def _params(seed=0, shapes=((64, 96), (300,), (37, 129))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]


def _run(optimizer, params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 1e-2 + 0.5 * p.detach()
        optimizer.step()


def test_fp32_path_equals_torch_adamw():
    a, b = _params(), _params()
    _run(torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1, foreach=False), a, 5)
    _run(AdamW8bit(b, lr=1e-2, weight_decay=0.1, min_8bit_size=10 ** 9), b, 5)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


def test_eight_bit_tracks_fp32_adamw():
    a, b = _params(), _params()
    _run(torch.optim.AdamW(a, lr=1e-2, foreach=True), a, 30)
    opt = AdamW8bit(b, lr=1e-2, min_8bit_size=1)
    _run(opt, b, 30)
    assert "exp_avg_codes" in opt.state[b[0]] and "exp_avg_codes" in opt.state[b[1]]
    start = _params()
    for x, y, s in zip(a, b, start):
        moved = (x - s).norm()
        assert (y - x).norm() < 0.05 * moved  # the 8-bit trajectory stays within 5% of the fp32 one


def test_chunking_does_not_change_the_result():
    a, b = _params(), _params()  # chunks are the torch path's; the CPU kernel walks whole tensors
    _run(AdamW8bit(a, lr=1e-2, min_8bit_size=1, chunk_size=256, backend="torch"), a, 4)
    _run(AdamW8bit(b, lr=1e-2, min_8bit_size=1, chunk_size=1 << 16, backend="torch"), b, 4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_state_bytes_under_027x_of_adamw():
    a, b = _params(shapes=((256, 256),)), _params(shapes=((256, 256),))
    ref, opt = torch.optim.AdamW(a), AdamW8bit(b)
    _run(ref, a, 1)
    _run(opt, b, 1)
    n = 256 * 256
    assert state_bytes(opt) == 2 * (n + n // 256 * 4) + 4  # codes + absmax per moment, fp32 step
    assert state_bytes(opt) / state_bytes(ref) <= 0.27


def test_state_dict_round_trip_is_bit_identical():
    a = _params()
    opt = AdamW8bit(a, lr=1e-2, min_8bit_size=1000)
    _run(opt, a, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    buf.seek(0)
    fresh = AdamW8bit(b, lr=1e-2, min_8bit_size=1000)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    _run(opt, a, 3, seed=7)
    _run(fresh, b, 3, seed=7)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_stable_embedding_groups_keep_embeddings_in_fp32(tiny_model):
    opt = AdamW8bit(stable_embedding_param_groups(tiny_model), min_8bit_size=1)
    for p in tiny_model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert "exp_avg" in opt.state[tiny_model.embed_tokens.weight]
    assert "exp_avg_codes" in opt.state[tiny_model.layers[0].mlp.up_proj.weight]


def test_bad_options_raise():
    with pytest.raises(ValueError, match="multiple of block_size"):
        AdamW8bit(_params(), chunk_size=100)
    with pytest.raises(ValueError, match="optim_bits"):
        AdamW8bit(_params(), optim_bits=4)
    with pytest.raises(ValueError, match="backend"):
        AdamW8bit(_params(), backend="triton")


def test_matches_bitsandbytes_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes")
    a, b = _params(shapes=((64, 128),)), _params(shapes=((64, 128),))
    try:
        peer = bnb.optim.AdamW8bit(a, lr=1e-2, min_8bit_size=1)
        _run(peer, a, 10)
    except Exception as e:  # a bitsandbytes build without CPU optimizer kernels
        pytest.skip(f"bitsandbytes AdamW8bit does not run here: {e}")
    _run(AdamW8bit(b, lr=1e-2, min_8bit_size=1), b, 10)
    start = _params(shapes=((64, 128),))[0]
    assert (b[0] - a[0]).norm() < 0.05 * (a[0] - start).norm()
