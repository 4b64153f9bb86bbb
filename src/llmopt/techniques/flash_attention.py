"""FlashAttention: exact attention whose memory grows linearly with sequence length, on CPU and GPU.

FlashAttention (Dao et al. 2022, arXiv:2205.14135) and FlashAttention-2 (Dao 2023,
arXiv:2307.08691): tiles of queries and keys, an online softmax, and recomputation in the backward,
so only q, k, v, the output and the per-row logsumexp are saved (`llmopt.kernels.flash_attention`).

```python
report = apply_(model, FlashAttentionConfig())                    # SDPA flash / Triton / tiled, exact
report = apply_(model, FlashAttentionConfig(window=256))          # sliding-window attention (Mistral)
report = apply_(model, FlashAttentionConfig(document_token=0))    # packed documents split at token 0
```
Each `Attention` module becomes `FlashAttention` (a subclass: parameters and state-dict keys keep
their names; it also stacks on fused_ops' `RoPEFusedAttention`), whose `attend` calls the chosen
kernel. With a KV cache (an explicit cache mask) it falls back to the stock SDPA path. Document
masks: a forward pre-hook on `embed_tokens` reads the token ids and gives token t the number of
`document_token`s before it as its document id, so a packed sequence's documents never attend to
each other (the separator belongs to the document it ends).

Backends: "auto" (Triton on CUDA; on CPU, SDPA's flash kernel for plain causal attention and the
tiled torch kernel for windows and documents: flex_attention has no CPU backward, this does),
"tiled", "sdpa", "triton", "reference" (materialized scores: the oracle, O(T^2) memory).

Numerics contract: plain causal attention is exact attention: within ~1e-6 relative of the stock
SDPA model in fp32 (reordered sums; "sdpa" and "auto" on CPU are bit-identical). `window` and
`document_token` change the function by design (a different mask), and match a materialized-mask
reference to the same ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.core import ApplyReport, Stage, TechniqueConfig, fqn_filter, register, register_revert, replace_modules
from llmopt.core.surgery import get_submodule_parent
from llmopt.kernels import flash_attention
from llmopt.models.llama import Attention
from llmopt.techniques.fused_ops import swap_class, with_mixin

__all__ = ["FlashAttentionConfig", "FlashAttentionMixin", "apply_flash_attention", "document_ids",
           "revert_flash_attention"]


@dataclass(frozen=True, kw_only=True)
class FlashAttentionConfig(TechniqueConfig):
    """Exact attention with O(T) memory, forward and backward, with causal, sliding-window and document masks."""

    backend: Literal["auto", "tiled", "sdpa", "triton", "reference"] = "auto"
    """Kernel: "auto" (Triton on CUDA; SDPA flash for plain causal on CPU, else tiled), or one explicitly."""
    window: int | None = None
    """Sliding window in tokens (each token sees itself and the window-1 before it); None: full causal."""
    document_token: int | None = None
    """Token id that ends each packed document; attention never crosses documents. None: no document mask."""
    block_q: int = 256
    """Query rows per tile of the "tiled" kernel."""
    block_k: int = 512
    """Key rows per tile of the "tiled" kernel."""
    include: tuple[str, ...] = ()
    """Swap only attention modules matching these fqn patterns (fqn_filter syntax); empty means all."""

    def __post_init__(self) -> None:
        if self.window is not None and self.window <= 0:
            raise ValueError(f"window must be a positive number of tokens, got {self.window}; or None for none")
        if self.block_q <= 0 or self.block_k <= 0:
            raise ValueError(f"block_q and block_k must be positive, got {self.block_q}, {self.block_k}")
        if self.backend == "sdpa" and (self.window is not None or self.document_token is not None):
            raise ValueError("backend='sdpa' has no sliding-window or document masks; use backend='auto' or 'tiled'")
        if self.document_token is not None and self.document_token < 0:
            raise ValueError(f"document_token must be a token id (>= 0), got {self.document_token}")


def document_ids(idx: torch.Tensor, document_token: int) -> torch.Tensor:
    """(B, T) document id of each token: the number of `document_token`s strictly before it."""
    ends = (idx == document_token).to(torch.int32)
    return F.pad(ends.cumsum(1)[:, :-1], (1, 0))


class _Documents:
    """Token ids of the current forward, shared by the model's flash-attention modules (set by a hook)."""

    def __init__(self, document_token: int) -> None:
        self.document_token = document_token
        self.ids: torch.Tensor | None = None

    def hook(self, module: nn.Module, args) -> None:
        self.ids = document_ids(args[0], self.document_token)


class FlashAttentionMixin:
    """Attention whose `attend` runs `llmopt.kernels.flash_attention` (mixed into any Attention class)."""

    flash_options: dict = {}
    flash_documents: _Documents | None = None

    def attend(self, q, k, v, *, mask, is_causal: bool) -> torch.Tensor:
        if mask is not None or q.shape[2] != k.shape[2]:  # KV-cache decoding: the stock SDPA path and cache mask
            return super().attend(q, k, v, mask=mask, is_causal=is_causal)
        docs = self.flash_documents.ids if self.flash_documents is not None else None
        if docs is not None and docs.shape != (q.shape[0], q.shape[2]):
            raise RuntimeError(f"document ids {tuple(docs.shape)} do not match the attention input "
                               f"{(q.shape[0], q.shape[2])}; call the model on token ids (embed_tokens must see them)")
        return flash_attention(q, k, v, causal=is_causal, doc_ids=docs, **self.flash_options)


@register(FlashAttentionConfig, name="flash_attention", stage=Stage.SURGERY, workload="train")
def apply_flash_attention(model: nn.Module, config: FlashAttentionConfig, *, filter_fn=None) -> ApplyReport:
    """Swap each Attention module for a FlashAttention subclass; hook embed_tokens for document masks."""
    include = fqn_filter(config.include or None)
    options = dict(backend=config.backend, window=config.window, block_q=config.block_q, block_k=config.block_k)
    documents = _Documents(config.document_token) if config.document_token is not None else None

    def chosen(module: nn.Module, fqn: str) -> bool:
        return include(module, fqn) and (filter_fn is None or filter_fn(module, fqn))

    def build(module: nn.Module, fqn: str) -> nn.Module:
        new = swap_class(module, with_mixin(FlashAttentionMixin, type(module), "Flash"))
        new.flash_options, new.flash_documents = options, documents
        return new

    policy = {type(m): build for m in model.modules()
              if isinstance(m, Attention) and not isinstance(m, FlashAttentionMixin)}
    originals = {fqn: type(m) for fqn, m in model.named_modules() if type(m) in policy}
    skipped: dict[str, str] = {}
    changed = replace_modules(model, policy, filter_fn=chosen, skipped=skipped)
    report = ApplyReport(changed=changed, skipped=skipped)
    report.revert_state["classes"] = {fqn: originals[fqn] for fqn in changed}
    if documents is not None and changed:
        embed = getattr(model, "embed_tokens", None)
        if embed is None:
            raise ValueError("document_token needs the token ids, read from model.embed_tokens, which this model "
                             "lacks; use document_token=None")
        report.revert_state["hook"] = embed.register_forward_pre_hook(documents.hook)
        changed["embed_tokens"] = (type(embed).__name__, f"{type(embed).__name__} (+ document-id pre-hook)")
    mask = "causal" + (f", window {config.window}" if config.window else "") + \
        (f", documents split at token {config.document_token}" if config.document_token is not None else "")
    report.notes.append(f"backend={config.backend}; mask: {mask}; KV-cache decoding keeps the SDPA path")
    return report


@register_revert(FlashAttentionConfig)
def revert_flash_attention(model: nn.Module, report: ApplyReport) -> ApplyReport:
    """Restore the original attention classes (same parameters) and remove the document hook."""
    changed = {}
    for fqn, cls in report.revert_state["classes"].items():
        parent, attr = get_submodule_parent(model, fqn)
        old = swap_class(getattr(parent, attr), cls)
        old.__dict__.pop("flash_options", None)
        old.__dict__.pop("flash_documents", None)
        setattr(parent, attr, old)
        changed[fqn] = report.changed[fqn][::-1]
    if "hook" in report.revert_state:
        report.revert_state["hook"].remove()
        changed["embed_tokens"] = report.changed["embed_tokens"][::-1]
    return ApplyReport(changed=changed)
