"""Data: the bundled corpus and `--data` files, tokenizer training, packing, and the batch loader.

    from llmopt.data import load_text, train_tokenizer, prepare_data, BatchLoader

    text = load_text()                          # bundled Shakespeare, or load_text("my.txt" | "my_dir/")
    tokenizer = train_tokenizer(text, "bpe", vocab_size=4096)
    train_ids, val_ids = prepare_data(text, tokenizer, val_fraction=0.05)
    with BatchLoader(train_ids, batch_size=8, seq_len=256, seed=0) as loader:
        inputs, targets = next(loader)          # (8, 256) int64 each
"""

from llmopt.data.corpus import default_corpus_text, join_documents, load_play, load_text, play_names, write_play
from llmopt.data.errors import DataError
from llmopt.data.loader import (
    BatchLoader,
    PackedDocuments,
    document_positions,
    epoch_windows,
    pack_documents,
    prepare_data,
    split_tokens,
    window_batch,
)
from llmopt.data.tokenizer import EOS_TOKEN, UNK_TOKEN, Tokenizer, split_at_lines, train_tokenizer

__all__ = [
    "EOS_TOKEN",
    "UNK_TOKEN",
    "BatchLoader",
    "DataError",
    "PackedDocuments",
    "Tokenizer",
    "default_corpus_text",
    "document_positions",
    "epoch_windows",
    "join_documents",
    "load_play",
    "load_text",
    "pack_documents",
    "play_names",
    "prepare_data",
    "split_at_lines",
    "split_tokens",
    "train_tokenizer",
    "window_batch",
    "write_play",
]
