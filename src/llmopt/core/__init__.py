"""The technique core: config base, registry, `apply_`/`revert_`, ApplyReport, module surgery, Hook.

Imports torch and the standard library only; every other layer builds on it (DESIGN.md §2-3).
"""

from llmopt.core.apply import (
    APPLIED_ATTR,
    NoEffectError,
    NoEffectWarning,
    NotReversibleError,
    applied_techniques,
    apply_,
    revert_,
)
from llmopt.core.config import TechniqueConfig, config_from_dict
from llmopt.core.hooks import HOOK_POINTS, Hook, HookList, call_hooks
from llmopt.core.registry import (
    KINDS,
    WORKLOADS,
    Stage,
    TechniqueEntry,
    UnknownTechniqueError,
    isolated_registry,
    lookup,
    name_of,
    register,
    register_revert,
    register_technique,
    registered,
)
from llmopt.core.report import ApplyReport, CombinedReport, human_count
from llmopt.core.spec import TechniqueSpec, format_technique_spec, parse_technique_spec, technique_options
from llmopt.core.surgery import (
    FilterFn,
    FqnFilter,
    ParameterCount,
    SkipModule,
    count_parameters,
    fqn_filter,
    freeze_all_but,
    get_submodule_parent,
    replace_modules,
)

__all__ = [
    "APPLIED_ATTR", "HOOK_POINTS", "KINDS", "WORKLOADS",
    "ApplyReport", "CombinedReport", "FilterFn", "FqnFilter", "Hook", "HookList", "NoEffectError",
    "NoEffectWarning", "NotReversibleError", "ParameterCount", "SkipModule", "Stage", "TechniqueConfig",
    "TechniqueEntry", "TechniqueSpec", "UnknownTechniqueError",
    "applied_techniques", "apply_", "call_hooks", "config_from_dict", "count_parameters", "format_technique_spec",
    "fqn_filter", "freeze_all_but", "get_submodule_parent", "human_count", "isolated_registry", "lookup", "name_of",
    "parse_technique_spec", "register", "register_revert", "register_technique", "registered", "replace_modules",
    "revert_", "technique_options",
]
