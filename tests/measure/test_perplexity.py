import math

import pytest
import torch
import torch.nn.functional as F

from llmopt.measure import perplexity, sliding_windows


def _tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g)


def test_window_covering_the_text_equals_one_full_forward(tiny_model):
    ids = _tokens(40)
    with torch.no_grad():
        logits = tiny_model(ids[None])[0]  # (T, V)
        nll = F.cross_entropy(logits[:-1], ids[1:], reduction="mean").item()
    for window in (40, 64):
        out = perplexity(tiny_model, ids, window=window, stride=window)
        assert out["tokens"] == 39 and out["windows"] == 1
        assert out["nll"] == pytest.approx(nll, rel=1e-6)
        assert out["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
        assert (out["window"], out["stride"]) == (window, window)


def test_strided_windows_score_each_token_once(tiny_model):
    ids = _tokens(10)
    # window 4, stride 2: [0,4) scores 1..3; [2,6) scores 4,5; [4,8) scores 6,7; [6,10) scores 8,9
    assert sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    total = 0.0
    with torch.no_grad():
        for begin, first in ((0, 1), (2, 4), (4, 6), (6, 8)):
            logprobs = F.log_softmax(tiny_model(ids[None, begin:begin + 4])[0], dim=-1)  # (4, V)
            for pos in range(first, begin + 4):
                total -= logprobs[pos - begin - 1, ids[pos]].item()
    expected = total / 9
    for batch_size in (1, 3):
        out = perplexity(tiny_model, ids, window=4, stride=2, batch_size=batch_size)
        assert out["tokens"] == 9 and out["windows"] == 4
        assert out["nll"] == pytest.approx(expected, rel=1e-6)


def test_last_window_may_be_shorter_and_batches_still_agree(tiny_model):
    ids = _tokens(23)
    one = perplexity(tiny_model, ids, window=8, stride=5)
    many = perplexity(tiny_model, ids, window=8, stride=5, batch_size=4)
    assert one["tokens"] == many["tokens"] == 22
    assert one["nll"] == pytest.approx(many["nll"], rel=1e-6)


def test_callable_and_adapter(tiny_model):
    ids = _tokens(12)
    direct = perplexity(tiny_model, ids, window=6, stride=3)

    class Output:  # what a transformers model returns: an object with .logits
        def __init__(self, logits):
            self.logits = logits

    hf_like = lambda idx: Output(tiny_model(idx))  # noqa: E731
    adapted = perplexity(None, ids, window=6, stride=3, logits_fn=lambda idx: hf_like(idx).logits)
    assert adapted["nll"] == direct["nll"]
    with pytest.raises(TypeError, match="logits_fn"):
        perplexity(hf_like, ids, window=6, stride=3)


def test_stride_equal_to_window_cannot_score_the_first_token_of_each_window(tiny_model):
    out = perplexity(tiny_model, _tokens(8), window=4, stride=4)
    assert sliding_windows(8, 4, 4) == [(0, 4, 1), (4, 8, 5)]
    assert out["tokens"] == 6  # tokens 0 and 4 have no context inside their window


def test_model_mode_is_restored_and_bad_arguments_raise(tiny_model):
    tiny_model.train()
    perplexity(tiny_model, _tokens(8), window=4, stride=2)
    assert tiny_model.training
    with pytest.raises(ValueError, match="stride"):
        perplexity(tiny_model, _tokens(8), window=4, stride=5)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(tiny_model, _tokens(8)[None], window=4, stride=4)
