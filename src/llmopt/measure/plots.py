"""PNG plots of a bench: ratios to the baseline with their noise bands, and loss curves.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), so it
works headless and never disturbs a caller's own matplotlib state.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _canvas(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_ratios(results: dict[str, Any], path: str | Path, *, figures: list[str] | None = None) -> Path:
    """Horizontal bars of each run's median ratio to the baseline, min-max error bars, a line at 1.0.

    One panel per (workload, figure); `figures` restricts which figures are drawn. Skipped runs and
    the baseline itself are left out. Returns the path written.
    """
    from llmopt.measure.report import sections

    panels = []
    for section in sections(results):
        baseline = section["baseline"]
        for figure_name in figures or _figure_names(section["summary"]):
            bars = [(name, s[figure_name]) for name, s in section["summary"].items()
                    if name != baseline and figure_name in s and s[figure_name].get("ratio") is not None
                    and math.isfinite(s[figure_name]["ratio"])]
            if bars:
                panels.append((section.get("workload"), figure_name, bars))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not panels:
        figure = _canvas(6, 1.5)
        figure.text(0.5, 0.5, "no ratios to plot (only a baseline, or every candidate skipped)", ha="center")
        figure.savefig(path)
        return path
    heights = [0.6 + 0.35 * len(bars) for _, _, bars in panels]
    figure = _canvas(7, sum(heights) + 0.4 * len(panels))
    axes = figure.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (workload, figure_name, bars) in zip(axes, panels):
        names = [name for name, _ in bars]
        ratios = [s["ratio"] for _, s in bars]
        low = [max(s["ratio"] - s.get("ratio_min", s["ratio"]), 0) for _, s in bars]
        high = [max(s.get("ratio_max", s["ratio"]) - s["ratio"], 0) for _, s in bars]
        ax.barh(range(len(bars)), ratios, xerr=[low, high], capsize=3, color="tab:blue", alpha=0.7)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(range(len(bars)), names)
        ax.invert_yaxis()
        label = _workload_label(workload)
        ax.set_title(f"{figure_name} / baseline" + (f"  [{label}]" if label else ""), fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: str | Path, *, xlabel: str = "step",
                ylabel: str = "loss", log_y: bool = False) -> Path:
    """One line per name through its (step, value) points, e.g. training loss of baseline and candidates."""
    figure = _canvas(7, 4)
    ax = figure.subplots()
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if any(curves.values()):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _figure_names(summary: dict[str, dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for figures in summary.values():
        names.extend(f for f in figures if f not in names)
    return names


def _workload_label(workload: Any) -> str:
    if isinstance(workload, dict):
        return str(workload.get("name", ""))
    return "" if workload is None else str(workload)
