"""KV cache, sampling and generation against the no-cache oracle (DESIGN.md §6, §8)."""

import pytest
import torch

from llmopt.inference import (KVCache, decode_one_token, generate, generate_reference, logits_to_probs,
                              make_cache, prefill, sample)


def _prompt(batch, length, seed=0, vocab=256):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- cached decode == uncached -------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len,new", [(1, 12), (9, 16), (120, 8)])  # 120 + 8 = tiny's max_seq_len
def test_cached_greedy_equals_reference(tiny_model, prompt_len, new):
    prompt = _prompt(1, prompt_len)
    fast = generate(tiny_model, prompt, new)
    slow = generate_reference(tiny_model, prompt, new)
    assert fast.tokens.shape == (1, prompt_len + new)
    assert torch.equal(fast.tokens, slow.tokens)
    assert fast.num_new_tokens == [new] and fast.decode_steps == new - 1


def test_list_prompt_is_batch_of_one(tiny_model):
    result = generate(tiny_model, [3, 1, 4, 1, 5], 6)
    assert result.tokens.shape == (1, 11) and result.tokens[0, :5].tolist() == [3, 1, 4, 1, 5]
    assert result.new_tokens.shape == (1, 6)


@pytest.mark.parametrize("static", [False, True])
def test_prefill_and_decode_logits_equal_full_forward(tiny_model, static):
    seq = _prompt(2, 24, seed=1)
    with torch.no_grad():
        full = tiny_model(seq)  # (2, 24, V)
        cache = make_cache(tiny_model, 2, max_len=32, static=static)
        logits = prefill(tiny_model, seq[:, :10], cache)
        torch.testing.assert_close(logits, full[:, 9], atol=1e-5, rtol=0)
        # a chunk of 5 at a nonzero start takes the explicit-mask path
        chunk = tiny_model(seq[:, 10:15], input_pos=torch.arange(10, 15), cache=cache)
        torch.testing.assert_close(chunk, full[:, 10:15], atol=1e-5, rtol=0)
        for pos in range(15, 24):
            _, logits = decode_one_token(tiny_model, seq[:, pos:pos + 1], torch.tensor([pos]), cache)
            torch.testing.assert_close(logits, full[:, pos], atol=1e-5, rtol=0)


def test_mask_kinds():
    cache = KVCache(1, 1, 1, 16, 4)
    assert cache.attn_mask(torch.arange(6)) == "causal" and cache.seq_len == 6
    assert cache.attn_mask(torch.tensor([6])) is None and cache.seq_len == 7
    mask = cache.attn_mask(torch.arange(7, 10))
    assert mask.dtype == torch.bool and mask.shape == (3, 10)
    assert mask.sum(-1).tolist() == [8, 9, 10]  # query at position p sees keys 0..p
    static = KVCache(1, 1, 1, 16, 4, static=True)
    mask = static.attn_mask(torch.tensor([3]))
    assert mask.shape == (1, 16) and mask.sum().item() == 4  # unwritten slots hidden


def test_batch_of_three_equals_one_by_one(tiny_model):
    prompts = _prompt(3, 7, seed=2)
    batched = generate(tiny_model, prompts, 10)
    for row in range(3):
        single = generate(tiny_model, prompts[row:row + 1], 10)
        assert torch.equal(batched.tokens[row], single.tokens[0])


def test_reused_cache_gives_the_same_tokens(tiny_model):
    cache = make_cache(tiny_model, 1, max_len=40)
    prompt = _prompt(1, 5, seed=3)
    first = generate(tiny_model, prompt, 20, cache=cache)
    second = generate(tiny_model, prompt, 20, cache=cache)
    assert torch.equal(first.tokens, second.tokens)


# ---- sampling ------------------------------------------------------------------------------------
def test_sampling_is_reproducible_and_matches_reference(tiny_model):
    prompt = _prompt(2, 4, seed=4)
    kwargs = dict(temperature=0.9, top_k=40, top_p=0.95, seed=123)
    a = generate(tiny_model, prompt, 16, **kwargs)
    b = generate(tiny_model, prompt, 16, **kwargs)
    ref = generate_reference(tiny_model, prompt, 16, **kwargs)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens, ref.tokens)
    other = generate(tiny_model, prompt, 16, **{**kwargs, "seed": 124})
    assert not torch.equal(a.tokens, other.tokens)


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    probs = logits_to_probs(logits, top_k=5)
    assert ((probs > 0).sum(-1) == 5).all()
    top = logits.topk(5, dim=-1).indices
    torch.testing.assert_close(probs.gather(-1, top).sum(-1), torch.ones(3))
    draws = sample(logits.expand(2000, 3, 100).reshape(-1, 100).contiguous(), top_k=5,
                   generator=torch.Generator().manual_seed(1)).view(2000, 3)
    assert all(set(draws[:, r].tolist()) <= set(top[r].tolist()) for r in range(3))


def test_top_p_keeps_the_smallest_set_covering_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert (logits_to_probs(logits, top_p=0.7) > 0).tolist() == [True, True, False, False]
    assert (logits_to_probs(logits, top_p=0.9) > 0).tolist() == [True, True, True, False]
    assert (logits_to_probs(logits, top_p=0.1) > 0).tolist() == [True, False, False, False]  # the top token stays
    torch.testing.assert_close(logits_to_probs(logits, top_p=0.7), torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    draws = sample(probs.log().expand(n, 4).contiguous(), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / n
    # 4 standard errors of a binomial proportion
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt()).all()
    # temperature 0.5 squares the odds: p^2 renormalized
    draws = sample(probs.log().expand(n, 4).contiguous(), temperature=0.5, generator=torch.Generator().manual_seed(1))
    expected = probs ** 2 / (probs ** 2).sum()
    freq = torch.bincount(draws, minlength=4).float() / n
    assert ((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-3).all()


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_values_raise(kwargs):
    with pytest.raises(ValueError):
        logits_to_probs(torch.zeros(1, 8), **{"temperature": 1.0, **kwargs})


# ---- cache bookkeeping ---------------------------------------------------------------------------
@pytest.mark.parametrize("static", [False, True])
def test_truncate_then_redecode_equals_fresh_decode(tiny_model, static):
    prompt = _prompt(1, 8, seed=5)
    with torch.no_grad():
        cache = make_cache(tiny_model, 1, max_len=32, static=static)
        prefill(tiny_model, prompt, cache)
        for pos, tok in zip(range(8, 13), [11, 22, 33, 44, 55]):  # 5 tokens that get rolled back
            decode_one_token(tiny_model, torch.tensor([[tok]]), torch.tensor([pos]), cache)
        cache.truncate(10)  # keep 11 and 22
        fresh = make_cache(tiny_model, 1, max_len=32, static=static)
        prefill(tiny_model, torch.cat([prompt, torch.tensor([[11, 22]])], dim=1), fresh)
        for pos, tok in zip(range(10, 14), [7, 8, 9, 10]):
            _, got = decode_one_token(tiny_model, torch.tensor([[tok]]), torch.tensor([pos]), cache)
            _, want = decode_one_token(tiny_model, torch.tensor([[tok]]), torch.tensor([pos]), fresh)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_cache_bytes_formula(tiny_model):
    c = tiny_model.config  # 2 layers, 2 kv heads, head_dim 8
    cache = make_cache(tiny_model, 3, max_len=50)
    assert cache.bytes_per_token == 2 * c.n_layer * c.n_kv_head * c.head_dim * 4
    assert cache.nbytes == cache.bytes_per_token * 3 * 50
    assert make_cache(tiny_model, 3, max_len=50, dtype=torch.bfloat16).nbytes == cache.nbytes // 2
    assert make_cache(tiny_model, 1).max_len == c.max_seq_len


def test_max_len_errors(tiny_model):
    with pytest.raises(ValueError, match=r"prompt \+ new tokens = 20 exceeds the cache's max_len=15; pass a larger"):
        generate(tiny_model, _prompt(1, 10), 10, max_len=15)
    with pytest.raises(ValueError, match="= 129 exceeds the model's max_seq_len=128"):
        generate(tiny_model, _prompt(1, 120), 9)
    with pytest.raises(ValueError, match="max_len=8"):
        generate(tiny_model, _prompt(1, 6), 4, cache=make_cache(tiny_model, 1, max_len=8))
    cache = KVCache(1, 1, 1, 8, 4)
    with pytest.raises(ValueError, match="= 9 exceeds the cache's max_len=8"):
        cache.attn_mask(torch.arange(9))
    with pytest.raises(ValueError, match="max_seq_len"):
        make_cache(tiny_model, 1, max_len=1000)


def test_input_errors(tiny_model):
    with pytest.raises(ValueError, match="different lengths"):  # the oracle has no padding; generate pads left
        generate_reference(tiny_model, [[1, 2, 3], [4, 5]], 3)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(tiny_model, [[1, 2, 3], []], 3)
    with pytest.raises(ValueError, match="T >= 1"):
        generate(tiny_model, [], 3)
    with pytest.raises(ValueError, match="static cache"):
        generate(tiny_model, [1, 2], 3, cache=make_cache(tiny_model, 1), compile=True)
    with pytest.raises(ValueError, match="batch_size=2"):
        generate(tiny_model, [1, 2], 3, cache=make_cache(tiny_model, 2))
    cache = make_cache(tiny_model, 1, max_len=16)
    with pytest.raises(ValueError, match="positions start at 4"):
        with torch.no_grad():
            tiny_model(torch.tensor([[1]]), input_pos=torch.tensor([4]), cache=cache)


def test_left_padding_matches_unpadded_rows(tiny_model):
    short, long = _prompt(1, 5, seed=6), _prompt(1, 8, seed=7)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])  # (2, 8), row 0 left-padded
    with torch.no_grad():
        cache = make_cache(tiny_model, 2, max_len=16)
        cache.set_key_padding(torch.tensor([[True] * 3 + [False] * 5, [False] * 8]))
        logits = prefill(tiny_model, batch, cache)
        torch.testing.assert_close(logits[0], tiny_model(short)[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], tiny_model(long)[0, -1], atol=1e-5, rtol=0)
        nxt = torch.tensor([[17], [42]])
        _, logits = decode_one_token(tiny_model, nxt, torch.tensor([8]), cache)
        torch.testing.assert_close(logits[0], tiny_model(torch.cat([short, nxt[:1]], 1))[0, -1], atol=1e-5, rtol=0)
        assert torch.isfinite(logits).all()


# ---- stopping and streaming ----------------------------------------------------------------------
def test_stop_ids_end_each_row(tiny_model):
    prompts = _prompt(3, 4, seed=8)
    free = generate(tiny_model, prompts, 12).new_tokens  # (3, 12)
    stop = free[0, 3].item()  # row 0 stops at step 3 (or earlier if the id came before)
    stopped = generate(tiny_model, prompts, 12, stop_ids=[stop])
    ref = generate_reference(tiny_model, prompts, 12, stop_ids=[stop])
    assert torch.equal(stopped.tokens, ref.tokens) and stopped.num_new_tokens == ref.num_new_tokens
    for row in range(3):
        hits = (free[row] == stop).nonzero()
        count = hits[0].item() + 1 if len(hits) else 12
        assert stopped.num_new_tokens[row] == count
        got = stopped.new_tokens[row]
        assert torch.equal(got[:count], free[row, :count])
        assert (got[count:] == stop).all()  # a finished row repeats its stop token


def test_generation_ends_when_all_rows_stopped(tiny_model):
    prompts = _prompt(2, 4, seed=9)
    free = generate(tiny_model, prompts, 12).new_tokens
    stops = [free[0, 1].item(), free[1, 2].item()]
    result = generate(tiny_model, prompts, 12, stop_ids=stops)
    longest = max(result.num_new_tokens)
    assert longest <= 3 and result.new_tokens.shape == (2, longest)
    assert result.decode_steps == longest - 1


def test_stream_sees_every_step(tiny_model):
    seen = []
    result = generate(tiny_model, _prompt(2, 3), 7, stream=lambda tok: seen.append(tok.clone()))
    assert torch.equal(torch.stack(seen, dim=1), result.new_tokens)
    assert result.prefill_seconds > 0 and result.decode_tokens_per_second > 0


@pytest.mark.slow
def test_compiled_decode_gives_the_same_greedy_tokens(tiny_model):
    prompt = _prompt(2, 6, seed=10)
    compiled = generate(tiny_model, prompt, 12, compile=True)
    eager = generate_reference(tiny_model, prompt, 12)
    assert torch.equal(compiled.tokens, eager.tokens)
    again = generate(tiny_model, _prompt(2, 6, seed=11), 12, compile=True)  # same shapes: no recompile
    assert torch.equal(again.tokens, generate_reference(tiny_model, _prompt(2, 6, seed=11), 12).tokens)


def test_last_logits_equals_full_forward_and_respects_hooks(tiny_model):
    from llmopt.inference.generate import last_logits

    tiny_model.eval()
    idx = torch.randint(0, tiny_model.config.vocab_size, (2, 9))
    pos = torch.arange(9)
    with torch.no_grad():
        full = tiny_model(idx)[:, -1]
        fast = last_logits(tiny_model, idx, pos, make_cache(tiny_model, 2, 16))
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
        handle = tiny_model.register_forward_hook(lambda m, a, out: out * 2)  # a hook: the full forward runs
        try:
            hooked = last_logits(tiny_model, idx, pos, make_cache(tiny_model, 2, 16))
        finally:
            handle.remove()
    torch.testing.assert_close(hooked, 2 * full, atol=1e-5, rtol=1e-5)
