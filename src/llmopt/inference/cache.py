"""Preallocated key/value caches behind one interface (DESIGN.md §6).

A cache is an object passed to the model, never state installed on it:
`logits = model(idx, input_pos=input_pos, cache=cache)`. The model calls, once per forward,
`mask = cache.attn_mask(input_pos)`, then in every attention layer
`k_all, v_all = cache.update(layer_idx, input_pos, k, v)` and attends to what comes back under `mask`.

Numerics contract: exact. The dense cache stores the keys and values the model computed (after RoPE) and
returns them unchanged, so cached decode gives the uncached forward's logits up to the summation order of
attention (about 1e-6 in fp32) and, in practice, the same greedy tokens.

Interface a cache implements (`QuantizedKVCache` and evicting caches subclass `KVCache` and override the
storage half: `_allocate`, `update`, `bytes_per_token`):

- `attn_mask(input_pos)` validates the positions, advances `seq_len` (a Python int, so that no layer
  has to synchronize with the device) and returns the mask: None, "causal" or a bool tensor
  broadcastable to (B, n_head, T, L), True = attend.
- `update(layer, input_pos, k, v) -> (k_all, v_all)` writes k, v (B, n_kv_head, T, head_dim) at the
  positions and returns the keys/values to attend, (B, n_kv_head, L, head_dim).
- `truncate(length)` forgets positions >= length (speculative decoding rolls back this way);
  `reset()` forgets everything; `nbytes`, `bytes_per_token`.

Two layouts: by default `update` returns a view up to `seq_len` (L = seq_len), so attention costs what
the sequence costs. With `static=True` it returns the whole buffer (L = max_len) and the mask hides the
unwritten slots: shapes never change, which is what `torch.compile(dynamic=False)` needs, and
`attn_mask` then never reads a tensor value back to the host.

Left padding (batch of prompts of different lengths): `set_key_padding(padding)` marks, per row, key
slots that no query may attend. Rotary embeddings are relative, so a left-padded row with shared
positions gives the same attention as the unpadded row.
"""

from __future__ import annotations

import torch


def _max_len_error(needed: int, max_len: int) -> ValueError:
    return ValueError(f"prompt + new tokens = {needed} exceeds the cache's max_len={max_len}; pass a larger max_len")


class KVCache:
    """Dense key/value cache: per layer, k and v buffers of shape (batch_size, n_kv_head, max_len, head_dim)."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None, *,
                 static: bool = False) -> None:
        for name, value in (("n_layer", n_layer), ("batch_size", batch_size), ("n_kv_head", n_kv_head),
                            ("max_len", max_len), ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"KVCache {name} must be positive, got {value}")
        self.n_layer, self.batch_size, self.n_kv_head = n_layer, batch_size, n_kv_head
        self.max_len, self.head_dim = max_len, head_dim
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        self.static = static
        self.seq_len = 0
        """Number of valid positions (highest written position + 1), advanced by `attn_mask`; a static cache
        does not track it (that would read the positions back to the host), its masks come from the positions."""
        self.key_padding: torch.Tensor | None = None
        """Optional (batch_size, max_len) bool, True = a padding slot no query attends (see `set_key_padding`)."""
        self._allocate()

    # ---- storage (what a quantized or evicting cache overrides) ----------------------------------
    def _allocate(self) -> None:
        shape = (self.batch_size, self.n_kv_head, self.max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layer)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layer)]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv_head, T, head_dim) at `input_pos` (T,); return the keys and values to attend."""
        if k.size(0) != self.batch_size:
            raise ValueError(f"batch of {k.size(0)} rows does not match the cache's batch_size={self.batch_size}; "
                             "build the cache with make_cache(model, batch_size)")
        k_buf, v_buf = self.k[layer], self.v[layer]
        k_buf.index_copy_(2, input_pos, k.to(self.dtype))
        v_buf.index_copy_(2, input_pos, v.to(self.dtype))
        if not self.static:
            k_buf, v_buf = k_buf[:, :, : self.seq_len], v_buf[:, :, : self.seq_len]  # (B, nkv, seq_len, hd)
        return k_buf.to(k.dtype), v_buf.to(v.dtype)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one sequence takes: k and v, every layer."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the buffers (batch_size * max_len positions)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    # ---- positions and masks (shared by every cache) -------------------------------------------
    def attn_mask(self, input_pos: torch.Tensor):
        """Called once per forward, before the layers: advance `seq_len` and say what each query may see.

        None: attend to every key `update` returns (single-token decode). "causal": the T queries are
        positions 0..T-1 and the keys are exactly those T. Otherwise a bool (T, L) or (B, 1, T, L) tensor,
        True = attend: a query at position p sees the keys at positions <= p.
        """
        T = input_pos.numel()
        if self.static:
            # No host sync: shapes and values stay on the device, so a compiled decode step is one graph.
            key_pos = torch.arange(self.max_len, device=input_pos.device)[None, :]
            query_pos = input_pos[:, None]
            return self._fold_padding(key_pos <= query_pos, key_pos == query_pos)  # (T, max_len)
        lo, hi = (int(x) for x in torch.stack([input_pos[0], input_pos.max()]).tolist())  # the one host sync
        if hi >= self.max_len:
            raise _max_len_error(hi + 1, self.max_len)
        if lo > self.seq_len:
            raise ValueError(f"positions start at {lo} but the cache holds only {self.seq_len}; "
                             "feed the positions in order (or truncate the cache first)")
        self.seq_len = hi + 1
        if self.key_padding is None:
            if T == 1:
                return None
            if lo == 0 and T == self.seq_len:
                return "causal"
        key_pos = torch.arange(self.seq_len, device=input_pos.device)[None, :]
        query_pos = input_pos[:, None]
        return self._fold_padding(key_pos <= query_pos, key_pos == query_pos)  # (T, seq_len)

    def _fold_padding(self, mask: torch.Tensor, own: torch.Tensor):
        """(T, L) causal mask -> (B, 1, T, L) with padded key slots hidden, when there is padding.

        `own` (T, L) is True where the key is the query's own position.
        """
        if self.key_padding is None:
            return mask
        keep = ~self.key_padding[:, None, None, : mask.size(-1)]  # (B, 1, 1, L)
        # A query at a padded slot would see no key, and SDPA returns NaN for an all-masked row (which
        # then leaks into later layers through 0 * NaN); let every query see at least its own key.
        return (mask & keep) | own

    def set_key_padding(self, padding: torch.Tensor | None) -> None:
        """Hide key slots per row: `padding` (batch_size, n) bool, True = slot i of that row is padding.

        Used for left-padded batches: pad the shorter prompts on the left, call this with the pad mask,
        then prefill positions 0..n-1 as usual. None removes the padding.
        """
        if padding is None:
            self.key_padding = None
            return
        if padding.dim() != 2 or padding.size(0) != self.batch_size or padding.size(1) > self.max_len:
            raise ValueError(f"key padding must be (batch_size={self.batch_size}, n <= max_len={self.max_len}), "
                             f"got {tuple(padding.shape)}")
        self.key_padding = torch.zeros(self.batch_size, self.max_len, dtype=torch.bool, device=self.device)
        self.key_padding[:, : padding.size(1)] = padding.to(self.device, torch.bool)

    def truncate(self, length: int) -> None:
        """Forget positions >= length; the next forward writes from `length` on (rejected slots are overwritten)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"truncate length must be in [0, max_len={self.max_len}], got {length}")
        self.seq_len = min(self.seq_len, length)

    def reset(self) -> None:
        """Forget every position and any key padding (the buffers stay allocated)."""
        self.seq_len = 0
        self.key_padding = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_layer={self.n_layer}, batch_size={self.batch_size}, "
                f"n_kv_head={self.n_kv_head}, max_len={self.max_len}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, static={self.static}, seq_len={self.seq_len}, nbytes={self.nbytes})")


def make_cache(model, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None, *,
               static: bool = False) -> KVCache:
    """The cache `model`'s family needs, sized from `model.config`, on the model's device and dtype."""
    config = model.config
    if config.family in ("mamba", "retnet"):  # linear-time families: a constant-size recurrent state
        from llmopt.inference.recurrent_cache import make_recurrent_cache

        if static:
            raise ValueError(f"a {config.family} state has one shape already; static=True (compile) is for KV caches")
        param = next(model.parameters())
        return make_recurrent_cache(model, batch_size, config.max_seq_len if max_len is None else max_len,
                                    param.dtype if dtype is None else dtype)
    if config.family != "llama":
        raise ValueError(f"no KV cache for model family {config.family!r}; available: llama, mamba, retnet")
    max_len = config.max_seq_len if max_len is None else max_len
    if max_len > config.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds model.max_seq_len={config.max_seq_len} (the rotary tables "
                         "end there); build the model with a larger max_seq_len")
    param = next(model.parameters())
    dtype = param.dtype if dtype is None else dtype
    return KVCache(config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim, dtype, param.device,
                   static=static)
