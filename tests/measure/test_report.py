import json
import math

import pytest

from llmopt.measure import (compare_runs, load_results, machine_info, plot_curves, plot_ratios, render_markdown,
                            summarize, verdict, versions, write_report, write_results)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(candidate_times=(0.5, 0.55, 0.45), measured=False):
    base_times = (1.0, 1.1, 0.9)
    return {
        "command": "llmopt bench fast --model tiny",
        "machine": machine_info(),
        "versions": versions(),
        "workload": {"name": "train tiny", "batch": 2, "seq_len": 16},
        "baseline": "baseline",
        "runs": {
            "baseline": {"kind": "baseline", "skipped": None, "repeats": [
                {"step_time_s": t, "peak_rss_bytes": 100 * 2**20, "energy_j": 2.0, "energy_measured": measured,
                 "energy_method": "rapl" if measured else "estimated"} for t in base_times]},
            "fast": {"kind": "candidate", "skipped": None, "repeats": [
                {"step_time_s": t, "peak_rss_bytes": 80 * 2**20, "energy_j": 1.0 + i / 10, "energy_measured": measured,
                 "energy_method": "rapl" if measured else "estimated"} for i, t in enumerate(candidate_times)]},
            "peft-lora": {"kind": "peer", "skipped": "peft is not installed", "repeats": []},
        },
    }


def test_summarize_takes_ratios_per_round():
    results = _results(candidate_times=(0.5, 1.1, 0.45))
    s = summarize(results["runs"], "baseline")
    assert "peft-lora" not in s
    t = s["fast"]["step_time_s"]
    assert (t["median"], t["min"], t["max"]) == (0.5, 0.45, 1.1)
    # rounds: 0.5/1.0, 1.1/1.1, 0.45/0.9
    assert (t["ratio"], t["ratio_min"], t["ratio_max"]) == (0.5, 0.5, 1.0)
    assert s["fast"]["peak_rss_bytes"]["ratio"] == pytest.approx(0.8)
    assert "energy_method" not in s["fast"] and "energy_measured" not in s["fast"]
    assert s["baseline"]["step_time_s"]["ratio"] == 1.0
    with pytest.raises(ValueError, match="baseline"):
        summarize(results["runs"], "nope")


def test_verdicts_are_honest():
    band = lambda lo, mid, hi: {"ratio": mid, "ratio_min": lo, "ratio_max": hi, "n": 5}  # noqa: E731
    assert verdict("step_time_s", band(0.7, 0.8, 0.9)).startswith("better")
    assert verdict("tokens_per_s", band(0.7, 0.8, 0.9)).startswith("worse")
    assert verdict("step_time_s", band(0.8, 0.95, 1.2)).startswith("within noise")
    assert verdict("accounted_bytes", band(1.0, 1.0, 1.0)) == "identical to the baseline"
    assert verdict("widgets", band(1.1, 1.2, 1.3)).startswith("differs")


def test_markdown_table(tmp_path):
    md = render_markdown(_results())
    assert "| run | kind | step_time_s | step_time_s ratio |" in md
    assert "energy_j (estimated)" in md
    assert "| baseline | baseline | 1 (0.9–1.1) | ×1 |" in md
    assert "| fast | candidate | 0.5 (0.45–0.55) | ×0.5 |" in md
    assert "80 MiB" in md and "×0.8" in md
    assert "| peft-lora | peer | skipped: peft is not installed |" in md
    assert "`fast` step_time_s: ×0.5: better: whole band below 1.0" in md
    assert "`fast` energy_j (estimated): ×0.55 (0.5–0.6): better" in md
    assert "(estimated)" not in render_markdown(_results(measured=True))
    # a candidate whose band straddles 1.0 is not claimed as a gain
    assert "within noise" in render_markdown(_results(candidate_times=(0.9, 1.3, 0.8)))


def test_write_results_is_valid_json_and_loads_back(tmp_path):
    results = _results()
    results["runs"]["fast"]["repeats"][0]["loss"] = math.nan  # unmeasured values become null
    path = write_results(tmp_path / "run", results)
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    loaded = load_results(tmp_path / "run")
    assert loaded["runs"]["fast"]["repeats"][0]["loss"] is None
    assert loaded["baseline"] == "baseline"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="runs"):
        load_results(tmp_path / "bad.json")
    with pytest.raises(TypeError, match=r"results\.runs\.fast\.repeats\[0\]\.obj"):
        results["runs"]["fast"]["repeats"][0]["obj"] = object()
        write_results(tmp_path / "x", results)


def test_write_report_writes_json_markdown_and_pngs(tmp_path):
    curves = {"baseline": [(0, 5.5), (1, 5.0), (2, 4.6)], "fast": [(0, 5.5), (1, 5.1), (2, 4.7)]}
    paths = write_report(tmp_path, _results(), curves=curves)
    assert set(paths) == {"results.json", "report.md", "ratios.png", "curves.png"}
    for name in ("ratios.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["fast"]["step_time_s"]["ratio"] == 0.5
    assert "| fast | candidate |" in (tmp_path / "report.md").read_text()


def test_plots_standalone(tmp_path):
    assert plot_ratios(_results(), tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC
    only_baseline = _results()
    del only_baseline["runs"]["fast"]
    assert plot_ratios(only_baseline, tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_curves({"a": [(0, 1.0), (10, 0.5)]}, tmp_path / "c.png", log_y=True).read_bytes()[:8] == PNG_MAGIC


def test_several_workloads_render_one_table_each():
    a, b = _results(), _results()
    b["workload"] = "decode tiny"
    results = {"command": "llmopt bench", "workloads": [a, b]}
    md = render_markdown(results)
    assert md.count("| run | kind |") == 2 and "## decode tiny" in md and "## train tiny" in md


def test_compare_runs():
    before, after = _results(), _results(candidate_times=(0.9, 1.05, 0.95))
    md = compare_runs(before, after, labels=("old", "new"))
    assert "| run | figure | old ratio | new ratio | change |" in md
    row = next(line for line in md.splitlines() if line.startswith("| fast | step_time_s"))
    assert "new higher, bands apart" in row
    rss = next(line for line in md.splitlines() if line.startswith("| fast | peak_rss_bytes"))
    assert "no clear change" in rss


def test_machine_info_and_versions():
    info = machine_info()
    assert info["logical_cores"] >= 1 and info["torch"] and info["python"]
    v = versions()
    assert "torch" in v and "surely-not-installed-package" not in versions(("surely-not-installed-package",))
