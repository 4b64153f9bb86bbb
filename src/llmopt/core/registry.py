"""The technique registry: one table of every technique, by short name.

Model transforms register a config class and an `apply_xxx` handler with `@register`; `apply_`
dispatches on `type(config)`. Techniques of the other kinds (optimizers, loop hooks, inference
components, ...) register a name, a description and a factory with `register_technique`, so that
`llmopt techniques` lists everything in one table and `--technique name:opt=val` parses for all.

The registry is filled when the modules that define techniques are imported (`llmopt.techniques`,
`llmopt.optim`, ...); `core` itself imports none of them.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmopt.core.config import TechniqueConfig


class Stage(enum.IntEnum):
    """When a model transform runs; `apply_` sorts by stage and refuses to go back to an earlier one.

    The order is torchtitan's: module surgery first, then tensor parallel, activation checkpointing
    (it wraps blocks), compile (after the wrapping, before sharding) and data-parallel sharding last.
    """

    SURGERY = 10
    TENSOR_PARALLEL = 20
    CHECKPOINTING = 30
    COMPILE = 40
    DATA_PARALLEL = 50


WORKLOADS = ("train", "generate", "eval")
"""What to run to see a technique's effect (`llmopt bench` picks the workload from this)."""

KINDS = ("transform", "optimizer", "hook", "setting", "architecture", "data", "inference", "kernel", "export")
"""Kinds of technique (DESIGN.md §3). Only `transform`s go through `apply_`; `register` makes them."""


@dataclass(frozen=True)
class TechniqueEntry:
    """One row of the registry."""

    name: str
    """Short registry name, as typed after `--technique` (e.g. "lora")."""
    kind: str
    """One of KINDS."""
    description: str
    """One line: the first line of the config's (or factory's) docstring unless given."""
    workload: str = "train"
    """Workload that shows the effect: "train", "generate" or "eval"."""
    config_cls: type | None = None
    """The TechniqueConfig subclass holding the options, if any."""
    stage: Stage | None = None
    """Stage of a transform; None for the other kinds."""
    apply_fn: Callable | None = None
    """Transform handler `apply_xxx(model, config, *, filter_fn) -> ApplyReport`."""
    revert_fn: Callable | None = None
    """Optional `revert_xxx(model, report) -> ApplyReport | None`."""
    reversible: bool = False
    """Whether `revert_` may undo it (True once a revert handler is registered)."""
    factory: Callable | None = None
    """For non-transforms: what builds the object (optimizer class, hook class, cache class, ...)."""

    def build(self, *args: Any, config: TechniqueConfig | None = None, **kwargs: Any) -> Any:
        """Call the factory: `factory(*args, config, **kwargs)` when the entry has a config class,
        else `factory(*args, **kwargs)` (e.g. `entry.build(model.parameters(), lr=1e-3)`)."""
        if self.factory is None:
            raise TypeError(f"technique {self.name!r} ({self.kind}) has no factory to build; "
                            + ("apply it with llmopt.apply_(model, config)" if self.kind == "transform" else ""))
        if self.config_cls is not None:
            return self.factory(*args, config if config is not None else self.config_cls(), **kwargs)
        return self.factory(*args, **kwargs)


class UnknownTechniqueError(KeyError, ValueError):
    """No technique by that name or config class; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0]) if self.args else ""


_ENTRIES: dict[str, TechniqueEntry] = {}
_NAME_OF_CONFIG: dict[type, str] = {}


def _description(*objs: Any) -> str:
    for obj in objs:
        doc = inspect.getdoc(obj) if obj is not None else None
        if not doc:
            continue
        first = doc.strip().splitlines()[0].strip()
        # dataclasses invent a docstring "Name(*, field: type = ...)" when there is none: not a description
        if isinstance(obj, type) and first.startswith(obj.__name__ + "("):
            continue
        return first
    return ""


def _check_new(name: str, config_cls: type | None) -> None:
    from llmopt.core.config import TechniqueConfig

    if not name or not name.replace("_", "").replace("-", "").isalnum() or name != name.lower():
        raise ValueError(f"technique name {name!r} must be lowercase letters, digits, '_' or '-' (e.g. 'lora')")
    if name in _ENTRIES:
        raise ValueError(f"a technique named {name!r} is already registered "
                         f"({_ENTRIES[name].kind}, config {getattr(_ENTRIES[name].config_cls, '__name__', None)})")
    if config_cls is not None:
        if not (isinstance(config_cls, type) and issubclass(config_cls, TechniqueConfig)):
            raise TypeError(f"{config_cls!r} is not a TechniqueConfig subclass; "
                            "declare it as @dataclass(frozen=True, kw_only=True) class XxxConfig(TechniqueConfig)")
        if config_cls in _NAME_OF_CONFIG:
            raise ValueError(f"{config_cls.__name__} is already registered as {_NAME_OF_CONFIG[config_cls]!r}")


def register(config_cls: type, *, name: str, stage: Stage, workload: str = "train", reversible: bool = False,
             revert: Callable | None = None, description: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator registering `apply_xxx(model, config, *, filter_fn) -> ApplyReport` for `config_cls`.

    The handler mutates `model` in place and returns an ApplyReport listing what it changed (`apply_`
    fills in the technique name, config and parameter counts). `revert` (or a later
    `@register_revert(config_cls)`) makes the technique reversible; `reversible=True` alone declares
    that a revert handler will follow. Registering a name or config class twice raises.
    """
    if not isinstance(stage, Stage):
        raise TypeError(f"stage must be a Stage (one of {', '.join(s.name for s in Stage)}), got {stage!r}")
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    _check_new(name, config_cls)

    def decorator(apply_fn: Callable) -> Callable:
        _check_new(name, config_cls)
        _ENTRIES[name] = TechniqueEntry(
            name=name, kind="transform", description=description or _description(config_cls, apply_fn),
            workload=workload, config_cls=config_cls, stage=stage, apply_fn=apply_fn, revert_fn=revert,
            reversible=reversible or revert is not None)
        _NAME_OF_CONFIG[config_cls] = name
        return apply_fn

    return decorator


def register_revert(config_cls: type) -> Callable[[Callable], Callable]:
    """Decorator registering `revert_xxx(model, report)` for an already registered transform."""
    name = name_of(config_cls)
    entry = _ENTRIES[name]
    if entry.kind != "transform":
        raise TypeError(f"{name!r} is a {entry.kind}, not a model transform; only transforms are reverted")

    def decorator(revert_fn: Callable) -> Callable:
        if _ENTRIES[name].revert_fn is not None:
            raise ValueError(f"technique {name!r} already has a revert handler ({_ENTRIES[name].revert_fn.__name__})")
        _ENTRIES[name] = _replace(_ENTRIES[name], revert_fn=revert_fn, reversible=True)
        return revert_fn

    return decorator


def register_technique(name: str, *, kind: str, description: str | None = None, config: type | None = None,
                       factory: Callable | None = None, workload: str = "train") -> TechniqueEntry:
    """Register a technique that is not a model transform (optimizer, hook, inference component, ...).

    `config` is its TechniqueConfig subclass, if it has one: then `--technique name:opt=val` parses
    into that config and `entry.build(*args, config=cfg)` calls `factory(*args, cfg)`. Without a
    config, options are the keyword parameters of `factory` (e.g. an optimizer class's `lr=`), and
    `parse_technique_spec` returns a `TechniqueSpec`. Returns the entry; also usable as a plain call
    at module level (`register_technique("lamb", kind="optimizer", factory=LAMB)`).
    """
    if kind not in KINDS or kind == "transform":
        raise ValueError(f"kind must be one of {', '.join(k for k in KINDS if k != 'transform')}, got {kind!r}; "
                         "model transforms register with @register(ConfigCls, name=..., stage=...)")
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if config is None and factory is None:
        raise ValueError(f"technique {name!r} needs a config class or a factory (the class or function to build it)")
    _check_new(name, config)
    entry = TechniqueEntry(name=name, kind=kind, description=description or _description(config, factory),
                           workload=workload, config_cls=config, factory=factory)
    _ENTRIES[name] = entry
    if config is not None:
        _NAME_OF_CONFIG[config] = name
    return entry


def _replace(entry: TechniqueEntry, **changes: Any) -> TechniqueEntry:
    import dataclasses

    return dataclasses.replace(entry, **changes)


def registered(kind: str | None = None) -> Mapping[str, TechniqueEntry]:
    """Read-only {name: entry} in registration order, optionally only one kind."""
    return MappingProxyType({n: e for n, e in _ENTRIES.items() if kind is None or e.kind == kind})


def _names() -> str:
    return ", ".join(_ENTRIES) if _ENTRIES else "(none; import llmopt.techniques to register the built-in ones)"


def lookup(name_or_config: str | type | Any) -> TechniqueEntry:
    """The entry for a name, a config class or a config instance.

    Raises UnknownTechniqueError (a KeyError and a ValueError) listing the registered names.
    """
    if isinstance(name_or_config, str):
        if name_or_config not in _ENTRIES:
            raise UnknownTechniqueError(f"no technique named {name_or_config!r}; registered: {_names()}")
        return _ENTRIES[name_or_config]
    return _ENTRIES[name_of(name_or_config)]


def name_of(config_or_cls: Any) -> str:
    """Registered name of a config instance or class; UnknownTechniqueError listing registered names."""
    cls = config_or_cls if isinstance(config_or_cls, type) else type(config_or_cls)
    if cls not in _NAME_OF_CONFIG:
        raise UnknownTechniqueError(f"{cls.__name__} is not registered; registered techniques: {_names()}")
    return _NAME_OF_CONFIG[cls]


def entry_for_config(config_or_cls: Any) -> TechniqueEntry | None:
    """The entry of a config instance or class, or None when it is not registered."""
    cls = config_or_cls if isinstance(config_or_cls, type) else type(config_or_cls)
    name = _NAME_OF_CONFIG.get(cls)
    return _ENTRIES[name] if name is not None else None


@contextlib.contextmanager
def isolated_registry() -> Iterator[None]:
    """Registrations made inside the block are undone on exit (for tests defining toy techniques)."""
    entries, names = dict(_ENTRIES), dict(_NAME_OF_CONFIG)
    try:
        yield
    finally:
        _ENTRIES.clear()
        _ENTRIES.update(entries)
        _NAME_OF_CONFIG.clear()
        _NAME_OF_CONFIG.update(names)
