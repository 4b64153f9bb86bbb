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


def test_loss_chunks_reuse_one_logits_buffer_and_match_the_reference():
    from llmopt import revert_
    from llmopt.models.loss import linear_cross_entropy

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny"))
    x = torch.randint(1, 320, (2, 21))
    ref_loss, _ = model.loss(x, x)
    ref_loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    report = apply_(model, BufferReuseConfig(loss_chunk_rows=8))
    workspace = model.loss_fn.keywords["workspace"]
    pointers = set()
    for length in (21, 13, 21):  # lengths vary; the buffer does not
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(x[:, :length], x[:, :length])
        loss.backward()
        pointers.add(workspace.buffer.data_ptr())
    assert len(pointers) == 1 and workspace.buffer.shape == (8, 320) and workspace.nbytes == 8 * 320 * 4
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[k], rtol=1e-5, atol=1e-6)
    revert_(model, "buffer_reuse")
    assert model.loss_fn is linear_cross_entropy and report.changed


def test_loss_chunks_leave_a_fused_ops_loss_alone():
    from llmopt.techniques.fused_ops import FusedOpsConfig

    model = build_model(ModelConfig.from_name("tiny"))
    apply_(model, FusedOpsConfig(backend="reference"))
    fused = model.loss_fn
    report = apply_(model, BufferReuseConfig())
    assert model.loss_fn is fused and "loss_fn" in report.skipped


def test_trim_before_backward_wraps_the_loss_exactly_and_reverts():
    import torch

    import llmopt
    from llmopt.core import apply_, parse_technique_spec, revert_
    from llmopt.models import ModelConfig, build_model
    from llmopt.models.loss import linear_cross_entropy

    llmopt.load_techniques()
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny"))
    x = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    reference = model.loss(x[:, :-1], x[:, 1:])[0]
    report = apply_(model, parse_technique_spec("buffer_reuse:trim_before_backward=True,loss_chunks=False,"
                                                "mmap_threshold=none"))
    assert "malloc_trim" in report.changed["loss_fn"][1]
    loss_sum, n = model.loss(x[:, :-1], x[:, 1:])
    (loss_sum / n).backward()
    assert torch.equal(loss_sum, reference)
    revert_(model, "buffer_reuse")
    assert model.loss_fn is linear_cross_entropy

