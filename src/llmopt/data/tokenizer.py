"""Tokenizers trained with Hugging Face `tokenizers`, behind one small wrapper.

Two kinds are trained here, both deterministic (the same text and settings give the same vocabulary):

- `bpe` (default): byte-level BPE as in GPT-2: the GPT-2 pre-tokenization regex, 256 byte tokens,
  merges learned on top. Lossless: `decode(encode(s)) == s` for every string, whatever its unicode
  or whitespace, so no `[UNK]` ever appears.
- `wordpiece`: BERT-style WordPiece (`##` continuation pieces, `[UNK]` for what it cannot spell,
  whitespace and punctuation split first). Not lossless: decoding puts single spaces between words.

Both reserve `<|endoftext|>` as the end-of-sequence token, which `llmopt.data.loader` puts between
documents. `Tokenizer.from_hf` wraps the fast tokenizer of a pretrained `transformers` model instead
(`kind="pretrained"`). `encode` never adds special tokens (no BOS): callers that want one add it.

Large texts are cut into chunks at line breaks that sit between two non-space characters
(`split_at_lines`): the pre-tokenizers of both kinds (and GPT-2-style byte-level ones in general)
never join pieces across such a break, so encoding the chunks and concatenating the ids gives
exactly the ids of the whole text, with the chunks spread over the `tokenizers` thread pool.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from llmopt.data.corpus import write_text_atomic
from llmopt.data.errors import DataError

__all__ = ["EOS_TOKEN", "KINDS", "UNK_TOKEN", "Tokenizer", "split_at_lines", "train_tokenizer"]

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
"""End of sequence, and the separator between packed documents."""
UNK_TOKEN = "[UNK]"
"""WordPiece's token for what its vocabulary cannot spell (byte-level BPE needs none)."""
KINDS = ("bpe", "wordpiece")
"""The kinds `train_tokenizer` can train."""
CHUNK_CHARS = 1 << 16
"""Target size of the chunks that training and batch encoding work on."""
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

_SAFE_BREAK = re.compile(r"(?<=\S)\n(?=\S)")


def split_at_lines(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `chunk_chars` characters; `"".join(pieces) == text`.

    Each cut falls just after a `\\n` that has a non-space character on both sides, so no
    whitespace run or word is split (see the module docstring for why that keeps encoding exact).
    """
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        match = _SAFE_BREAK.search(text, start + chunk_chars)
        if match is None:
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


def _new_backend(kind: str) -> tokenizers.Tokenizer:
    if kind == "bpe":
        backend = tokenizers.Tokenizer(models.BPE())
        # add_prefix_space=False: a prefix space would not survive decode, breaking the exact round trip
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
    else:
        backend = tokenizers.Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
        backend.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
    return backend


def _new_trainer(kind: str, vocab_size: int, special: list[str]) -> trainers.Trainer:
    if kind == "bpe":
        # all 256 bytes in the alphabet: nothing is ever unknown
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        return trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet, show_progress=False)
    return trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)


def train_tokenizer(text: str, kind: str = "bpe", vocab_size: int = 4096) -> Tokenizer:
    """Train a `kind` tokenizer ("bpe" or "wordpiece") of `vocab_size` tokens on `text`.

    Deterministic: the same text and settings give the same vocabulary and merges. The vocabulary
    can come out smaller than `vocab_size` when the text has too few distinct pieces.
    """
    if kind not in KINDS:
        raise DataError(f"tokenizer kind {kind!r}: unknown; use one of {', '.join(KINDS)}")
    special = [EOS_TOKEN] if kind == "bpe" else [UNK_TOKEN, EOS_TOKEN]
    smallest = 256 + len(special) if kind == "bpe" else len(special) + 1
    if vocab_size < smallest:
        raise DataError(f"tokenizer vocab_size={vocab_size}: too small for {kind}; use at least {smallest}")
    if not text.strip():
        raise DataError("tokenizer training text is empty; pass the text to train on (e.g. llmopt.data.load_text())")
    backend = _new_backend(kind)
    # WordPiece: register the `##x` pieces up front, in sorted order, so their ids (and with them the
    # trainer's tie-breaking) no longer follow hash-map order; huggingface/tokenizers#1794
    pinned = _continuation_pieces(backend, text) if kind == "wordpiece" else []
    trainer = _new_trainer(kind, vocab_size, special + pinned)
    chunks = split_at_lines(text)
    backend.train_from_iterator(chunks, trainer, length=len(chunks))
    if pinned:
        backend = _unmark_special(backend, set(pinned))
    log.info("trained %s tokenizer: %d tokens from %d characters", kind, backend.get_vocab_size(), len(text))
    return Tokenizer(backend, kind=kind, eos_id=backend.token_to_id(EOS_TOKEN))


def _continuation_pieces(backend: tokenizers.Tokenizer, text: str) -> list[str]:
    """`##c` for every character `c` that occurs inside a word (not first), sorted."""
    words = set(backend.normalizer.normalize_str(text).split())
    inner = set()
    for word, _ in backend.pre_tokenizer.pre_tokenize_str(" ".join(sorted(words))):
        inner.update(word[1:])
    return [f"##{char}" for char in sorted(inner)]


def _unmark_special(backend: tokenizers.Tokenizer, pieces: set[str]) -> tokenizers.Tokenizer:
    """The tokenizer with `pieces` kept in the vocabulary but no longer matched as special tokens."""
    state = json.loads(backend.to_str())
    state["added_tokens"] = [token for token in state["added_tokens"] if token["content"] not in pieces]
    return tokenizers.Tokenizer.from_str(json.dumps(state))


class Tokenizer:
    """A `tokenizers.Tokenizer` with the few methods llmopt needs, and its end-of-sequence id.

    `encode` adds no special tokens; `decode` keeps them (so `<|endoftext|>` in the text survives
    the byte-level round trip). Truncation and padding of the backend are turned off.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, kind: str, eos_id: int | None) -> None:
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        """The wrapped Hugging Face `tokenizers.Tokenizer`."""
        self.kind = kind
        """"bpe" or "wordpiece" (trained here), or "pretrained" (wrapped from `transformers`)."""
        self.eos_id = eos_id
        """Id of the end-of-sequence / document separator token; None if the tokenizer has none."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (the model's embedding needs this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token as text."""
        return None if self.eos_id is None else self.backend.id_to_token(self.eos_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the `tokenizers` thread pool."""
        # encode_batch_fast skips the character offsets we never use (tokenizers >= 0.21)
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]

    def encode_large(self, text: str) -> list[int]:
        """Token ids of a long text, equal to `encode(text)`, computed over chunks in parallel."""
        return [token for ids in self.encode_batch(split_at_lines(text)) for token in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (a list or a 1-D tensor); special tokens are kept."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory`; return `tokenizer.json`'s path.

        The folder also loads with `transformers.AutoTokenizer.from_pretrained(directory)`.
        """
        directory = Path(directory).expanduser()
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "llmopt_kind": self.kind, "eos_token": self.eos_token}
        if self.kind == "wordpiece":
            config["unk_token"] = UNK_TOKEN
        write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=1) + "\n")
        return write_text_atomic(directory / TOKENIZER_FILE, self.backend.to_str(pretty=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load what `save` wrote: a directory with `tokenizer.json`, or a `tokenizer.json` file.

        `tokenizer_config.json` beside it, if present, gives the kind and the eos token; otherwise
        the kind is "pretrained" and eos is `<|endoftext|>` when the vocabulary has it.
        """
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"{file}: no such tokenizer file; pass a tokenizer.json or a folder written by Tokenizer.save")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception for malformed JSON
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise DataError(f"{file}: not a valid tokenizers JSON ({reason}); retrain and save it again") from None
        config = _read_config(file.parent / CONFIG_FILE)
        eos_token = config.get("eos_token", EOS_TOKEN)
        if isinstance(eos_token, dict):  # transformers writes AddedToken dicts here
            eos_token = eos_token.get("content")
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        return cls(backend, kind=config.get("llmopt_kind", "pretrained"), eos_id=eos_id)

    @classmethod
    def from_hf(cls, hf_tokenizer) -> Tokenizer:
        """Wrap (a copy of) the backend of a `transformers` fast tokenizer; eos is its `eos_token_id`."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None) or getattr(hf_tokenizer, "_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(
                f"{type(hf_tokenizer).__name__} has no `tokenizers` backend; load a fast tokenizer "
                "(transformers.AutoTokenizer.from_pretrained(..., use_fast=True))"
            )
        # a copy, so turning off truncation and padding here leaves the caller's tokenizer alone
        copy = tokenizers.Tokenizer.from_str(backend.to_str())
        return cls(copy, kind="pretrained", eos_id=hf_tokenizer.eos_token_id)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def _read_config(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{file}: not valid JSON ({error}); fix it or delete it to load tokenizer.json alone") from None
    if not isinstance(config, dict):
        raise DataError(f"{file}: expected a JSON object; fix it or delete it to load tokenizer.json alone")
    return config
