"""Save and load LoRA / DoRA / QLoRA adapters on their own (a few MB), apart from the base model.

`save_adapters(model, "run/adapters.safetensors")` writes only the adapter tensors (`lora_A`,
`lora_B`, DoRA's `lora_magnitude`) under their module names, with the applied config as JSON in the
safetensors header, plus the same JSON beside it (`adapters.json`) for people to read.
`load_adapters(base_model, path)` applies that config to a base model and loads the tensors; a
tensor of another shape, or one the model lacks, is refused with one line and the model is left as
it was. Names from an llmopt model and from a `transformers` LlamaForCausalLM (`model.` prefix)
load into either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from llmopt.core import apply_, applied_techniques, config_from_dict, revert_
from llmopt.core.registry import entry_for_config
from llmopt.techniques.lora import ADAPTER_PREFIX, ADAPTER_TECHNIQUES

CONFIG_KEY = "llmopt_adapter_config"
HF_PREFIX = "model."


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{fqn: tensor} of every adapter parameter (name component starting with `lora_`)."""
    return {fqn: p.detach() for fqn, p in model.named_parameters()
            if fqn.rpartition(".")[2].startswith(ADAPTER_PREFIX)}


def _adapter_config(model: nn.Module):
    found = [c for c in applied_techniques(model)
             if (e := entry_for_config(c)) is not None and e.name in ADAPTER_TECHNIQUES]
    if not found:
        raise ValueError("save_adapters: the model has no adapters; apply lora, dora or qlora first")
    if len(found) > 1:
        raise ValueError(f"save_adapters: several adapter techniques applied ({len(found)}); save one model per adapter")
    return found[0]


def has_adapters(model: nn.Module) -> bool:
    """Whether an adapter technique (lora, dora, qlora) is applied to `model`."""
    return any((e := entry_for_config(c)) is not None and e.name in ADAPTER_TECHNIQUES
               for c in getattr(model, "applied_techniques", []))


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter tensors to `path` (.safetensors) and the config to `path` with suffix .json."""
    from safetensors.torch import save_file

    path = Path(path)
    config = _adapter_config(model)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={CONFIG_KEY: config_json})
    os.replace(tmp, path)  # atomic: a crash never leaves half a file under the real name
    path.with_suffix(".json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def _rename_for(model_keys: set[str], file_keys: list[str]) -> dict[str, str]:
    """file key -> model key, adding or removing the `model.` prefix of transformers models if needed."""
    if set(file_keys) <= model_keys:
        return {k: k for k in file_keys}
    added = {k: HF_PREFIX + k for k in file_keys}
    if set(added.values()) <= model_keys:
        return added
    removed = {k: k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k for k in file_keys}
    return removed


def load_adapters(base_model: nn.Module, path: str | os.PathLike):
    """Apply the saved adapter config to `base_model` and load the saved adapters; returns the ApplyReport."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter file; save one with save_adapters(model, path)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors adapter file ({e})") from None
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: no {CONFIG_KEY!r} in the header; it was not written by save_adapters")
    config = config_from_dict(json.loads(metadata[CONFIG_KEY]))
    report = apply_(base_model, config)
    params = dict(base_model.named_parameters())
    model_keys = set(adapter_state_dict(base_model))
    rename = _rename_for(model_keys, list(tensors))
    problem = None
    missing = sorted(model_keys - set(rename.values()))
    for key, target in rename.items():
        if target not in params:
            problem = f"{key} is not in the model (these adapters were saved from another model)"
        elif tuple(params[target].shape) != tuple(tensors[key].shape):
            problem = (f"{key} has shape {tuple(tensors[key].shape)} but the model expects "
                       f"{tuple(params[target].shape)} (these adapters were trained for another model shape)")
        if problem:
            break
    if problem is None and missing:
        problem = f"the file lacks {missing[0]} (+{len(missing) - 1} more) that {config.technique_name} adds to this model"
    if problem is not None:
        revert_(base_model, config.technique_name)
        raise ValueError(f"{path}: {problem}")
    with torch.no_grad():
        for key, target in rename.items():
            params[target].copy_(tensors[key])
    return report


__all__ = ["adapter_state_dict", "has_adapters", "load_adapters", "save_adapters"]
