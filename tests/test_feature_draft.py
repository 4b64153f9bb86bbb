"""The EAGLE feature draft: exact greedy output, the target's distribution when sampling, the training-time
unroll against what decoding feeds, files and errors, and a short training that makes it agree."""

import pytest
import torch

from llmopt.inference import generate, generate_reference
from llmopt.inference.cache import make_cache
from llmopt.inference.speculative import DraftWithLookupProposer, FeatureDraftProposer, speculative_generate
from llmopt.models import ModelConfig, build_model
from llmopt.models.feature_draft import FeatureDraft, is_feature_draft_dir
from llmopt.recipes.feature_draft import draft_losses, kept_vocabulary, unrolled_forward


def _model(seed, **overrides):
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_name("tiny", **overrides)).eval()


def _head(target, seed=7, vocab_ids=None, n_layer=1, prev_token=False):
    torch.manual_seed(seed)
    ids = torch.arange(target.config.vocab_size) if vocab_ids is None else vocab_ids
    return FeatureDraft(target.config, ids, n_layer=n_layer, prev_token=prev_token).attach(target).eval()


def _prompt(batch, length, seed=0, vocab=320):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k,adaptive,n_layer,confidence,prev", [(1, False, 1, None, False), (4, False, 1, None, False),
                                                                 (5, True, 2, None, False), (4, False, 1, 0.004, False),
                                                                 (1, False, 1, None, True), (4, False, 2, None, True),
                                                                 (4, False, 1, None, 2), (5, True, 2, None, 2)])
def test_greedy_equals_reference(tiny_model, k, adaptive, n_layer, confidence, prev):
    head = _head(tiny_model, vocab_ids=torch.arange(0, 320, 2), n_layer=n_layer, prev_token=prev)  # half the ids
    prompt = _prompt(2, 9, seed=1)
    ref = generate_reference(tiny_model, prompt, 24)
    got = speculative_generate(tiny_model, prompt, 24, proposer=FeatureDraftProposer(head, min_confidence=confidence),
                               k=k, adaptive=adaptive)
    assert torch.equal(got.tokens, ref.tokens)
    assert got.num_new_tokens == [24, 24] and got.target_forwards == len(got.ks) + 1
    if confidence is not None:  # some rounds stop early, some propose nothing
        assert 0 in got.ks and any(0 < k_ < k for k_ in got.ks), got.ks


@pytest.mark.parametrize("stop_below", [0.0, 0.004, 0.5])
def test_confidence_sized_chains(tiny_model, stop_below):
    """stop_below: the loop asks the head for k_max tokens whenever adaptive k would draft, the head stops where
    its chain probability falls below the bar, and greedy output stays the target's."""
    head = _head(tiny_model, vocab_ids=torch.arange(0, 320, 2))
    proposer = FeatureDraftProposer(head, stop_below=stop_below)
    asked = []
    propose = proposer.propose
    proposer.propose = lambda seq, k, sampling: asked.append(k) or propose(seq, k, sampling)
    prompt = _prompt(2, 9, seed=1)
    ref = generate_reference(tiny_model, prompt, 24)
    got = speculative_generate(tiny_model, prompt, 24, proposer=proposer, k=5, adaptive=True)
    assert torch.equal(got.tokens, ref.tokens)
    assert asked and sum(k == 5 for k in asked) >= len(asked) - 1  # k_max except maybe at the end (room left)
    if stop_below == 0.0:  # never stops on confidence: every asked chain is drafted whole
        assert [k for k in got.ks if k > 0] == [k for k in asked if k > 0]
    elif stop_below == 0.004:  # an untrained head over 160 ids (p ~ 1/100): one token passes the bar, two do not
        assert any(0 < k < 5 for k in got.ks), got.ks
    else:  # never trusts itself: each empty chain counts as a rejected token, so adaptive k stops asking
        assert max(got.ks) == 0 and len(asked) < len(got.ks) / 2, (asked, got.ks)


def test_generate_dispatch_and_left_padding(tiny_model):
    head = _head(tiny_model)
    rows = [_prompt(1, n, seed=10 + n)[0].tolist() for n in (3, 9, 6)]
    singles = [generate(tiny_model, [row], 14).new_tokens[0] for row in rows]
    batched = generate(tiny_model, rows, 14, draft=head)
    assert hasattr(batched, "acceptance_rate")
    for b in range(3):
        assert torch.equal(batched.new_tokens[b], singles[b])


@pytest.mark.parametrize("prev", [False, True, 2])
def test_unrolled_passes_see_what_decoding_feeds(prev):
    """Pass s of the training forward at position p equals the head run through its cache the way a round
    drafts: true features up to p - s, then its own predictions (and, for a prev_token head, the token at
    each position)."""
    target = _model(0)
    head = _head(target, n_layer=2, prev_token=prev)
    tokens = _prompt(2, 12, seed=3)
    at = lambda a, b: head.context_tokens(tokens, a, b % tokens.size(1))  # noqa: E731 (the tokens at p, p - 1)
    with torch.no_grad():
        feats = target.hidden_states(tokens)
        outs = unrolled_forward(head, feats, tokens, 3)
        assert torch.allclose(outs[0], head(feats[:, :-1], tokens[:, 1:], prev_tokens=at(0, -1)), atol=1e-5)
        for s in (1, 2):
            for p in (s, 6, 10):
                cache = make_cache(head, 2, 16)
                f = head(feats[:, :p - s + 1], tokens[:, 1:p - s + 2], prev_tokens=at(0, p - s + 1),
                         input_pos=torch.arange(p - s + 1), cache=cache)[:, -1]
                for j in range(1, s + 1):
                    q = p - s + j
                    f = head(f[:, None], tokens[:, q + 1:q + 2], prev_tokens=at(q, q + 1), input_pos=torch.tensor([q]),
                             cache=cache)[:, -1]
                assert torch.allclose(outs[s][:, p - s], f, atol=1e-5), (s, p)


def _memorized_head():
    """A peaked tiny target, its greedy continuations of two prompts, and a head trained (unrolled) on them."""
    target = _model(0, vocab_size=64, tie_embeddings=False, init_std=0.3)  # peaked, varied greedy output
    prompt = _prompt(2, 4, seed=99, vocab=64)
    with torch.no_grad():
        rows = generate(target, prompt, 40).tokens
        feats = target.hidden_states(rows)
        top1 = target.lm_head(feats).argmax(-1)
    ids = kept_vocabulary(top1, rows, 64, 64)
    kept_index = torch.full((64,), -1, dtype=torch.long)
    kept_index[ids] = torch.arange(ids.numel())
    head = _head(target, vocab_ids=ids)
    before = speculative_generate(target, prompt, 40, proposer=FeatureDraftProposer(head), k=3, adaptive=False)
    head.train()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(100):
        outs = unrolled_forward(head, feats, rows, 2)
        regs, clss, _ = draft_losses(head, outs, feats, top1, kept_index)
        (sum(regs) + sum(clss)).backward()
        opt.step()
        opt.zero_grad()
    return target, prompt, rows, head.eval(), before


@pytest.fixture(scope="module")
def memorized():
    return _memorized_head()


def test_training_makes_the_head_agree(memorized):
    """The head trained on the target's greedy continuations of two prompts drafts them: the features,
    positions and rollback of the decoding loop match the training, or this fails."""
    target, prompt, rows, head, before = memorized
    after = speculative_generate(target, prompt, 40, proposer=FeatureDraftProposer(head), k=3, adaptive=False)
    assert torch.equal(after.tokens, rows) and torch.equal(before.tokens, rows)
    assert before.acceptance_rate < 0.3 and after.acceptance_rate > 0.8, (before.acceptance_rate,
                                                                         after.acceptance_rate)


def test_fused_cpu_step_matches_the_module_path(memorized):
    """The head's blocks in the fused C step (kernels="auto") propose what the module path proposes."""
    from llmopt.inference.cpu_linear import cpu_linear_kernels

    target, prompt, rows, head, _ = memorized
    with cpu_linear_kernels(head) as routed:
        fused = "forward_cached" in head.__dict__
    runs = {}
    for kernels in ("auto", "torch"):
        got = speculative_generate(target, prompt, 40, proposer=FeatureDraftProposer(head), k=3, adaptive=False,
                                   kernels=kernels)
        assert torch.equal(got.tokens, rows)
        runs[kernels] = (got.accept_counts, got.ks)
    assert runs["auto"] == runs["torch"] and sum(runs["auto"][0][1:]) > 0
    if routed:
        assert fused


@pytest.mark.parametrize("n_prev", [1, 2])
def test_prev_token_head_fused_step_matches_the_module_path(tiny_model, n_prev):
    """A prev_token head's fused C step computes what its modules compute, previous tokens included (different
    previous tokens give different features), and speculative decoding with it stays the target's output."""
    from llmopt.inference.cpu_linear import cpu_linear_kernels

    head = _head(tiny_model, prev_token=n_prev, n_layer=2)
    feats = torch.randn(2, 5, tiny_model.config.dim)
    nxt = _prompt(2, 5, seed=5)
    prev = _prompt(2, 5, seed=6) if n_prev == 1 else torch.stack([_prompt(2, 5, seed=6), _prompt(2, 5, seed=7)], -1)
    outs = {}
    with torch.no_grad():
        for fused in (False, True):
            with cpu_linear_kernels(head, enabled=fused) as routed:
                assert ("forward_cached" in head.__dict__) == bool(fused and routed)
                for name, p in (("a", prev), ("b", prev.flip(1))):
                    cache = make_cache(head, 2, 16)
                    outs[fused, name] = head.forward_cached(feats, nxt, prev_tokens=p, input_pos=torch.arange(5),
                                                            cache=cache)
    torch.testing.assert_close(outs[True, "a"], outs[False, "a"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[True, "b"], outs[False, "b"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[True, "a"], outs[True, "b"], atol=1e-3)
    prompt = _prompt(2, 7, seed=4)
    got = speculative_generate(tiny_model, prompt, 20, proposer=FeatureDraftProposer(head), k=3, adaptive=False)
    assert torch.equal(got.tokens, generate_reference(tiny_model, prompt, 20).tokens)


def test_bf16_head_drafts_through_the_fused_step(memorized):
    """A head cast to bf16 (half the bytes a drafted token reads) takes the fused C step too, stays exact, and
    drafts as well as the fp32 head on what it memorized."""
    import copy

    from llmopt.inference.cpu_linear import cpu_linear_kernels

    target, prompt, rows, head, _ = memorized
    half = copy.deepcopy(head).to(torch.bfloat16).attach(target)
    assert half.head.weight.dtype == torch.bfloat16
    with cpu_linear_kernels(half) as routed:
        fused = "forward_cached" in half.__dict__
    assert fused or not routed
    fp32 = speculative_generate(target, prompt, 40, proposer=FeatureDraftProposer(head), k=3, adaptive=False)
    for kernels in ("auto", "torch"):
        got = speculative_generate(target, prompt, 40, proposer=FeatureDraftProposer(half), k=3, adaptive=False,
                                   kernels=kernels)
        assert torch.equal(got.tokens, rows)
        assert got.acceptance_rate > fp32.acceptance_rate - 0.1, (kernels, got.acceptance_rate, fp32.acceptance_rate)


def test_int8_quantized_head_drafts_exactly(memorized):
    """A head whose linears are weight-only int8 (`weight_only_quant`, applied after attach) drafts through the
    fused step on the int8 C kernels; the output stays the target's, and re-attaching it is refused in one line."""
    import copy

    import llmopt.techniques.weight_only_quant  # noqa: F401  (registers the technique)
    from llmopt.core import apply_
    from llmopt.inference.cpu_linear import cpu_linear_kernels
    from llmopt.techniques.weight_only_quant import WeightOnlyQuantConfig

    target, prompt, rows, head, _ = memorized
    q = copy.deepcopy(head).attach(target)
    apply_(q, WeightOnlyQuantConfig(bits=8))
    assert type(q.head).__name__ == "IntWeightOnlyLinear" and q.dtype == torch.float32
    with cpu_linear_kernels(q) as routed:
        assert "forward_cached" in q.__dict__ or not routed
    got = speculative_generate(target, prompt, 40, proposer=FeatureDraftProposer(q), k=3, adaptive=False)
    assert torch.equal(got.tokens, rows) and got.acceptance_rate > 0.5
    with pytest.raises(ValueError, match="attach the head to its target before quantizing"):
        q.attach(target)


def test_an_unattached_head_is_linked_before_the_kernels_copy_it():
    target = _model(0, vocab_size=64, tie_embeddings=False, init_std=0.3)
    torch.manual_seed(3)
    head = FeatureDraft(target.config, torch.arange(64)).eval()  # never attached: head rows are random
    got = speculative_generate(target, _prompt(1, 4, seed=2, vocab=64), 12, proposer=FeatureDraftProposer(head), k=2,
                               adaptive=False)
    assert torch.equal(head.head.weight, target.lm_head.weight)
    assert torch.equal(got.tokens, generate_reference(target, _prompt(1, 4, seed=2, vocab=64), 12).tokens)


@pytest.mark.parametrize("top_k,gate", [(None, None), (4, None), (None, "min_confidence"), (None, "stop_below"),
                                        (4, "stop_below")])
def test_sampling_keeps_the_target_distribution(top_k, gate):
    """The accept/reject rule keeps the target's distribution; with a confidence bar, set between the head's top
    probabilities after different first tokens, so that some rows draft and some do not (a bar that read the
    drawn token's probability instead of the distribution's top one would skew the output)."""
    from llmopt.inference.sampling import logits_to_probs

    target = _model(2, vocab_size=8, dim=16, n_head=2, n_kv_head=1)
    head = _head(target, seed=3, vocab_ids=torch.tensor([0, 2, 3, 5, 7]))  # ids 1, 4, 6 never proposed
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    V = 8
    with torch.no_grad():
        p1 = logits_to_probs(target(prompt)[0, -1], 1.3, top_k)
        seqs = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        exact = p1[:, None] * logits_to_probs(target(seqs)[:, -1], 1.3, top_k)
        # the head's distribution for the second new token, after each first token
        f = head(target.hidden_states(prompt).expand(V, -1, -1), seqs[:, 1:])[:, -1]
        top = logits_to_probs(head.full_logits(f), 1.3, top_k).max(-1).values
    bars = {}
    if gate is not None:
        bar = float(top.sort().values[V // 2])  # about half the first tokens leave the head above the bar
        assert (top >= bar).any() and (top < bar).any()
        bars = {gate: bar}
    rows = 20_000
    # 3 new tokens: the first comes from the prefill, the second through the accept/reject rule
    got = speculative_generate(target, prompt.expand(rows, -1), 3, k=2, proposer=FeatureDraftProposer(head, **bars),
                               adaptive=False, temperature=1.3, top_k=top_k, seed=0)
    assert got.proposed > 0  # every row draws column 0 by the accept/reject rule (the batch keeps the min run)
    pairs = got.new_tokens[:, 0] * V + got.new_tokens[:, 1]
    freq = torch.bincount(pairs, minlength=V * V).float().view(V, V) / rows
    tv = 0.5 * (freq - exact).abs().sum().item()
    assert tv < 0.035, tv


def test_save_load_and_errors(tiny_model, tmp_path):
    head = _head(tiny_model, vocab_ids=torch.arange(10, 200))
    head.info = {"note": "test"}
    head.save(tmp_path / "h")
    assert is_feature_draft_dir(tmp_path / "h") and not is_feature_draft_dir(tmp_path)
    back = FeatureDraft.load(tmp_path / "h", tiny_model)
    assert back.info == {"note": "test"} and torch.equal(back.vocab_ids, head.vocab_ids)
    f, t = torch.randn(1, 3, tiny_model.config.dim), _prompt(1, 3)
    with torch.no_grad():
        assert torch.equal(back(f, t), head(f, t))
    prev = _head(tiny_model, vocab_ids=torch.arange(10, 200), prev_token=True)
    prev.save(tmp_path / "p")
    back = FeatureDraft.load(tmp_path / "p", tiny_model)
    assert back.prev_token and back.fc.in_features == 3 * tiny_model.config.dim
    with torch.no_grad():
        assert torch.equal(back(f, t, prev_tokens=t), prev(f, t, prev_tokens=t))
    with pytest.raises(ValueError, match="prev_tokens"):
        back(f, t)
    two = _head(tiny_model, vocab_ids=torch.arange(10, 200), prev_token=2)  # reads the tokens at p and p - 1
    two.save(tmp_path / "p2")
    back = FeatureDraft.load(tmp_path / "p2", tiny_model)
    assert back.n_prev == 2 and back.fc.in_features == 4 * tiny_model.config.dim
    both = two.context_tokens(t, 0, 3)
    assert both.shape == (1, 3, 2) and torch.equal(both[0, :, 0], t[0]) and both[0, 0, 1] == 0
    assert torch.equal(both[0, 1:, 1], t[0, :2])
    with torch.no_grad():
        assert torch.equal(back(f, t, prev_tokens=both), two(f, t, prev_tokens=both))
    with pytest.raises(ValueError, match=r"prev_tokens of shape \(1, 3, 2\)"):
        back(f, t, prev_tokens=t)
    other = _model(5)  # same shapes, other weights
    with pytest.raises(ValueError, match="trained for another target"):
        FeatureDraft.load(tmp_path / "h", other)
    with pytest.raises(ValueError, match="not a feature draft directory"):
        FeatureDraft.load(tmp_path)
    (tmp_path / "h" / "feature_draft.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read the feature draft"):
        FeatureDraft.load(tmp_path / "h")
    wide = _model(0, dim=48, n_head=4, n_kv_head=2)
    with pytest.raises(ValueError, match="does not fit a target|another target"):
        _head(tiny_model).attach(wide)
    with pytest.raises(ValueError, match="not attached"):
        FeatureDraft(tiny_model.config, torch.arange(5))(f, t)
    with pytest.raises(ValueError, match="vocab_ids"):
        FeatureDraft(tiny_model.config, torch.tensor([0, 10_000]))


def test_hooked_target_is_refused(tiny_model):
    handle = tiny_model.register_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(ValueError, match="plain model contract"):
            speculative_generate(tiny_model, _prompt(1, 4), 4, proposer=FeatureDraftProposer(_head(tiny_model)))
    finally:
        handle.remove()


def test_with_prompt_lookup_stays_exact(tiny_model):
    """Lookup rounds skip the head; its cache catches up on their tokens from the states the loop hands over."""
    base = _prompt(2, 20, seed=8)
    prompt = torch.cat([base, base[:, :5]], dim=1)  # copy-heavy
    ref = generate_reference(tiny_model, prompt, 30)
    proposer = DraftWithLookupProposer(_head(tiny_model, vocab_ids=torch.arange(0, 320, 3)))
    got = speculative_generate(tiny_model, prompt, 30, proposer=proposer, k=4, adaptive=False)
    assert torch.equal(got.tokens, ref.tokens)
    assert proposer.lookup_rounds > 0 and proposer.lookup_rounds < len(got.ks)


def test_recipe_end_to_end_on_a_tiny_target(tmp_path, monkeypatch):
    """The recipe on a tiny trained target: data, features, training, files; a rerun reuses the cached
    features and continues from the saved head."""
    from llmopt.cli import main as cli
    from llmopt.models import load_pretrained
    from llmopt.recipes.feature_draft import main, train_feature_draft

    quick = ["--set", "train.steps=2", "--set", "data.max_chars=40000", "--set", "train.batch_size=2",
             "--set", "train.seq_len=32", "--set", "train.eval_batches=1", "--set", "train.progress=false"]
    assert cli(["train", "tiny", "--out", str(tmp_path / "target")] + quick) == 0
    kw = dict(target_name=str(tmp_path / "target"), continuations=4, val_continuations=2, windows=4, seq_len=24,
              prompt_len=8, vocab=64, steps=3, batch_size=2, unroll=2, eval_every=2)
    summary = train_feature_draft(tmp_path / "head", **kw)
    assert summary["rows"] == 8 and summary["final"]["step"] == 3 and "val_top1_pass1" in summary["final"]
    target, _ = load_pretrained(tmp_path / "target")
    head = FeatureDraft.load(tmp_path / "head", target)
    assert head.vocab_ids.numel() == 64 and head.info["steps"] == 3
    again = train_feature_draft(tmp_path / "head", **kw, init_head=tmp_path / "head")
    assert again["feature_seconds"] < summary["feature_seconds"] + 1 and again["init_head"]
    parts = sorted((tmp_path / "head" / "data").glob("features_*.pt"))
    assert len(parts) == 3  # cached per part: the generated continuations, the windows, the held-out rows
    parts[0].write_bytes(b"garbage")  # a stopped write
    with pytest.raises(ValueError, match="cannot read the cached features .*delete it"):
        train_feature_draft(tmp_path / "head", **kw)
    # reused continuations (two folders) plus newly generated ones: all of them are training rows
    (generated,) = (tmp_path / "head" / "data").glob("continuations_*")
    more = train_feature_draft(tmp_path / "more", **{**kw, "continuations": 2, "steps": 1},
                               continuations_from=[generated, str(generated)], generate_too=True)
    assert more["continuation_rows"] == 4 + 4 + 2 and more["rows"] == 10 + 4
    cached = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "more" / "data").glob("features_*.pt")}
    assert len(cached) == 4  # the reused folder once (both copies are the same rows), the new rows, windows, held-out
    fewer = train_feature_draft(tmp_path / "more", **{**kw, "continuations": 2, "steps": 1},
                                continuations_from=[generated], generate_too=True)
    assert fewer["rows"] == 10 and {p.name: p.stat().st_mtime_ns  # every part's features reused, none rewritten
                                    for p in (tmp_path / "more" / "data").glob("features_*.pt")} == cached
    # features in blocks: a grown continuation folder (the same seed's first prompts) keeps its first block
    import llmopt.recipes.feature_draft as recipe

    monkeypatch.setattr(recipe, "FEATURE_BLOCK", 2)
    train_feature_draft(tmp_path / "blocks", **{**kw, "continuations": 2, "steps": 1, "windows": 0})
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "blocks" / "data").glob("features_*.pt")}
    train_feature_draft(tmp_path / "blocks", **{**kw, "continuations": 4, "steps": 1, "windows": 0})
    now = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "blocks" / "data").glob("features_*.pt")}
    assert len(first) == 1 + 1 and len(now) == 2 + 1 and all(now[name] == t for name, t in first.items())
    monkeypatch.undo()
    reused = train_feature_draft(tmp_path / "reused", **{**kw, "steps": 1}, continuations_from=generated)
    assert reused["continuation_rows"] == 4  # without generate_too, --continuations is not generated
    # a head that also reads the previous token, grown from the trained one: fc starts as the same function
    old = FeatureDraft.load(tmp_path / "head", target)
    grown = train_feature_draft(tmp_path / "grown", **{**kw, "steps": 1, "lr": 1e-9}, init_head=tmp_path / "head",
                                prev_token=True)
    assert grown["prev_token"] and grown["history"][0]["val_top1_pass0"] == again["final"]["val_top1_pass0"]
    new = FeatureDraft.load(tmp_path / "grown", target)
    assert new.prev_token and torch.allclose(new.fc.weight[:, :2 * old.config.dim], old.fc.weight, atol=1e-6)
    with pytest.raises(ValueError, match="add --prev-token"):
        train_feature_draft(tmp_path / "x", **kw, init_head=tmp_path / "grown")
    # then to the tokens at p and p - 1 (a bigram to match before copying): the same function to start
    bigram = train_feature_draft(tmp_path / "bigram", **{**kw, "steps": 1, "lr": 1e-9}, init_head=tmp_path / "grown",
                                 prev_token=2)
    assert bigram["prev_token"] == 2
    assert bigram["history"][0]["val_top1_pass0"] == grown["final"]["val_top1_pass0"]
    # a second block appended to the trained head: zero output projections, so it starts as the same function
    deeper = train_feature_draft(tmp_path / "deeper", **{**kw, "steps": 1, "lr": 1e-9}, init_head=tmp_path / "head",
                                 n_layer=2)
    assert deeper["n_layer"] == 2 and deeper["history"][0]["val_top1_pass0"] == again["final"]["val_top1_pass0"]
    two = FeatureDraft.load(tmp_path / "deeper", target)
    assert torch.allclose(two.layers[0].self_attn.q_proj.weight, old.layers[0].self_attn.q_proj.weight, atol=1e-6)
    with pytest.raises(ValueError, match="more than --layers 1"):
        train_feature_draft(tmp_path / "x", **kw, init_head=tmp_path / "deeper")
    with pytest.raises(SystemExit, match="error: .*--vocab"):
        main(["--out", str(tmp_path / "bad"), "--target", str(tmp_path / "target"), "--vocab", "0",
              "--continuations", "2", "--val-continuations", "2", "--windows", "2", "--seq-len", "24",
              "--prompt-len", "8"])

