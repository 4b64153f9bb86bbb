"""Wall-clock timing that survives a noisy machine: same-run, interleaved, reported as ratios.

On a shared CPU machine the speed of the whole box drifts by 10-100x for minutes at a time, so an
absolute time means little and two runs measured minutes apart cannot be compared. `interleaved`
runs the candidates in rounds (A B C, then B C A, then C A B, ...), so every candidate sees the same
slow and fast periods, and it divides by the baseline *within each round* before taking the median.
The min-max of those per-round ratios is the noise band the report quotes: a gain shows only when the
whole band is on one side of 1.0.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple


class Spread(NamedTuple):
    """Median and range of a set of measurements."""

    median: float
    min: float
    max: float


def median_min_max(values: Iterable[float]) -> Spread:
    """(median, min, max) of the finite values; all NaN when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return Spread(math.nan, math.nan, math.nan)
    return Spread(statistics.median(finite), min(finite), max(finite))


def _cuda_synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Timer:
    """`with Timer() as t: work()` then `t.seconds`.

    `cuda_sync=True` waits for queued CUDA work on entry and exit, so GPU time is not reported as the
    time to enqueue kernels (a no-op without CUDA). `clock` is injectable for tests.
    """

    def __init__(self, *, cuda_sync: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        self.cuda_sync = cuda_sync
        self.clock = clock
        self.seconds: float = math.nan
        self._start = 0.0

    def __enter__(self) -> "Timer":
        if self.cuda_sync:
            _cuda_synchronize()
        self._start = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda_sync:
            _cuda_synchronize()
        self.seconds = self.clock() - self._start


@dataclass
class InterleavedResult:
    """What `interleaved` measured. The first name is the baseline."""

    names: list[str]
    """Candidate names in the order given; names[0] is the baseline."""
    orders: list[list[str]] = field(default_factory=list)
    """The order the candidates ran in, per timed round."""
    times: dict[str, list[float]] = field(default_factory=dict)
    """Seconds per call, per round, for each name."""
    ratios: dict[str, list[float]] = field(default_factory=dict)
    """time / baseline time, computed within each round (the baseline's are all 1.0)."""
    returns: dict[str, list[Any]] = field(default_factory=dict)
    """What each call returned, per round (for figures the callable measures itself)."""

    @property
    def baseline(self) -> str:
        return self.names[0]

    def summary(self) -> dict[str, dict[str, float]]:
        """{name: {median, min, max, ratio, ratio_min, ratio_max}} of the times and per-round ratios."""
        out = {}
        for name in self.names:
            t, r = median_min_max(self.times[name]), median_min_max(self.ratios[name])
            out[name] = {"median": t.median, "min": t.min, "max": t.max,
                         "ratio": r.median, "ratio_min": r.min, "ratio_max": r.max}
        return out


def rotated(names: list[str], round_index: int) -> list[str]:
    """`names` rotated left by `round_index`: round 0 is A B C, round 1 is B C A, ..."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def interleaved(candidates: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter, cuda_sync: bool = False) -> InterleavedResult:
    """Time each callable `repeats` times, one call of each per round, in an order rotated every round.

    The first entry of `candidates` is the baseline. Each name first runs `warmup` untimed calls (in the
    same rotated fashion). The ratio of a candidate in a round is its time divided by the baseline's
    time in that same round; summarize with `InterleavedResult.summary()` (median and min-max over
    rounds). `clock` returns seconds and is injectable, so tests can use a deterministic fake clock.
    """
    if not candidates:
        raise ValueError("interleaved needs at least one candidate (the first is the baseline)")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(candidates)
    for w in range(warmup):
        for name in rotated(names, w):
            candidates[name]()
    result = InterleavedResult(names=names, times={n: [] for n in names}, ratios={n: [] for n in names},
                               returns={n: [] for n in names})
    for r in range(repeats):
        order = rotated(names, r)
        result.orders.append(order)
        for name in order:
            with Timer(cuda_sync=cuda_sync, clock=clock) as t:
                value = candidates[name]()
            result.times[name].append(t.seconds)
            result.returns[name].append(value)
        base = result.times[names[0]][-1]
        for name in names:
            result.ratios[name].append(result.times[name][-1] / base if base > 0 else math.nan)
    return result
