"""Technique specs on the command line: `--technique lora:r=8,alpha=16,target=q_proj|v_proj`.

Syntax: `name` or `name:key=value,key=value`. Values are converted by the option's declared type:
`8` int, `1e-3` float, `true`/`false` bool, `none` for an optional, `a|b|c` a tuple (an empty value
is the empty tuple), a Literal or Enum by its value. A value holding `,` or `|` literally is quoted:
`pattern='re:layers\\.[0-3]\\..*'`.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import typing
from dataclasses import dataclass
from typing import Any

from llmopt.core.config import TechniqueConfig
from llmopt.core.fields import coerce, config_fields, split_outside_quotes, type_name
from llmopt.core.registry import TechniqueEntry, lookup, name_of


@dataclass(frozen=True)
class TechniqueSpec:
    """A parsed spec for a technique registered without a config class: its name and keyword options."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def build(self, *args: Any, **kwargs: Any) -> Any:
        """`factory(*args, **options, **kwargs)`, e.g. `spec.build(model.parameters())` for an optimizer."""
        return lookup(self.name).build(*args, **{**self.kwargs, **kwargs})


def technique_options(name_or_entry: str | TechniqueEntry) -> dict[str, Any]:
    """{option: type} that `name:option=value` accepts, in declaration order."""
    entry = lookup(name_or_entry) if isinstance(name_or_entry, str) else name_or_entry
    if entry.config_cls is not None:
        return config_fields(entry.config_cls)
    return _factory_options(entry.factory)


def _factory_options(factory: Any) -> dict[str, Any]:
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    options = {}
    for p in inspect.signature(factory).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue  # positional inputs (params, model) are given by the caller, not the spec
        if p.name in hints:
            options[p.name] = hints[p.name]
        elif p.default is not None:
            options[p.name] = type(p.default)
        else:
            options[p.name] = Any
    return options


def parse_technique_spec(spec: str) -> TechniqueConfig | TechniqueSpec:
    """The config of the registered technique `spec` names, with its options converted by type.

    Techniques registered with a config class give that config; those registered with only a factory
    give a TechniqueSpec. Unknown technique, unknown option, repeated option or a bad value raise
    ValueError naming it and listing what is valid.
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    try:
        entry = lookup(name)
    except KeyError as e:
        raise ValueError(f"--technique {spec!r}: {e}") from None
    options = technique_options(entry)
    valid = ", ".join(f"{k}: {type_name(t)}" for k, t in options.items()) or "none"
    values: dict[str, Any] = {}
    for item in split_outside_quotes(rest, ",") if rest.strip() else []:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--technique {spec!r}: option {item!r} is not key=value; {name} options are: {valid}")
        if key not in options:
            raise ValueError(f"--technique {spec!r}: {name} has no option {key!r}; its options are: {valid}")
        if key in values:
            raise ValueError(f"--technique {spec!r}: option {key!r} is given twice")
        values[key] = coerce(raw.strip(), options[key], where=f"--technique {name}: {key}", from_text=True)
    if entry.config_cls is None:
        return TechniqueSpec(name=entry.name, options=tuple(values.items()))
    try:
        return entry.config_cls(**values)
    except ValueError as e:
        raise ValueError(f"--technique {spec!r}: {e}") from None


def _format_value(value: Any, where: str) -> str:
    if isinstance(value, tuple):
        return "|".join(_format_scalar(v, where, in_tuple=True) for v in value)
    return _format_scalar(value, where, in_tuple=False)


def _format_scalar(value: Any, where: str, *, in_tuple: bool) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (int, float)):
        return repr(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: a {type(value).__name__} value cannot be written in a technique spec")
    needs_quotes = ("," in value or "'" in value or '"' in value or value != value.strip()
                    or value.lower() in ("none", "null", "true", "false")
                    or (in_tuple and ("|" in value or value == "")))
    if not needs_quotes:
        return value
    if "'" in value and '"' in value:
        raise ValueError(f"{where}: {value!r} holds both quote characters, so it cannot be written in a spec")
    quote = '"' if "'" in value else "'"
    return f"{quote}{value}{quote}"


def format_technique_spec(config: TechniqueConfig | TechniqueSpec) -> str:
    """`name:key=value,...` for the fields that differ from their defaults; parses back to `config`."""
    if isinstance(config, TechniqueSpec):
        items = config.options
        name = config.name
    else:
        name = name_of(config)
        items = []
        for f in dataclasses.fields(config):
            if not f.init:
                continue
            value = getattr(config, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if value != default:
                items.append((f.name, value))
    parts = [f"{k}={_format_value(v, f'{name}.{k}')}" for k, v in items]
    return name + (":" + ",".join(parts) if parts else "")
