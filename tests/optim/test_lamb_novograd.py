"""Lamb and NovoGrad against float64 references of the papers' equations, and against torch-optimizer."""

import math

import pytest
import torch

from llmopt.optim import Lamb, NovoGrad

SHAPES = ((16, 24), (24,), (5, 3, 4))


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * 0.1 for s in SHAPES]


def _lamb_reference(x, g, state, t, *, lr, b1, b2, eps, wd, clamp, bias_correction):
    """You et al. 2019, Algorithm 2, in float64."""
    m = state.setdefault("m", torch.zeros_like(x))
    v = state.setdefault("v", torch.zeros_like(x))
    m.mul_(b1).add_((1 - b1) * g)
    v.mul_(b2).add_((1 - b2) * g * g)
    m_hat, v_hat = (m / (1 - b1 ** t), v / (1 - b2 ** t)) if bias_correction else (m, v)
    r = m_hat / (v_hat.sqrt() + eps) + wd * x
    phi = min(float(x.norm()), clamp)
    trust = phi / float(r.norm()) if phi > 0 and float(r.norm()) > 0 else 1.0
    return x - lr * trust * r


def _novograd_reference(w, g, state, t, *, lr, b1, b2, eps, wd, grad_averaging):
    """Ginsburg et al. 2019, Algorithm 1, in float64."""
    norm_sq = float((g * g).sum())
    state["v"] = norm_sq if t == 1 else b2 * state["v"] + (1 - b2) * norm_sq
    m = state.setdefault("m", torch.zeros_like(w))
    d = g / (math.sqrt(state["v"]) + eps) + wd * w
    m.mul_(b1).add_((1 - b1) * d if grad_averaging else d)
    return w - lr * m


def _check_against_reference(optimizer_cls, reference, opt_kwargs, ref_kwargs, steps=6):
    """Each update of the optimizer run on float64 parameters equals the float64 equations to 1e-6 relative;
    run on float32 parameters, the trajectory stays within float32 rounding of the float64 one."""
    params64 = [torch.nn.Parameter(p.detach().double()) for p in _params()]
    _compare(optimizer_cls, reference, opt_kwargs, ref_kwargs, params64, steps)
    params32 = _params()
    ref32 = _params()
    ref64 = [torch.nn.Parameter(p.detach().double()) for p in ref32]
    o32, o64 = optimizer_cls(params32, **opt_kwargs), optimizer_cls(ref64, **opt_kwargs)
    for t in range(1, steps + 1):
        for p, q, g in zip(params32, ref64, _grads(t)):
            p.grad, q.grad = g.clone(), g.double()
        o32.step()
        o64.step()
    for p, q in zip(params32, ref64):
        torch.testing.assert_close(p.detach().double(), q.detach(), rtol=1e-6, atol=1e-6)


def _compare(optimizer_cls, reference, opt_kwargs, ref_kwargs, params, steps):
    states = [{} for _ in params]
    opt = optimizer_cls(params, **opt_kwargs)
    for t in range(1, steps + 1):
        grads = _grads(t)
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        before = [p.detach().double().clone() for p in params]
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            expected = reference(before[i], g.double(), states[i], t, **ref_kwargs)
            update, expected_update = p.detach().double() - before[i], expected - before[i]
            rel = float((update - expected_update).norm() / expected_update.norm())
            assert rel < 1e-6, f"step {t}, tensor {i}: relative update error {rel:.2e}"


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_matches_float64_reference(bias_correction, wd):
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd, clamp_value=10.0,
              bias_correction=bias_correction)
    ref = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-6, wd=wd, clamp=10.0, bias_correction=bias_correction)
    _check_against_reference(Lamb, _lamb_reference, kw, ref)


def test_lamb_trust_ratio_clamp_and_zero_weights():
    p = torch.nn.Parameter(torch.full((10,), 100.0))  # ||x|| = 316 > clamp 10: phi = 10
    opt = Lamb([p], lr=0.1, clamp_value=10.0)
    p.grad = torch.ones(10)
    opt.step()
    # first step, bias corrected: r = 1/(1+eps) per element, ||r|| = sqrt(10); step = lr * 10 / sqrt(10) * r
    torch.testing.assert_close(p.detach(), torch.full((10,), 100.0 - 0.1 * 10 / math.sqrt(10) / (1 + 1e-6)))
    z = torch.nn.Parameter(torch.zeros(4))
    opt = Lamb([z], lr=0.1)
    z.grad = torch.ones(4)
    opt.step()  # ||x|| = 0: trust ratio 1
    torch.testing.assert_close(z.detach(), torch.full((4,), -0.1 / (1 + 1e-6)))


@pytest.mark.parametrize("grad_averaging", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.001])
def test_novograd_matches_float64_reference(grad_averaging, wd):
    kw = dict(lr=1e-2, betas=(0.95, 0.98), eps=1e-8, weight_decay=wd, grad_averaging=grad_averaging)
    ref = dict(lr=1e-2, b1=0.95, b2=0.98, eps=1e-8, wd=wd, grad_averaging=grad_averaging)
    _check_against_reference(NovoGrad, _novograd_reference, kw, ref)


def test_novograd_state_is_half_of_adam():
    from llmopt.optim import state_bytes

    a, b = [torch.nn.Parameter(torch.randn(64, 64))], [torch.nn.Parameter(torch.randn(64, 64))]
    adam, nov = torch.optim.Adam(a), NovoGrad(b)
    for p in a + b:
        p.grad = torch.randn(64, 64)
    adam.step()
    nov.step()
    assert state_bytes(nov) / state_bytes(adam) <= 0.55


def _peer_run(ours, peer, steps=5):
    pa, pb = _params(), _params()
    oa, ob = ours(pa), peer(pb)
    for t in range(1, steps + 1):
        for p, q, g in zip(pa, pb, _grads(t)):
            p.grad, q.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_lamb_equals_torch_optimizer_without_bias_correction():
    to = pytest.importorskip("torch_optimizer")
    _peer_run(lambda ps: Lamb(ps, lr=1e-2, weight_decay=0.01, bias_correction=False),
              lambda ps: to.Lamb(ps, lr=1e-2, weight_decay=0.01, debias=False))


def test_novograd_equals_torch_optimizer_and_leaves_grads_alone():
    to = pytest.importorskip("torch_optimizer")
    _peer_run(lambda ps: NovoGrad(ps, lr=1e-2, betas=(0.95, 0.98), weight_decay=0.001),
              lambda ps: to.NovoGrad(ps, lr=1e-2, betas=(0.95, 0.98), weight_decay=0.001))
    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.ones(8)
    NovoGrad([p]).step()
    assert torch.equal(p.grad, torch.ones(8))  # torch-optimizer divides p.grad in place; we do not
