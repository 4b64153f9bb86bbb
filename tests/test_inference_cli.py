"""`llmopt generate` with the inference options: same greedy text on every fast path, one-line errors."""

import pytest

from llmopt.cli import main

QUICK = ["--set", "train.steps=2", "--set", "data.max_chars=40000", "--set", "train.batch_size=2",
         "--set", "train.seq_len=32", "--set", "train.eval_batches=1", "--set", "train.progress=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "tiny", "--out", str(root / "target")] + QUICK) == 0
    assert main(["train", "tiny", "--out", str(root / "other"), "--set", "model.vocab_size=300"] + QUICK) == 0
    return root


def _generate(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_fast_paths_print_the_plain_greedy_text(capsys, runs):
    target = str(runs / "target")
    base = [target, "--prompt", "ROMEO: ROMEO:", "--max-new-tokens", "12", "--temperature", "0", "--no-stop"]
    code, plain, _ = _generate(capsys, *base)
    assert code == 0 and plain.startswith("ROMEO: ROMEO:")
    for extra in (["--prompt-lookup"], ["--draft", target, "--speculate-k", "3"]):
        code, text, err = _generate(capsys, *base, *extra, "--stats")
        assert code == 0 and text == plain, extra
        assert "acceptance_rate" in err
    code, text, _ = _generate(capsys, *base, "--kv-cache", "int8")
    assert code == 0 and text.startswith("ROMEO: ROMEO:")


def test_batch_file_and_stream(capsys, runs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET: good night\n")
    target = str(runs / "target")
    code, text, _ = _generate(capsys, target, "--batch-file", str(prompts), "--max-new-tokens", "5",
                              "--temperature", "0", "--no-stop")
    lines = [line for line in text.splitlines() if line.startswith(("ROMEO:", "JULIET:"))]
    assert code == 0 and len(lines) >= 2
    code, single, _ = _generate(capsys, target, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature", "0",
                                "--no-stop")
    code, streamed, _ = _generate(capsys, target, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--temperature",
                                  "0", "--no-stop", "--stream")
    assert streamed == single


@pytest.mark.parametrize("extra, needle", [
    (["--draft", "OTHER"], "different vocabulary"),
    (["--prompt-lookup", "--speculate-k", "0"], "at least 1"),
    (["--stop", "no such token at all"], "unknown stop token"),
    (["--max-new-tokens", "500"], "exceeds the model's context"),
    (["--draft", "TARGET", "--prompt-lookup"], "not both"),
])
def test_bad_input_is_one_line(capsys, runs, extra, needle):
    extra = [str(runs / "other") if e == "OTHER" else str(runs / "target") if e == "TARGET" else e for e in extra]
    code, _, err = _generate(capsys, str(runs / "target"), "--prompt", "ROMEO:", *extra)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_feature_draft_head_from_the_cli(capsys, runs, tmp_path):
    import torch

    from llmopt.models import load_pretrained
    from llmopt.models.feature_draft import FeatureDraft

    target = str(runs / "target")
    model, _ = load_pretrained(target)
    torch.manual_seed(0)
    FeatureDraft(model.config, torch.arange(model.config.vocab_size)).attach(model).save(tmp_path / "head")
    base = [target, "--prompt", "ROMEO: ROMEO:", "--max-new-tokens", "12", "--temperature", "0", "--no-stop"]
    code, plain, _ = _generate(capsys, *base)
    code, text, err = _generate(capsys, *base, "--draft", str(tmp_path / "head"), "--stats")
    assert code == 0 and text == plain and "acceptance_rate" in err
    code, text, _ = _generate(capsys, *base, "--draft", str(tmp_path / "head"), "--draft-dtype", "fp32")
    assert code == 0 and text == plain  # the head as trained (bf16 is the default): the same output
    code, _, err = _generate(capsys, *base, "--draft", target, "--draft-dtype", "bf16")
    assert code == 2 and "--draft-dtype applies to a feature-draft" in err
    # a head trained for another target of the same shape: refused in one line
    torch.manual_seed(1)
    other = type(model)(model.config)
    FeatureDraft(model.config, torch.arange(model.config.vocab_size)).attach(other).save(tmp_path / "foreign")
    code, _, err = _generate(capsys, *base, "--draft", str(tmp_path / "foreign"))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "another target" in lines[0], err
