"""Buffer reuse: bucketing keeps the loss sum and token count exact, allocator settings reported, RSS logged."""

from types import SimpleNamespace

import torch

from llmopt import apply_
from llmopt.core import call_hooks
from llmopt.models import ModelConfig, build_model
from llmopt.techniques.buffer_reuse import BufferReuseConfig, BufferReuseHook


def test_bucketing_pads_with_ignored_targets_and_keeps_the_loss_exact():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny"))
    report = apply_(model, BufferReuseConfig(bucket_multiple=16))
    (hook,) = report.hooks
    assert isinstance(hook, BufferReuseHook) and hook.buckets[:3] == (16, 32, 48)
    state = SimpleNamespace(step=0, model=model, metrics={})
    x = torch.randint(1, 320, (2, 21))
    px, py = call_hooks(report.hooks, "before_forward", state, (x, x))
    assert px.shape == (2, 32) and (py[:, 21:] == -100).all() and torch.equal(px[:, :21], x)
    with torch.no_grad():
        loss, n = model.loss(x, x)
        padded_loss, padded_n = model.loss(px, py)
    assert n == padded_n
    torch.testing.assert_close(padded_loss, loss, atol=1e-5, rtol=1e-6)  # same terms, summed in another order
    call_hooks(report.hooks, "after_optimizer_step", state)
    assert state.metrics["rss_bytes"] > 0
    assert any("M_ARENA_MAX" in note or "glibc" in note for note in report.notes)


def test_mmap_threshold_is_set_and_reported_and_validated():
    import pytest

    from llmopt.techniques.buffer_reuse import _libc

    model = build_model(ModelConfig.from_name("tiny"))
    report = apply_(model, BufferReuseConfig(mmap_threshold=256 * 1024))
    if _libc() is not None:
        assert any("M_MMAP_THRESHOLD, 262144) set" in note for note in report.notes)
    with pytest.raises(ValueError, match="mmap_threshold"):
        BufferReuseConfig(mmap_threshold=64 * 2**20)
