import math

import pytest

from llmopt.measure import Timer, interleaved, median_min_max
from llmopt.measure.timing import rotated


class FakeClock:
    """A clock that only moves when a fake workload says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_median_min_max():
    assert median_min_max([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert median_min_max([4, 1, 2, 3]).median == 2.5
    assert median_min_max([1.0, math.nan, None, 5.0]) == (3.0, 1.0, 5.0)
    assert all(math.isnan(v) for v in median_min_max([]))


def test_timer_uses_the_clock():
    clock = FakeClock()
    with Timer(clock=clock) as t:
        clock.now += 2.5
    assert t.seconds == 2.5


def test_rotation():
    assert [rotated(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_interleaved_rotates_and_computes_ratios_within_each_round():
    clock = FakeClock()
    calls = []

    def work(name, cost):
        def fn():
            calls.append(name)
            timed_round = (len(calls) - 1 - 3) // 3  # 3 warm-up calls, then rounds of 3
            clock.now += cost * (10.0 if timed_round % 2 else 1.0)  # every other round is 10x slower
            return name
        return fn

    candidates = {"base": work("base", 1.0), "fast": work("fast", 0.5), "slow": work("slow", 2.0)}
    result = interleaved(candidates, repeats=4, warmup=1, clock=clock)

    assert calls[:3] == ["base", "fast", "slow"]  # warm-up
    assert result.orders == [["base", "fast", "slow"], ["fast", "slow", "base"],
                             ["slow", "base", "fast"], ["base", "fast", "slow"]]
    assert calls[3:] == [n for order in result.orders for n in order]
    assert result.times["base"] == [1.0, 10.0, 1.0, 10.0]
    assert result.ratios["fast"] == [0.5] * 4 and result.ratios["slow"] == [2.0] * 4
    assert result.ratios["base"] == [1.0] * 4
    summary = result.summary()
    assert summary["fast"]["ratio"] == summary["fast"]["ratio_min"] == summary["fast"]["ratio_max"] == 0.5
    assert (summary["base"]["min"], summary["base"]["max"]) == (1.0, 10.0)
    assert result.returns["slow"] == ["slow"] * 4


def test_interleaved_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        interleaved({}, repeats=3)
    with pytest.raises(ValueError, match="repeats"):
        interleaved({"a": lambda: None}, repeats=0)
