"""fused_ops: module swaps keep the stock state dict, every fusion matches the stock model, the loss never builds
N x V logits, options select fusions, and it composes with flash_attention."""

import copy

import pytest
import torch

from llmopt import apply_
from llmopt.core import revert_
from llmopt.models import ModelConfig, build_model
from llmopt.techniques import FlashAttentionConfig, FusedOpsConfig


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("tiny", **overrides))


def _batch(vocab=320, B=2, T=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _loss_grads(model, batch):
    model.zero_grad(set_to_none=True)
    s, n = model.loss(*batch)
    (s / n).backward()
    return (s / n).detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_matches_stock_model(backend):
    model = _model()
    ref = copy.deepcopy(model)
    apply_(model, FusedOpsConfig(backend=backend, chunk_size=5))
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), ref(batch[0]), atol=1e-6, rtol=1e-5)
    loss, grads = _loss_grads(model, batch)
    ref_loss, ref_grads = _loss_grads(ref, batch)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-5, msg=k)


def test_state_dict_layout_is_stock():
    model = _model()
    keys = list(model.state_dict())
    apply_(model, FusedOpsConfig(backend="reference"))
    assert list(model.state_dict()) == keys
    build = _model()
    build.load_state_dict(model.state_dict(), strict=True)


def test_options_select_fusions():
    model = _model()
    report = apply_(model, FusedOpsConfig(rms_norm=False, rope=False, residual_norm=False, backend="reference"))
    kinds = {new for _, new in report.changed.values()}
    assert kinds == {"FusedFeedForward", "fused_linear_cross_entropy"}
    assert type(model.norm).__name__ == "RMSNorm"
    with pytest.raises(ValueError, match="at least one"):
        FusedOpsConfig(rms_norm=False, swiglu=False, rope=False, residual_norm=False, cross_entropy=False)


def test_loss_saves_no_tokens_by_vocab_tensor():
    model = _model(vocab_size=2048)
    apply_(model, FusedOpsConfig(backend="compiled", rms_norm=False, swiglu=False, rope=False, residual_norm=False,
                                 chunk_size=4))  # the chunked CPU loss ("reference" is the full-logits one)
    x, y = _batch(2048, T=64)  # N = 128 tokens: N x V is larger than the (V, dim) weight gradient
    N, V = y.numel(), 2048
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        s, n = model.loss(x, y)
    (s / n).backward()
    assert max(sizes) < N * V


def test_composes_with_flash_attention_and_reverts_in_order():
    model = _model()
    ref = copy.deepcopy(model)
    apply_(model, FusedOpsConfig(backend="reference"), FlashAttentionConfig(backend="tiled", block_q=4, block_k=4))
    assert type(model.layers[0].self_attn).__name__ == "FlashRoPEFusedAttention"
    batch = _batch()
    loss, _ = _loss_grads(model, batch)
    torch.testing.assert_close(loss, _loss_grads(ref, batch)[0], atol=1e-6, rtol=1e-5)
    revert_(model, "flash_attention")
    revert_(model, "fused_ops")
    with torch.no_grad():
        assert torch.equal(model(batch[0]), ref(batch[0]))
    assert model.loss_fn is ref.loss_fn or model.loss_fn.__name__ == "linear_cross_entropy"


def test_cached_generation_unchanged():
    from llmopt.inference import generate, generate_reference

    model = _model()
    apply_(model, FusedOpsConfig(backend="reference"))
    prompt = torch.tensor([[1, 2, 3, 4]])
    fast = generate(model, prompt, max_new_tokens=6, temperature=0)
    slow = generate_reference(model, prompt, max_new_tokens=6, temperature=0)
    assert torch.equal(fast.tokens, slow.tokens)
