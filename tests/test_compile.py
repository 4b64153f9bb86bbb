"""compile: bucketing (pure), recompile counting with and without buckets, numerics vs eager, revert.

Inductor code generation costs ~5 s (warm cache) to minutes (cold, loaded machine) per process on these
CPUs, so the Inductor numerics tests are `slow`; the non-slow compile tests use backend="aot_eager",
which runs the same Dynamo capture, guards and recompiles without code generation.
"""

import copy

import pytest
import torch

import llmopt.techniques  # noqa: F401  (registers compile)
from llmopt.core import apply_, revert_
from llmopt.techniques.compile import (CompileConfig, CompileHook, bucket_lengths, bucket_pad, compile_events,
                                       compile_payback_steps)

# Inductor fuses and reorders fp32 reductions (RMSNorm, softmax, matmul epilogues): measured ~1e-7 on the
# logits and ~5e-7 on the gradients of the tiny model; held to
ATOL, RTOL = 1e-5, 1e-4


def test_bucket_lengths():
    assert bucket_lengths(128) == (16, 32, 64, 128)
    assert bucket_lengths(100) == (16, 32, 64, 100)
    assert bucket_lengths(256, "multiple", multiple=64) == (64, 128, 192, 256)
    assert bucket_lengths(128, "none") == ()
    with pytest.raises(ValueError, match="bucketing"):
        bucket_lengths(128, "fib")


def test_bucket_pad_leaves_the_loss_unchanged(tiny_model):
    x = torch.randint(1, 320, (2, 21), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 320, (2, 21), generator=torch.Generator().manual_seed(1))
    px, py = bucket_pad((x, y), (16, 32, 64), pad_id=0)
    assert px.shape == py.shape == (2, 32)
    assert torch.equal(px[:, :21], x) and (px[:, 21:] == 0).all() and (py[:, 21:] == -100).all()
    with torch.no_grad():
        loss, n = tiny_model.loss(x, y)
        padded_loss, padded_n = tiny_model.loss(px, py)
    assert int(n) == int(padded_n) == 42
    torch.testing.assert_close(padded_loss, loss, atol=1e-5, rtol=1e-6)  # causal: real tokens never see padding
    assert bucket_pad((x, y), (16,))[0] is x  # longer than every bucket: unchanged
    assert bucket_pad((x[:, :16], y[:, :16]), (16, 32))[0].shape == (2, 16)


def test_compile_payback_steps():
    assert compile_payback_steps(30.0, 1.0, 0.8) == pytest.approx(150.0)
    assert compile_payback_steps(30.0, 1.0, 1.2) == float("inf")


def test_hook_adds_the_run_length_as_a_bucket():
    hook = CompileHook((16, 32, 64, 128))
    config = type("C", (), {"train": type("T", (), {"seq_len": 100})()})()
    hook.on_fit_start(type("S", (), {"config": config})())
    assert hook.buckets == (16, 32, 64, 100)  # a fixed-length run of 100 pads nothing
    x = torch.zeros(1, 40, dtype=torch.long)
    assert hook.before_forward(None, (x, x))[0].shape == (1, 64)


def test_report_and_revert_restore_eager_modules(tiny_model):
    report = apply_(tiny_model, CompileConfig(backend="eager"))
    assert report.changed == {"layers.0": ("Block", "Block (compiled)"), "layers.1": ("Block", "Block (compiled)")}
    assert isinstance(report.hooks[0], CompileHook)
    assert all(b._compiled_call_impl is not None for b in tiny_model.layers)
    assert list(tiny_model.state_dict()) == list(type(tiny_model)(tiny_model.config).state_dict())  # no _orig_mod.
    revert_(tiny_model, "compile")
    assert all(b._compiled_call_impl is None for b in tiny_model.layers)
    report = apply_(tiny_model, CompileConfig(scope="loss", backend="eager"))
    assert report.changed == {"loss_fn": ("linear_cross_entropy", "compiled")}
    revert_(tiny_model, "compile")
    assert tiny_model.loss_fn.__name__ == "linear_cross_entropy"


def _train_on_lengths(model, hook, lengths):
    """One forward/backward per length through the hook, as the loop does; returns (compiles, recompiles)."""
    since = len(__import__("llmopt.techniques.compile", fromlist=["_EVENTS"])._EVENTS)
    g = torch.Generator().manual_seed(0)
    for T in lengths:
        batch = (torch.randint(0, 320, (2, T), generator=g), torch.randint(0, 320, (2, T), generator=g))
        x, y = hook.before_forward(None, batch) or batch
        loss, n = model.loss(x, y)
        (loss / n).backward()
    return compile_events(since)


LENGTHS = [20, 24, 30, 40, 50, 60]  # pow2 buckets: 32 (x3) and 64 (x3)


def test_bucketing_bounds_recompiles_to_the_buckets_used(tiny_model):
    torch._dynamo.reset()
    report = apply_(tiny_model, CompileConfig(backend="aot_eager"))
    compiles, recompiles = _train_on_lengths(tiny_model, report.hooks[0], LENGTHS)
    assert compiles == 2 and recompiles == 1  # one graph per bucket, shared by both blocks


@pytest.mark.slow
def test_without_bucketing_every_length_recompiles(tiny_model):
    torch._dynamo.reset()
    report = apply_(tiny_model, CompileConfig(backend="aot_eager", bucketing="none"))
    compiles, recompiles = _train_on_lengths(tiny_model, report.hooks[0], LENGTHS)
    assert compiles == len(LENGTHS) and recompiles == len(LENGTHS) - 1


@pytest.mark.slow
def test_without_bucketing_automatic_dynamic_shapes_stop_recompiles(tiny_model):
    torch._dynamo.reset()
    report = apply_(tiny_model, CompileConfig(backend="aot_eager", bucketing="none", dynamic=None))
    compiles, _ = _train_on_lengths(tiny_model, report.hooks[0], LENGTHS)
    assert compiles == 2  # static first, then one dynamic-length graph for all the others


def test_hook_puts_compile_metrics_in_state(tiny_model):
    torch._dynamo.reset()
    hook = apply_(tiny_model, CompileConfig(backend="aot_eager")).hooks[0]
    state = type("S", (), {"metrics": {}})()
    x = torch.randint(0, 320, (2, 32))
    for _ in range(3):
        state.metrics = {}
        bx, by = hook.before_forward(state, (x, x)) or (x, x)
        loss, n = tiny_model.loss(bx, by)
        loss.backward()
        hook.after_optimizer_step(state)
    assert state.metrics["compiles"] == 1 and state.metrics["recompiles"] == 0
    assert state.metrics["compile_seconds"] >= 0 and hook.compiling_steps == [True, False, False]


def _compare_with_eager(model, scope, backend):
    reference = copy.deepcopy(model)
    apply_(model, CompileConfig(scope=scope, backend=backend))
    x = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
    for m in (model, reference):
        loss, n = m.loss(x, y)
        (loss / n).backward()
        m.last = (loss.detach(), m(x).detach())
    torch.testing.assert_close(model.last[0], reference.last[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(model.last[1], reference.last[1], atol=ATOL, rtol=RTOL)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=RTOL, msg=lambda m: f"grad of {name}: {m}")


def test_aot_eager_loss_and_gradients_match_eager(tiny_model):
    _compare_with_eager(tiny_model, "blocks", "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "model", "loss"])
def test_inductor_loss_and_gradients_match_eager(tiny_model, scope):
    _compare_with_eager(tiny_model, scope, "inductor")
