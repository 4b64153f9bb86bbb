"""GaLoreAdamW: randomized projector vs SVD, update vs a float64 reference, refresh, 8-bit, groups, peer."""

import io
import math

import pytest
import torch

from llmopt.optim import GaLoreAdamW, galore_param_groups, randomized_range_finder, state_bytes


def _low_rank_plus_noise(m, n, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, rank, generator=g))
    s = torch.logspace(1, 0, rank)
    return u @ torch.diag(s) @ v.T + 1e-3 * torch.randn(m, n, generator=g)


def test_range_finder_spans_the_svd_subspace():
    a = _low_rank_plus_noise(96, 64, 8)
    p = randomized_range_finder(a, 8, generator=torch.Generator().manual_seed(0))
    assert p.shape == (96, 8)
    torch.testing.assert_close(p.T @ p, torch.eye(8), atol=1e-5, rtol=0)
    u = torch.linalg.svd(a, full_matrices=False)[0][:, :8]
    # cosines of the principal angles between the two subspaces are all ~1
    assert torch.linalg.svdvals(p.T @ u).min() > 0.9999


def _reference_update(w, g, proj, left, state, t, *, lr, b1, b2, eps, wd, scale):
    low = proj.T @ g if left else g @ proj
    m = state.setdefault("m", torch.zeros_like(low))
    v = state.setdefault("v", torch.zeros_like(low))
    m.mul_(b1).add_((1 - b1) * low)
    v.mul_(b2).add_((1 - b2) * low * low)
    n = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    back = proj @ n if left else n @ proj.T
    return w * (1 - lr * wd) - lr * scale * back


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_update_matches_float64_reference(shape):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    kw = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.1, scale=0.25)
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], lr=kw["lr"], weight_decay=kw["wd"], scale=kw["scale"],
                      update_proj_gap=100)
    state = {}
    for t in range(1, 5):
        g = torch.randn(shape, dtype=torch.float64)
        w.grad = g.clone()
        before = w.detach().clone()
        opt.step()
        proj = opt.state[w]["projector"].double()
        left = shape[0] <= shape[1]
        assert proj.shape == ((shape[0] if left else shape[1]), 4)
        expected = _reference_update(before, g, proj, left, state, t, **kw)
        rel = float((w.detach() - before - (expected - before)).norm() / (expected - before).norm())
        assert rel < 1e-6


def test_projector_refreshes_every_gap_steps_and_state_is_low_rank():
    w = torch.nn.Parameter(torch.randn(32, 48))
    opt = GaLoreAdamW([{"params": [w], "rank": 4}], update_proj_gap=3)
    projectors = []
    for _ in range(7):
        w.grad = torch.randn(32, 48)
        opt.step()
        projectors.append(opt.state[w]["projector"].clone())
    same = [torch.equal(projectors[i], projectors[i + 1]) for i in range(6)]
    assert same == [True, True, False, True, True, False]  # refreshed before steps 4 and 7
    assert opt.state[w]["exp_avg"].shape == (4, 48)


def test_eight_bit_variant_tracks_fp32_and_saves_state():
    torch.manual_seed(0)
    w32, w8 = (torch.nn.Parameter(torch.randn(64, 512)) for _ in range(2))
    w8.data.copy_(w32.data)
    start = w32.detach().clone()
    o32 = GaLoreAdamW([{"params": [w32], "rank": 16}], lr=1e-2)
    o8 = GaLoreAdamW([{"params": [w8], "rank": 16, "optim_bits": 8}], lr=1e-2)
    for _ in range(10):
        g = torch.randn(64, 512) + 0.5 * w32.detach()
        w32.grad, w8.grad = g.clone(), g.clone()
        o32.step()
        o8.step()
    assert (w8 - w32).norm() < 0.05 * (w32 - start).norm()
    assert state_bytes(o8) < 0.5 * state_bytes(o32)


def test_state_dict_round_trip_is_bit_identical():
    torch.manual_seed(0)
    for bits in (32, 8):
        a = torch.nn.Parameter(torch.randn(32, 40))
        opt = GaLoreAdamW([{"params": [a], "rank": 4, "optim_bits": bits}], update_proj_gap=2)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            a.grad = torch.randn(32, 40, generator=gen)
            opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        b = torch.nn.Parameter(a.detach().clone())
        fresh = GaLoreAdamW([{"params": [b], "rank": 4, "optim_bits": bits}], update_proj_gap=2)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        for _ in range(3):
            g = torch.randn(32, 40, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
            opt.step()
            fresh.step()
        assert torch.equal(a, b), bits


def test_param_groups_pick_attention_and_mlp_weights(tiny_model):
    groups = galore_param_groups(tiny_model, rank=8)
    projected = {id(p) for p in groups[0]["params"]}
    names = [n for n, p in tiny_model.named_parameters() if id(p) in projected]
    assert names and all(("self_attn" in n or "mlp" in n) and n.endswith("weight") for n in names)
    assert len(names) == 7 * tiny_model.config.n_layer
    rest = {id(p) for g in groups[1:] for p in g["params"]}
    assert id(tiny_model.embed_tokens.weight) in rest and id(tiny_model.lm_head.weight) in rest
    with pytest.raises(ValueError, match="no trainable nn.Linear"):
        galore_param_groups(tiny_model, rank=8, targets=("nothing",))
    with pytest.raises(ValueError, match="too small"):
        galore_param_groups(tiny_model, rank=64)


def test_matches_galore_torch_on_a_clear_spectrum():
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    a, b = (torch.nn.Parameter(torch.zeros(48, 64)) for _ in range(2))
    ours = GaLoreAdamW([{"params": [a], "rank": 4, "scale": 0.25}], lr=1e-2, update_proj_gap=100)
    peer = galore_torch.GaLoreAdamW([{"params": [b], "rank": 4, "update_proj_gap": 100, "scale": 0.25,
                                      "proj_type": "std"}], lr=1e-2, weight_decay=0.0)
    g = _low_rank_plus_noise(48, 64, 4)
    for _ in range(3):
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        peer.step()
    # same subspace and Adam math; galore-torch folds bias correction into the step size (eps placement)
    assert (a - b).norm() < 1e-3 * b.norm()
