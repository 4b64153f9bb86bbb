"""Training-loop hooks: a few named points, no event bus (DESIGN.md §5).

The loop in `llmopt.train` calls, at the lines that say so:

    on_fit_start(state)               after apply_ and the optimizer are built
    before_forward(state, batch)      may return a transformed batch (curriculum, seq-len warmup)
    after_backward(state)             gradients exist; before unscaling, clipping and the step
    before_optimizer_step(state)      after unscaling and clipping, just before optimizer.step()
    after_optimizer_step(state)       after the step (EMA, mask regrowth, scale precompute)
    on_eval(state, metrics)           after an evaluation; may add entries to `metrics`

`on_*` and `before_*` run in list order, `after_*` in reverse (Composer's FILO rule: the hook that
went first cleans up last). `before_forward` threads the batch: each hook sees what the previous
one returned (None means "unchanged").

`state` is whatever object the loop passes. Hooks may rely on these attributes and no others:
`step` (int, optimizer steps done), `model` (nn.Module), `optimizer` (torch.optim.Optimizer),
`scaler` (a GradScaler or None), `config` (the run's config) and `metrics` (a dict of the current
step's metrics, which a hook may add to).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

HOOK_POINTS = ("on_fit_start", "before_forward", "after_backward", "before_optimizer_step",
               "after_optimizer_step", "on_eval")


class Hook:
    """Override only what you need; every method is a no-op by default.

    A hook with state (counters, schedules, observers) returns it from `state_dict` (tensors and
    plain data) so checkpoints resume it exactly.
    """

    def on_fit_start(self, state: Any) -> None:
        pass

    def before_forward(self, state: Any, batch: Any) -> Any | None:
        """Return a new batch to replace it, or None to leave it as is."""
        return None

    def after_backward(self, state: Any) -> None:
        pass

    def before_optimizer_step(self, state: Any) -> None:
        pass

    def after_optimizer_step(self, state: Any) -> None:
        pass

    def on_eval(self, state: Any, metrics: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            raise ValueError(f"{type(self).__name__} keeps no state but the checkpoint holds {sorted(state_dict)}; "
                             "override load_state_dict or check that the checkpoint belongs to this run")


def call_hooks(hooks: Iterable[Hook], point: str, state: Any, *args: Any) -> Any:
    """Call `point` on every hook in the order of the rule above.

    Returns the (possibly transformed) batch for `before_forward`, else None.
    """
    if point not in HOOK_POINTS:
        raise ValueError(f"unknown hook point {point!r}; the points are {', '.join(HOOK_POINTS)}")
    ordered = list(hooks)
    if point.startswith("after_"):
        ordered.reverse()
    if point == "before_forward":
        (batch,) = args
        for hook in ordered:
            out = hook.before_forward(state, batch)
            if out is not None:
                batch = out
        return batch
    for hook in ordered:
        getattr(hook, point)(state, *args)
    return None


class HookList(Hook):
    """Several hooks behaving as one, in the order rule of `call_hooks`; checkpoints them together."""

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self.hooks: list[Hook] = []
        for hook in hooks:
            self.append(hook)

    def append(self, hook: Hook) -> None:
        if not isinstance(hook, Hook):
            raise TypeError(f"{hook!r} is not an llmopt Hook; subclass llmopt.core.Hook and override its methods")
        self.hooks.append(hook)

    def extend(self, hooks: Iterable[Hook]) -> None:
        for hook in hooks:
            self.append(hook)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks)

    def __len__(self) -> int:
        return len(self.hooks)

    def on_fit_start(self, state: Any) -> None:
        call_hooks(self.hooks, "on_fit_start", state)

    def before_forward(self, state: Any, batch: Any) -> Any:
        return call_hooks(self.hooks, "before_forward", state, batch)

    def after_backward(self, state: Any) -> None:
        call_hooks(self.hooks, "after_backward", state)

    def before_optimizer_step(self, state: Any) -> None:
        call_hooks(self.hooks, "before_optimizer_step", state)

    def after_optimizer_step(self, state: Any) -> None:
        call_hooks(self.hooks, "after_optimizer_step", state)

    def on_eval(self, state: Any, metrics: dict[str, Any]) -> None:
        call_hooks(self.hooks, "on_eval", state, metrics)

    def _keys(self) -> list[str]:
        # class name, numbered when a class appears more than once: stable across runs of one recipe
        counts: dict[str, int] = {}
        keys = []
        for hook in self.hooks:
            name = type(hook).__name__
            counts[name] = counts.get(name, 0) + 1
            keys.append(name if counts[name] == 1 else f"{name}#{counts[name]}")
        return keys

    def state_dict(self) -> dict[str, Any]:
        return {key: hook.state_dict() for key, hook in zip(self._keys(), self.hooks)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        keys = self._keys()
        missing, unexpected = sorted(set(keys) - set(state_dict)), sorted(set(state_dict) - set(keys))
        if missing or unexpected:
            raise ValueError(f"hook state does not match the hooks of this run: missing {missing}, unexpected "
                             f"{unexpected}; resume with the same techniques the checkpoint was written with")
        for key, hook in zip(keys, self.hooks):
            hook.load_state_dict(state_dict[key])
