"""Constant-size recurrent states for the linear-time families (Mamba, RetNet), behind the cache interface.

`generate` treats them like a `KVCache`: `make_cache(model, batch_size, max_len)` builds one, `reset()`
empties it, `max_len` bounds the positions, `static` is False. The model calls `check_model(model)` and
`advance(input_pos, batch_size=B)` once per forward, then each layer reads and replaces its own state.
Unlike a KV cache, the memory does not grow with the context: `nbytes` is the same at position 10 and
at position 100,000 (`bytes_per_token` is 0).

A recurrent state cannot be rewound: `truncate(length)` accepts only the current length (a no-op) or 0
(a reset); speculative decoding with rollback therefore needs a KV-cache model.

Numerics contract: exact. The states are the ones the full-sequence forward computes internally (fp32).
"""

from __future__ import annotations

import torch


class RecurrentCache:
    """Shared position bookkeeping; subclasses allocate `_states()` and name the model shape they fit."""

    static = False
    key_padding = None

    def __init__(self, batch_size: int, max_len: int, dtype: torch.dtype, device) -> None:
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
        self.batch_size, self.max_len = batch_size, max_len
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seq_len = 0
        """Number of positions consumed so far."""
        self.reset()

    def shape_key(self) -> tuple:
        raise NotImplementedError

    def check_model(self, model) -> None:
        """Refuse a state built for another model size (one line, with both shapes)."""
        mine, theirs = self.shape_key(), type(self).shape_key_of(model)
        if mine != theirs:
            raise ValueError(f"{type(self).__name__} was built for {mine} but the model is {theirs}; "
                             "build the cache with make_cache(model, batch_size)")

    def advance(self, input_pos: torch.Tensor, *, batch_size: int) -> None:
        """Check that input_pos continues the state exactly, then move seq_len past it."""
        if batch_size != self.batch_size:
            raise ValueError(f"batch of {batch_size} rows does not match the cache's batch_size={self.batch_size}; "
                             "build the cache with make_cache(model, batch_size)")
        T = input_pos.numel()
        if T == 1:  # the decode step: one scalar read (stack + tolist costs more per token)
            lo = hi = int(input_pos.reshape(()).item())
        else:
            lo, hi = (int(v) for v in torch.stack([input_pos[0], input_pos[-1]]).tolist())
        if lo != self.seq_len or hi != lo + T - 1:
            raise ValueError(f"a recurrent state holds positions 0..{self.seq_len - 1} and can only continue at "
                             f"{self.seq_len}; got positions {lo}..{hi} (reset() the cache to start over)")
        if hi >= self.max_len:
            raise ValueError(f"position {hi} exceeds the cache's max_len={self.max_len}; pass a larger max_len")
        self.seq_len = hi + 1

    def set_key_padding(self, padding) -> None:
        """Left padding would feed pad tokens into the state; only None (no padding) is accepted."""
        if padding is not None and bool(padding.any()):
            raise ValueError("a recurrent state cannot hide left-padded prompt tokens; generate prompts of "
                             "different lengths one by one")

    def truncate(self, length: int) -> None:
        if length == self.seq_len:
            return
        if length == 0:
            self.reset()
            return
        raise ValueError(f"a recurrent state cannot be rewound from {self.seq_len} to {length} positions; "
                         "only truncate(0) (reset) or the current length")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    bytes_per_token = 0

    def _tensors(self):
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(key={self.shape_key()}, batch_size={self.batch_size}, max_len={self.max_len}, "
                f"seq_len={self.seq_len}, nbytes={self.nbytes})")


class MambaCache(RecurrentCache):
    """Per layer: conv state (B, d_inner, d_conv - 1) in the model dtype and SSM state (B, d_inner, d_state) fp32."""

    def __init__(self, n_layer: int, batch_size: int, d_inner: int, d_state: int, d_conv: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        self.n_layer, self.d_inner, self.d_state, self.d_conv = n_layer, d_inner, d_state, d_conv
        super().__init__(batch_size, max_len, dtype, device)

    @staticmethod
    def shape_key_of(model) -> tuple:
        s = model.settings
        return ("mamba", model.config.n_layer, s["d_inner"], s["d_state"], s["d_conv"])

    def shape_key(self) -> tuple:
        return ("mamba", self.n_layer, self.d_inner, self.d_state, self.d_conv)

    def reset(self) -> None:
        B = self.batch_size
        self.conv = [torch.zeros(B, self.d_inner, self.d_conv - 1, dtype=self.dtype, device=self.device)
                     for _ in range(self.n_layer)]
        self.ssm = [torch.zeros(B, self.d_inner, self.d_state, dtype=torch.float32, device=self.device)
                    for _ in range(self.n_layer)]
        self.seq_len = 0

    def _tensors(self):
        return [*self.conv, *self.ssm]


class RetNetCache(RecurrentCache):
    """Per layer: the retention state (B, n_head, head_dim, value_head_dim) in fp32."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, value_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        self.n_layer, self.n_head, self.head_dim, self.value_dim = n_layer, n_head, head_dim, value_dim
        super().__init__(batch_size, max_len, dtype, device)

    @staticmethod
    def shape_key_of(model) -> tuple:
        c = model.config
        return ("retnet", c.n_layer, c.n_head, c.head_dim, model.value_head_dim)

    def shape_key(self) -> tuple:
        return ("retnet", self.n_layer, self.n_head, self.head_dim, self.value_dim)

    def reset(self) -> None:
        shape = (self.batch_size, self.n_head, self.head_dim, self.value_dim)
        self.state = [torch.zeros(shape, dtype=torch.float32, device=self.device) for _ in range(self.n_layer)]
        self.seq_len = 0

    def _tensors(self):
        return self.state


def make_recurrent_cache(model, batch_size: int, max_len: int, dtype: torch.dtype) -> RecurrentCache:
    """The constant-size state for a Mamba or RetNet model."""
    param = next(model.parameters())
    family = model.config.family
    if family == "mamba":
        s = model.settings
        return MambaCache(model.config.n_layer, batch_size, s["d_inner"], s["d_state"], s["d_conv"], max_len,
                          dtype, param.device)
    if family == "retnet":
        c = model.config
        return RetNetCache(c.n_layer, batch_size, c.n_head, c.head_dim, model.value_head_dim, max_len, dtype,
                           param.device)
    raise ValueError(f"no recurrent cache for model family {family!r}; available: mamba, retnet")
