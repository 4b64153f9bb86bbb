"""Module surgery: swap submodules in place, choose them by name, freeze the rest, count parameters.

Everything here works on `meta`-device models: nothing reads tensor values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.nn as nn

FilterFn = Callable[[nn.Module, str], bool]
"""`filter_fn(module, fqn) -> bool`: True to transform this module (torchao's convention)."""

OUTPUT_LAYER_NAMES = ("lm_head", "output")
"""Final projections that `"all-linear"` leaves out (as PEFT does): adapting them rarely helps."""


class SkipModule(Exception):
    """Raise from a `replace_modules` policy to leave a module alone and say why (recorded in `skipped`)."""


def get_submodule_parent(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule at `fqn`, e.g. (layers[0].self_attn, "q_proj")."""
    if not fqn:
        raise ValueError("the root module has no parent; replace the model itself instead of its fqn ''")
    parent_fqn, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_fqn) if parent_fqn else model
    if name not in parent._modules:
        raise AttributeError(f"{type(parent).__name__} at {parent_fqn or '<root>'!r} has no submodule {name!r}")
    return parent, name


def replace_modules(model: nn.Module, policy: dict[type, Callable[[nn.Module, str], nn.Module | None]], *,
                    filter_fn: FilterFn | None = None, skipped: dict[str, str] | None = None
                    ) -> dict[str, tuple[str, str]]:
    """Swap submodules in place, by class: `{nn.Linear: lambda m, fqn: LoRALinear.from_linear(m)}`.

    A policy key matches a module's exact class (a subclass such as an already swapped
    `LoRALinear(nn.Linear)` is not matched again; list it to include it). For each match, in
    `named_modules` order (parents first), `filter_fn(module, fqn)` decides, then the policy builds
    the replacement, which is set on the parent (nested ModuleList/ModuleDict/Sequential included).
    The policy may return None or the same module to leave it, or raise `SkipModule(reason)`.
    Descendants of a replaced module are not visited. A module reachable under several names is
    replaced at all of them by one new module (reported under its first name).

    Returns {fqn: (old class name, new class name)}. If `skipped` is given, modules of a policy class
    that were not replaced are added to it as {fqn: reason}: the `SkipModule` message, or the filter's
    `skip_reason(fqn)` (see `fqn_filter`), which by default leaves modules that were never targeted out.
    """
    for cls, fn in policy.items():
        if not isinstance(cls, type) or not callable(fn):
            raise TypeError(f"policy must map module classes to callables (module, fqn) -> module, got {cls!r}: {fn!r}")
    aliases: dict[int, list[str]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(fqn)

    changed: dict[str, tuple[str, str]] = {}
    replaced_prefixes: list[str] = []
    for fqn, module in list(model.named_modules()):
        if not fqn or type(module) not in policy:
            continue
        if any(fqn.startswith(p + ".") for p in replaced_prefixes):
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            reason = getattr(filter_fn, "skip_reason", lambda _fqn: None)(fqn)
            if reason is not None and skipped is not None:
                skipped[fqn] = reason
            continue
        try:
            new = policy[type(module)](module, fqn)
        except SkipModule as e:
            if skipped is not None:
                skipped[fqn] = str(e) or "skipped by policy"
            continue
        if new is None or new is module:
            continue
        if not isinstance(new, nn.Module):
            raise TypeError(f"policy for {type(module).__name__} returned {type(new).__name__} at {fqn!r}; "
                            "return an nn.Module, None to keep the module, or raise SkipModule(reason)")
        for name in aliases[id(module)]:
            parent, attr = get_submodule_parent(model, name)
            setattr(parent, attr, new)
            replaced_prefixes.append(name)
        changed[fqn] = (type(module).__name__, type(new).__name__)
    return changed


@dataclass(frozen=True)
class FqnFilter:
    """A `filter_fn(module, fqn)` built from include/exclude patterns; see `fqn_filter`."""

    include: tuple[str, ...] | None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in (self.include or ()) + self.exclude:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ValueError(f"bad regular expression in pattern {pattern!r}: {e}") from None
            elif not pattern:
                raise ValueError("empty module name pattern; use a name, a suffix, 're:<regex>' or 'all-linear'")

    def __call__(self, module: nn.Module, fqn: str) -> bool:
        return self._included(module, fqn) and not self._excluded(fqn)

    def skip_reason(self, fqn: str) -> str | None:
        """Why a module that `include` targets was left out ("excluded", "output layer"), else None."""
        if self.include is not None and any(_matches(p, fqn) for p in self.include if p != "all-linear"):
            return "excluded" if self._excluded(fqn) else None
        if self.include is None or "all-linear" in self.include:
            if self._excluded(fqn):
                return "excluded"
            if self.include is not None and fqn.rpartition(".")[2] in OUTPUT_LAYER_NAMES:
                return "output layer (all-linear leaves it out; name it in include to target it)"
        return None

    def _included(self, module: nn.Module, fqn: str) -> bool:
        if self.include is None:
            return True
        for pattern in self.include:
            if pattern == "all-linear":
                if isinstance(module, nn.Linear) and fqn.rpartition(".")[2] not in OUTPUT_LAYER_NAMES:
                    return True
            elif _matches(pattern, fqn):
                return True
        return False

    def _excluded(self, fqn: str) -> bool:
        return any(_matches(p, fqn) for p in self.exclude)


def _matches(pattern: str, fqn: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    return fqn == pattern or fqn.endswith("." + pattern)


def fqn_filter(include: str | Iterable[str] | None = None, exclude: str | Iterable[str] = ()) -> FqnFilter:
    """A `filter_fn(module, fqn)` selecting modules by fully qualified name.

    Pattern syntax (include and exclude alike):
    - `"lm_head"`, `"layers.0.self_attn.q_proj"`: the exact fqn;
    - `"q_proj"`, `"self_attn.q_proj"`: a suffix on a dot boundary (`q_proj` matches
      `model.layers.3.self_attn.q_proj`, not `xq_proj`), so names work on llmopt and HF models alike;
    - `"re:layers\\.[0-3]\\..*_proj"`: a Python regular expression that must match the whole fqn;
    - `"all-linear"` (include only): every nn.Linear except the output layer (`lm_head`/`output`).
    `include=None` selects everything; `exclude` wins over `include`. A single string is one pattern.
    """
    def as_tuple(patterns):
        return (patterns,) if isinstance(patterns, str) else tuple(patterns)

    exclude_t = as_tuple(exclude)
    if "all-linear" in exclude_t:
        raise ValueError("'all-linear' is an include pattern; to exclude Linear modules, name them")
    return FqnFilter(include=None if include is None else as_tuple(include), exclude=exclude_t)


def freeze_all_but(model: nn.Module, predicate: Callable[[str, nn.Parameter], bool] | str) -> list[str]:
    """Set requires_grad=False on every parameter except those `predicate(fqn, param)` keeps.

    A string predicate keeps parameters with a name component starting with it (`"lora_"` keeps
    `layers.0.self_attn.q_proj.lora_A`). Returns the names of the parameters left trainable.
    """
    if isinstance(predicate, str):
        prefix = predicate
        predicate = lambda fqn, _p: any(part.startswith(prefix) for part in fqn.split("."))  # noqa: E731
    trainable = []
    for fqn, param in model.named_parameters():  # tied parameters appear once
        keep = bool(predicate(fqn, param))
        param.requires_grad_(keep)
        if keep:
            trainable.append(fqn)
    return trainable


@dataclass(frozen=True)
class ParameterCount:
    total: int
    """Elements of all parameters, each tied/shared parameter once (meta tensors count by numel)."""
    trainable: int
    """Elements of the parameters with requires_grad."""
    nbytes: int
    """Bytes of parameters and buffers, each tensor once."""


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and trainable parameter elements (tied weights once) and bytes of parameters + buffers."""
    seen: set[int] = set()
    total = trainable = nbytes = 0
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        nbytes += p.numel() * p.element_size()
    for _, b in model.named_buffers(remove_duplicate=False):
        if id(b) not in seen:
            seen.add(id(b))
            nbytes += b.numel() * b.element_size()
    return ParameterCount(total=total, trainable=trainable, nbytes=nbytes)
