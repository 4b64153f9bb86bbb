"""Run configuration: small per-component dataclasses, assembled by recipes, overridden by `--set key=value`.

A run is `RunConfig(model=..., data=..., train=..., optim=..., techniques=[...])`. Recipes
(`llmopt.recipes`) are Python functions returning a full `RunConfig`; the CLI applies dotted overrides
(`--set train.steps=200 --set optim.lr=3e-4`). An unknown key or a value of the wrong type is a
`ConfigError` with one line naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from llmopt.models.config import ModelConfig


class ConfigError(ValueError):
    """A bad configuration key or value; the message is one line with the fix."""


@dataclass(kw_only=True)
class DataConfig:
    path: str | None = None
    """A text file or a directory of .txt files; None means the bundled Shakespeare corpus."""
    tokenizer: Literal["bpe", "wordpiece"] = "bpe"
    """Tokenizer trained on the training text: byte-level BPE or WordPiece."""
    vocab_size: int | None = None
    """Tokenizer vocabulary size; None means the model's vocab_size."""
    val_fraction: float = 0.05
    """Share of the tokens held out for validation (the tail of the text)."""
    max_chars: int | None = None
    """Use only the first max_chars characters of the text (quick runs); None means all."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adamw (torch.optim.AdamW, foreach), or one registered by llmopt.optim: sgd, lamb, novograd,
    adamw8bit, galore (see `llmopt techniques`)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup from 0 to lr over this many optimizer steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (not norms, not biases)."""
    beta1: float = 0.9
    """Adam beta1 / SGD momentum."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    nesterov: bool = False
    """sgd: Nesterov momentum (momentum is beta1)."""
    freeze_embeddings: bool = False
    """sgd: freeze the token embeddings (the fine-tuning recipe of Kumar et al.; use it with init_from)."""
    rank: int = 128
    """galore: rank of the gradient projection (layers with a side <= rank get plain AdamW)."""
    update_proj_gap: int = 200
    """galore: optimizer steps between projector refreshes."""
    scale: float = 0.25
    """galore: scale of the back-projected update (the paper's alpha)."""
    optim_bits: int = 32
    """galore: 8 stores the low-rank moments in block-wise 8 bits (adamw8bit is always 8-bit)."""
    block_size: int = 256
    """adamw8bit and galore with optim_bits=8: elements per quantization block."""
    stable_embedding: bool = False
    """adamw8bit: keep 32-bit state for nn.Embedding weights (the optimizer half of StableEmbedding)."""
    bias_correction: bool = True
    """lamb: Adam bias correction of the moments (Algorithm 2 of the paper)."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    seq_len: int = 128
    """Tokens per sequence."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the loss is normalized by the step's target tokens: exact)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast compute dtype; weights and optimizer state stay fp32 (fp16 uses dynamic loss scaling)."""
    grad_clip: float | None = 1.0
    """Clipping threshold, applied once per step after unscaling (see clip_mode); None disables."""
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    """How grad_clip clips: global L2 norm, each element's value, or adaptive unit-wise clipping relative to the
    weight norm (AGC, Brock et al. 2021; grad_clip is then lambda, e.g. 0.01). See llmopt.optim.clipping."""
    eval_every: int = 50
    """Evaluate validation loss every this many steps (and at the end)."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    ckpt_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end)."""
    log_every: int = 10
    """Write a metrics.jsonl line every this many steps."""
    seed: int = 1337
    """Seed of model init, data order and dropout."""
    device: str = "cpu"
    """Device to train on (cpu, cuda)."""
    threads: int | None = None
    """torch.set_num_threads for the run; None leaves torch's default."""
    progress: bool = True
    """Show a rich progress bar."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")


@dataclass(kw_only=True)
class DistConfig:
    """How a run is spread over processes (`llmopt.train.distributed`); the defaults are one process."""

    mesh: str = ""
    """Named mesh, outermost axis first: `dp=4`, `dp=2,tp=2`, `pp=2,dp=2,tp=2`, or HSDP's `dp_replicate=2,dp_shard=4`.
    Empty: one process. The product must equal the world size (`--nproc` or torchrun's WORLD_SIZE)."""
    data_parallel: Literal["fsdp", "ddp"] = "fsdp"
    """What the `dp` axis does: FSDP2 full sharding (`fully_shard`) or DDP (gradients all-reduced). The
    `dp_replicate` x `dp_shard` axes always mean HSDP (replicate across, shard within)."""
    sequence_parallel: bool = True
    """With tp > 1, also shard the norms and residual stream along the sequence (Megatron SP)."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP mixed precision: the dtype parameters are all-gathered and computed in (masters stay fp32)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP mixed precision: the dtype gradients are reduce-scattered in."""
    reshard_after_forward: bool = True
    """FSDP: free the gathered parameters after each block's forward (ZeRO-3) or keep them until backward
    (ZeRO-2-like: less communication, more memory). Forced off for the stages of a pipeline."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs"] = "1f1b"
    """Pipeline schedule (torch.distributed.pipelining). The interleaved and looped schedules place two stages on
    each rank (virtual stages), so n_layer must be divisible by 2*pp. (torch 2.13's zero-bubble ZBV schedule trains
    but its eval() fails, so it is not offered.)"""
    pp_microbatches: int = 0
    """Micro-batches the pipeline splits each rank's batch into; 0 means 2*pp."""
    engine: Literal["torch", "deepspeed"] = "torch"
    """torch: DDP / FSDP2 / TP / PP as above. deepspeed: DeepSpeed ZeRO (`zero_stage`), dp axis only."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 1, 2 or 3 (engine=deepspeed only)."""
    backend: str = ""
    """Process-group backend; empty means nccl on cuda, gloo on cpu."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"dist.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.pp_microbatches < 0:
            raise ConfigError(f"dist.pp_microbatches must be >= 0, got {self.pp_microbatches}")


@dataclass(kw_only=True)
class RunConfig:
    recipe: str = "custom"
    """Recipe this run came from."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (a preset plus overrides)."""
    init_from: str | None = None
    """Start from pretrained weights (smollm2-135m, a GGUF file, a HF directory or a run directory) instead of random init; the tokenizer then comes from there too."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    techniques: list[str] = field(default_factory=list)
    """Techniques by registry name with options, e.g. `lora:r=8` (see `llmopt techniques`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        return _build(cls, values, prefix="")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _build(cls, values: dict[str, Any], prefix: str):
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"unknown config key {prefix}{key!r}; valid keys: {', '.join(prefix + k for k in known)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value, prefix=f"{prefix}{name}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _coerce(key: str, text: str, hint: Any) -> Any:
    """Parse the string `text` of an override into the type `hint` of the field `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, text, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {text!r}")
    if origin is Literal:
        if text not in args:
            raise ConfigError(f"{key}={text!r} is not one of: {', '.join(map(str, args))}")
        return text
    if origin is list:
        return [t for t in text.split(";") if t]  # technique specs contain commas: separate items with ;
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r} is not a boolean; use true or false")
    if hint in (int, float):
        try:
            value = float(text) if hint is float else int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not {'a number' if hint is float else 'an integer'}") from None
        return value
    if hint is str:
        return text
    if isinstance(hint, type) and hint is dict or origin is dict:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"{key}={text!r} is not a JSON object") from None
    raise ConfigError(f"{key} cannot be set from the command line")


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Return a new RunConfig with `key=value` overrides (dotted keys) applied and validated."""
    values = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key=value, e.g. train.steps=200")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        cls, target = RunConfig, values
        for depth, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if part not in fields:
                prefix = ".".join(parts[:depth])
                choices = ", ".join((prefix + "." if prefix else "") + f for f in fields)
                raise ConfigError(f"unknown config key {key!r}; valid keys here: {choices}")
            hint = typing.get_type_hints(cls)[part]
            if depth == len(parts) - 1:
                if dataclasses.is_dataclass(hint):
                    raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.{dataclasses.fields(hint)[0].name}=...")
                target[part] = _coerce(key, text, hint)
            else:
                if not dataclasses.is_dataclass(hint):
                    raise ConfigError(f"{'.'.join(parts[:depth + 1])} is not a section; use --set {'.'.join(parts[:depth + 1])}=VALUE")
                cls, target = hint, target[part]
    return RunConfig.from_dict(values)
