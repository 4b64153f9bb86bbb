"""Typed fields of config dataclasses: list them, turn values into plain data and back.

One coercion routine serves two callers: `config_from_dict` (JSON data: numbers, strings, lists,
dicts) and `parse_technique_spec` (command-line strings such as `r=8`, `target=q_proj|v_proj`).
Supported field types: `bool`, `int`, `float`, `str`, `tuple[X, ...]` and `tuple[X, Y]`,
`Literal[...]`, `enum.Enum` subclasses, `X | None`, unions of those, nested `TechniqueConfig`s, and
`Any` (kept as is).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Literal, Union

TRUE_STRINGS = ("true", "1", "yes", "on")
FALSE_STRINGS = ("false", "0", "no", "off")
NONE_STRINGS = ("none", "null")


def config_fields(cls: type) -> dict[str, Any]:
    """Init fields of dataclass `cls` -> resolved type hint, in declaration order (ClassVars excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def type_name(tp: Any) -> str:
    """A short, readable name for a type hint: `int`, `tuple[str, ...]`, `'a' | 'b'`, `float | None`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return "tuple[" + ", ".join(type_name(a) for a in args) + "]"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def to_data(value: Any) -> Any:
    """A field value as JSON-ready data: tuples become lists, enums their value, configs their dict."""
    from llmopt.core.config import TechniqueConfig

    if isinstance(value, TechniqueConfig):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [to_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    return value


def coerce(value: Any, tp: Any, *, where: str, from_text: bool = False) -> Any:
    """`value` converted to type `tp`; ValueError naming `where` and the expected type.

    With `from_text`, `value` is a command-line string: "8" is an int, "true" a bool, "none" None,
    "a|b" a tuple, and '...' quotes are removed. Without it, `value` is JSON data (lists for tuples).
    """
    try:
        return _coerce(value, tp, from_text)
    except _Mismatch as e:
        raise ValueError(f"{where}: expected {type_name(tp)}, got {value!r}{e.detail}") from None


class _Mismatch(Exception):
    def __init__(self, detail: str = "") -> None:
        self.detail = detail


def _coerce(value: Any, tp: Any, text: bool) -> Any:
    from llmopt.core.config import TechniqueConfig, config_from_dict

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is None or (text and isinstance(value, str) and value.lower() in NONE_STRINGS):
            return None
        raise _Mismatch()
    if origin in (Union, types.UnionType):
        # None first, so that "none" is None and not the string "none"; then the others in order
        ordered = sorted(args, key=lambda a: a is not type(None))
        for arg in ordered:
            try:
                return _coerce(value, arg, text)
            except (_Mismatch, ValueError, TypeError):
                continue
        raise _Mismatch()
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
            if text and isinstance(value, str) and not isinstance(choice, str) and _literal_str(choice) == value.lower():
                return choice
        raise _Mismatch(f"; choose one of {', '.join(repr(a) for a in args)}")
    if origin is tuple:
        if text and isinstance(value, str):
            items = [] if value == "" else split_outside_quotes(value, "|")  # items are unquoted as str below
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _Mismatch()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], text) for v in items)
        if not args:
            return tuple(items)
        if len(items) != len(args):
            raise _Mismatch(f"; it needs exactly {len(args)} items")
        return tuple(_coerce(v, a, text) for v, a in zip(items, args))
    if origin is not None:  # dict[...], list[...] and other generics: configs are data, accept as given
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value is member or value == member.value or (text and isinstance(value, str) and value in (member.name, str(member.value))):
                return member
        raise _Mismatch(f"; choose one of {', '.join(repr(m.value) for m in tp)}")
    if isinstance(tp, type) and issubclass(tp, TechniqueConfig):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return config_from_dict(value)
        raise _Mismatch()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.lower() in TRUE_STRINGS + FALSE_STRINGS:
            return value.lower() in TRUE_STRINGS
        raise _Mismatch("; use true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text and isinstance(value, str):
            try:
                return int(value.replace("_", ""), 0)
            except ValueError:
                raise _Mismatch() from None
        raise _Mismatch()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch() from None
        raise _Mismatch()
    if tp is str:
        if isinstance(value, str):
            return unquote(value) if text else value
        raise _Mismatch()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch()
    return value


def _literal_str(choice: Any) -> str:
    if isinstance(choice, bool):
        return "true" if choice else "false"
    if choice is None:
        return "none"
    return str(choice).lower()


def split_outside_quotes(text: str, sep: str) -> list[str]:
    """`text` split on `sep`, except inside '...' or "..." quotes (which are kept)."""
    parts, current, quote = [], [], None
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quote:
        raise ValueError(f"unclosed quote {quote} in {text!r}")
    parts.append("".join(current))
    return parts


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text
