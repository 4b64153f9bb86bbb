"""report.md and the plots of a bench: a headline table first, then every figure (`measure.report`).

The headline has one row per headline figure and one column per run (peers are columns too): the
baseline's median (min–max) over repeats, and for every other run its median, its ratio to the
baseline of the same round (median, min–max over rounds) and a mark: `better` / `worse` when the whole
band is on one side of 1.0, `≈` when it contains 1.0, `=` when identical. Then the verdict lines and
time-to-target. The full table of every figure follows (`measure.report.render_markdown`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from llmopt.measure.report import _fmt, _fmt_ratio, load_results, render_markdown, sections, write_results
from llmopt.measure.report import verdict as report_verdict

EQUAL_RTOL = 1e-4
"""A ratio band inside 1 ± this is float noise (a compiled kernel's summation order), not a difference."""

HEADLINE = {
    "train": ["step_time_s", "tokens_per_s", "train_loss", "val_loss", "time_to_target_s", "peak_rss_bytes",
              "cuda_peak_bytes", "accounted_total_bytes", "activations_bytes", "optimizer_state_bytes", "mfu",
              "energy_per_step_j", "tokens_per_joule"],
    "generate": ["prefill_tokens_per_s", "decode_tokens_per_s", "greedy_token_accuracy", "peak_rss_bytes",
                 "cuda_peak_bytes", "tokens_per_joule"],
    "eval": ["ppl", "eval_tokens_per_s", "peak_rss_bytes", "cuda_peak_bytes", "tokens_per_joule"],
}
"""Figures of the headline table and the ratio plot, per workload."""

_MARKS = (("better", "better"), ("worse", "worse"), ("within noise", "≈"), ("identical", "="), ("equal", "="),
          ("differs", "≠"))


def verdict(figure: str, s: dict[str, Any]) -> str:
    """`measure.report.verdict`, except that a band inside 1 ± EQUAL_RTOL is called equal, not better or worse."""
    lo, hi = s.get("ratio_min"), s.get("ratio_max")
    if lo is not None and hi is not None and not lo == hi == 1.0 and 1 - EQUAL_RTOL <= lo <= hi <= 1 + EQUAL_RTOL:
        return f"equal to the baseline within {EQUAL_RTOL:g} (float rounding)"
    return report_verdict(figure, s)


def _workload_kind(section: dict[str, Any]) -> str:
    w = section.get("workload")
    name = w.get("name", "") if isinstance(w, dict) else str(w or "")
    return name.split()[0] if name.split() and name.split()[0] in HEADLINE else "train"


def headline_figures(section: dict[str, Any]) -> list[str]:
    present = {f for figs in section["summary"].values() for f in figs}
    return [f for f in HEADLINE[_workload_kind(section)] if f in present]


def _estimated(section: dict[str, Any], figure: str) -> bool:
    if "energy" not in figure and "joule" not in figure:
        return False
    return any(r.get("energy_measured") is not True for run in section["runs"].values() for r in run.get("repeats", []))


def _mark(figure: str, s: dict[str, Any]) -> str:
    v = verdict(figure, s)
    return next((m for prefix, m in _MARKS if v.startswith(prefix)), "")


def progress_figures(rep: dict[str, Any]) -> str:
    """A few figures of one repeat for the progress line."""
    parts = []
    for key, label, fmt in (("step_time_s", "step", "{:.3g} s"), ("tokens_per_s", "", "{:.0f} tok/s"),
                            ("val_loss", "val loss", "{:.4f}"), ("prefill_tokens_per_s", "prefill", "{:.0f} tok/s"),
                            ("decode_tokens_per_s", "decode", "{:.0f} tok/s"), ("ppl", "ppl", "{:.3f}"),
                            ("eval_tokens_per_s", "", "{:.0f} tok/s")):
        v = rep.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            parts.append((label + " " if label else "") + fmt.format(v))
    if rep.get("peak_rss_bytes"):
        parts.append(f"peak RSS {_fmt(rep['peak_rss_bytes'], '_bytes')}")
    return ", ".join(parts)


def _ordered(section: dict[str, Any]) -> list[str]:
    rank = {"baseline": 0, "candidate": 1, "peer": 2}
    runs = section["runs"]
    return sorted(runs, key=lambda n: (n != section["baseline"], rank.get(runs[n].get("kind"), 1)))


def _section_headline(section: dict[str, Any]) -> list[str]:
    runs, summary, baseline = section["runs"], section["summary"], section["baseline"]
    w = section.get("workload")
    title = w.get("name") if isinstance(w, dict) else str(w)
    repeats = len(runs[baseline].get("repeats", []))
    active = [n for n in _ordered(section) if not runs[n].get("skipped") and n in summary]
    lines = [f"## {title}", ""]
    if isinstance(w, dict):
        keys = [k for k in w if k not in ("name", "model_config")]
        lines += ["Setup: " + ", ".join(f"{k} {w[k]}" for k in keys), ""]
    lines += [f"{repeats} interleaved rounds, each run a fresh process; baseline cells are median (min–max) over "
              "rounds, other cells median · ratio to the baseline of the same round, median (min–max) over "
              "rounds, and a mark: better / worse when the whole band is on one side of 1.0, ≈ when the band "
              "includes 1.0.", ""]
    header = ["figure"] + [f"{n} ({runs[n].get('kind')})" if n != baseline else n for n in active]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fig in headline_figures(section):
        label = fig + (" (estimated)" if _estimated(section, fig) else "")
        row = [label]
        for name in active:
            s = summary[name].get(fig)
            if s is None:
                row.append("n/a")
            elif name == baseline:
                band = "" if s["min"] == s["max"] else f" ({_fmt(s['min'], fig)}–{_fmt(s['max'], fig)})"
                row.append(_fmt(s["median"], fig) + band)
            else:
                row.append(f"{_fmt(s['median'], fig)} · {_fmt_ratio(s)} {_mark(fig, s)}".rstrip())
        lines.append("| " + " | ".join(row) + " |")
    skipped = [n for n in _ordered(section) if runs[n].get("skipped")]
    if skipped:
        lines += [""] + [f"- `{n}` ({runs[n].get('kind')}): skipped: {runs[n]['skipped']}" for n in skipped]
    findings = []
    for name in active[1:]:
        for fig in headline_figures(section):
            s = summary[name].get(fig)
            if s is None or s.get("ratio") is None or fig == "time_to_target_s":
                continue
            est = " (estimated)" if _estimated(section, fig) else ""
            findings.append(f"- `{name}` {fig}{est}: {_fmt_ratio(s)}: {verdict(fig, s)}")
        findings += _time_to_target_line(section, name)
    if findings:
        lines += ["", "Verdicts against the baseline:", ""] + findings
    return lines


def _time_to_target_line(section: dict[str, Any], name: str) -> list[str]:
    reps = section["runs"][name].get("repeats", [])
    if not reps or "time_to_target_s" not in reps[0]:
        return []
    reached = sum(1 for r in reps if r.get("time_to_target_s") is not None)
    s = section["summary"][name].get("time_to_target_s")
    target = (reps[0].get("info") or {}).get("target_val_loss")
    head = f"- `{name}` time to the baseline's final val loss ({_fmt(target)} in round 1)"
    if not s or s.get("ratio") is None:
        return [f"{head}: not reached in any of {len(reps)} rounds"]
    return [f"{head}: {_fmt_ratio(s)} of the baseline's time, reached in {reached}/{len(reps)} rounds: "
            f"{verdict('time_to_target_s', s)}"]


def _machine_lines(results: dict[str, Any]) -> list[str]:
    machine = results.get("machine") or {}
    lines = []
    peak = machine.get("peak_flops")
    if isinstance(peak, dict) and peak.get("peak_flops"):
        low, high = peak.get("min", math.nan) / 1e9, peak.get("max", math.nan) / 1e9
        lines.append(f"MFU is against this machine's measured matmul peak, {peak['peak_flops'] / 1e9:.1f} GFLOP/s "
                     f"({low:.1f}–{high:.1f}; {peak.get('dtype')} {peak.get('size')}x{peak.get('size')} matmul, "
                     f"{peak.get('threads')} threads, {peak.get('device')}), measured once before the runs: "
                     "not a datasheet peak.")
    energy = {r.get("energy_method") for s in sections(results) for run in s["runs"].values()
              for r in run.get("repeats", [])} - {None, ""}
    if energy and energy <= {"estimated"}:
        lines.append("Energy is estimated (CPU seconds x watts per core, `measure.energy`), not measured: compare "
                     "runs of this report only.")
    elif energy:
        lines.append(f"Energy method: {', '.join(sorted(energy))}.")
    return lines


def render_headline(results: dict[str, Any]) -> str:
    """The headline tables and verdicts of every workload (what `bench_table` returns)."""
    lines: list[str] = []
    for section in sections(results):
        lines += _section_headline(section) + [""]
    return "\n".join(lines + _machine_lines(results)).rstrip() + "\n"


def render_bench_markdown(results: dict[str, Any]) -> str:
    """report.md: command, headline per workload, then every figure of every run (measure.report)."""
    full = render_markdown(results).split("\n")
    full = ["# All figures" if ln == "# llmopt bench report" else ("#" + ln if ln.startswith("## ") else ln)
            for ln in full]
    head = ["# llmopt bench report", ""]
    if results.get("command"):
        head += [f"Command: `{results['command']}`", ""]
    return "\n".join(head) + render_headline(results) + "\n" + "\n".join(full)


def write_bench_outputs(out_dir: str | Path, results: dict[str, Any]) -> str:
    """results.json (with summaries), report.md, ratios.png and, for training, the loss-curve PNGs."""
    from llmopt.measure.plots import plot_curves, plot_ratios

    out_dir = Path(out_dir)
    results = dict(results)
    filled = sections(results)
    if "workloads" in results:
        results["workloads"] = filled
    else:
        results["summary"] = filled[0]["summary"]
    path = write_results(out_dir, results)
    os.chmod(path, 0o666 & ~umask())  # written through mkstemp, which makes it private
    markdown = render_bench_markdown(results)
    tmp = out_dir / ".report.md.tmp"
    tmp.write_text(markdown)
    tmp.replace(out_dir / "report.md")
    figures = [f for s in filled for f in headline_figures(s)]
    plot_ratios(results, out_dir / "ratios.png", figures=list(dict.fromkeys(figures)))
    for section in filled:
        runs = {n: r["repeats"][0] for n, r in section["runs"].items() if r.get("repeats")}
        if any("loss_curve" in rep for rep in runs.values()):
            plot_curves({n: [tuple(p[:2]) for p in rep.get("loss_curve", [])] for n, rep in runs.items()},
                        out_dir / "loss_curves.png", xlabel="step", ylabel="train loss (round 1)")
            plot_curves({n: [tuple(p[:2]) for p in rep.get("val_curve", [])] for n, rep in runs.items()},
                        out_dir / "val_loss_vs_time.png", xlabel="training seconds (round 1, evaluation excluded)",
                        ylabel="validation loss")
    return markdown


def umask() -> int:
    """This process's umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def rerender(run_dir: str | Path) -> str:
    """`llmopt report DIR`: rewrite report.md and the PNGs from DIR/results.json; returns the Markdown.

    The figures paired with the baseline's round (time-to-target, greedy agreement) and the summaries
    are recomputed from the stored repeats, so a report follows the current rules.
    """
    from llmopt.measure.bench import add_round_figures

    results = load_results(run_dir)
    for section in results.get("workloads") or [results]:
        add_round_figures(section)
        section.pop("summary", None)
    return write_bench_outputs(run_dir, results)
