"""Mamba-2 (SSD block): the sequential, chunked and recurrent paths agree; cached generation equals the
oracle; gradients agree; bad settings are one-line errors."""

import pytest
import torch

from llmopt.inference import generate, generate_reference, make_cache
from llmopt.models import ModelConfig, build_model
from llmopt.models.mamba2 import ssd_chunked, ssd_sequential, ssd_step

from test_mamba import _paths_agree  # the same three-path check as Mamba-1


def _ssd_inputs(B=2, T=70, H=3, P=4, N=5, dt_scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g)
    dt = torch.rand(B, T, H, generator=g) * dt_scale
    a = -torch.rand(H, generator=g) * 15 - 1
    Bm, Cm = torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    h0 = torch.randn(B, H, P, N, generator=g)
    return x, dt, a, Bm, Cm, h0


@pytest.mark.parametrize("chunk", [1, 7, 32, 64, 70, 128])
@pytest.mark.parametrize("dt_scale", [0.1, 1.0, 5.0])  # 5.0: decays far below fp32's range inside one chunk
def test_chunked_ssd_equals_sequential(chunk, dt_scale):
    x, dt, a, Bm, Cm, h0 = _ssd_inputs(dt_scale=dt_scale)
    y_ref, h_ref = ssd_sequential(x, dt, a, Bm, Cm, h0)
    y, h = ssd_chunked(x, dt, a, Bm, Cm, h0, chunk_size=chunk)
    # 1e-5; at dt 5 (outputs up to ~120 that cancel to ~1 in places) 1e-5 of the output's scale: both paths
    # are then ~4e-6 / ~5e-5 from a float64 oracle, the ordinary rounding of sums of terms of size 100
    atol = 1e-5 if dt_scale < 5 else 1e-5 * float(y_ref.abs().max())
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=atol, rtol=1e-5)
    hs = h0
    for t in range(x.size(1)):  # the decode path
        y_t, hs = ssd_step(hs, x[:, t], dt[:, t], a, Bm[:, t], Cm[:, t])
        torch.testing.assert_close(y_t, y_ref[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dt_scale", [0.1, 5.0])
def test_chunked_ssd_gradients_equal_sequential(dt_scale):
    inputs = [t.clone().double().requires_grad_() for t in _ssd_inputs(T=20, dt_scale=dt_scale)]
    y_ref, h_ref = ssd_sequential(*inputs)
    grads_ref = torch.autograd.grad(y_ref.square().sum() + h_ref.sum(), inputs)
    y, h = ssd_chunked(*inputs, chunk_size=8)
    for g, g_ref in zip(torch.autograd.grad(y.square().sum() + h.sum(), inputs), grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-9)


def _model(**over):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("tiny_mamba2", **{"init_std": 0.2, **over})).eval()


def test_model_paths_agree_random_weights():
    _paths_agree(_model(), torch.randint(0, 320, (2, 75)))


def test_trained_model_paths_agree_load_pretrained_and_generate(tmp_path):
    from llmopt.models import load_pretrained
    from llmopt.recipes import get_recipe
    from llmopt.train.config import apply_overrides
    from llmopt.train.loop import fit

    run = apply_overrides(get_recipe("tiny_mamba2"), ["train.steps=4", "train.eval_every=2", "train.eval_batches=1",
                                                      "data.max_chars=30000", "train.batch_size=2",
                                                      "train.seq_len=32", "train.progress=false"])
    result = fit(run, tmp_path / "run")
    assert result.final_val_loss is not None and result.final_val_loss == result.final_val_loss
    model, tokenizer = load_pretrained(tmp_path / "run")
    assert model.settings["block"] == "mamba2"
    idx = torch.tensor([tokenizer.encode("ROMEO: what light through yonder")[:12]] * 2)
    _paths_agree(model, torch.cat([idx, torch.randint(0, 320, (2, 30))], 1))
    cached = generate(model, idx, 25)
    oracle = generate_reference(model, idx, 25)
    assert torch.equal(cached.tokens, oracle.tokens)


def test_state_bytes_independent_of_length_and_other_size_refused():
    model = _model()
    cache = make_cache(model, 1, max_len=4096)
    nbytes = cache.nbytes
    with torch.no_grad():
        model(torch.randint(0, 320, (1, 300)), input_pos=torch.arange(300), cache=cache)
    assert cache.nbytes == nbytes
    other = build_model(ModelConfig.from_name("tiny_mamba2", extra=dict(block="mamba2", headdim=16, d_state=8)))
    with pytest.raises(ValueError, match="was built for"):
        other(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([300]), cache=cache)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="headdim=12 must divide"):
        build_model(ModelConfig.from_name("tiny_mamba2", extra=dict(block="mamba2", headdim=12)))
    with pytest.raises(ValueError, match="block must be"):
        build_model(ModelConfig.from_name("tiny_mamba2", extra=dict(block="mamba3")))
    with pytest.raises(ValueError, match="longer than model.max_seq_len"):
        _model(max_seq_len=16)(torch.zeros(1, 17, dtype=torch.long))
