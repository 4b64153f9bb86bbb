"""`ApplyReport`: what one technique did to a model, readable in one line and saved as data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmopt.core.config import TechniqueConfig
    from llmopt.core.hooks import Hook


def human_count(n: int) -> str:
    """12345 -> '12.3K', 3_200_000 -> '3.2M'."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _percent(part: int, whole: int) -> str:
    if whole == 0:
        return "0%"
    pct = 100.0 * part / whole
    if pct == 0 or pct >= 10:
        return f"{pct:.0f}%"
    return f"{pct:.2g}%" if pct < 1 else f"{pct:.1f}%"


@dataclass
class ApplyReport:
    """What a technique changed. A handler fills `changed`/`skipped`/`hooks`/`notes`/`revert_state`;
    `apply_` fills `technique`, `config` and the parameter counts."""

    technique: str = ""
    """Registered name of the technique."""
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)
    """fqn -> (old class name, new class name) for each swapped or wrapped module. Changes that are not
    module swaps use a dotted attribute path (`loss_fn`, `layers.0.self_attn.attend`) or "" for the
    root (e.g. a compiled forward), with a short description of old and new."""
    skipped: dict[str, str] = field(default_factory=dict)
    """fqn -> why a module the technique targets was left alone ("excluded", "dims not multiple of 16")."""
    params_before: int = 0
    """Parameter elements before (tied weights once, meta tensors by numel)."""
    params_after: int = 0
    """Parameter elements after."""
    trainable_before: int = 0
    """Trainable parameter elements before."""
    trainable_after: int = 0
    """Trainable parameter elements after."""
    bytes_before: int = 0
    """Bytes of parameters and buffers before."""
    bytes_after: int = 0
    """Bytes of parameters and buffers after."""
    hooks: list[Hook] = field(default_factory=list)
    """Training-loop hooks the technique needs; the loop must run them."""
    notes: list[str] = field(default_factory=list)
    """Side effects and caveats made visible (global settings changed, fallbacks taken)."""
    config: TechniqueConfig | None = None
    """The config that was applied."""
    revert_state: dict[str, Any] = field(default_factory=dict, repr=False)
    """Whatever the technique's revert handler needs (original modules, ...). Not serialized."""

    @property
    def has_effect(self) -> bool:
        """Whether anything changed: a module or attribute, or a hook for the loop."""
        return bool(self.changed) or bool(self.hooks)

    @property
    def reports(self) -> list[ApplyReport]:
        """[self], so that single and combined reports iterate alike (`for r in report.reports`)."""
        return [self]

    def __str__(self) -> str:
        parts = []
        swaps = Counter(self.changed.values())
        if swaps:
            parts.append(", ".join(f"{n} {old} -> {new}" for (old, new), n in swaps.items()))
        else:
            parts.append("nothing changed")
        if self.skipped:
            shown = "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:2])
            more = f"; +{len(self.skipped) - 2} more" if len(self.skipped) > 2 else ""
            parts.append(f"{len(self.skipped)} skipped ({shown}{more})")
        line = f"{self.technique or '?'}: " + ", ".join(parts)
        line += f"; trainable {_percent(self.trainable_after, self.params_after)} " \
                f"({human_count(self.trainable_after)} / {human_count(self.params_after)})"
        if self.params_after != self.params_before:
            line += f"; params {human_count(self.params_before)} -> {human_count(self.params_after)}"
        if self.hooks:
            line += f"; +{len(self.hooks)} hook{'s' if len(self.hooks) > 1 else ''} " \
                    f"({', '.join(type(h).__name__ for h in self.hooks)})"
        for note in self.notes:
            line += f" | note: {note}"
        return line

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (hooks by class name, config as its dict, no revert_state)."""
        return {
            "technique": self.technique,
            "config": self.config.to_dict() if self.config is not None else None,
            "changed": {k: list(v) for k, v in self.changed.items()},
            "skipped": dict(self.skipped),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "trainable_before": self.trainable_before,
            "trainable_after": self.trainable_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "hooks": [type(h).__name__ for h in self.hooks],
            "notes": list(self.notes),
        }


@dataclass
class CombinedReport:
    """Reports of several techniques applied in one `apply_` call, in the order they ran."""

    reports: list[ApplyReport]

    def __iter__(self) -> Iterator[ApplyReport]:
        return iter(self.reports)

    def __len__(self) -> int:
        return len(self.reports)

    def __getitem__(self, key: int | str) -> ApplyReport:
        """By position, or by technique name (`report["lora"]`)."""
        if isinstance(key, str):
            for r in self.reports:
                if r.technique == key:
                    return r
            raise KeyError(f"no report for {key!r}; this report has {', '.join(r.technique for r in self.reports)}")
        return self.reports[key]

    @property
    def hooks(self) -> list[Hook]:
        """All hooks, in the order the techniques ran."""
        return [h for r in self.reports for h in r.hooks]

    @property
    def notes(self) -> list[str]:
        return [f"{r.technique}: {n}" for r in self.reports for n in r.notes]

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.reports)

    def to_dict(self) -> dict[str, Any]:
        return {"reports": [r.to_dict() for r in self.reports]}
