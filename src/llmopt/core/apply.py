"""`apply_` and `revert_`: the one way to apply a model transform (DESIGN.md §3).

```python
report = apply_(model, LoRAConfig(r=8), ActivationCheckpointingConfig(policy="selective"))
print(report)   # one line per technique
```
Rules: dispatch on `type(config)`; configs in one call run sorted by stage; a stage earlier than
one already applied, or the same technique twice, raises naming both; a technique that changes
nothing raises `NoEffectError` (or warns when its config says `allow_no_effect=True`); the model is
mutated in place and each applied config is appended to `model.applied_techniques`, which
checkpoints save as data. Every check runs before the first handler, so a refused call leaves the
model untouched; a handler that fails part-way leaves the techniques before it applied (and
recorded).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch.nn as nn

from llmopt.core.config import TechniqueConfig
from llmopt.core.registry import TechniqueEntry, UnknownTechniqueError, entry_for_config, lookup, registered
from llmopt.core.report import ApplyReport, CombinedReport
from llmopt.core.surgery import FilterFn, count_parameters

logger = logging.getLogger("llmopt")

APPLIED_ATTR = "applied_techniques"
"""Model attribute listing the applied configs, in order (plain data: saved with checkpoints)."""
_REPORTS_ATTR = "_llmopt_apply_reports"
# name -> ApplyReport of each applied technique, for revert_ (not saved: a loaded model is rebuilt
# by re-applying its configs, which makes fresh reports)


class NoEffectError(RuntimeError):
    """A technique matched nothing in the model (fix the target names, or set allow_no_effect=True)."""


class NoEffectWarning(UserWarning):
    """A technique with allow_no_effect=True changed nothing."""


class NotReversibleError(RuntimeError):
    """`revert_` on a technique without a revert handler."""


def applied_techniques(model: nn.Module) -> list[TechniqueConfig]:
    """The model's list of applied configs, created (empty) if the model has none yet."""
    applied = getattr(model, APPLIED_ATTR, None)
    if applied is None:
        applied = []
        setattr(model, APPLIED_ATTR, applied)
    return applied


def _reports(model: nn.Module) -> dict[str, ApplyReport]:
    reports = model.__dict__.get(_REPORTS_ATTR)
    if reports is None:
        reports = {}
        model.__dict__[_REPORTS_ATTR] = reports
    return reports


def _entry(config: Any) -> TechniqueEntry:
    if not isinstance(config, TechniqueConfig):
        raise TypeError(f"apply_ takes TechniqueConfig instances, got {type(config).__name__}: {config!r}"
                        + ("; instantiate the class: XxxConfig()" if isinstance(config, type) else ""))
    entry = entry_for_config(config)
    if entry is None:
        names = ", ".join(registered("transform")) or "(none; import llmopt.techniques to register the built-in ones)"
        raise UnknownTechniqueError(f"{type(config).__name__} is not a registered technique; "
                                    f"registered transforms: {names}")
    if entry.kind != "transform":
        raise TypeError(f"{entry.name!r} is a {entry.kind}, not a model transform, so apply_ cannot apply it; "
                        f"build it with llmopt.core.lookup({entry.name!r}).build(...) and give it to the loop")
    return entry


def apply_(model: nn.Module, *configs: TechniqueConfig, filter_fn: FilterFn | None = None
           ) -> ApplyReport | CombinedReport:
    """Apply the configs' techniques to `model` in place, in stage order; return what changed.

    One config gives an ApplyReport, several a CombinedReport (one line each when printed; index it
    by position or technique name). `filter_fn(module, fqn)`, if given, is passed to every handler to
    restrict the modules it may touch.
    """
    if not configs:
        raise ValueError("apply_ needs at least one config, e.g. apply_(model, LoRAConfig(r=8))")
    entries = [_entry(c) for c in configs]
    order = sorted(range(len(configs)), key=lambda i: entries[i].stage)  # stable: ties keep the given order

    applied = applied_techniques(model)
    seen: dict[str, TechniqueEntry] = {}
    latest: TechniqueEntry | None = None  # the latest-stage technique already on the model
    for done in applied:
        entry = entry_for_config(done)
        if entry is None or entry.stage is None:
            continue  # registered in another process or an isolated registry: nothing to compare against
        seen[entry.name] = entry
        if latest is None or entry.stage >= latest.stage:
            latest = entry
    already = set(seen)
    for i in order:
        entry = entries[i]
        if entry.name in seen:
            where = "is already applied to this model" if entry.name in already else "appears twice in this call"
            raise ValueError(f"technique {entry.name!r} {where}; apply it once (revert_ it first to change its config)")
        if latest is not None and entry.stage < latest.stage:
            raise ValueError(f"cannot apply {entry.name!r} (stage {entry.stage.name}) after {latest.name!r} "
                             f"(stage {latest.stage.name}) is applied; pass both to one apply_ call, which sorts "
                             f"them, or revert_ {latest.name!r} first")
        seen[entry.name] = entry

    reports = []
    for i in order:
        reports.append(_apply_one(model, configs[i], entries[i], filter_fn))
    return reports[0] if len(reports) == 1 else CombinedReport(reports)


def _names(applied: list) -> list[str]:
    names = []
    for c in applied:
        entry = entry_for_config(c)
        if entry is not None:
            names.append(entry.name)
    return names


def _apply_one(model: nn.Module, config: TechniqueConfig, entry: TechniqueEntry,
               filter_fn: FilterFn | None) -> ApplyReport:
    before = count_parameters(model)
    report = entry.apply_fn(model, config, filter_fn=filter_fn)
    if not isinstance(report, ApplyReport):
        raise TypeError(f"handler {entry.apply_fn.__name__} for {entry.name!r} returned {type(report).__name__}; "
                        "it must return an ApplyReport")
    after = count_parameters(model)
    report.technique, report.config = entry.name, config
    report.params_before, report.trainable_before, report.bytes_before = before.total, before.trainable, before.nbytes
    report.params_after, report.trainable_after, report.bytes_after = after.total, after.trainable, after.nbytes
    if not report.has_effect:
        skipped = f" ({len(report.skipped)} skipped: {', '.join(list(report.skipped)[:3])})" if report.skipped else ""
        message = (f"{entry.name!r} changed nothing in {type(model).__name__}{skipped}; check its target/include "
                   f"patterns against the model's module names (model.named_modules()), or set allow_no_effect=True")
        if not config.allow_no_effect:
            raise NoEffectError(message)
        warnings.warn(message, NoEffectWarning, stacklevel=3)
    applied_techniques(model).append(config)
    _reports(model)[entry.name] = report
    logger.info("%s", report)
    return report


def revert_(model: nn.Module, technique: str | TechniqueConfig | type) -> ApplyReport:
    """Undo an applied technique with its registered revert handler; remove it from applied_techniques.

    `technique` is a name, a config or a config class. Only the most recently applied technique can
    be reverted (later ones may wrap or compile what it changed): revert in reverse order. Raises
    NotReversibleError for techniques without a revert handler.
    """
    entry = lookup(technique)
    applied = applied_techniques(model)
    names = _names(applied)
    if entry.name not in names:
        raise ValueError(f"{entry.name!r} is not applied to this model; applied: {', '.join(names) or 'nothing'}")
    if entry.revert_fn is None:
        raise NotReversibleError(f"{entry.name!r} cannot be reverted (it registers no revert handler); "
                                 "rebuild the model from its checkpoint without it instead")
    later = names[names.index(entry.name) + 1:]
    if later:
        raise ValueError(f"cannot revert {entry.name!r} while {', '.join(repr(n) for n in later)} applied after it "
                         f"is still on the model; revert_ {later[-1]!r} first")
    original = _reports(model).get(entry.name)
    if original is None:
        raise ValueError(f"{entry.name!r} is listed in applied_techniques but was not applied by apply_ in this "
                         "process, so there is no report to revert from; rebuild the model and apply_ its configs")
    before = count_parameters(model)
    result = entry.revert_fn(model, original)
    after = count_parameters(model)
    report = result if isinstance(result, ApplyReport) else ApplyReport()
    report.technique, report.config = f"revert {entry.name}", original.config
    report.params_before, report.trainable_before, report.bytes_before = before.total, before.trainable, before.nbytes
    report.params_after, report.trainable_after, report.bytes_after = after.total, after.trainable, after.nbytes
    applied[:] = [c for c in applied if type(c) is not entry.config_cls]
    del _reports(model)[entry.name]
    logger.info("%s", report)
    return report
