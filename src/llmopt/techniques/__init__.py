"""Model-transform techniques: one module per technique, each an `XxxConfig` plus a registered `apply_xxx`.

Every module in this package is imported here, so that importing `llmopt.techniques` registers all
techniques with `llmopt.core` and re-exports each module's `__all__` (`from llmopt.techniques import
LoRAConfig`). A new technique is a new file in this folder: nothing else needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__: list[str] = []

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)

