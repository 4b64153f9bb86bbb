"""`llmopt bench` end to end: real subprocesses on the tiny model, then `llmopt report`.

One bench of 2 rounds x 2 runs (4 fresh processes) is shared by the default tests; the heavier ones
(the transformers peer, a --set candidate, generate and eval) are marked slow.
"""

from __future__ import annotations

import json

import pytest

from llmopt.cli import main

TRAIN_FIGURES = {"step_time_s", "tokens_per_s", "train_time_s", "train_loss", "val_loss", "params_bytes",
                 "grads_bytes", "optimizer_state_bytes", "activations_bytes", "accounted_total_bytes",
                 "flops_per_step", "mfu", "energy_j", "energy_per_step_j", "tokens_per_joule", "flops_per_joule",
                 "energy_method", "energy_measured", "loss_curve", "val_curve", "peak_rss_bytes",
                 "time_to_target_s", "steps_to_target"}
ACCOUNTED = ("params_bytes", "buffers_bytes", "grads_bytes", "optimizer_state_bytes", "activations_bytes",
             "accounted_total_bytes")


@pytest.fixture(scope="module")
def sgd_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "sgd"
    code = main(["bench", "sgd", "--model", "tiny", "--repeats", "2", "--steps", "2", "--warmup", "0",
                 "--peers", "none", "--out", str(out)])
    assert code == 0
    return out


def test_bench_writes_the_schema(sgd_bench):
    from llmopt.measure import load_results

    r = load_results(sgd_bench)
    assert r["command"] == "llmopt bench sgd --model tiny --repeats 2 --steps 2 --peers none"
    assert r["machine"]["peak_flops"]["peak_flops"] > 0 and "torch" in r["versions"]
    assert r["workload"]["name"] == "train tiny" and r["workload"]["timed_steps"] == 2
    assert r["orders"] == [["baseline", "sgd"], ["sgd", "baseline"]]
    for name in ("baseline", "sgd"):
        reps = r["runs"][name]["repeats"]
        assert len(reps) == 2 and TRAIN_FIGURES <= set(reps[0]), TRAIN_FIGURES - set(reps[0])
        assert reps[0]["energy_method"] == "estimated" and reps[0]["energy_measured"] is False
        assert [p[0] for p in reps[0]["loss_curve"]] == [1, 2]
        assert reps[0]["val_curve"][0][0] == 0.0 and reps[0]["val_curve"][-1][2] == 2
        # accounted memory is exact: identical in two separate processes
        assert [reps[0][k] for k in ACCOUNTED] == [reps[1][k] for k in ACCOUNTED]
        # the same seed and data: the same losses in every round
        assert reps[0]["val_loss"] == reps[1]["val_loss"] and reps[0]["loss_curve"] == reps[1]["loss_curve"]
    base, sgd = r["runs"]["baseline"]["repeats"][0], r["runs"]["sgd"]["repeats"][0]
    assert sgd["optimizer_state_bytes"] == sgd["params_bytes"]  # one momentum buffer per parameter
    assert base["optimizer_state_bytes"] == 2 * base["params_bytes"] + 4 * 20  # two Adam moments, step counters
    assert sgd["params_bytes"] == base["params_bytes"] and sgd["activations_bytes"] == base["activations_bytes"]
    s = r["summary"]["sgd"]["step_time_s"]
    ratios = [c["step_time_s"] / b["step_time_s"] for c, b in zip(r["runs"]["sgd"]["repeats"],
                                                                    r["runs"]["baseline"]["repeats"])]
    assert (s["ratio_min"], s["ratio_max"]) == (min(ratios), max(ratios))
    assert r["summary"]["sgd"]["optimizer_state_bytes"]["ratio"] == pytest.approx(0.5, abs=1e-3)


def test_report_rerenders_and_compares(sgd_bench, tmp_path, capsys):
    md = (sgd_bench / "report.md").read_text()
    assert "| figure | baseline | sgd (candidate) |" in md and "`sgd` optimizer_state_bytes: ×0.5" in md
    (sgd_bench / "report.md").unlink()
    (sgd_bench / "ratios.png").unlink()
    assert main(["report", str(sgd_bench)]) == 0
    assert (sgd_bench / "report.md").read_text() == md and (sgd_bench / "ratios.png").exists()
    assert "| figure | baseline | sgd (candidate) |" in capsys.readouterr().out
    assert main(["report", str(sgd_bench), str(sgd_bench), "--out", str(tmp_path / "cmp.md")]) == 0
    cmp = (tmp_path / "cmp.md").read_text()
    assert "| sgd | optimizer_state_bytes | ×0.5 | ×0.5 | bands overlap: no clear change |" in cmp


@pytest.mark.slow
def test_bench_with_override_candidate_and_transformers_peer(tmp_path):
    out = tmp_path / "b"
    assert main(["bench", "sgd", "train.grad_clip=none", "--model", "tiny", "--repeats", "2", "--steps", "2",
                 "--warmup", "1", "--peers", "transformers", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    assert set(r["runs"]) == {"baseline", "sgd", "train.grad_clip=none", "transformers"}
    assert r["runs"]["transformers"]["kind"] == "peer"
    base, peer = r["runs"]["baseline"]["repeats"][0], r["runs"]["transformers"]["repeats"][0]
    # same weights, batches and optimizer through model(input_ids, labels=...): the same losses
    assert peer["val_loss"] == pytest.approx(base["val_loss"], abs=1e-4)
    assert peer["train_loss"] == pytest.approx(base["train_loss"], abs=1e-4)
    assert "| figure | baseline | sgd (candidate) | train.grad_clip=none (candidate) | transformers (peer) |" in \
        (out / "report.md").read_text()


@pytest.mark.slow
def test_bench_generate_and_eval_workloads(tmp_path):
    out = tmp_path / "g"
    assert main(["bench", "train.precision=bf16", "--model", "tiny", "--workload", "generate", "--repeats", "2",
                 "--steps", "2", "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    peer = r["runs"]["transformers"]["repeats"][0]
    assert peer["greedy_token_accuracy"] == 1.0 and peer["decode_tokens_per_s"] > 0
    assert r["runs"]["baseline"]["repeats"][0]["prefill_tokens_per_s"] > 0
    out = tmp_path / "e"
    assert main(["bench", "train.precision=bf16", "--model", "tiny", "--workload", "eval", "--repeats", "2",
                 "--out", str(out)]) == 0
    r = json.loads((out / "results.json").read_text())
    rep = r["runs"]["baseline"]["repeats"][0]
    assert rep["ppl"] > 1 and rep["info"]["window"] == 64 and rep["info"]["stride"] == 32
    assert set(r["runs"]) == {"baseline", "train.precision=bf16"}  # no eval peer registered
