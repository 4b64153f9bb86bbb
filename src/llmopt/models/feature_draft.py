"""A feature-level draft head for speculative decoding (EAGLE: Li, Wei, Zhang & Zhang 2024, "EAGLE:
Speculative Sampling Requires Rethinking Feature Uncertainty").

A separate small draft model has to guess the target's next token from the tokens alone; this head also
reads the target's own final hidden state, so it only has to carry the target's view one token further.
At position p it takes the target's (normalized) final hidden state h_p and the embedding of the token
at p + 1, mixes them with one linear layer and one decoder block of the target's shape, and predicts
h_{p+1}; the target's own output projection, restricted to the `vocab_ids` the target actually emits,
turns that into the guess for the token at p + 2. Drafting several tokens feeds the head its own
predicted features.

Cost per drafted token: `fc` (2 dim^2) + one block + dim x len(vocab_ids) for the projection; on
SmolLM2-135M with one block and 8,192 kept tokens, about 9M multiply-adds against the target's 135M.
The token embedding and output rows are the target's: `attach(target)` links them (they are not saved).

Files (`save` / `load`): `feature_draft.json` (shape, target fingerprint, training record) and
`feature_draft.safetensors` (fc, blocks, norm, vocab_ids).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from llmopt.models.config import ModelConfig
from llmopt.models.llama import Block, RMSNorm, rope_tables

CONFIG_FILE = "feature_draft.json"
WEIGHTS_FILE = "feature_draft.safetensors"


class FeatureDraft(nn.Module):
    """EAGLE-style draft head for a Llama-family `target` (see the module docstring).

    `vocab_ids` (N,): the token ids the head can propose (the target's most frequent greedy outputs);
    `n_layer`: decoder blocks of the target's width (1 in EAGLE); `prev_token`: also read the embedding of the
    token at p itself (so a key at j carries t_j and the head's one attention layer can copy: a query for the
    token after t_{p+1} matches the key where t_j == t_{p+1} and reads h_j, the target's guess for t_{j+1}: an
    induction head in one layer, which text that repeats itself needs). An int n reads the n tokens at p, p - 1,
    ...: with 2, a key at j carries (t_{j-1}, t_j) and its value t_{j+1}, so the query at p, carrying
    (t_p, t_{p+1}), can match the bigram and copy the token that followed it (a single token matches too often).
    """

    def __init__(self, target_config: ModelConfig, vocab_ids: torch.Tensor, *, n_layer: int = 1,
                 prev_token: bool | int = False) -> None:
        super().__init__()
        if target_config.family != "llama":
            raise ValueError(f"a feature draft needs a llama-family target, got {target_config.family!r}")
        if n_layer < 1:
            raise ValueError(f"a feature draft needs at least one block, got n_layer={n_layer}")
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long).flatten()
        if vocab_ids.numel() < 1 or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= target_config.vocab_size:
            raise ValueError(f"vocab_ids must be non-empty ids in [0, {target_config.vocab_size})")
        self.config = dataclasses.replace(target_config, n_layer=n_layer, name="feature-draft")
        dim = self.config.dim
        self.n_prev = int(prev_token)
        """How many tokens the head reads beside the features: at p, p - 1, ... (0: EAGLE's head)."""
        if not 0 <= self.n_prev <= 4:
            raise ValueError(f"prev_token must be a bool or 0..4 tokens, got {prev_token}")
        self.prev_token = self.n_prev > 0
        self.fc = nn.Linear((2 + self.n_prev) * dim, dim, bias=False)
        self.layers = nn.ModuleList(Block(self.config, i) for i in range(n_layer))
        self.norm = RMSNorm(dim, self.config.norm_eps)
        self.register_buffer("vocab_ids", vocab_ids.clone())
        self.head = nn.Linear(dim, vocab_ids.numel(), bias=False)
        self.head.weight.requires_grad_(False)
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.info: dict = {}
        """Training record (saved in feature_draft.json)."""
        self.__dict__["_embed"] = None  # the target's embedding, linked by attach (not a submodule: not saved)
        self.__dict__["_target_fingerprint"] = None

    # ---- the target's pieces ---------------------------------------------------------------------
    @staticmethod
    def fingerprint(target) -> dict:
        c = target.config
        return {"vocab_size": c.vocab_size, "dim": c.dim, "n_head": c.n_head, "n_kv_head": c.n_kv_head,
                "head_dim": c.head_dim, "intermediate_size": c.intermediate_size, "rope_theta": c.rope_theta,
                "lm_head_sum": round(float(target.lm_head.weight[:64].detach().double().sum()), 4)}

    def attach(self, target) -> "FeatureDraft":
        """Link the target's token embedding and copy its output rows for `vocab_ids`; checks the shapes."""
        got = self.fingerprint(target)
        want = self.__dict__["_target_fingerprint"]
        if want is not None and want != got:
            diff = {k: (want.get(k), got.get(k)) for k in got if want.get(k) != got.get(k)}
            raise ValueError(f"this feature draft was trained for another target (saved vs given: {diff}); "
                             "train one for this model with python -m llmopt.recipes.feature_draft")
        if target.config.dim != self.config.dim or target.config.vocab_size != self.config.vocab_size:
            raise ValueError(f"feature draft of width {self.config.dim} / vocabulary {self.config.vocab_size} "
                             f"does not fit a target of width {target.config.dim} / vocabulary "
                             f"{target.config.vocab_size}")
        weight = target.lm_head.weight
        if type(self.head) is not nn.Linear:
            raise ValueError(f"the feature draft's output layer is a {type(self.head).__name__} (quantized after "
                             "attach): attach the head to its target before quantizing it")
        with torch.no_grad():
            self.head.weight.data = weight[self.vocab_ids.to(weight.device)].detach().to(self.dtype).clone()
        self.__dict__["_embed"] = target.embed_tokens
        self.__dict__["_target_fingerprint"] = got
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The head's float dtype (its activations): the norm's, which weight-only quantization of the linears leaves
        as it is."""
        return self.norm.weight.dtype

    @property
    def attached(self) -> bool:
        return self.__dict__["_embed"] is not None

    def attached_to(self, target) -> bool:
        return self.__dict__["_embed"] is target.embed_tokens

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.attached:
            raise ValueError("feature draft is not attached to its target: call draft.attach(target) first")
        return self.__dict__["_embed"](tokens)

    def mix(self, features: torch.Tensor, next_tokens: torch.Tensor,
            prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks' input (B, T, dim): `fc` over the target's features h_p, the embeddings of the tokens at
        p + 1 and (a `prev_token` head) of the tokens at p (B, T), or at p, p - 1, ... (B, T, n_prev) for a head
        that reads more than one (`context_tokens` builds them), in the head's dtype."""
        dtype = self.dtype
        parts = [features.to(dtype), self.embed(next_tokens).to(dtype)]
        if self.n_prev:
            if prev_tokens is not None and prev_tokens.dim() == next_tokens.dim():
                prev_tokens = prev_tokens[..., None]
            if prev_tokens is None or prev_tokens.shape != (*next_tokens.shape, self.n_prev):
                raise ValueError(f"this feature draft reads the {self.n_prev} token(s) at p, p - 1, ... too "
                                 f"(prev_token={self.n_prev}): pass prev_tokens of shape "
                                 f"{tuple(next_tokens.shape) + ((self.n_prev,) if self.n_prev > 1 else ())} "
                                 "(draft.context_tokens(seq, start, stop) builds them)")
            parts += [self.embed(prev_tokens[..., i]).to(dtype) for i in range(self.n_prev)]
        return self.fc(torch.cat(parts, dim=-1))

    def context_tokens(self, seq: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
        """The tokens this head reads beside the features at positions start..stop-1, from token rows `seq`
        (B, L) with seq[:, p] the token at p: (B, T) (the tokens at p) for a one-token head, (B, T, n_prev) (at p,
        p - 1, ...; id 0 before position 0) for more, None for a head that reads none."""
        if not self.n_prev:
            return None
        cols = []
        for i in range(self.n_prev):
            a, b = start - i, stop - i
            col = seq[:, max(a, 0):max(b, 0)]
            if a < 0:
                col = torch.cat([seq.new_zeros(seq.size(0), min(-a, b - a)), col], dim=1)
            cols.append(col)
        return cols[0] if self.n_prev == 1 else torch.stack(cols, dim=-1)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, features: torch.Tensor, next_tokens: torch.Tensor, *, prev_tokens: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Predicted features (B, T, dim) at positions p + 1 from the target's features h_p (B, T, dim), the
        tokens at p + 1 (B, T) and, for a `prev_token` head, the tokens at p (B, T); `input_pos` (T,) are the
        positions p (required with a cache)."""
        T = features.size(1)
        x = self.mix(features, next_tokens, prev_tokens)
        if input_pos is None:
            if cache is not None:
                raise ValueError("input_pos is required with a cache: pass the positions p of the features, shape (T,)")
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = cache.attn_mask(input_pos) if cache is not None else "causal"
        for layer in self.layers:
            x = layer(x, cos, sin, cache=cache, input_pos=input_pos, mask=mask)
        return self.norm(x)

    def forward_cached(self, features: torch.Tensor, next_tokens: torch.Tensor, *, prev_tokens: torch.Tensor | None = None,
                       input_pos: torch.Tensor, cache) -> torch.Tensor:
        """`forward` through a cache: what decoding calls (`llmopt.inference.cpu_linear` swaps in the fused CPU
        step for the blocks here, as it does for a Transformer's decode step)."""
        return self(features, next_tokens, prev_tokens=prev_tokens, input_pos=input_pos, cache=cache)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (..., len(vocab_ids)) over the kept tokens."""
        return self.head(features)

    def full_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (..., vocab_size): the kept tokens' logits, -inf elsewhere (for sampling and tests)."""
        small = self.logits(features)
        out = small.new_full((*small.shape[:-1], self.config.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.vocab_ids, small)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def multiply_adds_per_token(self) -> int:
        """Weights one drafted token reads: fc, the blocks, the norm and the kept output rows."""
        return sum(p.numel() for p in self.parameters())

    # ---- files -----------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("head.")}
        save_file(tensors, str(out / WEIGHTS_FILE))
        meta = {"kind": "feature_draft", "n_layer": self.config.n_layer, "vocab_kept": int(self.vocab_ids.numel()),
                "prev_token": self.n_prev,
                "target": self.__dict__["_target_fingerprint"], "target_config": dataclasses.asdict(self.config), "info": self.info}
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path, target=None, *, dtype: torch.dtype | None = None) -> "FeatureDraft":
        """The head saved at `path` (a directory with feature_draft.json), attached to `target` if given.

        `dtype`: cast the head's weights (e.g. torch.bfloat16: half the bytes each drafted token reads, so about
        half the drafting time on a CPU, where a head's step is bound by reading its weights; the target's output
        stays exact, only the proposals can change)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise ValueError(f"{path} has no {CONFIG_FILE}: not a feature draft directory (train one with "
                             "python -m llmopt.recipes.feature_draft --out DIR)")
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
            config = ModelConfig(**{k: v for k, v in meta["target_config"].items() if k != "n_layer"}, n_layer=1)
            tensors = load_file(str(path / WEIGHTS_FILE))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise ValueError(f"cannot read the feature draft in {path} ({type(e).__name__}: {e}); "
                             "re-run the recipe that wrote it") from None
        draft = cls(config, tensors["vocab_ids"], n_layer=int(meta["n_layer"]), prev_token=int(meta.get("prev_token") or 0))
        missing, unexpected = draft.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ValueError(f"feature draft weights in {path} do not match its config (missing {missing}, "
                             f"unexpected {unexpected}); re-run the recipe that wrote it")
        draft.info = meta.get("info", {})
        draft.__dict__["_target_fingerprint"] = meta.get("target")
        draft.eval()
        if dtype is not None:
            if not dtype.is_floating_point:
                raise ValueError(f"a feature draft's dtype must be a floating-point one (float32, bfloat16), got {dtype}")
            draft.to(dtype)
        return draft.attach(target) if target is not None else draft


def is_feature_draft_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()
