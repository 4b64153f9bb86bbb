"""The `llmopt` command: bad input is one line on stderr and exit status 2, and nothing written is lost."""

import json

import pytest

from llmopt.cli import main

QUICK = ["--set", "train.steps=2", "--set", "data.max_chars=40000", "--set", "train.batch_size=2",
         "--set", "train.seq_len=32", "--set", "train.eval_batches=1", "--set", "train.progress=false"]


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["train", "tiny", "--set", "train.stepz=3"], "train.stepz"),
    (["train", "tiny", "--set", "train.steps=many"], "not an integer"),
    (["train", "tiny", "--set", "train.precision=fp64"], "fp32, bf16, fp16"),
    (["train", "nosuchrecipe"], "unknown recipe"),
    (["train", "tiny", "--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    (["eval", "/nonexistent/model", "--data", "x.txt"], "x.txt"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, argv, needle):
    code, _, err = _run(capsys, argv + ["--out", str(tmp_path / "out")] if argv[0] == "train" else argv)
    assert code == 2
    assert needle in _one_line_error(err)


def test_empty_and_non_utf8_data(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = _run(capsys, ["train", "tiny", "--data", str(empty), "--out", str(tmp_path / "a")])
    assert code == 2 and "empty.txt" in _one_line_error(err)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Ophélie, où es-tu?\n".encode("latin-1") * 100)
    code, _, err = _run(capsys, ["train", "tiny", "--data", str(latin), "--out", str(tmp_path / "b")])
    line = _one_line_error(err)
    assert code == 2 and "latin.txt" in line and "UTF-8" in line


def test_train_then_corrupt_checkpoint_then_resume(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, _ = _run(capsys, ["train", "tiny", "--out", str(out)] + QUICK)
    assert code == 0
    metrics_before = (out / "metrics.jsonl").read_text()
    weights = out / "model.safetensors"
    weights_before = weights.read_bytes()

    # training again into the same directory is refused, nothing is overwritten
    code, _, err = _run(capsys, ["train", "tiny", "--out", str(out)] + QUICK)
    assert code == 2 and "--resume" in _one_line_error(err)
    assert weights.read_bytes() == weights_before

    # resuming into a different model shape is refused
    code, _, err = _run(capsys, ["train", "tiny", "--out", str(out), "--resume", "--set", "model.dim=64"] + QUICK)
    assert code == 2 and "different model" in _one_line_error(err)

    # a corrupt checkpoint is refused, and the run directory is left as it was
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    code, _, err = _run(capsys, ["train", "tiny", "--out", str(out), "--resume", "--set", "train.steps=4"]
                        + QUICK[2:])
    assert code == 2 and "sha256" in _one_line_error(err)
    assert (out / "metrics.jsonl").read_text() == metrics_before
    assert weights.read_bytes() == weights_before


def test_generate_and_eval_on_a_trained_run(capsys, tmp_path):
    out = tmp_path / "run"
    assert _run(capsys, ["train", "tiny", "--out", str(out)] + QUICK)[0] == 0
    code, text, _ = _run(capsys, ["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                                  "--temperature", "0"])
    assert code == 0 and text.startswith("ROMEO:")
    data = tmp_path / "play.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 20)
    code, text, _ = _run(capsys, ["eval", str(out), "--data", str(data), "--window", "32", "--stride", "16", "--json"])
    assert code == 0
    result = json.loads(text)
    assert result["ppl"] > 1 and result["window"] == 32 and result["stride"] == 16


def test_techniques_lists_registered(capsys):
    code, text, _ = _run(capsys, ["techniques", "--json"])
    assert code == 0
    rows = json.loads(text)
    assert all({"name", "kind", "description"} <= set(r) for r in rows)
