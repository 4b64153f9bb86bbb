"""Speculative decoding and prompt lookup against the no-cache oracle and the target's exact distribution."""

import pytest
import torch

from llmopt.inference import generate, generate_reference, make_cache
from llmopt.inference.prompt_lookup import PromptLookupProposer
from llmopt.inference.speculative import (AdaptiveK, DraftModelProposer, Proposal, speculative_generate,
                                          verify)
from llmopt.inference.sampling import logits_to_probs
from llmopt.models import ModelConfig, build_model


def _model(seed, **overrides):
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_name("tiny", **overrides)).eval()


def _prompt(batch, length, seed=0, vocab=320):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def draft_model():
    return _model(1, n_layer=1, dim=16, n_head=2, n_kv_head=1)


# ---- greedy: identical to the target's own output ------------------------------------------------
@pytest.mark.parametrize("k,adaptive", [(1, False), (4, False), (6, True)])
def test_draft_greedy_equals_reference(tiny_model, draft_model, k, adaptive):
    prompt = _prompt(2, 9, seed=1)
    ref = generate_reference(tiny_model, prompt, 24)
    got = speculative_generate(tiny_model, prompt, 24, proposer=DraftModelProposer(draft_model), k=k,
                               adaptive=adaptive)
    assert torch.equal(got.tokens, ref.tokens)
    assert got.num_new_tokens == [24, 24] and got.target_forwards == len(got.ks) + 1
    assert sum(got.accept_counts) == len(got.ks) and got.accepted <= got.proposed
    assert got.decode_steps == 23


def test_target_as_its_own_draft_accepts_everything(tiny_model):
    got = speculative_generate(tiny_model, _prompt(1, 5, seed=2), 21, proposer=DraftModelProposer(tiny_model),
                               k=4, adaptive=False)
    assert got.acceptance_rate == 1.0 and got.target_forwards == 1 + 4  # 4 rounds of 5 tokens after the first
    assert torch.equal(got.tokens, generate_reference(tiny_model, _prompt(1, 5, seed=2), 21).tokens)


@pytest.mark.parametrize("k", [2, 10])
def test_prompt_lookup_greedy_equals_reference(tiny_model, k):
    base = _prompt(1, 40, seed=3)
    prompt = torch.cat([base, base[:, :6]], dim=1)  # copy-heavy: the passage repeats
    ref = generate_reference(tiny_model, prompt, 30)
    got = speculative_generate(tiny_model, prompt, 30, proposer=PromptLookupProposer(), k=k, adaptive=False)
    assert torch.equal(got.tokens, ref.tokens)
    assert got.accepted > 0 and got.target_forwards < 30


def test_generate_dispatches_to_speculative(tiny_model, draft_model):
    prompt = _prompt(1, 7, seed=4)
    ref = generate_reference(tiny_model, prompt, 12)
    assert torch.equal(generate(tiny_model, prompt, 12, draft=draft_model).tokens, ref.tokens)
    lookup = generate(tiny_model, prompt, 12, prompt_lookup=True)
    assert torch.equal(lookup.tokens, ref.tokens) and hasattr(lookup, "acceptance_rate")


def test_stop_ids_match_plain_generate(tiny_model, draft_model):
    prompts = _prompt(3, 6, seed=5)
    free = generate(tiny_model, prompts, 16).new_tokens
    stop = [free[0, 4].item(), free[2, 2].item()]
    plain = generate(tiny_model, prompts, 16, stop_ids=stop)
    for proposer in (DraftModelProposer(draft_model), PromptLookupProposer()):
        got = speculative_generate(tiny_model, prompts, 16, proposer=proposer, k=3, adaptive=False, stop_ids=stop)
        assert got.num_new_tokens == plain.num_new_tokens
        assert torch.equal(got.tokens, plain.tokens)


def test_left_padded_batch_equals_one_by_one(tiny_model, draft_model):
    rows = [_prompt(1, n, seed=10 + n)[0].tolist() for n in (3, 9, 6)]
    singles = [generate(tiny_model, [row], 14).new_tokens[0] for row in rows]
    plain = generate(tiny_model, rows, 14)
    assert plain.prompt_padding.sum(-1).tolist() == [6, 0, 3]
    for b in range(3):
        assert torch.equal(plain.new_tokens[b], singles[b])
        assert plain.tokens[b, :9][~plain.prompt_padding[b]].tolist() == rows[b]
    for kwargs in (dict(draft=draft_model), dict(prompt_lookup=True)):
        batched = generate(tiny_model, rows, 14, **kwargs)
        for b in range(3):
            assert torch.equal(batched.new_tokens[b], singles[b]), kwargs


def test_streaming_sees_every_emitted_column(tiny_model, draft_model):
    seen = []
    got = generate(tiny_model, _prompt(2, 5, seed=6), 11, draft=draft_model, stream=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), got.new_tokens)


# ---- sampling: the target's distribution exactly --------------------------------------------------
def test_verify_rule_keeps_each_column_distributed_as_p():
    """Synthetic p, q per column: among rows that reach column j, out[:, j] ~ p_j (total variation)."""
    gen = torch.Generator().manual_seed(0)
    B, k, V = 200_000, 3, 6
    p_logits = torch.randn(k + 1, V, generator=gen) * 1.5
    q_logits = torch.randn(k, V, generator=gen) * 1.5
    q = q_logits.softmax(-1).expand(B, k, V)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).view(B, k)
    sampling = dict(temperature=1.0, top_k=None, top_p=None, generator=gen)
    n, out = verify(p_logits.expand(B, k + 1, V), Proposal(drafts, q.contiguous()), sampling)
    p = p_logits.softmax(-1)
    for j in range(k + 1):
        reached = n >= j
        freq = torch.bincount(out[reached, j], minlength=V).float() / reached.sum()
        assert 0.5 * (freq - p[j]).abs().sum() < 0.01, j
    # acceptance at column 0 is sum_x min(p, q)
    expected = torch.minimum(p[0], q_logits[0].softmax(-1)).sum()
    assert abs((n >= 1).float().mean() - expected) < 0.01


def _exact_two_token_joint(model, prompt, temperature, top_k):
    """P(t1, t2 | prompt) under the target, (V, V)."""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = logits_to_probs(model(prompt)[0, -1], temperature, top_k)  # (V,)
        seqs = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        p2 = logits_to_probs(model(seqs)[:, -1], temperature, top_k)  # (V, V)
    return p1[:, None] * p2


@pytest.mark.parametrize("proposer_kind,top_k", [("draft", None), ("draft", 5), ("lookup", None)])
def test_sampling_keeps_the_target_distribution(proposer_kind, top_k):
    """Many rows at once: the joint of the first two new tokens against the exact target joint."""
    target = _model(2, vocab_size=8, dim=16, n_head=2, n_kv_head=1)
    draft = _model(3, vocab_size=8, dim=16, n_head=2, n_kv_head=1, n_layer=1)
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    exact = _exact_two_token_joint(target, prompt, 1.3, top_k)
    rows = 20_000
    proposer = DraftModelProposer(draft) if proposer_kind == "draft" else PromptLookupProposer()
    # 3 new tokens: the first comes from the prefill, the second through the accept/reject rule (with 2, the
    # round after the prefill has no room for a proposal and the rule is never exercised)
    got = speculative_generate(target, prompt.expand(rows, -1), 3, proposer=proposer, k=2, adaptive=False,
                               temperature=1.3, top_k=top_k, seed=0)
    assert got.proposed > 0
    pairs = got.new_tokens[:, 0] * 8 + got.new_tokens[:, 1]
    freq = torch.bincount(pairs, minlength=64).float().view(8, 8) / rows
    tv = 0.5 * (freq - exact).abs().sum().item()
    # 64 cells, 20k draws: sampling noise alone gives TV about 0.02; a wrong rule (e.g. keeping every
    # draft token) is off by more than 0.1 here
    assert tv < 0.035, tv
    plain = generate(target, prompt.expand(rows, -1), 2, temperature=1.3, top_k=top_k, seed=1)
    pairs = plain.new_tokens[:, 0] * 8 + plain.new_tokens[:, 1]
    tv_plain = 0.5 * (torch.bincount(pairs, minlength=64).float().view(8, 8) / rows - exact).abs().sum().item()
    assert tv < tv_plain + 0.02


@pytest.mark.slow
def test_single_row_sampling_follows_the_target_over_seeds():
    """Batch 1 exercises multi-token acceptance: the first three new tokens over many seeds."""
    target = _model(4, vocab_size=4, dim=16, n_head=2, n_kv_head=1)
    draft = _model(5, vocab_size=4, dim=16, n_head=2, n_kv_head=1, n_layer=1)
    prompt = torch.tensor([[0, 1, 2]])
    with torch.no_grad():
        seqs = torch.cartesian_prod(torch.arange(4), torch.arange(4))  # (16, 2)
        p1 = logits_to_probs(target(prompt)[0, -1])
        p2 = logits_to_probs(target(torch.cat([prompt.expand(4, -1), torch.arange(4)[:, None]], 1))[:, -1])
        p3 = logits_to_probs(target(torch.cat([prompt.expand(16, -1), seqs], 1))[:, -1]).view(4, 4, 4)
    exact = p1[:, None, None] * p2[:, :, None] * p3  # (4, 4, 4)
    counts = torch.zeros(64)
    plain_counts = torch.zeros(64)
    n = 1000
    long_rounds = 0
    for seed in range(n):
        got = speculative_generate(target, prompt, 4, proposer=DraftModelProposer(draft), k=2, adaptive=False,
                                   temperature=1.0, seed=seed)
        t = got.new_tokens[0]
        counts[t[0] * 16 + t[1] * 4 + t[2]] += 1
        long_rounds += got.accept_counts[2]
        t = generate(target, prompt, 3, temperature=1.0, seed=seed).new_tokens[0]
        plain_counts[t[0] * 16 + t[1] * 4 + t[2]] += 1
    tv = 0.5 * (counts / n - exact.flatten()).abs().sum().item()
    tv_plain = 0.5 * (plain_counts / n - exact.flatten()).abs().sum().item()
    assert long_rounds > 0  # some rounds kept both draft tokens
    assert tv < tv_plain + 0.04, (tv, tv_plain)  # noise at 1000 draws over 64 cells is about 0.07


# ---- adaptive k, errors -------------------------------------------------------------------------
def test_adaptive_k_switches_off_a_useless_proposer():
    control = AdaptiveK(8)
    for _ in range(30):
        k = control.next_k()
        control.observe(k, 0, k + 1, 1.0 + 0.05 * k, 0.3 * k)  # never accepted, draft costs 0.3 target
    ks = [control.next_k() for _ in range(16)]
    assert ks.count(0) >= 12 and max(ks) <= 1  # off, with rare 1-token probes
    waits = []  # plain rounds before each rejected probe: a probe every 4th, 8th, 16th round (the cap)
    control = AdaptiveK(8, probe_every=4, max_probe_every=16)
    idle = 0
    for _ in range(200):
        k = control.next_k()
        if k == 1 and control.probing:
            waits.append(idle)
            idle = 0
        elif k == 0:
            idle += 1
        control.observe(k, 0, k + 1, 1.0 + 0.05 * k, 0.3 * k)
    assert waits[:3] == [3, 7, 15] and waits[-3:] == [15, 15, 15]
    good = AdaptiveK(8)
    for _ in range(30):
        k = good.next_k()
        good.observe(k, k, k + 1, 1.0 + 0.02 * k, 0.05 * k)  # always accepted, cheap draft
    assert good.next_k() == 8


def test_errors(tiny_model, draft_model):
    other_vocab = _model(6, vocab_size=64)
    with pytest.raises(ValueError, match="draft vocabulary"):
        generate(tiny_model, [1, 2, 3], 4, draft=other_vocab)
    with pytest.raises(ValueError, match="at least 1"):
        speculative_generate(tiny_model, [1, 2], 4, proposer=PromptLookupProposer(), k=0)
    with pytest.raises(ValueError, match="max_len"):
        speculative_generate(tiny_model, [1, 2], 10, proposer=PromptLookupProposer(),
                             cache=make_cache(tiny_model, 1, max_len=8))
    with pytest.raises(ValueError, match="not both"):
        generate(tiny_model, [1, 2], 3, draft=draft_model, prompt_lookup=True)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupProposer(max_ngram=1, min_ngram=2)
