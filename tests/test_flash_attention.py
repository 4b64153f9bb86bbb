"""flash_attention: the swapped model matches SDPA (causal), materialized masks (window, documents), trains on CPU
through the tiled kernel, keeps KV-cache decoding, and reverts."""

import copy

import pytest
import torch

from llmopt import apply_
from llmopt.core import revert_
from llmopt.kernels import attention_reference
from llmopt.models import ModelConfig, build_model
from llmopt.techniques import FlashAttentionConfig
from llmopt.techniques.flash_attention import document_ids


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig.from_name("tiny"))


def _batch(B=2, T=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 320, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("backend", ["auto", "sdpa", "tiled"])
def test_causal_matches_stock(backend):
    model, batch = _model(), _batch()
    ref = copy.deepcopy(model)
    apply_(model, FlashAttentionConfig(backend=backend, block_q=4, block_k=4))
    for m in (model, ref):
        m.zero_grad()
        s, n = m.loss(*batch)
        (s / n).backward()
    with torch.no_grad():
        torch.testing.assert_close(model(batch[0]), ref(batch[0]), atol=1e-6, rtol=1e-5)
    for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=k)


def _reference_attend(mask_fn):
    """Patch each stock Attention.attend with materialized-mask attention (the oracle model)."""
    def attend(self, q, k, v, *, mask, is_causal):
        return attention_reference(q, k, v, causal=True, **mask_fn())
    return attend


@pytest.mark.parametrize("kind", ["window", "documents"])
def test_masks_match_materialized_reference(kind, monkeypatch):
    model, (x, y) = _model(), _batch()
    x[0, 5] = x[1, 9] = x[1, 12] = 0  # separators: token 0 ends a document
    oracle = copy.deepcopy(model)
    config = FlashAttentionConfig(window=5, block_q=4, block_k=4) if kind == "window" else \
        FlashAttentionConfig(document_token=0, block_q=4, block_k=8)
    apply_(model, config)
    extra = (lambda: {"window": 5}) if kind == "window" else (lambda: {"doc_ids": document_ids(x, 0)})
    for layer in oracle.layers:
        monkeypatch.setattr(layer.self_attn, "attend", _reference_attend(extra).__get__(layer.self_attn))
    for m in (model, oracle):
        m.zero_grad()
        s, n = m.loss(x, y)
        (s / n).backward()
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(model(x), _model()(x), atol=1e-4)  # the mask really changed the function
    for (k, p), (_, q) in zip(model.named_parameters(), oracle.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=k)


def test_document_ids():
    idx = torch.tensor([[5, 0, 7, 7, 0, 0, 3]])
    assert document_ids(idx, 0).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


def test_kv_cache_decoding_unchanged_and_revert():
    from llmopt.inference import generate, generate_reference

    model = _model()
    before = copy.deepcopy(model)
    apply_(model, FlashAttentionConfig(backend="tiled", block_q=4, block_k=4))
    prompt = torch.tensor([[1, 2, 3, 4]])
    fast = generate(model, prompt, max_new_tokens=6, temperature=0)
    slow = generate_reference(model, prompt, max_new_tokens=6, temperature=0)
    assert torch.equal(fast.tokens, slow.tokens)
    revert_(model, "flash_attention")
    x = _batch()[0]
    with torch.no_grad():
        assert torch.equal(model(x), before(x))


def test_document_hook_removed_on_revert():
    model = _model()
    apply_(model, FlashAttentionConfig(document_token=0))
    assert model.embed_tokens._forward_pre_hooks
    revert_(model, "flash_attention")
    assert not model.embed_tokens._forward_pre_hooks


def test_config_validation():
    with pytest.raises(ValueError, match="window"):
        FlashAttentionConfig(window=0)
    with pytest.raises(ValueError, match="sdpa"):
        FlashAttentionConfig(backend="sdpa", window=8)
