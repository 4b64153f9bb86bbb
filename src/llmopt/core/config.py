"""`TechniqueConfig`: the base of every technique's options, and their round trip through plain data.

A config is data: a frozen, keyword-only dataclass of numbers, strings, tuples, enums and nested
configs, hashable and comparable, validated in `__post_init__` with `ValueError`s that say what to
do instead. It serializes as `{"_type": registered name, "version": int, **fields}` (torchao's
`config_to_dict`), which is what checkpoints store; `config_from_dict` rebuilds it.

```python
@dataclass(frozen=True, kw_only=True)
class LoRAConfig(TechniqueConfig):
    \"\"\"Low-Rank Adaptation (Hu et al. 2021, arXiv:2106.09685).\"\"\"
    version: ClassVar[int] = 1
    r: int = 8
    \"\"\"Rank of the update BA.\"\"\"

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}; use r=8 or 16")
```
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from llmopt.core.fields import coerce, config_fields, to_data


@dataclass(frozen=True, kw_only=True)
class TechniqueConfig:
    """Base for every technique config. Configs are data: no callables, no tensors, no modules."""

    version: ClassVar[int] = 1
    """Format version of this config's dict; bump it (and override `migrate`) when fields change meaning."""

    allow_no_effect: bool = False
    """Warn (NoEffectWarning) instead of raising NoEffectError when the technique changes nothing."""

    def __post_init__(self) -> None:
        """Subclasses validate here (raise ValueError with the fix); call super().__post_init__() if chained."""

    @property
    def technique_name(self) -> str:
        """The registered short name ("lora"); raises if this config class is not registered."""
        from llmopt.core.registry import name_of

        return name_of(self)

    def to_dict(self) -> dict[str, Any]:
        """`{"_type": name, "version": int, **fields}`, JSON-ready (tuples become lists)."""
        data: dict[str, Any] = {"_type": self.technique_name, "version": type(self).version}
        for f in fields(self):
            if f.init:
                data[f.name] = to_data(getattr(self, f.name))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TechniqueConfig:
        """Inverse of `to_dict`; `_type` must name this class (or is absent)."""
        if "_type" not in data:
            from llmopt.core.registry import name_of

            data = {"_type": name_of(cls), **data}
        config = config_from_dict(data)
        if not isinstance(config, cls):
            raise ValueError(f"_type {data['_type']!r} is a {type(config).__name__}, not a {cls.__name__}")
        return config

    @classmethod
    def migrate(cls, data: dict[str, Any], from_version: int) -> dict[str, Any]:
        """Fields of an older version's dict rewritten for the current version. Default: refuse."""
        raise ValueError(f"{cls.__name__} dict has version {from_version} but this code reads version {cls.version}, "
                         f"and {cls.__name__}.migrate does not convert it; re-create the config with this version")


def config_from_dict(data: dict[str, Any]) -> TechniqueConfig:
    """The config that `to_dict` produced: looks `_type` up in the registry and coerces every field.

    Unknown fields, a missing or unregistered `_type`, a newer version, or a value of the wrong type
    raise ValueError (or UnknownTechniqueError) naming the field.
    """
    from llmopt.core.registry import lookup

    if not isinstance(data, dict) or "_type" not in data:
        raise ValueError(f"a technique config dict needs a '_type' key naming the technique, got {data!r}")
    entry = lookup(data["_type"])
    cls = entry.config_cls
    if cls is None:
        raise ValueError(f"technique {entry.name!r} ({entry.kind}) has no config class to build from a dict")
    values = {k: v for k, v in data.items() if k not in ("_type", "version")}
    version = data.get("version", cls.version)
    if not isinstance(version, int) or version > cls.version:
        raise ValueError(f"{entry.name}: dict has version {version!r}, newer than this code's {cls.version}; "
                         "upgrade llmopt to read it")
    if version != cls.version:
        values = cls.migrate(values, version)
    types_ = config_fields(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(f"{entry.name}: unknown field(s) {', '.join(unknown)}; {cls.__name__} has: {', '.join(types_)}")
    kwargs = {k: coerce(v, types_[k], where=f"{entry.name}.{k}") for k, v in values.items()}
    return cls(**kwargs)
