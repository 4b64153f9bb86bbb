"""Hugging Face `transformers` interop: Llama-family configs, weights and models, both ways.

The llmopt decoder (`llmopt.models.llama`) uses `LlamaForCausalLM`'s module names minus the `model.`
prefix, RoPE in the same `rotate_half` layout and RMSNorm computed the same way, so conversion is a
rename and nothing else: no permutation, no reshaping. Numerics contract: same logits as
`transformers` on the same weights to within float rounding (tested at 1e-5 in fp32).

Accepted `model_type`s:
- `llama`: the reference.
- `mistral`: structurally identical to Llama when attention is global; accepted only with
  `sliding_window` None or at least `max_position_embeddings` (the window then never masks anything).

Refused (a one-line `ValueError`): attention or MLP biases (so `qwen2`, which has q/k/v biases, is
refused), rope scaling other than the default (`llama3`, `linear`, `dynamic`, `yarn`, ...), any
activation other than SiLU, attention dropout, and every other `model_type` (`qwen3` has q/k norms,
`gemma` scales embeddings and norms by 1 + w, `phi3` fuses q/k/v, ...).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from llmopt.models.config import ModelConfig
from llmopt.models.llama import Transformer

SUPPORTED_MODEL_TYPES = ("llama", "mistral")

_HF_PREFIX = "model."
_LM_HEAD = "lm_head.weight"
# Buffers that old checkpoints saved and that we recompute (never weights).
_DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def _get(hf_config: Any, key: str, default: Any = None) -> Any:
    """A field of a `transformers` config object or of a plain config.json dict."""
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def _rope_theta(hf_config: Any) -> float:
    """rope_theta from `rope_parameters` (transformers 5), `rope_scaling` or the flat field (transformers 4)."""
    theta = _get(hf_config, "rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        params = _get(hf_config, key)
        if not params:
            continue
        if not isinstance(params, Mapping):
            raise ValueError(f"unsupported {key}={params!r}: expected a dict with rope_type and rope_theta")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported rope scaling {rope_type!r} ({key}); llmopt implements only the default RoPE")
        theta = params.get("rope_theta", theta)
    return float(theta if theta is not None else 10000.0)


def config_from_hf(hf_config: Any) -> ModelConfig:
    """The `ModelConfig` of a Llama-family `transformers` config (object, or config.json as a dict).

    Raises a one-line `ValueError` for anything the llmopt decoder does not compute the same way.
    """
    model_type = _get(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; llmopt converts: {', '.join(SUPPORTED_MODEL_TYPES)} "
                         "(qwen2 has q/k/v biases, gemma and qwen3 extra norms)")
    for key in ("attention_bias", "mlp_bias"):
        if _get(hf_config, key, False):
            raise ValueError(f"unsupported {key}=True; the llmopt decoder has bias-free projections")
    act = _get(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act={act!r}; the llmopt feed-forward is SwiGLU (silu)")
    if _get(hf_config, "attention_dropout", 0.0):
        raise ValueError("unsupported attention_dropout != 0; set it to 0.0 (llmopt attention has no dropout)")
    max_pos = int(_get(hf_config, "max_position_embeddings", 2048))
    window = _get(hf_config, "sliding_window")
    if window is not None and window < max_pos:
        raise ValueError(f"unsupported sliding_window={window} < max_position_embeddings={max_pos}; "
                         "llmopt attention is global")
    hidden, n_head = int(_get(hf_config, "hidden_size")), int(_get(hf_config, "num_attention_heads"))
    return ModelConfig(
        name=str(_get(hf_config, "_name_or_path", "") or f"hf-{model_type}"),
        family="llama",
        vocab_size=int(_get(hf_config, "vocab_size")),
        dim=hidden,
        n_layer=int(_get(hf_config, "num_hidden_layers")),
        n_head=n_head,
        n_kv_head=int(_get(hf_config, "num_key_value_heads") or n_head),
        head_dim=int(_get(hf_config, "head_dim") or hidden // n_head),
        intermediate_size=int(_get(hf_config, "intermediate_size")),
        rope_theta=_rope_theta(hf_config),
        norm_eps=float(_get(hf_config, "rms_norm_eps", 1e-6)),
        tie_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        max_seq_len=max_pos,
        init_std=float(_get(hf_config, "initializer_range", 0.02)),
    )


def config_to_hf(config: ModelConfig):
    """The `transformers.LlamaConfig` of an llmopt llama-family `ModelConfig`."""
    from transformers import LlamaConfig

    if config.family != "llama":
        raise ValueError(f"only family 'llama' converts to transformers, got {config.family!r}")
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
    )


def state_dict_from_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a `LlamaForCausalLM` state dict to llmopt names (`model.layers.0...` -> `layers.0...`).

    A pure renaming (tensors are not copied); rotary `inv_freq` buffers are dropped, any other key
    outside `model.*` and `lm_head.weight` raises.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_DROPPED_SUFFIXES):
            continue
        if key == _LM_HEAD:
            out[key] = value
        elif key.startswith(_HF_PREFIX):
            out[key[len(_HF_PREFIX):]] = value
        else:
            raise ValueError(f"unexpected key {key!r} in a Llama state dict (expected model.* or lm_head.weight)")
    return out


def state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an llmopt state dict to `LlamaForCausalLM` names (the inverse of `state_dict_from_hf`)."""
    return {key if key == _LM_HEAD else _HF_PREFIX + key: value for key, value in state_dict.items()}


def load_state_dict_(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict",
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
    """Load llmopt-named weights into `model` (built on `meta` or not) strictly, by assignment.

    Tied (shared) parameters need only one of their names in `state_dict` (checkpoints store them
    once); when several are given they must be equal. Floating tensors are cast to `dtype` and moved to
    `device`; the rotary tables (not weights) are rebuilt on `device`. Mismatched keys or shapes raise
    one line naming `source`.
    """
    expected = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}  # id of a shared tensor -> every state-dict name it has
    for key, value in expected.items():
        aliases.setdefault(id(value), []).append(key)
    sd = dict(state_dict)
    for names in aliases.values():
        given = [n for n in names if n in sd]
        if len(names) < 2 or not given:
            continue
        first = sd[given[0]]
        for other in given[1:]:
            if sd[other] is not first and not torch.equal(sd[other], first):
                raise ValueError(f"{source}: {other} differs from {given[0]} but the model ties them "
                                 "(tie_word_embeddings=True)")
        for name in names:
            sd[name] = first
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model: missing {_short(missing)}, "
                         f"unexpected {_short(unexpected)}")
    for key, ref in expected.items():
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(sd[key].shape)}, the model expects {tuple(ref.shape)}")
    device = torch.device(device) if device is not None else next(iter(sd.values())).device
    converted: dict[int, torch.Tensor] = {}  # convert each tensor once, so shared tensors stay shared

    def convert(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in converted:
            converted[id(t)] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        return converted[id(t)]

    model.load_state_dict({k: convert(v) for k, v in sd.items()}, strict=True, assign=True)
    for names in aliases.values():  # assign=True gave each name its own Parameter: tie them again
        if len(names) > 1:
            shared = model.get_parameter(names[0])
            for name in names[1:]:
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, shared)
    if isinstance(model, Transformer):
        model.rope_cos = torch.empty(0, device=device)  # reset_rope builds on the device of this buffer
        model.reset_rope()
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{source}: tensors left uninitialized on meta after loading: {_short(left)}")


def _short(names: list[str], n: int = 4) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def from_hf(hf_model, *, dtype: torch.dtype | None = None) -> Transformer:
    """An llmopt `Transformer` with a copy of the weights of a Llama-family `transformers` causal LM."""
    config = config_from_hf(hf_model.config)
    with torch.device("meta"):
        model = Transformer(config)
    sd = {k: v.detach().clone() for k, v in state_dict_from_hf(hf_model.state_dict()).items()}
    load_state_dict_(model, sd, source=f"{type(hf_model).__name__}", dtype=dtype)
    return model


def to_hf(model: Transformer):
    """A `transformers.LlamaForCausalLM` with a copy of the weights of an llmopt `Transformer`."""
    from transformers import LlamaForCausalLM

    if getattr(model, "applied_techniques", None):
        names = [type(c).__name__ for c in model.applied_techniques]
        raise ValueError(f"model has techniques applied ({', '.join(names)}); merge or revert them before to_hf")
    sd = model.state_dict()
    weight = model.embed_tokens.weight
    hf_model = LlamaForCausalLM(config_to_hf(model.config)).to(device=weight.device, dtype=weight.dtype)
    missing, unexpected = hf_model.load_state_dict(state_dict_to_hf(sd), strict=False)
    if unexpected or [k for k in missing if not k.endswith(_DROPPED_SUFFIXES)]:
        raise ValueError(f"to_hf: weights do not match LlamaForCausalLM: missing {_short(missing)}, "
                         f"unexpected {_short(unexpected)}")
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_hf", "config_to_hf", "from_hf", "load_state_dict_",
           "state_dict_from_hf", "state_dict_to_hf", "to_hf"]
