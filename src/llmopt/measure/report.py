"""results.json, report.md and the plots of a bench, and the comparison of two benches.

The results.json schema (what `llmopt bench` writes and `llmopt report` reads)::

    {
      "command":  "llmopt bench lora --model tiny ...",      # how to reproduce the run
      "machine":  {...},             # machine_info(): cpu, cores, memory, torch, python, cuda
      "versions": {"torch": "2.13.0", ...},                 # versions(): installed key packages
      "workload": "train tiny b8 t128" | {"name": ..., ...}, # what every run did
      "baseline": "baseline",        # the name in "runs" every ratio divides by
      "runs": {
        NAME: {
          "kind": "baseline" | "candidate" | "peer",   # peer: another library doing the same thing
          "skipped": null | "peft is not installed",   # why a run did not happen (then repeats is [])
          "repeats": [ {FIGURE: number, ...}, ... ]    # one dict per interleaved round, in round order;
        }                                              # non-numbers (e.g. "energy_method") are kept
      },                                               # but not summarized
      "summary": {                   # summarize(runs, baseline); recomputed when absent
        NAME: {FIGURE: {"median", "min", "max",            # of the values over repeats
                        "ratio", "ratio_min", "ratio_max",   # of value / baseline value, per round
                        "n"}}                                # repeats that have the figure
      }
    }

Several workloads in one file: put the per-workload keys ("workload", "baseline", "runs", "summary")
in a list under "workloads"; "command", "machine" and "versions" stay at the top.

Ratios are taken per repeat index (round i of a candidate over round i of the baseline, which ran
next to each other; see `llmopt.measure.timing.interleaved`), then summarized by median and min-max.
The min-max is the noise band: the report calls a difference a gain (or a loss) only when the whole
band lies on one side of 1.0, and "within noise" otherwise.

Figure names carry their unit and direction: `*_s` and `*_bytes` and `*_j`, `loss`, `ppl` are better
lower; `*_per_s`, `*_per_joule`, `mfu`, `accuracy` better higher. An energy figure is labelled
"(estimated)" unless every repeat has `"energy_measured": true`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from llmopt.measure.machine import machine_info, versions
from llmopt.measure.plots import plot_curves, plot_ratios
from llmopt.measure.timing import median_min_max

KINDS = ("baseline", "candidate", "peer")
HIGHER_IS_BETTER = ("_per_s", "_per_joule", "mfu", "accuracy", "acceptance_rate")
LOWER_IS_BETTER = ("_s", "_bytes", "_j", "loss", "ppl", "perplexity", "nll")


def better_direction(figure: str) -> str | None:
    """"higher", "lower" or None (unknown) for a figure name, from its suffix."""
    if figure.endswith(HIGHER_IS_BETTER):
        return "higher"
    if figure.endswith(LOWER_IS_BETTER):
        return "lower"
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def summarize(runs: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, dict[str, float | None]]]:
    """{name: {figure: {median, min, max, ratio, ratio_min, ratio_max}}} over the numeric figures.

    Ratios pair repeat i with the baseline's repeat i (the same interleaved round); a figure the baseline
    lacks, or where the baseline is 0, gets ratio None. Skipped runs are left out.
    """
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not among the runs: {', '.join(runs)}")
    base = runs[baseline].get("repeats", [])
    summary = {}
    for name, run in runs.items():
        repeats = run.get("repeats") or []
        if run.get("skipped") or not repeats:
            continue
        figures: list[str] = []
        for r in repeats:
            figures.extend(k for k, v in r.items() if k not in figures and _number(v) is not None)
        out = {}
        for fig in figures:
            values = [_number(r.get(fig)) for r in repeats]
            spread = median_min_max(v for v in values if v is not None)
            ratios = []
            for value, b in zip(values, base):
                b = _number(b.get(fig))
                if value is not None and b is not None and b != 0:
                    ratios.append(value / b)
            r = median_min_max(ratios)
            out[fig] = {"median": spread.median, "min": spread.min, "max": spread.max,
                        "ratio": r.median if ratios else None, "ratio_min": r.min if ratios else None,
                        "ratio_max": r.max if ratios else None, "n": len([v for v in values if v is not None])}
        summary[name] = out
    return summary


def sections(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The workloads of `results` (one, or the "workloads" list), each with its summary filled in."""
    items = results.get("workloads") or [results]
    out = []
    for item in items:
        if "runs" not in item or "baseline" not in item:
            raise ValueError("results have no 'runs' and 'baseline': not a llmopt bench results.json "
                             "(see the schema in llmopt.measure.report)")
        section = dict(item)
        if not section.get("summary"):
            section["summary"] = summarize(section["runs"], section["baseline"])
        out.append(section)
    return out


# ---- JSON --------------------------------------------------------------------------------

def _jsonable(value: Any, where: str = "results") -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # JSON has no NaN: an unmeasured value is null
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and hasattr(value, "shape") and math.prod(value.shape) == 1:
        return _jsonable(value.item(), where)  # numpy scalars, one-element tensors
    raise TypeError(f"{where} is a {type(value).__name__}, which results.json cannot hold; "
                    "store numbers, strings, lists and dicts")


def write_results(out_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write `out_dir/results.json` atomically (temp file + rename); NaN and inf become null."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _write_atomic(out_dir / "results.json", json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n")


def _write_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a results.json (or the one inside a run directory) and check it has the schema's keys."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; point at a `llmopt bench --out` directory")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun `llmopt bench` to rewrite it") from e
    try:
        sections(results)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return results


def new_results(*, command: str, workload: Any, baseline: str) -> dict[str, Any]:
    """An empty results dict with machine and versions filled in, ready for runs to be added."""
    return {"command": command, "machine": machine_info(), "versions": versions(), "workload": workload,
            "baseline": baseline, "runs": {}, "summary": {}}


# ---- Markdown ----------------------------------------------------------------------------

def _fmt(value: float | None, figure: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if figure.endswith("_bytes"):
        for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= scale:
                return f"{value / scale:.4g} {unit}"
        return f"{value:.0f} B"
    return f"{value:.4g}"


def _fmt_ratio(s: dict[str, Any]) -> str:
    if s.get("ratio") is None:
        return "n/a"
    if s.get("n", 2) < 2 or s["ratio_min"] == s["ratio_max"]:
        return f"×{s['ratio']:.3g}"
    return f"×{s['ratio']:.3g} ({s['ratio_min']:.3g}–{s['ratio_max']:.3g})"


def verdict(figure: str, s: dict[str, Any]) -> str:
    """One honest phrase: whether the ratio's noise band clears 1.0, and in which direction."""
    if s.get("ratio") is None:
        return "no ratio (baseline lacks this figure)"
    lo, hi = s["ratio_min"], s["ratio_max"]
    if lo == hi == 1.0:
        return "identical to the baseline"
    if s.get("n", 2) < 2 and lo != hi:
        return "one repeat: no noise band, no verdict"
    if lo <= 1.0 <= hi:
        return "within noise (band includes 1.0)"
    direction = better_direction(figure)
    side = "below" if hi < 1.0 else "above"
    if direction is None:
        return f"differs (whole band {side} 1.0)"
    good = (side == "below") == (direction == "lower")
    return f"{'better' if good else 'worse'}: whole band {side} 1.0"


def _energy_estimated(runs: dict[str, Any], figure: str) -> bool:
    if "energy" not in figure and "joule" not in figure:
        return False
    return any(r.get("energy_measured") is not True for run in runs.values() for r in run.get("repeats", []))


def _ordered_runs(section: dict[str, Any]) -> list[str]:
    runs, baseline = section["runs"], section["baseline"]
    rank = {k: i for i, k in enumerate(KINDS)}
    rest = [n for n in runs if n != baseline]
    return [baseline] + sorted(rest, key=lambda n: rank.get(runs[n].get("kind", "candidate"), 1))


def _section_markdown(section: dict[str, Any]) -> list[str]:
    runs, summary, baseline = section["runs"], section["summary"], section["baseline"]
    figures: list[str] = []
    for name in _ordered_runs(section):
        figures.extend(f for f in summary.get(name, {}) if f not in figures)
    repeats = len(runs[baseline].get("repeats", []))
    workload = section.get("workload")
    title = workload.get("name", json.dumps(workload)) if isinstance(workload, dict) else workload
    lines = [f"## {title or 'workload'}", ""]
    if isinstance(workload, dict):
        lines += ["`" + json.dumps(workload, sort_keys=True) + "`", ""]
    lines += [f"Baseline `{baseline}`, {repeats} interleaved repeats; cells are median (min–max) over repeats, "
              "ratios are to the baseline of the same round.", ""]
    header = ["run", "kind"]
    for f in figures:
        label = f + (" (estimated)" if _energy_estimated(runs, f) else "")
        header += [label, f"{f} ratio"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in _ordered_runs(section):
        run = runs[name]
        row = [name, run.get("kind", "candidate")]
        if run.get("skipped"):
            row += [f"skipped: {run['skipped']}"] + [""] * max(2 * len(figures) - 1, 0)
        else:
            for f in figures:
                s = summary.get(name, {}).get(f)
                if s is None:
                    row += ["n/a", "n/a"]
                    continue
                band = "" if s["min"] == s["max"] else f" ({_fmt(s['min'], f)}–{_fmt(s['max'], f)})"
                row += [_fmt(s["median"], f) + band, _fmt_ratio(s)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    findings = []
    for name in _ordered_runs(section)[1:]:
        for f in figures:
            s = summary.get(name, {}).get(f)
            if s is not None and s.get("ratio") is not None:
                estimated = " (estimated)" if _energy_estimated(runs, f) else ""
                findings.append(f"- `{name}` {f}{estimated}: {_fmt_ratio(s)}: {verdict(f, s)}")
    if findings:
        lines += ["", "Against the baseline:", ""] + findings
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """report.md: the command, machine, versions, then one table per workload and its findings."""
    lines = ["# llmopt bench report", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    machine = results.get("machine") or {}
    if machine:
        cuda = machine.get("cuda")
        gpu = ", ".join(cuda["devices"]) if isinstance(cuda, dict) and cuda.get("devices") else "no GPU"
        lines += [f"Machine: {machine.get('cpu', '?')}, {machine.get('usable_cores', '?')} usable cores, "
                  f"{_fmt(machine.get('memory_bytes'), '_bytes')} memory, {gpu}; Python {machine.get('python', '?')}, "
                  f"torch {machine.get('torch', '?')}.", ""]
        if not isinstance(cuda, dict):
            lines += ["Absolute times on a shared CPU drift with the machine's load: read the ratios.", ""]
    if results.get("versions"):
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    for section in sections(results):
        lines += _section_markdown(section) + [""]
    return "\n".join(lines)


def compare_runs(results_a: dict[str, Any], results_b: dict[str, Any], *, labels: tuple[str, str] = ("A", "B")) -> str:
    """Markdown comparing the ratios of two benches, figure by figure, for runs present in both.

    A change is claimed only when the two ratio bands do not overlap.
    """
    a_label, b_label = labels
    lines = [f"# Comparison: {a_label} vs {b_label}", ""]
    b_sections = {json.dumps(s.get("workload"), sort_keys=True): s for s in sections(results_b)}
    for sa in sections(results_a):
        key = json.dumps(sa.get("workload"), sort_keys=True)
        sb = b_sections.get(key)
        lines += [f"## {sa.get('workload')}", ""]
        if sb is None:
            lines += [f"Not in {b_label}.", ""]
            continue
        lines += [f"| run | figure | {a_label} ratio | {b_label} ratio | change |", "|---|---|---|---|---|"]
        for name, figs in sa["summary"].items():
            if name == sa["baseline"] or name not in sb["summary"]:
                continue
            for fig, s_a in figs.items():
                s_b = sb["summary"][name].get(fig)
                if s_b is None or s_a.get("ratio") is None or s_b.get("ratio") is None:
                    continue
                overlap = s_a["ratio_min"] <= s_b["ratio_max"] and s_b["ratio_min"] <= s_a["ratio_max"]
                change = "bands overlap: no clear change" if overlap else (
                    f"{b_label} {'higher' if s_b['ratio'] > s_a['ratio'] else 'lower'}, bands apart")
                lines.append(f"| {name} | {fig} | {_fmt_ratio(s_a)} | {_fmt_ratio(s_b)} | {change} |")
        only = sorted(set(sa["summary"]) ^ set(sb["summary"]))
        if only:
            lines += ["", "In one run only: " + ", ".join(f"`{n}`" for n in only)]
        lines.append("")
    return "\n".join(lines)


def write_report(out_dir: str | Path, results: dict[str, Any], *,
                 curves: dict[str, list[tuple[float, float]]] | None = None) -> dict[str, Path]:
    """Write results.json, report.md, ratios.png (and curves.png when `curves` is given) into `out_dir`."""
    out_dir = Path(out_dir)
    results = dict(results)
    if "workloads" not in results:
        results["summary"] = sections(results)[0]["summary"]
    else:
        results["workloads"] = sections(results)
    paths = {"results.json": write_results(out_dir, results),
             "report.md": _write_atomic(out_dir / "report.md", render_markdown(results)),
             "ratios.png": plot_ratios(results, out_dir / "ratios.png")}
    if curves:
        paths["curves.png"] = plot_curves(curves, out_dir / "curves.png")
    return paths
