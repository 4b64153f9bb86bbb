"""The contract matrix: every registered technique through the same generic tests (DESIGN.md §8).

Per-technique settings (config, numerics contract, trainable set, skips with reasons) live in
`settings.py`; nothing about a particular technique is written here.
"""

from __future__ import annotations

import copy
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch
from settings import SETTINGS, TEST_KEYS, ContractCase

import llmopt.techniques
from llmopt.core import (
    NoEffectError,
    NotReversibleError,
    apply_,
    call_hooks,
    config_from_dict,
    format_technique_spec,
    lookup,
    parse_technique_spec,
    registered,
    revert_,
)
from llmopt.models import ModelConfig, build_model

llmopt.load_techniques()

TRANSFORMS = sorted(n for n in registered("transform") if n in SETTINGS)
OPTIMIZERS = sorted(n for n in registered("optimizer") if n in SETTINGS)
HOOKS = sorted(n for n in registered("hook") if n in SETTINGS)
OTHERS = sorted(n for n, e in registered().items() if e.kind not in ("transform", "optimizer", "hook") and n in SETTINGS)

B, T = 2, 16


def _case(name: str, test_key: str) -> ContractCase:
    assert test_key in TEST_KEYS, test_key
    case = SETTINGS[name]
    if test_key in case.skip:
        pytest.skip(f"{name}: {case.skip[test_key]}")
    return case


def _model(case: ContractCase, seed: int = 0, device: str | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_name("tiny", **dict(case.model_overrides)), device=device)


def _batch(model: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _outputs(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, mean token loss) on a fixed batch, without gradients."""
    x, y = batch
    with torch.no_grad():
        logits = model(x)
        loss_sum, n = model.loss(x, y)
    return logits, loss_sum / n


def _loss_and_grads(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, y = batch
    model.zero_grad(set_to_none=True)
    loss_sum, n = model.loss(x, y)
    loss = loss_sum / n
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def _module_types(model: torch.nn.Module) -> dict[str, str]:
    return {fqn: type(m).__name__ for fqn, m in model.named_modules()}


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref.double() - out.double()).pow(2).sum()
    return math.inf if noise == 0 else float(10 * torch.log10(ref.double().pow(2).sum() / noise))


def _assert_close(case: ContractCase, ref: torch.Tensor, out: torch.Tensor, what: str) -> None:
    assert ref.shape == out.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if case.numerics == "exact":
        assert torch.equal(ref, out), f"{what}: not exact, max |diff| {(ref - out).abs().max().item():.3g}"
        return
    if case.atol is not None:
        torch.testing.assert_close(out, ref, atol=case.atol, rtol=case.rtol, msg=lambda m: f"{what}: {m} ({case.reason})")
    if case.min_sqnr_db is not None:
        sqnr = _sqnr_db(ref, out)
        assert sqnr >= case.min_sqnr_db, f"{what}: SQNR {sqnr:.1f} dB < {case.min_sqnr_db} dB ({case.reason})"


def _apply(name: str, case: ContractCase, model: torch.nn.Module):
    config = case.config()
    assert lookup(config).name == name, f"settings[{name!r}].config builds a {type(config).__name__} of another technique"
    return apply_(model, config)


# ---- coverage: the matrix knows every registered technique, and nothing else ---------------------------

def test_every_registered_technique_has_settings():
    missing = sorted(set(registered()) - set(SETTINGS))
    assert not missing, (f"registered techniques missing from tests/contract/settings.py: {missing}; add a "
                         "ContractCase block for each (see the top of settings.py and docs/contract_matrix.md)")


def test_every_settings_entry_is_registered():
    unknown = sorted(set(SETTINGS) - set(registered()))
    assert not unknown, (f"tests/contract/settings.py has entries for unregistered techniques: {unknown}; "
                         f"registered: {sorted(registered())}")


def test_settings_are_in_alphabetical_order():
    assert list(SETTINGS) == sorted(SETTINGS), "keep the blocks of settings.py in alphabetical order of name"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_settings_agree_with_registry(name):
    case, entry = SETTINGS[name], lookup(name)
    assert case.config is not None, f"{name}: a transform's ContractCase needs config=lambda: XxxConfig(...)"
    assert case.reversible == entry.reversible, (f"{name}: settings say reversible={case.reversible}, the registry "
                                                 f"says {entry.reversible}")


# ---- model transforms ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TRANSFORMS)
def test_apply_report_matches_module_tree(name):
    case = _case(name, "apply")
    model = _model(case)
    before = _module_types(model)
    report = _apply(name, case, model)
    after = _module_types(model)
    assert report.technique == name and report.config == case.config()
    assert model.applied_techniques == [case.config()]
    assert report.has_effect

    def covered(fqn: str) -> bool:
        return any(c == "" or fqn == c or fqn.startswith(c + ".") for c in report.changed)

    swapped = sorted(f for f in before if f not in after or after[f] != before[f])
    uncovered = [f for f in swapped if not covered(f)]
    assert not uncovered, f"{name}: modules changed but missing from report.changed: {uncovered}"
    for key in report.changed:
        if key in before or key in after:
            continue
        parent, _, attr = key.rpartition(".")  # a non-module change: an attribute of a module
        owner = model.get_submodule(parent) if parent else model
        assert hasattr(owner, attr) or attr in getattr(owner, "__dict__", {}), \
            f"{name}: report.changed names {key!r}, which is neither a module nor an attribute of one"
    for fqn, reason in report.skipped.items():
        assert isinstance(reason, str) and reason, f"{name}: skipped {fqn!r} without a reason"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_forward_backward_finite(name):
    case = _case(name, "forward_backward")
    model = _model(case)
    _apply(name, case, model)
    batch = _batch(model)
    logits, _ = _outputs(model, batch)
    assert torch.isfinite(logits).all()
    loss, grads = _loss_and_grads(model, batch)
    assert torch.isfinite(loss)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(grads) <= trainable
    assert grads, f"{name}: no trainable parameter received a gradient"
    bad = [k for k, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"{name}: non-finite gradients in {bad}"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_numerics_contract(name):
    case = _case(name, "numerics")
    model = _model(case)
    reference = copy.deepcopy(model)
    _apply(name, case, model)
    batch = _batch(model)
    ref_logits, ref_loss = _outputs(reference, batch)
    logits, loss = _outputs(model, batch)
    if case.numerics == "changes_outputs":
        assert not torch.equal(ref_logits, logits), f"{name}: numerics='changes_outputs' but outputs are unchanged"
    _assert_close(case, ref_logits, logits, f"{name} logits")
    _assert_close(case, ref_loss, loss, f"{name} loss")
    if case.numerics == "changes_outputs":
        return  # a changed function has changed gradients
    _, ref_grads = _loss_and_grads(reference, batch)
    _, grads = _loss_and_grads(model, batch)
    shared = sorted(set(ref_grads) & set(grads))
    for key in shared:
        _assert_close(case, ref_grads[key], grads[key], f"{name} grad of {key}")


@pytest.mark.parametrize("name", TRANSFORMS)
def test_meta_device(name):
    case = _case(name, "meta")
    real = _model(case)
    real_report = _apply(name, case, real)
    meta = _model(case, device="meta")
    report = _apply(name, case, meta)
    assert report.changed == real_report.changed and report.skipped == real_report.skipped
    off_meta = [k for k, t in [*meta.named_parameters(), *meta.named_buffers()] if t.device.type != "meta"]
    assert not off_meta, f"{name}: applying on meta materialized {off_meta}"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_state_dict_round_trip(name):
    case = _case(name, "state_dict")
    source = _model(case, seed=0)
    _apply(name, case, source)
    batch = _batch(source)
    _loss_and_grads(source, batch)  # one SGD step, so adapters and other new parameters are not at their init
    with torch.no_grad():
        for p in source.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = _model(case, seed=1)
    _apply(name, case, target)
    target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    for a, b, what in zip(_outputs(source, batch), _outputs(target, batch), ("logits", "loss")):
        assert torch.equal(a, b), f"{name}: {what} differ after a state_dict round trip"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_hooks_state_round_trip(name):
    """The report's hooks, driven a few steps, saved and loaded into fresh hooks, continue identically."""
    case = _case(name, "hooks_state")
    model = _model(case)
    hooks = _apply(name, case, model).hooks
    if not hooks:
        return
    fresh = _apply(name, case, _model(case)).hooks
    _check_hook_resume(hooks, fresh, model)


def _fake_state(model: torch.nn.Module) -> SimpleNamespace:
    from llmopt.recipes import get_recipe

    run = get_recipe("tiny")
    run.train.seq_len, run.train.batch_size, run.train.steps = T, B, 8
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return SimpleNamespace(step=0, model=model, optimizer=optimizer, scaler=None, config=run, metrics={},
                           train_ids=torch.arange(4096) % model.config.vocab_size)


def _drive(hooks, state, steps: int) -> list:
    seen = []
    for _ in range(steps):
        state.metrics = {}
        x, y = _batch(state.model, seed=state.step)
        out = call_hooks(hooks, "before_forward", state, (x, y))
        seen.append([t.clone() for t in out])
        call_hooks(hooks, "after_backward", state)
        call_hooks(hooks, "before_optimizer_step", state)
        call_hooks(hooks, "after_optimizer_step", state)
        state.step += 1
    return seen


def _check_hook_resume(hooks, fresh, model) -> None:
    state = _fake_state(model)
    call_hooks(hooks, "on_fit_start", state)
    _drive(hooks, state, 3)
    saved = [h.state_dict() for h in hooks]
    json.dumps(saved, default=lambda t: t.tolist())  # plain data (tensors allowed) that a checkpoint can hold
    resumed_state = _fake_state(model)
    resumed_state.step = state.step
    call_hooks(fresh, "on_fit_start", resumed_state)
    for h, s in zip(fresh, copy.deepcopy(saved)):
        h.load_state_dict(s)
    assert all(_equal_state(h.state_dict(), s) for h, s in zip(fresh, saved)), "hook state_dict changed by loading it"
    expected = _drive(hooks, state, 3)
    got = _drive(fresh, resumed_state, 3)
    for e, g in zip(expected, got):
        assert all(torch.equal(a, b) for a, b in zip(e, g)), "batches differ after a hook state round trip"


def _equal_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", TRANSFORMS)
def test_double_apply_raises(name):
    case = _case(name, "double_apply")
    model = _model(case)
    _apply(name, case, model)
    with pytest.raises(ValueError, match="already applied"):
        _apply(name, case, model)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_no_match_raises(name):
    case = _case(name, "no_match")
    assert case.no_match_config is not None, (f"{name}: set no_match_config=lambda: ... (a config matching nothing), "
                                              "or skip={'no_match': '<why nothing can fail to match>'}")
    model = _model(case)
    before = _module_types(model)
    with pytest.raises(NoEffectError):
        apply_(model, case.no_match_config())
    assert _module_types(model) == before and model.applied_techniques == []


@pytest.mark.parametrize("name", TRANSFORMS)
def test_revert_restores_outputs(name):
    case = _case(name, "revert")
    model = _model(case)
    batch = _batch(model)
    before_outputs, before_types = _outputs(model, batch), _module_types(model)
    before_keys = set(model.state_dict())
    _apply(name, case, model)
    if not case.reversible:
        with pytest.raises(NotReversibleError):
            revert_(model, name)
        return
    revert_(model, name)
    assert model.applied_techniques == []
    assert _module_types(model) == before_types and set(model.state_dict()) == before_keys
    for a, b, what in zip(before_outputs, _outputs(model, batch), ("logits", "loss")):
        assert torch.equal(a, b), f"{name}: {what} not restored exactly by revert_"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_only_intended_parameters_train(name):
    case = _case(name, "trainable")
    model = _model(case)
    before = {k for k, p in model.named_parameters() if p.requires_grad}
    _apply(name, case, model)
    names = [k for k, _ in model.named_parameters()]
    got = {k for k, p in model.named_parameters() if p.requires_grad}
    if case.trainable == "unchanged":
        expected = before & set(names)
    elif case.trainable == "all":
        expected = set(names)
    elif case.trainable == "none":
        expected = set()
    else:
        expected = {k for k in names if case.trainable(k)}
    assert got == expected, f"{name}: trainable but should not: {sorted(got - expected)}; frozen but should " \
                            f"train: {sorted(expected - got)}"


@pytest.mark.parametrize("name", TRANSFORMS)
def test_config_dict_round_trip(name):
    case = _case(name, "config_dict")
    for factory in (case.config, case.no_match_config):
        if factory is None:
            continue
        config = factory()
        data = json.loads(json.dumps(config.to_dict()))
        assert data["_type"] == name
        assert config_from_dict(data) == config


@pytest.mark.parametrize("name", sorted(n for n in TRANSFORMS + OPTIMIZERS + HOOKS + OTHERS
                                        if lookup(n).config_cls is not None))
def test_spec_round_trip(name):
    case = _case(name, "spec")
    entry = lookup(name)
    for factory in (case.config, case.no_match_config, entry.config_cls):
        if factory is None:
            continue
        config = factory()
        spec = format_technique_spec(config)
        assert parse_technique_spec(spec) == config, f"{name}: {spec!r} does not parse back to {config!r}"


# ---- optimizers ------------------------------------------------------------------------------------

def _build_optimizer(name: str, case: ContractCase, params):
    if case.build is not None:
        return case.build(params)
    entry = lookup(name)
    config = case.config() if case.config is not None else None
    return entry.build(params, config=config) if entry.config_cls is not None else entry.build(params)


def _optimizer_steps(model, optimizer, steps: int, seed: int = 0) -> None:
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _loss_and_grads(model, _batch(model, seed=seed + i))
        optimizer.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_step_runs(name):
    case = _case(name, "optimizer_step")
    model = _model(case)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    optimizer = _build_optimizer(name, case, model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    _optimizer_steps(model, optimizer, 2)
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: two steps moved no parameter"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_round_trip(name):
    case = _case(name, "optimizer_state")
    model = _model(case)
    optimizer = _build_optimizer(name, case, model.parameters())
    _optimizer_steps(model, optimizer, 2)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model(case, seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = _build_optimizer(name, case, resumed.parameters())
    resumed_optimizer.load_state_dict(saved["optimizer"])
    _optimizer_steps(model, optimizer, 2, seed=10)
    _optimizer_steps(resumed, resumed_optimizer, 2, seed=10)
    for (k, a), (_, b) in zip(model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), f"{name}: {k} differs after an optimizer state_dict round trip"


# ---- loop hooks ------------------------------------------------------------------------------------

def _build_hook(name: str, case: ContractCase):
    if case.build is not None:
        return case.build()
    entry = lookup(name)
    return entry.build(config=case.config() if case.config else None) if entry.config_cls else entry.build()


@pytest.mark.parametrize("name", HOOKS)
def test_hook_state_round_trip(name):
    case = _case(name, "hook_state")
    hook, fresh = _build_hook(name, case), _build_hook(name, case)
    _check_hook_resume([hook], [fresh], _model(case))


@pytest.mark.parametrize("name", OTHERS)
def test_other_kinds_are_listed(name):
    """Kinds without generic checks yet (inference, data, kernel, ...): the settings entry documents them."""
    pytest.skip(f"{name}: no generic check for kind {lookup(name).kind!r} yet; its own tests cover it")
