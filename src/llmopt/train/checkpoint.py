"""Checkpoints: safetensors for tensors, one JSON for everything else, written atomically.

A checkpoint is a directory `checkpoints/step_000050/` holding
- `model.safetensors`: the model state dict (tied weights stored once),
- `optimizer.safetensors`: every tensor of the optimizer state, keyed `state.<param index>.<name>`,
  plus the RNG states (`rng.torch`, `rng.cuda.N`),
- `state.json`: the step, the full run config, the optimizer's param groups and non-tensor state,
  the data position, hook and scaler states, the applied techniques, and the sha256 of both tensor files.

It is written to a temporary directory and renamed into place, `state.json` last, so a crash never
leaves a half-written checkpoint under a final name; `latest` (a one-line file) is replaced
atomically too. Loading verifies the hashes, so a truncated or corrupt file is refused with a one-line
`CheckpointError`, and a checkpoint of another model shape is refused naming the keys that differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with shared (tied) tensors stored once; safetensors refuses aliases."""
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Write the model's weights to a safetensors file atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(_unique_state_dict(model), str(tmp), metadata={"format": "llmopt"})
    os.replace(tmp, path)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict into `model` strictly (tied weights may be absent)."""
    path = Path(path)
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such weights file") from None
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"{path}: unreadable weights ({type(e).__name__}: {e}); the file is corrupt or "
                              "truncated, use another checkpoint") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _is_tied_alias(model, k, state)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); load them into the model config they were saved from")
    for k, v in state.items():
        if tuple(expected[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)} but the model expects "
                                  f"{tuple(expected[k].shape)}; the checkpoint is from another model config")
    model.load_state_dict(state, strict=False)


def _is_tied_alias(model: torch.nn.Module, key: str, state: dict) -> bool:
    sd = model.state_dict()
    ptr = sd[key].untyped_storage().data_ptr()
    return any(k in state and sd[k].untyped_storage().data_ptr() == ptr for k in sd if k != key)


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_checkpoint(ckpt_dir: str | Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    run_config: dict[str, Any], extra: dict[str, Any] | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write `ckpt_dir/step_NNNNNN/` atomically and point `ckpt_dir/latest` at it. Returns the directory."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".step_{step:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    save_file(_unique_state_dict(model), str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    rng = rng_states()
    opt_tensors["rng.torch"] = rng["torch"]
    for i, s in enumerate(rng.get("cuda", [])):
        opt_tensors[f"rng.cuda.{i}"] = s
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))

    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "run_config": run_config,
        "optimizer": opt_meta,
        "python_rng": _jsonable_random_state(rng["python"]),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "applied_techniques": [_config_dict(c) for c in getattr(model, "applied_techniques", [])],
        "sha256": {name: _sha256(tmp / name) for name in ("model.safetensors", "optimizer.safetensors")},
        **(extra or {}),
    }
    _write_json_atomic(tmp / "state.json", state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(ckpt_dir / "latest", final.name + "\n")
    return final


def _config_dict(config: Any) -> Any:
    return config.to_dict() if hasattr(config, "to_dict") else config


def _jsonable_random_state(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _write_json_atomic(path: Path, data: Any) -> None:
    _write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to a checkpoint's JSON")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The directory `latest` points at, or None when there is no checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points at {path.name}, which does not exist; delete {pointer} or restore it")
    return path


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's state.json, or a one-line CheckpointError when it is missing or corrupt."""
    state_file = Path(path) / "state.json"
    try:
        return json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state_file}: missing; {path} is not a complete checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file}: corrupt JSON ({e}); use an earlier checkpoint") from None


def check_model_config(path: Path, saved: dict, expected_model_config: dict) -> None:
    """Refuse (one line) a checkpoint written for another model shape."""
    diff = sorted(k for k in set(saved) | set(expected_model_config)
                  if k != "name" and saved.get(k) != expected_model_config.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {expected_model_config.get(k)!r}"
                            for k in diff[:3])
        raise CheckpointError(f"{path}: checkpoint is for a different model ({details}); resume with the same "
                              "model config or start a new --out directory")


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None, expected_model_config: dict | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Verify and load a checkpoint directory into model/optimizer/scaler; return its state.json dict."""
    path = Path(path)
    state_file = path / "state.json"
    state = read_state(path)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_file}: format version {state.get('format_version')} is not "
                              f"{FORMAT_VERSION}; it was written by another llmopt version")
    for name, digest in state.get("sha256", {}).items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing from the checkpoint; use an earlier checkpoint")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: contents do not match the recorded sha256 (corrupt or truncated); "
                                  "use an earlier checkpoint")
    if expected_model_config is not None:
        check_model_config(path, state["run_config"].get("model", {}), expected_model_config)
    load_weights(model, path / "model.safetensors")
    tensors = load_file(str(path / "optimizer.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_from_flat(tensors, state["optimizer"]))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    return state
