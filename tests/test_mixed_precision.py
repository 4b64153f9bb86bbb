"""Mixed precision: bf16/fp16 autocast inside the model, loss scaling hook, bf16 weights with fp32 masters, auto."""

import copy
from types import SimpleNamespace

import pytest
import torch

from llmopt import apply_
from llmopt.core import call_hooks, revert_
from llmopt.models import ModelConfig, build_model
from llmopt.techniques.mixed_precision import DynamicLossScaleHook, MasterWeightsHook, MixedPrecisionConfig


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("tiny"))


def _batch(seed=0):
    x = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(seed))
    return x[:, :-1], x[:, 1:]


def _state(model, optimizer, precision="fp32"):
    return SimpleNamespace(step=0, model=model, optimizer=optimizer, scaler=None, metrics={},
                           config=SimpleNamespace(train=SimpleNamespace(precision=precision)))


def _sqnr(ref, out):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_bf16_autocast_inside_the_model_and_exact_revert():
    model = _model()
    reference = copy.deepcopy(model)
    report = apply_(model, MixedPrecisionConfig(precision="bf16"))
    x, y = _batch()
    logits = model(x)
    assert logits.dtype == torch.bfloat16 and model.llmopt_precision == "bf16"
    assert 20 < _sqnr(reference(x).detach(), logits.float().detach()) < 80
    loss_sum, n = model.loss(x, y)
    assert loss_sum.dtype == torch.float32  # cross-entropy in fp32
    assert set(report.changed) == {"forward", "loss"}
    revert_(model, "mixed_precision")
    assert torch.equal(model(x), reference(x))


def test_fp16_loss_scaling_unscales_and_skips_overflow():
    model = _model()
    reference = copy.deepcopy(model)
    report = apply_(model, MixedPrecisionConfig(precision="fp16", init_scale=1024.0, growth_interval=2))
    (hook,) = report.hooks
    assert isinstance(hook, DynamicLossScaleHook)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = _state(model, optimizer)
    call_hooks(report.hooks, "on_fit_start", state)
    x, y = _batch()
    loss_sum, n = model.loss(x, y)
    (loss_sum / n).backward()
    call_hooks(report.hooks, "after_backward", state)
    ref_sum, ref_n = reference.loss(x, y)
    (ref_sum / ref_n).backward()
    g, ref_g = model.layers[0].mlp.up_proj.weight.grad, reference.layers[0].mlp.up_proj.weight.grad
    assert _sqnr(ref_g, g) > 20  # unscaled: the true gradient, to fp16 rounding
    # an overflow: grads dropped (step skipped), scale halved
    model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("inf")
    call_hooks(report.hooks, "after_backward", state)
    assert all(p.grad is None for p in model.parameters()) and hook.scale == 512.0 and hook.skipped == 1
    with pytest.raises(ValueError, match="train.precision"):
        call_hooks(report.hooks, "on_fit_start", _state(model, optimizer, precision="fp16"))


def test_bf16_weights_with_fp32_masters_train():
    model = _model()
    report = apply_(model, MixedPrecisionConfig(precision="bf16_weights"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    (hook,) = report.hooks
    assert isinstance(hook, MasterWeightsHook)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = _state(model, optimizer)
    call_hooks(report.hooks, "on_fit_start", state)
    assert all(p.dtype == torch.float32 for g in optimizer.param_groups for p in g["params"])
    losses = []
    for step in range(6):
        x, y = _batch(0)
        loss_sum, n = model.loss(x, y)
        (loss_sum / n).backward()
        losses.append(float(loss_sum.detach() / n))
        call_hooks(report.hooks, "before_optimizer_step", state)
        optimizer.step()
        call_hooks(report.hooks, "after_optimizer_step", state)
    assert losses[-1] < losses[0]
    for p, master in hook.pairs:
        assert torch.equal(p, master.to(torch.bfloat16))
    saved = hook.state_dict()
    assert all(m.dtype == torch.float32 for m in saved["masters"])


def test_auto_measures_and_reports_its_choice():
    model = _model()
    report = apply_(model, MixedPrecisionConfig(precision="auto", auto_steps=1, auto_seq_len=16))
    assert model.llmopt_precision in ("fp32", "bf16")
    assert "chose" in report.notes[0]
    if model.llmopt_precision == "fp32":
        x, _ = _batch()
        assert model(x).dtype == torch.float32


def test_auto_keeping_fp32_leaves_the_model_untouched(monkeypatch):
    import llmopt.techniques.mixed_precision as mp

    model = _model()
    x, _ = _batch()
    before = model(x)
    monkeypatch.setattr(mp, "host_bf16_ratio", lambda model, **_: 16.0)  # a host without fast bf16 matmuls
    report = apply_(model, MixedPrecisionConfig(precision="auto", auto_steps=1, auto_seq_len=16))
    assert model.llmopt_precision == "fp32" and "without probing" in report.notes[0]
    assert "forward" not in model.__dict__ and "loss" not in model.__dict__  # nothing wrapped: the fp32 model itself
    assert torch.equal(model(x), before)


def test_host_bf16_ratio_is_a_positive_ratio():
    from llmopt.techniques.mixed_precision import host_bf16_ratio

    assert host_bf16_ratio(_model(), tokens=32, repeats=1) > 0
