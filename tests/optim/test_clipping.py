"""clip_gradients_: norm and value equal torch's, AGC equals a float64 reference, norms before/after; the loop."""

import json

import pytest
import torch

from llmopt.optim import clip_gradients_


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((8, 6), (6,), (3, 2, 4))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 3
    return ps


def _norm(ps):
    return float(torch.cat([p.grad.flatten() for p in ps]).norm())


def test_norm_mode_equals_torch():
    a, b = _params(), _params()
    ref = float(torch.nn.utils.clip_grad_norm_(a, 1.0))
    before, after = clip_gradients_(b, "norm", 1.0)
    assert before == pytest.approx(ref, rel=1e-6) and after == pytest.approx(_norm(b), rel=1e-5)
    assert after == pytest.approx(1.0, rel=1e-5)
    for p, q in zip(a, b):
        assert torch.equal(p.grad, q.grad)


def test_value_mode_equals_torch():
    a, b = _params(), _params()
    torch.nn.utils.clip_grad_value_(a, 0.5)
    before, after = clip_gradients_(b, "value", 0.5)
    for p, q in zip(a, b):
        assert torch.equal(p.grad, q.grad)
    assert after == pytest.approx(_norm(b), rel=1e-6) and after < before


def test_agc_matches_float64_reference():
    ps = _params()
    ps[0].data[0].zero_()  # a zero row: the 1e-3 floor applies
    expected = []
    for p in ps:
        w, g = p.detach().double(), p.grad.double()
        dims = tuple(range(1, w.dim())) if w.dim() > 1 else None
        wn = (w.norm(dim=dims, keepdim=True) if dims else w.norm()).clamp_min(1e-3)
        gn = g.norm(dim=dims, keepdim=True) if dims else g.norm()
        bound = 0.01 * wn
        expected.append(torch.where(gn > bound, g * bound / gn, g))
    before, after = clip_gradients_(ps, "agc", 0.01)
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-6, atol=1e-9)
    assert after < before


def test_none_measures_only_and_bad_values_raise():
    ps = _params()
    n = _norm(ps)
    assert clip_gradients_(ps, "norm", None) == pytest.approx((n, n), rel=1e-6)
    with pytest.raises(ValueError, match="clip mode"):
        clip_gradients_(ps, "l1", 1.0)
    with pytest.raises(ValueError, match="positive"):
        clip_gradients_(ps, "value", -1.0)


def test_loop_logs_norms_before_and_after_with_agc_and_lamb(tmp_path):
    from llmopt.recipes import get_recipe
    from llmopt.train import apply_overrides, fit

    run = apply_overrides(get_recipe("tiny"), ["train.steps=2", "train.log_every=1", "train.eval_every=2",
                                               "train.eval_batches=1", "data.max_chars=20000", "train.batch_size=2",
                                               "train.seq_len=16", "train.progress=false", "optim.name=lamb",
                                               "train.clip_mode=agc", "train.grad_clip=0.01"])
    fit(run, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "grad_norm" in r]
    assert rows and all(r["grad_norm_clipped"] < r["grad_norm"] for r in rows)
