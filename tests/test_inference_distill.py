"""Distillation of a draft model (llmopt.data.distill, llmopt.recipes.distill) on tiny models."""

import json

import pytest
import torch

from llmopt.data.distill import (TeacherTargets, project_embedding, teacher_topk, top1_agreement,
                                 topk_distill_loss, windows)
from llmopt.models import ModelConfig, build_model, load_pretrained


def test_topk_loss_with_full_vocabulary_is_kl_plus_entropy():
    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(2, 5, 11), torch.randn(2, 5, 11, requires_grad=True)
    logp = teacher_logits.log_softmax(-1)
    values, ids = logp.topk(11, dim=-1)
    loss = topk_distill_loss(student_logits, ids, values.log_softmax(-1))
    kl = torch.nn.functional.kl_div(student_logits.log_softmax(-1), logp, log_target=True, reduction="none").sum(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(loss, (kl + entropy).mean(), rtol=1e-5, atol=1e-5)
    loss.backward()  # gradient of the soft cross-entropy: softmax(student) - teacher
    expected = (student_logits.softmax(-1) - logp.exp()) / 10
    torch.testing.assert_close(student_logits.grad, expected.detach(), rtol=1e-4, atol=1e-6)


def test_student_matching_the_teacher_minimizes_the_loss():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 50)
    values, ids = logits.log_softmax(-1).topk(8, dim=-1)
    target = values.log_softmax(-1)
    matched = torch.full_like(logits, -1e4).scatter(-1, ids, target)  # the renormalized top-8 exactly
    assert topk_distill_loss(matched, ids, target) < topk_distill_loss(logits, ids, target)
    assert top1_agreement(logits, ids) == 1.0


def test_project_embedding_full_rank_keeps_the_geometry():
    torch.manual_seed(2)
    e = torch.randn(40, 12)
    p = project_embedding(e, 12)
    torch.testing.assert_close(p @ p.T, e @ e.T, rtol=1e-4, atol=1e-4)  # all inner products (logits) kept
    low = project_embedding(e, 4)
    assert low.shape == (40, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        project_embedding(e, 13)


def test_teacher_topk_targets_roundtrip(tmp_path, tiny_model):
    ids = torch.randint(0, 320, (1000,), generator=torch.Generator().manual_seed(0))
    inputs = windows(ids, 32, max_windows=6)
    assert inputs.shape == (6, 32)
    targets = teacher_topk(tiny_model, inputs, top_k=5, batch_size=4)
    torch.testing.assert_close(targets.topk_logprobs.logsumexp(-1), torch.zeros(6, 32), atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(targets.topk_ids[..., 0], tiny_model(inputs).argmax(-1))
    assert 0 < targets.mass <= 1
    targets.save(tmp_path / "t.safetensors")
    back = TeacherTargets.load(tmp_path / "t.safetensors")
    assert torch.equal(back.inputs, inputs) and torch.equal(back.topk_ids, targets.topk_ids)
    torch.testing.assert_close(back.topk_logprobs, targets.topk_logprobs, atol=1e-2, rtol=1e-3)  # stored fp16
    batch = next(back.batches(3, seed=0))
    assert [t.shape[0] for t in batch] == [3, 3, 3]
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(ids[:10], 32)
    with pytest.raises(ValueError, match="top_k must be in"):
        teacher_topk(tiny_model, inputs, top_k=0)


def test_distill_recipe_end_to_end(tmp_path):
    """A tiny teacher (own tokenizer, saved as a directory) distilled into a narrower student: the loss
    falls, the student agrees with the teacher more than at init, and the result loads as a draft."""
    from llmopt.data import load_text, train_tokenizer
    from llmopt.inference import DraftModelProposer, generate_reference, speculative_generate
    from llmopt.models.pretrained import save_pretrained_hf
    from llmopt.recipes import get_recipe
    from llmopt.recipes.distill import distill
    from llmopt.train.config import DataConfig, OptimConfig, RunConfig, TrainConfig

    text = load_text()[:30_000]
    tokenizer = train_tokenizer(text, "bpe", vocab_size=320)
    torch.manual_seed(0)
    teacher = build_model(ModelConfig.from_name("tiny", dim=64, n_layer=2, max_seq_len=256))
    save_pretrained_hf(teacher, tokenizer, tmp_path / "teacher")
    run = RunConfig(recipe="distill_test", init_from=str(tmp_path / "teacher"),
                    model=ModelConfig.from_name("tiny", dim=16, n_layer=1, n_head=2, n_kv_head=1, head_dim=8,
                                                max_seq_len=256),
                    data=DataConfig(max_chars=30_000), optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2),
                    train=TrainConfig(steps=40, batch_size=4, seq_len=32, eval_every=40, log_every=10))
    summary = distill(run, tmp_path / "draft", top_k=8, val_windows=8)
    first, last = summary["history"][0], summary["final"]
    assert last["val_distill_loss"] < first["val_distill_loss"]
    assert last["val_top1_agreement"] > first["val_top1_agreement"]
    assert json.loads((tmp_path / "draft" / "distill.json").read_text())["teacher_tokens"] > 0

    draft, draft_tokenizer = load_pretrained(tmp_path / "draft")
    assert draft.config.dim == 16 and draft_tokenizer.vocab_size == tokenizer.vocab_size
    prompt = torch.tensor([tokenizer.encode(text[:40])])
    got = speculative_generate(teacher.eval(), prompt, 12, proposer=DraftModelProposer(draft), k=3)
    assert torch.equal(got.tokens, generate_reference(teacher, prompt, 12).tokens)

    recipe = get_recipe("distill_draft")  # the shipped recipe: 1/8 of SmolLM2's compute or less
    m = recipe.model
    per_token = lambda c: c.vocab_size * c.dim + c.n_layer * (  # noqa: E731  (multiply-adds per token)
        c.dim * c.head_dim * (2 * c.n_head + 2 * c.n_kv_head) + 3 * c.dim * c.intermediate_size)
    assert per_token(m) <= per_token(ModelConfig.from_name("smollm2-135m")) / 8
    assert recipe.init_from == "smollm2-135m"


def test_distill_refuses_a_student_with_another_vocabulary(tmp_path):
    from llmopt.recipes import get_recipe
    from llmopt.recipes.distill import distill

    run = get_recipe("distill_draft")
    run.init_from = None
    with pytest.raises(ValueError, match="needs init_from"):
        distill(run, tmp_path)


def test_teacher_continuations_are_the_teachers_greedy_output(tiny_model):
    """Sequence-level distillation data: the stored tokens are `generate`'s greedy continuation and the stored
    top-k at every position is the teacher's distribution over that very sequence."""
    from llmopt.data.distill import concat_targets, mixed_batches
    from llmopt.inference import generate
    from llmopt.recipes.distill import teacher_continuations

    tiny_model.eval()
    prompts = torch.randint(0, 320, (3, 7), generator=torch.Generator().manual_seed(3))
    got = teacher_continuations(tiny_model, prompts, 10, top_k=4)
    assert got.inputs.shape == (3, 16) and got.topk_ids.shape == (3, 16, 4)
    want = generate(tiny_model, prompts, 10).tokens  # (3, 17): the last token is only a target
    assert torch.equal(got.inputs, want[:, :16])
    assert torch.equal(got.topk_ids[:, 6:, 0], want[:, 7:])  # from the last prompt position on: greedy
    with torch.no_grad():
        full = tiny_model(got.inputs).log_softmax(-1).topk(4, dim=-1)
    torch.testing.assert_close(got.topk_logprobs, full.values.log_softmax(-1), atol=1e-4, rtol=1e-4)

    text = teacher_topk(tiny_model, torch.randint(0, 320, (5, 16), generator=torch.Generator().manual_seed(4)),
                        top_k=4)
    both = concat_targets([text, got])
    assert len(both) == 8
    inputs, _, _ = next(mixed_batches(text, got, 4, 3, seed=0))
    assert inputs.shape == (4, 16)
    assert sum(any(torch.equal(r, c) for c in got.inputs) for r in inputs) == 3  # 3 rows from the continuations
    with pytest.raises(ValueError, match="new_tokens must be at least 1"):
        teacher_continuations(tiny_model, prompts, 0)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_draft_with_lookup_proposer_is_exact(tiny_model, temperature):
    """Lookup rounds and draft rounds mixed in one generation: greedy output is the target's own; with
    sampling the run completes with valid tokens (the accept rule is the same per round)."""
    from llmopt.inference import generate_reference
    from llmopt.inference.speculative import DraftWithLookupProposer, speculative_generate

    torch.manual_seed(1)
    draft = build_model(ModelConfig.from_name("tiny", n_layer=1, dim=16, n_head=2, n_kv_head=1)).eval()
    tiny_model.eval()
    # this prompt's greedy continuation falls into a loop (see the continuation test above): the lookup finds it
    prompt = torch.randint(0, 320, (3, 7), generator=torch.Generator().manual_seed(3))[:1]
    proposer = DraftWithLookupProposer(draft)
    got = speculative_generate(tiny_model, prompt, 30, proposer=proposer, k=4, adaptive=False,
                               temperature=temperature, seed=0)
    assert got.tokens.shape == (1, 37) and int(got.tokens.max()) < 320
    if temperature == 0:
        assert torch.equal(got.tokens, generate_reference(tiny_model, prompt, 30).tokens)
        assert 0 < proposer.lookup_rounds < len(got.ks)  # both sources used
