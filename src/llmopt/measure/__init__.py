"""Measurement: the proof of every claim (DESIGN.md §7).

Pure primitives that `llmopt bench` composes: interleaved timing reported as same-round ratios
(`timing`), measured and accounted memory (`memory`), FLOPs and MFU (`flops`), energy that is measured
or labelled estimated (`energy`), sliding-window perplexity (`perplexity`), and the results.json /
report.md / PNG writer with its schema (`report`, `plots`, `machine`).

Names are imported lazily on first use, so `import llmopt.measure` (and the subprocess child that
`run_in_subprocess` starts) does not pull in torch before the measured function does.
"""

import importlib

_EXPORTS = {
    "energy": ["ESTIMATE_WATTS_PER_CORE", "EnergyMeter", "RaplReader", "flops_per_joule", "joules_per_step",
               "tokens_per_joule"],
    "flops": ["count_flops", "estimate_train_flops", "matmul_weight_count", "measure_peak_flops", "mfu",
              "train_step_flops"],
    "machine": ["machine_info", "versions"],
    "memory": ["AccountedMemory", "account_training_step", "cuda_peak_bytes", "peak_rss_bytes", "reset_cuda_peak",
               "run_in_subprocess", "saved_activation_bytes"],
    "perplexity": ["perplexity", "sliding_windows"],
    "plots": ["plot_curves", "plot_ratios"],
    "report": ["compare_runs", "load_results", "new_results", "render_markdown", "summarize", "verdict",
               "write_report", "write_results"],
    "timing": ["InterleavedResult", "Spread", "Timer", "interleaved", "median_min_max"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'llmopt.measure' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llmopt.measure.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
