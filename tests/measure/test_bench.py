"""`llmopt bench` without subprocesses: name resolution, interleaving, per-round ratios, outputs, errors.

The runs are faked by an injected runner (what `run_in_subprocess` would return), and the data
preparation by a stub, so these tests take well under a second each. The real subprocess path is in
test_bench_cli.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import llmopt.measure.bench as bench_mod
from llmopt.measure.bench import BenchError, add_round_figures, bench, resolve_candidate, time_to_target
from llmopt.measure.bench_peers import register_peer, select_peers, unregister_peer

PEAK = {"peak_flops": 1e9, "min": 1e9, "max": 1e9, "size": 256, "dtype": "float32", "device": "cpu", "threads": 1}


@pytest.fixture(autouse=True)
def _registry_loaded():
    import llmopt.techniques

    llmopt.load_techniques()  # before any isolated_registry block, so its undo keeps the real ones


@pytest.fixture
def no_data(monkeypatch):
    """Skip tokenizer training: the fake runner never reads the data."""

    def fake_prepare(run, workspace: Path):
        workspace.mkdir(parents=True, exist_ok=True)
        return workspace / "data.pt", run.model

    monkeypatch.setattr(bench_mod, "prepare_data", fake_prepare)


class FakeRunner:
    """Returns figures chosen per (optimizer, round): baseline step times 1 then 10, sgd 2 then 5."""

    TIMES = {"adamw": [1.0, 10.0, 1.0], "sgd": [2.0, 5.0, 2.0]}

    def __init__(self, fail_on: int | None = None, fail_name: str | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.rounds: dict[str, int] = {}
        self.fail_on, self.fail_name = fail_on, fail_name

    def __call__(self, fn: str, kwargs: dict) -> dict:
        self.calls.append((fn, kwargs))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("the machine caught fire")
        optim = kwargs["run"]["optim"]["name"]
        if optim == self.fail_name:
            return {"ok": False, "error": "ValueError: boom", "stderr_tail": "Traceback ...", "peak_rss_bytes": None}
        r = self.rounds.get(optim, 0)
        self.rounds[optim] = r + 1
        t = self.TIMES[optim][r % 3]
        final = 5.0 if optim == "adamw" else 4.0
        return {"ok": True, "peak_rss_bytes": 100 * 2**20, "wall_s": 3.0, "result": {
            "step_time_s": t, "tokens_per_s": 1000 / t, "val_loss": final, "train_loss": final + 0.1,
            "activations_bytes": 4096, "energy_per_step_j": t * 10, "energy_method": "estimated",
            "energy_measured": False, "val_curve": [[0.0, 6.0, 0], [10 * t, final, 10]],
            "loss_curve": [[1, 6.0], [10, final]], "info": {}}}


# ---- resolving names ---------------------------------------------------------------------------
def test_builtin_optimizer_and_override_candidates():
    c = resolve_candidate("sgd")
    assert (c.workload, c.techniques, c.overrides) == ("train", (), ("optim.name=sgd",))
    c = resolve_candidate("sgd:lr=0.1,momentum=0.8")  # the registered sgd's momentum is the loop's beta1
    assert c.overrides == ("optim.name=sgd", "optim.lr=0.1", "optim.beta1=0.8")
    c = resolve_candidate("sgd:freeze_embeddings=true")  # the fine-tuning recipe's switch
    assert "optim.freeze_embeddings=True" in c.overrides or "optim.freeze_embeddings=true" in c.overrides
    c = resolve_candidate("adamw:lr=0.1,beta2=0.99")  # the loop's own optimizer, options from OptimConfig
    assert c.overrides == ("optim.name=adamw", "optim.lr=0.1", "optim.beta2=0.99")
    c = resolve_candidate("train.grad_clip=none")
    assert (c.workload, c.overrides) == ("train", ("train.grad_clip=none",))
    c = resolve_candidate("sgd+optim.lr=1e+3")  # `+` joins; the `+` of a number does not
    assert c.overrides == ("optim.name=sgd", "optim.lr=1e+3")


def _fake_techniques():
    from llmopt.core import Hook, Stage, TechniqueConfig, register, register_technique

    @dataclass(frozen=True, kw_only=True)
    class FakeTransformConfig(TechniqueConfig):
        """A transform for the bench tests."""

        width: int = 4

    register(FakeTransformConfig, name="fake-transform", stage=Stage.SURGERY)(
        lambda model, config, filter_fn=None: None)

    class FakeHook(Hook):
        pass

    register_technique("fake-hook", kind="hook", factory=FakeHook)
    register_technique("fake-precision", kind="setting",
                       factory=lambda precision="bf16": {"train.precision": precision})
    register_technique("fake-cache", kind="inference", factory=lambda bits=4: None, workload="generate")
    register_technique("fake-optimizer", kind="optimizer", factory=lambda params, lr=1e-3, gamma=0.0: None)


def test_registered_kinds_resolve():
    from llmopt.core import isolated_registry

    with isolated_registry():
        _fake_techniques()
        c = resolve_candidate("fake-transform:width=8")
        assert (c.techniques, c.overrides, c.workload) == (("fake-transform:width=8",), (), "train")
        assert resolve_candidate("fake-transform", "eval").workload == "eval"  # transforms run every workload
        assert resolve_candidate("fake-hook").techniques == ("fake-hook",)
        assert resolve_candidate("fake-precision:precision=fp16").overrides == ("train.precision=fp16",)
        assert resolve_candidate("fake-optimizer:lr=0.5").overrides == ("optim.name=fake-optimizer", "optim.lr=0.5")
        c = resolve_candidate("fake-transform+fake-hook+sgd")
        assert c.techniques == ("fake-transform", "fake-hook") and c.overrides == ("optim.name=sgd",)
        with pytest.raises(BenchError, match="gamma.*no optim"):
            resolve_candidate("fake-optimizer:gamma=0.9")
        with pytest.raises(BenchError, match="inference technique.*cannot run yet"):
            resolve_candidate("fake-cache")
        with pytest.raises(BenchError, match="cannot run the generate workload.*can run: train"):
            resolve_candidate("fake-hook", "generate")
        with pytest.raises(BenchError, match="has no option 'depth'.*width: int"):
            resolve_candidate("fake-transform:depth=2")


def test_bad_names_are_one_line_errors():
    with pytest.raises(BenchError, match=r"unknown technique 'nonsense'; registered: .*sgd"):
        resolve_candidate("nonsense")
    with pytest.raises(BenchError, match="sgd has no option 'rank'"):
        resolve_candidate("sgd:rank=3")
    with pytest.raises(BenchError, match="adamw has no option 'rank2'"):
        resolve_candidate("adamw:rank2=3")
    with pytest.raises(BenchError, match="unknown workload 'serve'"):
        resolve_candidate("sgd", "serve")
    with pytest.raises(BenchError, match="cannot run the eval workload"):
        resolve_candidate("sgd", "eval")
    with pytest.raises(ValueError, match="unknown config key 'train.nope'"):
        bench(["train.nope=1"], model="tiny", out="unused", runner=FakeRunner(), peak_flops=PEAK)
    with pytest.raises(BenchError, match="--model 'gpt-17'"):
        bench(["sgd"], model="gpt-17", runner=FakeRunner(), peak_flops=PEAK)


# ---- rounds, ratios, outputs -------------------------------------------------------------------
def test_interleaved_rounds_and_per_round_ratios(tmp_path, no_data):
    runner, lines = FakeRunner(), []
    out = tmp_path / "b"
    result = bench(["sgd"], model="tiny", repeats=3, steps=2, out=out, peers="none", runner=runner, peak_flops=PEAK,
                   progress=lines.append)
    r = json.loads((out / "results.json").read_text())
    assert r["orders"] == [["baseline", "sgd"], ["sgd", "baseline"], ["baseline", "sgd"]]
    assert [k["run"]["optim"]["name"] for _, k in runner.calls] == ["adamw", "sgd", "sgd", "adamw", "adamw", "sgd"]
    assert {fn for fn, _ in runner.calls} == {"llmopt.measure.workloads:run_train"}
    assert r["machine"]["peak_flops"] == PEAK and r["baseline"] == "baseline"
    assert r["command"].startswith("llmopt bench sgd")
    assert r["runs"]["baseline"]["kind"] == "baseline" and r["runs"]["sgd"]["kind"] == "candidate"
    rep = r["runs"]["sgd"]["repeats"][0]
    assert rep["peak_rss_bytes"] == 100 * 2**20 and rep["info"]["round"] == 0
    # paired per round: 2/1, 5/10, 2/1 -> median 2, band 0.5..2 (unpaired medians would give 2/1 = 2, no band)
    s = r["summary"]["sgd"]["step_time_s"]
    assert (s["ratio"], s["ratio_min"], s["ratio_max"]) == (2.0, 0.5, 2.0)
    assert (s["median"], s["min"], s["max"]) == (2.0, 2.0, 5.0)
    # time to the baseline's final val loss 5.0: sgd's curve (0, 6) -> (10 t, 4) crosses it at 5 t
    assert [x["time_to_target_s"] for x in r["runs"]["sgd"]["repeats"]] == [10.0, 25.0, 10.0]
    assert [x["time_to_target_s"] for x in r["runs"]["baseline"]["repeats"]] == [10.0, 100.0, 10.0]
    assert len(lines) == 1 + 1 + 6 and "round 2/3 sgd: step 5 s" in lines[-4]
    md = (out / "report.md").read_text()
    assert md == result.markdown
    assert "| figure | baseline | sgd (candidate) |" in md
    assert "| step_time_s | 1 (1–10) | 2 · ×2 (0.5–2) ≈ |" in md
    assert "energy_per_step_j (estimated)" in md and "Energy is estimated" in md
    assert "`sgd` time to the baseline's final val loss (5 in round 1): ×1 (0.25–1)" in md
    assert "# All figures" in md
    assert {p.name for p in out.iterdir()} == {"results.json", "report.md", "ratios.png", "loss_curves.png",
                                               "val_loss_vs_time.png"}
    assert not list(tmp_path.glob(".b.*"))  # no staging directory left behind


def test_missing_peer_is_a_skipped_row(tmp_path, no_data):
    register_peer("ghost", "train", "nowhere:run", requires=["llmopt_no_such_package_xyz"])
    try:
        runner = FakeRunner()
        result = bench(["sgd"], model="tiny", repeats=2, steps=2, out=tmp_path / "b", peers="ghost", runner=runner,
                       peak_flops=PEAK)
        ghost = result.results["runs"]["ghost"]
        why = "llmopt_no_such_package_xyz is not installed (pip install llmopt-no-such-package-xyz)"
        assert ghost == {**ghost, "kind": "peer", "repeats": [], "skipped": why}
        assert len(runner.calls) == 4 and all(fn != "nowhere:run" for fn, _ in runner.calls)
        assert "- `ghost` (peer): skipped: llmopt_no_such_package_xyz is not installed" in result.markdown
        assert [p.name for p in select_peers("all", "train", {"sgd"})].count("ghost") == 1
    finally:
        unregister_peer("ghost", "train")
    with pytest.raises(ValueError, match="--peers 'transformers' cannot run the eval workload"):
        select_peers("transformers", "eval", set())
    with pytest.raises(ValueError, match="no such peer"):
        select_peers("nope", "train", set())


def test_existing_out_needs_force_and_force_keeps_old_results_on_crash(tmp_path, no_data):
    out = tmp_path / "b"
    out.mkdir()
    (out / "results.json").write_text("old")
    runner = FakeRunner()
    with pytest.raises(BenchError, match="already exists.*--force"):
        bench(["sgd"], model="tiny", repeats=2, out=out, peers="none", runner=runner, peak_flops=PEAK)
    assert runner.calls == [] and (out / "results.json").read_text() == "old"
    with pytest.raises(RuntimeError, match="caught fire"):
        bench(["sgd"], model="tiny", repeats=2, out=out, force=True, peers="none", runner=FakeRunner(fail_on=3),
              peak_flops=PEAK)
    assert (out / "results.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    bench(["sgd"], model="tiny", repeats=2, out=out, force=True, peers="none", runner=FakeRunner(), peak_flops=PEAK)
    assert json.loads((out / "results.json").read_text())["runs"]["sgd"]["repeats"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failing_candidate_is_reported_and_failing_baseline_stops(tmp_path, no_data):
    result = bench(["sgd"], model="tiny", repeats=2, out=tmp_path / "a", peers="none",
                   runner=FakeRunner(fail_name="sgd"), peak_flops=PEAK)
    assert result.failures == ["sgd: failed in round 1: ValueError: boom"]
    assert result.results["runs"]["sgd"]["skipped"] == "failed in round 1: ValueError: boom"
    with pytest.raises(RuntimeError, match="the baseline failed in round 1: ValueError: boom"):
        bench(["sgd"], model="tiny", repeats=2, out=tmp_path / "b", peers="none", runner=FakeRunner(fail_name="adamw"),
              peak_flops=PEAK)
    assert not (tmp_path / "b").exists()


def test_time_to_target_interpolates():
    curve = [[0.0, 6.0, 0], [2.0, 5.0, 5], [4.0, 3.0, 10]]
    assert time_to_target(curve, 4.0) == (3.0, 7.5)
    assert time_to_target(curve, 6.5) == (0.0, 0)
    assert time_to_target(curve, 2.0) == (None, None)
    assert time_to_target(curve, 3.0 - 1e-5) == (4.0, 10)  # float noise below the target still reaches it


def test_float_noise_is_equal_not_worse():
    from llmopt.measure.bench_report import verdict

    s = {"ratio": 1.000001, "ratio_min": 1.000001, "ratio_max": 1.000002, "n": 3}
    assert verdict("val_loss", s).startswith("equal to the baseline within")
    assert verdict("val_loss", {**s, "ratio_max": 1.01}).startswith("worse")


def test_greedy_agreement_is_per_round():
    section = {"baseline": "baseline", "runs": {
        "baseline": {"repeats": [{"new_token_ids": [[1, 2, 3, 4]]}, {"new_token_ids": [[1, 2, 3, 4]]}]},
        "int4": {"repeats": [{"new_token_ids": [[1, 2, 9, 4]]}, {"new_token_ids": [[1, 2, 3, 4]]}]}}}
    add_round_figures(section)
    assert [r["greedy_token_accuracy"] for r in section["runs"]["int4"]["repeats"]] == [0.75, 1.0]
    assert [r["greedy_tokens_identical"] for r in section["runs"]["int4"]["repeats"]] == [False, True]


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    from llmopt.cli import main

    (tmp_path / "taken").mkdir()
    cases = [(["bench", "nonsense", "--model", "tiny"], "error: unknown technique 'nonsense'; registered:"),
             (["bench", "sgd:rank=3", "--model", "tiny"], "sgd:rank=3': sgd has no option 'rank'"),
             (["bench", "sgd", "--model", "tiny", "--workload", "serve"], "error: unknown workload 'serve'"),
             (["bench", "sgd", "--model", "tiny", "--workload", "generate"],
              "error: 'sgd' cannot run the generate workload"),
             (["bench", "sgd", "--model", "tiny", "--out", str(tmp_path / "taken")], "already exists"),
             (["bench", "train.precision=bf16", "--model", "tiny", "--peers", "transformers", "--workload", "eval",
               "--out", str(tmp_path / "x")], "error: --peers 'transformers' cannot run the eval workload"),
             (["report", str(tmp_path / "taken")], "no results.json")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
