"""Hooks: order rule (after_* reversed), before_forward threading, state dicts."""

import pytest
from core_toys import CountingHook

from llmopt.core import HOOK_POINTS, Hook, HookList, call_hooks


class Recorder(Hook):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def on_fit_start(self, state):
        self.log.append(("on_fit_start", self.name))

    def after_backward(self, state):
        self.log.append(("after_backward", self.name))

    def before_optimizer_step(self, state):
        self.log.append(("before_optimizer_step", self.name))

    def after_optimizer_step(self, state):
        self.log.append(("after_optimizer_step", self.name))

    def on_eval(self, state, metrics):
        metrics[self.name] = len(metrics)


class AppendToBatch(Hook):
    def __init__(self, item):
        self.item = item

    def before_forward(self, state, batch):
        return batch + [self.item]


def test_order_rule():
    log = []
    hooks = HookList([Recorder("a", log), Recorder("b", log), Recorder("c", log)])
    hooks.on_fit_start(None)
    hooks.before_optimizer_step(None)
    hooks.after_backward(None)
    hooks.after_optimizer_step(None)
    assert log == [("on_fit_start", "a"), ("on_fit_start", "b"), ("on_fit_start", "c"),
                   ("before_optimizer_step", "a"), ("before_optimizer_step", "b"), ("before_optimizer_step", "c"),
                   ("after_backward", "c"), ("after_backward", "b"), ("after_backward", "a"),
                   ("after_optimizer_step", "c"), ("after_optimizer_step", "b"), ("after_optimizer_step", "a")]
    metrics = {"loss": 1.0}
    hooks.on_eval(None, metrics)
    assert metrics == {"loss": 1.0, "a": 1, "b": 2, "c": 3}


def test_before_forward_threads_the_batch():
    hooks = [AppendToBatch(1), Hook(), AppendToBatch(2)]  # the plain Hook returns None: batch unchanged
    assert call_hooks(hooks, "before_forward", None, [0]) == [0, 1, 2]
    assert HookList(hooks).before_forward(None, []) == [1, 2]
    assert call_hooks([], "before_forward", None, "batch") == "batch"


def test_unknown_point_and_non_hooks_raise():
    with pytest.raises(ValueError, match="before_backward.*on_fit_start"):
        call_hooks([], "before_backward", None)
    with pytest.raises(TypeError, match="not an llmopt Hook"):
        HookList([object()])
    assert HOOK_POINTS[0] == "on_fit_start" and len(HOOK_POINTS) == 6


def test_state_dict_round_trip_and_mismatch():
    hooks = HookList([CountingHook(), CountingHook(), Hook()])
    for _ in range(3):
        hooks.after_optimizer_step(None)
    state = hooks.state_dict()
    assert state == {"CountingHook": {"steps": 3}, "CountingHook#2": {"steps": 3}, "Hook": {}}
    fresh = HookList([CountingHook(), CountingHook(), Hook()])
    fresh.load_state_dict(state)
    assert [h.steps for h in list(fresh)[:2]] == [3, 3]
    with pytest.raises(ValueError, match=r"missing \['CountingHook#2'\], unexpected \['X'\]"):
        fresh.load_state_dict({"Hook": {}, "CountingHook": {"steps": 1}, "X": {}})
    with pytest.raises(ValueError, match="keeps no state"):
        Hook().load_state_dict({"steps": 1})
