"""Token streams for training: a leak-free split, document packing, and a prefetching, resumable loader.

- `split_tokens` holds out the *tail* of the token stream as validation. One contiguous cut means no
  training window ever contains a validation token, and with the bundled corpus (plays in sorted
  order) the last 5% is, give or take the closing song of Twelfth Night, two whole plays (The Two
  Gentlemen of Verona, The Winter's Tale) the model never sees: a held-out set, not a neighbour of
  the training text.
- `pack_documents` concatenates documents with an end-of-sequence token after each and cuts the
  stream into rows of `seq_len + 1` tokens (input = row[:-1], target = row[1:]), with the document
  id and the position inside the document of every token, for document-masked attention.
- `BatchLoader` draws `(inputs, targets)` batches of windows from one long token tensor. Each epoch
  is a permutation of non-overlapping windows, shifted by a random offset in `[0, seq_len)` so that
  window boundaries differ from epoch to epoch. The order is a pure function of `(seed, epoch)`, so
  the loader's whole state is its position `(epoch, batch)`: that is what `state_dict` saves, and a
  resumed run gets bit-identical batches. A background thread prepares the next `prefetch` batches
  while the model computes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from llmopt.data.errors import DataError

if TYPE_CHECKING:
    from llmopt.data.tokenizer import Tokenizer

__all__ = [
    "BatchLoader",
    "PackedDocuments",
    "as_token_tensor",
    "document_positions",
    "epoch_windows",
    "pack_documents",
    "prepare_data",
    "split_tokens",
    "window_batch",
]

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def as_token_tensor(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """`ids` as a 1-D integer tensor (a list becomes int64; a tensor is kept as it is, not copied)."""
    tokens = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids, dtype=torch.long)
    if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise DataError(f"token ids must be a 1-D integer tensor or list, got {tuple(tokens.shape)} {tokens.dtype}")
    return tokens


def split_tokens(ids: Sequence[int] | torch.Tensor, val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream into (train, validation): validation is the last `val_fraction` of it.

    Contiguous and deterministic (see the module docstring for why the tail). `val_fraction=0`
    gives an empty validation tensor. Both parts are views of `ids`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}: must be in [0, 1); 0.05 holds out the last 5%")
    tokens = as_token_tensor(ids)
    n_val = round(len(tokens) * val_fraction)
    if val_fraction > 0 and (n_val == 0 or n_val == len(tokens)):
        raise DataError(f"{len(tokens)} tokens cannot be split with val_fraction={val_fraction}; use more text")
    cut = len(tokens) - n_val
    return tokens[:cut], tokens[cut:]


def document_positions(tokens: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of a stream whose documents each end with `eos_id`: (document id, position in it).

    The eos token belongs to the document it ends. Ids count from 0 in stream order.
    """
    is_eos = (tokens == eos_id).long()
    doc_ids = torch.cumsum(is_eos, 0) - is_eos  # a document's eos still counts as that document
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(is_eos).flatten() + 1])
    positions = torch.arange(len(tokens)) - starts[doc_ids]
    return doc_ids, positions


@dataclass(frozen=True)
class PackedDocuments:
    """Documents packed into rows of `seq_len + 1` tokens; row `i` is sample `i` of a dataset."""

    tokens: torch.Tensor
    """(N, seq_len + 1) int64 token ids: inputs are `[:, :-1]`, targets `[:, 1:]`."""
    doc_ids: torch.Tensor
    """(N, seq_len + 1) int64 document index of each token (the eos belongs to the document it ends)."""
    positions: torch.Tensor
    """(N, seq_len + 1) int64 position of each token inside its document (a document that runs on
    into the next row keeps counting)."""

    @property
    def seq_len(self) -> int:
        """Length of an input (and of a target) sequence."""
        return self.tokens.shape[1] - 1

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> Batch:
        """(inputs, targets) of row `index`, each (seq_len,)."""
        row = self.tokens[index]
        return row[:-1], row[1:]


def pack_documents(docs: Iterable[Sequence[int]], seq_len: int, eos_id: int | None) -> PackedDocuments:
    """Concatenate documents, each followed by `eos_id`, and cut the stream into rows of `seq_len + 1`.

    Rows overlap by one token (row i starts at i * seq_len), so every token but the first is a
    target exactly once. Tokens after the last full row are dropped.
    """
    if eos_id is None:
        raise DataError("pack_documents needs an eos_id to separate documents; use a tokenizer with an eos token")
    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len}: must be positive")
    pieces = []
    for doc in docs:
        pieces += [as_token_tensor(doc).long(), torch.tensor([eos_id])]
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    if len(stream) < seq_len + 1:
        raise DataError(f"documents hold {len(stream)} tokens with separators, fewer than one row of seq_len+1={seq_len + 1}; use more text or a smaller seq_len")
    doc_ids, positions = document_positions(stream, eos_id)
    n_rows = (len(stream) - 1) // seq_len
    log.debug("packed %d tokens into %d rows of %d; %d left over", len(stream), n_rows, seq_len + 1, len(stream) - 1 - n_rows * seq_len)

    def rows(values: torch.Tensor) -> torch.Tensor:
        return values.unfold(0, seq_len + 1, seq_len)[:n_rows].contiguous()  # (N, seq_len + 1)

    return PackedDocuments(tokens=rows(stream), doc_ids=rows(doc_ids), positions=rows(positions))


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for `torch.Generator`, well mixed from (seed, epoch)."""
    digest = hashlib.sha256(f"llmopt.data.loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@functools.lru_cache(maxsize=4)
def epoch_windows(n_tokens: int, seq_len: int, *, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """Start index of each window of `seq_len + 1` tokens for one epoch, in the order they are served.

    With `shuffle`, windows start at a random offset in [0, seq_len) and come in a random order,
    both drawn from `(seed, epoch)`; without, they start at 0 and come in order. Cached: treat the
    result as read-only.
    """
    if not shuffle:
        return torch.arange(0, n_tokens - seq_len, seq_len)
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    offset = int(torch.randint(seq_len, (1,), generator=generator))
    starts = torch.arange(offset, n_tokens - seq_len, seq_len)
    return starts[torch.randperm(len(starts), generator=generator)]


def window_batch(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> Batch:
    """(inputs, targets), each (B, seq_len) int64, of the windows of `tokens` beginning at `starts` (B,)."""
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()  # (B, seq_len + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


@dataclass(frozen=True)
class _Plan:
    """What fixes the batch sequence: the data size and the loader settings (no tensors, no state)."""

    n_tokens: int
    batch_size: int
    seq_len: int
    seed: int
    shuffle: bool

    def starts(self, epoch: int) -> torch.Tensor:
        return epoch_windows(self.n_tokens, self.seq_len, seed=self.seed, epoch=epoch, shuffle=self.shuffle)

    def batch_starts(self, position: tuple[int, int]) -> torch.Tensor:
        epoch, batch = position
        return self.starts(epoch)[batch * self.batch_size : (batch + 1) * self.batch_size]

    def advance(self, position: tuple[int, int]) -> tuple[int, int]:
        epoch, batch = position
        # a last partial batch of an epoch is skipped: every batch has exactly batch_size rows
        if batch + 1 < len(self.starts(epoch)) // self.batch_size:
            return epoch, batch + 1
        return epoch + 1, 0


def _produce(tokens: torch.Tensor, plan: _Plan, position: tuple[int, int], stop: threading.Event, out: queue.Queue) -> None:
    """Thread body: put (next position, batch) items into `out` until `stop`; an error is put as (None, error)."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        while not stop.is_set():
            batch = window_batch(tokens, plan.batch_starts(position), plan.seq_len)
            position = plan.advance(position)
            if not put((position, batch)):
                return
    except BaseException as error:  # handed to the consumer, which re-raises it
        put((None, error))


class BatchLoader:
    """An endless iterator of `(inputs, targets)` int64 batches of shape (batch_size, seq_len).

    Epochs of shuffled, non-overlapping windows over `tokens` (see the module docstring); targets
    are the inputs shifted by one token. With `prefetch > 0`, a daemon thread keeps up to
    `prefetch` batches ready; `close()` (or leaving a `with` block) stops it, and iterating again
    restarts it from the current position. An exception in the thread is raised by `next()`.

        with BatchLoader(train_ids, batch_size=8, seq_len=256, seed=0) as loader:
            inputs, targets = next(loader)
    """

    def __init__(
        self,
        tokens: Sequence[int] | torch.Tensor,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 2,
    ) -> None:
        self.tokens = as_token_tensor(tokens)
        """The token stream batches are cut from (1-D, any integer dtype; batches are int64)."""
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if value <= 0:
                raise DataError(f"{name}={value}: must be positive")
        if prefetch < 0:
            raise DataError(f"prefetch={prefetch}: must be >= 0 (0 prepares each batch in the calling thread)")
        needed = batch_size * seq_len + (seq_len if shuffle else 1)  # one full batch even at the largest offset
        if len(self.tokens) < needed:
            raise DataError(
                f"{len(self.tokens)} tokens are too few for batch_size={batch_size} x seq_len={seq_len}; "
                f"need at least {needed}: use more text or a smaller batch_size or seq_len"
            )
        self.plan = _Plan(n_tokens=len(self.tokens), batch_size=batch_size, seq_len=seq_len, seed=seed, shuffle=shuffle)
        """The settings that fix the batch sequence."""
        self.prefetch = prefetch
        """How many batches the background thread prepares ahead (0: no thread)."""
        self._position = (0, 0)  # (epoch, batch) of the next batch next() returns
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()

    @property
    def epoch(self) -> int:
        """Epoch of the next batch (0-based)."""
        return self._position[0]

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> Batch:
        if self.prefetch == 0:
            batch = window_batch(self.tokens, self.plan.batch_starts(self._position), self.plan.seq_len)
            self._position = self.plan.advance(self._position)
            return batch
        if self._thread is None:
            self._start()
        position, item = self._queue.get()
        if position is None:
            self.close()
            raise item
        self._position = position
        return item

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        args = (self.tokens, self.plan, self._position, self._stop, self._queue)
        self._thread = threading.Thread(target=_produce, args=args, name="llmopt-batch-prefetch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the prefetch thread and drop the batches it prepared; the position is kept."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._queue = queue.Queue()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # the thread holds no reference to self, so this runs; stop it rather than leak it
        if getattr(self, "_thread", None) is not None:
            self._stop.set()

    def state_dict(self) -> dict[str, int | bool]:
        """The position of the next batch and the settings it depends on (plain ints, JSON-safe).

        No RNG state is needed: each epoch's order is drawn from a generator seeded by `(seed, epoch)`.
        """
        epoch, batch = self._position
        plan = self.plan
        return {
            "epoch": epoch,
            "batch": batch,
            "n_tokens": plan.n_tokens,
            "batch_size": plan.batch_size,
            "seq_len": plan.seq_len,
            "seed": plan.seed,
            "shuffle": plan.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the position `state_dict` saved; the settings must match this loader's."""
        current = self.state_dict()
        missing = sorted(set(current) - set(state))
        if missing:
            raise DataError(f"loader state lacks {', '.join(missing)}; pass a dict saved by BatchLoader.state_dict()")
        for key in ("n_tokens", "batch_size", "seq_len", "seed", "shuffle"):
            if state[key] != current[key]:
                raise DataError(
                    f"loader state {key}={state[key]!r} does not match this loader's {key}={current[key]!r}; "
                    "resume with the same data and loader settings"
                )
        self.close()
        self._position = (int(state["epoch"]), int(state["batch"]))


def prepare_data(text: str, tokenizer: Tokenizer, val_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode `text` (in parallel chunks, same ids as one `encode`) and split it: (train_ids, val_ids) int64."""
    ids = torch.tensor(tokenizer.encode_large(text), dtype=torch.long)
    log.info("encoded %d characters into %d tokens", len(text), len(ids))
    return split_tokens(ids, val_fraction)
