"""Curriculum learning: seq_len_at, pacing, difficulty_order, the hooks, and bit-identical resume in the loop."""

import math

import pytest
import torch

import llmopt.techniques  # noqa: F401  (registers curriculum)
from llmopt.core import apply_, parse_technique_spec
from llmopt.data.curriculum import (difficulty_order, pacing_fraction, seq_len_at, token_counts, training_windows,
                                    unigram_surprisal)
from llmopt.recipes import get_recipe
from llmopt.techniques.curriculum import CurriculumConfig, DifficultySamplerHook, SeqLenWarmupHook
from llmopt.train.config import apply_overrides
from llmopt.train.loop import fit


def test_seq_len_at_grows_in_multiples_to_full_length():
    lengths = [seq_len_at(s, 32, 128, 100, 8) for s in range(120)]
    assert lengths[0] == 32 and lengths[100] == lengths[119] == 128
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))
    assert all(n % 8 == 0 for n in lengths)
    assert len(set(lengths)) == (128 - 32) // 8 + 1  # few distinct shapes: at most one per multiple
    assert seq_len_at(50, 32, 128, 100, 8) == 80  # linear: halfway between 32 and 128
    assert seq_len_at(0, 5, 64, 10, 8) == 8  # never below one multiple
    assert seq_len_at(3, 256, 128, 10) == 128  # start beyond the full length: full length
    assert seq_len_at(0, 32, 128, 0) == 128  # no warmup
    with pytest.raises(ValueError, match="positive"):
        seq_len_at(0, 0, 128, 10)


def test_pacing_fraction():
    assert pacing_fraction(0.0, "linear", 0.2) == pytest.approx(0.2)
    assert pacing_fraction(0.5, "linear", 0.2) == pytest.approx(0.6)
    assert pacing_fraction(0.0, "root", 0.2) == pytest.approx(0.2)
    assert pacing_fraction(0.5, "root", 0.2) == pytest.approx(math.sqrt(0.04 + 0.96 * 0.5))
    assert pacing_fraction(0.5, "root", 0.2) > pacing_fraction(0.5, "linear", 0.2)  # root opens harder data sooner
    assert pacing_fraction(2.0, "root") == pacing_fraction(1.0, "linear") == 1.0
    with pytest.raises(ValueError, match="pacing"):
        pacing_fraction(0.5, "cubic")


def test_unigram_surprisal_ranks_rare_tokens_harder():
    tokens = torch.tensor([0] * 90 + [1] * 9 + [2])  # 0 common, 2 rare
    counts = token_counts(tokens, vocab_size=4)
    windows = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1], [0, 2, 2, 2]])
    scores = unigram_surprisal(windows, counts)
    assert scores[0] < scores[1] < scores[2]


def test_difficulty_order_is_easy_first_and_paced():
    windows = training_windows(torch.arange(101), 10)  # 10 windows of 11 tokens
    assert windows.shape == (10, 11) and torch.equal(windows[1], torch.arange(10, 21))
    scores = torch.tensor([5.0, 1.0, 3.0, 1.0, 9.0, 2.0, 8.0, 7.0, 6.0, 4.0])
    first = difficulty_order(windows, scores, "linear", 0, 10, start_fraction=0.3)
    assert first.tolist() == [1, 3, 5]  # the 3 easiest, ties by index
    middle = difficulty_order(windows, scores, "linear", 5, 10, start_fraction=0.3)
    assert len(middle) == math.ceil(0.65 * 10) and middle[:3].tolist() == [1, 3, 5]
    assert sorted(difficulty_order(windows, scores, "root", 10, 10).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="scores"):
        difficulty_order(windows, scores[:5], "linear", 0, 10)


def test_seq_len_hook_crops_and_counts_steps():
    hook = SeqLenWarmupHook(start_len=8, warmup_steps=4, multiple=8)
    state = type("S", (), {"metrics": {}})()
    x = torch.arange(64).view(2, 32)
    seen = []
    for _ in range(6):
        out = hook.before_forward(state, (x, x + 1))
        seen.append((out or (x, x + 1))[0].shape[1])
        hook.after_optimizer_step(state)
    assert seen == [8, 14 // 8 * 8, 20 // 8 * 8, 26 // 8 * 8, 32, 32]
    assert state.metrics["seq_len"] == 32 and hook.state_dict() == {"steps_done": 6}


def test_difficulty_hook_draws_from_the_easiest_windows():
    tokens = torch.randint(0, 50, (2000,), generator=torch.Generator().manual_seed(0))
    hook = DifficultySamplerHook(pacing="linear", start_fraction=0.1, pacing_steps=100, tokens=tokens)
    x = torch.zeros(4, 16, dtype=torch.long)
    out_x, out_y = hook.before_forward(None, (x, x))
    windows = training_windows(tokens, 16)
    easiest = windows[difficulty_order(windows, unigram_surprisal(windows, token_counts(tokens)), "linear", 0, 100,
                                       start_fraction=0.1)]
    for row_x, row_y in zip(out_x, out_y):
        assert any(torch.equal(row_x, w[:-1]) and torch.equal(row_y, w[1:]) for w in easiest)
    with pytest.raises(ValueError, match="training tokens"):
        DifficultySamplerHook(pacing_steps=10).before_forward(None, (x, x))


def test_spec_parses_and_apply_returns_only_a_hook(tiny_model):
    config = parse_technique_spec("curriculum:kind=seq_len,start_len=32,warmup_steps=100")
    assert config == CurriculumConfig(kind="seq_len", start_len=32, warmup_steps=100)
    report = apply_(tiny_model, config)
    assert report.changed == {} and isinstance(report.hooks[0], SeqLenWarmupHook)
    with pytest.raises(ValueError, match="start_fraction"):
        CurriculumConfig(kind="difficulty", start_fraction=0.0)


def _run(steps, technique, **sets):
    run = get_recipe("tiny")
    overrides = [f"train.steps={steps}", "train.log_every=1", "train.eval_every=3", "train.eval_batches=2",
                 "data.max_chars=60000", "train.batch_size=4", "train.seq_len=32", "train.progress=false"]
    run = apply_overrides(run, overrides + [f"{k}={v}" for k, v in sets.items()])
    run.techniques = [technique]
    return run


class _Stop(Exception):
    pass


class _StopAt:
    """Stops the run at the start of step `at` (after the checkpoint of step `at`); at=-1 never stops. Passed on
    resume too, so the checkpoint's positional hook states line up with the same hooks."""

    def __init__(self, at):
        self.at = at

    def before_forward(self, state, batch):
        if state.step == self.at:
            raise _Stop
        return batch


@pytest.mark.parametrize("technique", ["curriculum:kind=seq_len,start_len=8,warmup_steps=5",
                                       "curriculum:kind=difficulty,pacing=linear,start_fraction=0.2"])
def test_resume_in_the_loop_is_bit_identical(tmp_path, technique):
    straight = fit(_run(6, technique), tmp_path / "a", hooks=[_StopAt(-1)])
    with pytest.raises(_Stop):
        fit(_run(6, technique, **{"train.ckpt_every": 3}), tmp_path / "b", hooks=[_StopAt(3)])
    resumed = fit(_run(6, technique, **{"train.ckpt_every": 3}), tmp_path / "b", resume=True, hooks=[_StopAt(-1)])
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in straight.history if "loss" in r]
    assert losses[3:] == [r["loss"] for r in resumed.history if "loss" in r]
    if "seq_len" in technique:
        assert [r["seq_len"] for r in straight.history if "loss" in r] == [8, 8, 16, 16, 24, 32]  # 8 + 24 * step / 5, rounded down to 8s
    else:
        fractions = [r["curriculum_fraction"] for r in straight.history if "loss" in r]
        assert fractions == sorted(fractions) and fractions[0] < 0.3


def test_evaluation_stays_at_full_length(tmp_path, monkeypatch):
    from llmopt.models import Transformer

    seen = []
    original = Transformer.loss

    def recording_loss(self, idx, targets, *args, **kwargs):
        seen.append((torch.is_grad_enabled(), idx.shape[1]))
        return original(self, idx, targets, *args, **kwargs)

    monkeypatch.setattr(Transformer, "loss", recording_loss)
    fit(_run(3, "curriculum:kind=seq_len,start_len=8,warmup_steps=100"), tmp_path / "r")
    train_lengths = {t for grad, t in seen if grad}
    eval_lengths = {t for grad, t in seen if not grad}
    assert train_lengths == {8} and eval_lengths == {32}
