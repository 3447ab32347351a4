"""Tests for gpt.data's pretraining side: reading, cleaning, splitting, windows, batches, token files.

Expected numbers are derived here from the inputs (by plain Python or numpy, or by
hand with the count spelled out), never copied from the code's own output.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.data import (
    BatchLoader,
    CleanStats,
    SlidingWindowDataset,
    TokenFileDataset,
    check_token_meta,
    clean_documents,
    dataset_stats,
    iterate_eval,
    join_documents,
    load_text_corpus,
    prepare,
    pretraining_windows,
    prepare_cli,
    read_documents,
    split_documents,
    tokenize_documents,
    write_length_histogram,
)
from gpt.data.text import _clean_pieces
from gpt.data.report import _length_histogram_figure
from gpt.errors import UserError
from gpt.tokenizer import get_tokenizer

BOTCHAN = Path(__file__).resolve().parent.parent / "data" / "botchan.txt"
EOT = 50256


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("gpt2")


def botchan_by_hand() -> str:
    """data/botchan.txt cleaned with plain string operations: the text between the
    `*** START OF` and `*** END OF` lines, newlines as LF, surrounding whitespace off."""
    lines = BOTCHAN.read_text(encoding="utf-8-sig").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    return "\n".join(lines[start + 1 : end]).strip()


@pytest.fixture(scope="module")
def botchan_stream(tokenizer) -> list[int]:
    """Botchan's tokens followed by <|endoftext|>, from the hand-cleaned text."""
    return tokenizer.encode(botchan_by_hand()) + [EOT]


def documents_of(stream: np.ndarray) -> list[tuple[int, ...]]:
    """A joined token stream cut back into its documents (each one ends with EOT)."""
    tokens = stream.tolist()
    assert not tokens or tokens[-1] == EOT
    docs, current = [], []
    for token in tokens:
        if token == EOT:
            docs.append(tuple(current))
            current = []
        else:
            current.append(token)
    return docs


GUTENBERG = (
    "\ufeffThe Project Gutenberg EBook of Tiny\r\n"
    "Title: Tiny\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK TINY ***\r\n"
    "\r\n"
    "Chapter 1\r\n"
    "It was a dark night.\r"
    "The end.\r\n"
    "\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK TINY ***\r\n"
    "Full license text.\r\n"
)


# ---- reading ------------------------------------------------------------------


def test_read_text_file_strips_bom_and_keeps_text(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(GUTENBERG.encode("utf-8"))
    (doc,) = read_documents(path)
    assert doc == GUTENBERG.removeprefix("\ufeff")


def test_read_folder_recursively_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("third")
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 7}\n')
    (tmp_path / "b" / "ignored.csv").write_text("not read")
    assert read_documents(tmp_path) == ["first", "second", "third"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', r"line 2, column \d+: not valid JSON"),
        ('{"title": "no text"}', 'line 2: expected a JSON object with a "text" field'),
        ('["text"]', 'line 2: expected a JSON object with a "text" field'),
        ('{"text": 3}', 'line 2: "text" must be a string, got int'),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=message) as err:
        read_documents(path)
    assert str(path) in str(err.value)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        read_documents(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="holds no .txt or .jsonl files"):
        read_documents(tmp_path)


def test_non_utf8_names_byte_offset(tmp_path):
    good, before_bad = b"caf\xc3\xa9 ok\n" * 10, b"na"
    path = tmp_path / "latin1.txt"
    path.write_bytes(good + before_bad + b"\xefve")  # 0xef starts a 3-byte sequence; 'v' cannot continue it
    offset = len(good) + len(before_bad)  # 10 * 9 + 2 = 92
    with pytest.raises(UserError, match=rf"latin1\.txt: not UTF-8 text: byte 0xef at byte offset {offset}\b"):
        read_documents(path)
    with pytest.raises(UserError, match=rf"byte offset {offset}\b"):  # the same when the bad byte is in a later block
        read_documents(path, block_bytes=7)
    first_line, second_start = b'{"text": "a"}\n', b'{"text": "'
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(first_line + second_start + b'\xff"}\n')
    offset = len(first_line) + len(second_start)  # 14 + 10 = 24: the offset in the file, not in the line
    with pytest.raises(UserError, match=rf"bad\.jsonl, line 2: not UTF-8 text: byte 0xff at byte offset {offset}\b"):
        read_documents(jsonl)


def test_small_blocks_read_the_same_text(tmp_path):
    text = "héllo wörld ✓ " * 50
    path = tmp_path / "u.txt"
    path.write_text(text, encoding="utf-8")
    assert read_documents(path, block_bytes=5) == [text]  # multi-byte characters straddle blocks


# ---- cleaning -----------------------------------------------------------------


def test_gutenberg_header_footer_and_newlines():
    (doc,), stats = clean_documents([GUTENBERG])
    assert doc == "Chapter 1\nIt was a dark night.\nThe end."
    assert stats == CleanStats(read=1, empty=0, duplicate=0, kept=1)


def test_gutenberg_botchan():
    (raw,) = read_documents(BOTCHAN)
    (doc,), _ = clean_documents([raw])
    assert doc.startswith("Produced by David Starner and the Online Distributed Proofreading Team\nBOTCHAN")
    assert doc.endswith("[R: Rad]\nEnd of Project Gutenberg's Botchan (Master Darling), by Kin-nosuke Natsume")
    assert "*** START OF" not in doc and "*** END OF" not in doc and "LICENSE" not in doc
    assert doc == botchan_by_hand()


def test_text_without_gutenberg_markers_only_stripped():
    (doc,), _ = clean_documents(["  \r\n line one\r\nline two\r\r\n\t "])
    assert doc == "line one\nline two"


def test_dedupe_and_empty_keep_first_order():
    docs, stats = clean_documents(["b", " a\r\n", "", "a\n", "\n\t", "c", "b"])
    assert docs == ["b", "a", "c"]
    assert stats == CleanStats(read=7, empty=2, duplicate=2, kept=3)


def test_pieces_tokenize_like_the_whole(tokenizer):
    (raw,) = read_documents(BOTCHAN)
    (whole,), _ = clean_documents([raw])
    # 2000 characters hold the Gutenberg header (its START line ends near character 600), so START is in the first piece.
    pieces = list(_clean_pieces((raw[i : i + 777] for i in range(0, len(raw), 777)), 2000))
    assert len(pieces) > 100 and max(map(len, pieces)) <= 2000
    assert "".join(pieces) == whole
    assert sum((tokenizer.encode(p) for p in pieces), []) == tokenizer.encode(whole)


# ---- tokenizing and splitting -------------------------------------------------


def test_join_puts_eot_after_every_document():
    joined = join_documents([np.array([1, 2]), np.array([3])], EOT)
    assert joined.tolist() == [1, 2, EOT, 3, EOT]


def test_split_by_documents_is_deterministic(tokenizer):
    docs = [f"document number {i}." for i in range(20)]
    doc_tokens = tokenize_documents(docs, tokenizer)
    assert [t.tolist() for t in doc_tokens] == [tokenizer.encode(doc) for doc in docs]
    position = {tuple(tokenizer.encode(doc)): i for i, doc in enumerate(docs)}  # the documents are all different
    train, val = split_documents(doc_tokens, 0.1, EOT, seed=3)
    train_docs = [position[doc] for doc in documents_of(train)]
    val_docs = [position[doc] for doc in documents_of(val)]
    assert len(val_docs) == math.floor(20 * 0.1)  # whole documents, as many as the fraction allows
    assert sorted(train_docs + val_docs) == list(range(20))  # every document once, on one side
    assert train_docs == sorted(train_docs) and val_docs == sorted(val_docs)  # both sides keep the original order
    again_train, again_val = split_documents(doc_tokens, 0.1, EOT, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    other_seeds = [split_documents(doc_tokens, 0.1, EOT, seed=seed)[1] for seed in range(4, 10)]
    assert any(not np.array_equal(val, other) for other in other_seeds)  # the seed picks the documents


def test_single_document_splits_at_token_tail(tokenizer, botchan_stream):
    train, val, stats = load_text_corpus(BOTCHAN, tokenizer, 0.1)
    n_val = round(len(botchan_stream) * 0.1)  # too few documents to split by: the last 10% of the tokens
    assert train.tolist() == botchan_stream[:-n_val] and val.tolist() == botchan_stream[-n_val:]
    assert stats["split"] == "tokens" and stats["document_tokens"]["tokens"] == len(botchan_stream) - 1


# ---- windows ------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_tokens, context_length, stride",
    [(11, 10, 1), (12, 10, 1), (100, 10, 10), (101, 10, 10), (100, 10, 3), (100, 4, 7)],
)
def test_sliding_window_count(n_tokens, context_length, stride):
    windows = SlidingWindowDataset(np.arange(n_tokens), context_length, stride)
    # Every start a stride apart whose window (the inputs plus one next token) fits in the stream.
    starts = [s for s in range(0, n_tokens, stride) if s + context_length + 1 <= n_tokens]
    assert len(windows) == len(starts)
    for index, start in enumerate(starts):
        x, y = windows[index]
        assert x.tolist() == list(range(start, start + context_length))
        assert y.tolist() == list(range(start + 1, start + context_length + 1))
    with pytest.raises(IndexError):
        windows[len(starts)]


def test_sliding_window_shift_and_stride():
    windows = SlidingWindowDataset(np.arange(50, dtype=np.uint16), context_length=4, stride=3)
    x, y = windows[2]  # starts at token 2 * 3 = 6
    assert x.dtype == torch.int64 and x.shape == (4,)
    assert x.tolist() == [6, 7, 8, 9] and y.tolist() == [7, 8, 9, 10]


def test_too_short_corpus_names_both_numbers():
    with pytest.raises(UserError, match=r"has 64 tokens; one window of context_length 64 needs 65"):
        SlidingWindowDataset(np.zeros(64, dtype=np.int64), 64, 64)


# ---- batches ------------------------------------------------------------------


N_TOKENS, CONTEXT = 1000, 8
N_WINDOWS = len(range(0, N_TOKENS - CONTEXT, CONTEXT))  # starts 0, 8, ..., the last s with s + 9 <= 1000: 124


def _windows():
    return SlidingWindowDataset(np.arange(N_TOKENS), CONTEXT, stride=CONTEXT)


def test_batch_loader_resume_equals_uninterrupted():
    per_epoch = N_WINDOWS // 8  # 15 batches an epoch
    reference = BatchLoader(_windows(), 8, seed=5)
    expected = [reference.next_batch() for _ in range(40)]
    first = BatchLoader(_windows(), 8, seed=5)
    for _ in range(17):
        first.next_batch()
    state = first.state_dict()
    assert state == {"epoch": 17 // per_epoch, "position": 17 % per_epoch}  # epoch 1, its 2nd batch taken
    assert all(type(v) is int for v in state.values())
    resumed = BatchLoader(_windows(), 8, seed=5)
    resumed.load_state_dict(state)
    for x_expected, y_expected in expected[17:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)
    assert resumed.epoch == 40 // per_epoch


def test_batch_loader_epochs_are_permutations():
    per_epoch = N_WINDOWS // 4
    loader = BatchLoader(_windows(), 4, seed=0)
    epoch0 = torch.cat([loader.next_batch()[0][:, 0] for _ in range(per_epoch)])
    epoch1 = torch.cat([loader.next_batch()[0][:, 0] for _ in range(per_epoch)])
    every_start = [CONTEXT * i for i in range(N_WINDOWS)]  # N_WINDOWS is a multiple of 4: no window left out
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == every_start
    assert not torch.equal(epoch0, epoch1)


def test_ddp_shards_are_disjoint_and_make_the_global_batch():
    whole = BatchLoader(_windows(), 6, seed=1)
    ranks = [BatchLoader(_windows(), 3, seed=1, rank=r, world_size=2) for r in range(2)]
    assert N_WINDOWS // 6 < 25  # the loop below crosses an epoch boundary
    for _ in range(25):
        x_all, y_all = whole.next_batch()
        (x0, y0), (x1, y1) = (loader.next_batch() for loader in ranks)
        assert not set(x0[:, 0].tolist()) & set(x1[:, 0].tolist())
        assert torch.equal(torch.cat([x0, x1]), x_all) and torch.equal(torch.cat([y0, y1]), y_all)


def test_keep_last_completes_the_batch_and_too_small_set_errors():
    # Windows of 3 tokens, 2 apart, over 0..10 start at 0, 2, 4, 6, 8: 5 windows. Without shuffling, batches of 3
    # take them in order, and the second batch is completed from the start of the epoch.
    loader = BatchLoader(SlidingWindowDataset(np.arange(11), 2, 2), 3, shuffle=False, drop_last=False)
    firsts = [loader.next_batch()[0][:, 0].tolist() for _ in range(2)]
    assert firsts == [[0, 2, 4], [6, 8, 0]]
    with pytest.raises(UserError, match="has 5 windows; one batch needs 8"):
        BatchLoader(SlidingWindowDataset(np.arange(11), 2, 2), 4, world_size=2)


def test_iterate_eval_is_fixed():
    windows = _windows()
    batches = list(iterate_eval(windows, 50))
    assert [x.shape[0] for x, _ in batches] == [min(50, N_WINDOWS - start) for start in range(0, N_WINDOWS, 50)]
    assert torch.cat([x[:, 0] for x, _ in batches]).tolist() == [CONTEXT * i for i in range(N_WINDOWS)]  # in order
    capped = [x[:, 0].tolist() for x, _ in iterate_eval(windows, 2, max_batches=2)]
    spread = [CONTEXT * (i * N_WINDOWS // 4) for i in range(4)]  # 4 windows, a quarter of the data set apart
    assert capped == [spread[:2], spread[2:]]
    assert capped == [x[:, 0].tolist() for x, _ in iterate_eval(windows, 2, max_batches=2)]  # the same each time


# ---- token files --------------------------------------------------------------


def _make_corpus(folder: Path) -> None:
    (folder / "books").mkdir(parents=True)
    (folder / "books" / "botchan.txt").write_bytes(BOTCHAN.read_bytes())
    (folder / "books" / "copy.txt").write_bytes(BOTCHAN.read_bytes())  # a duplicate of a multi-piece document
    (folder / "books" / "tiny.txt").write_bytes(GUTENBERG.encode("utf-8"))
    lines = [json.dumps({"text": f"Story {i}: " + "once upon a time " * (i % 7) + "<|endoftext|> end."}) for i in range(300)]
    lines += [json.dumps({"text": "Story 3: " + "once upon a time " * 3 + "<|endoftext|> end."}), '{"text": "  "}']
    (folder / "stories.jsonl").write_text("\n".join(lines) + "\n")


def test_prepare_with_workers_equals_in_memory_pipeline(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    _make_corpus(corpus)

    # Small pieces and blocks: many pieces, tasks and blocks, botchan split over many tasks. The in-memory side
    # below keeps the default sizes, so the seams must not change a single token.
    meta = prepare(corpus, tmp_path / "out", val_fraction=0.01, workers=2, piece_chars=4000, block_bytes=3000)

    docs, stats = clean_documents(read_documents(corpus))
    train, val = split_documents(tokenize_documents(docs, tokenizer), 0.01, EOT)
    train_bin = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val_bin = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert np.array_equal(train_bin, train) and np.array_equal(val_bin, val)
    # By hand: 3 .txt files + 302 JSON lines = 305 documents read; the "  " line is empty; copy.txt repeats
    # botchan.txt and the 301st story repeats story 3: 2 duplicates; 305 - 1 - 2 = 302 kept.
    assert stats == CleanStats(read=305, empty=1, duplicate=2, kept=302)
    assert meta["documents"] == {"read": 305, "empty": 1, "duplicate": 2, "kept": 302, "filtered": {}}
    assert meta["split"] == "documents" and (val_bin == EOT).sum() == math.floor(302 * 0.01)
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "data_report.json", "data_report.md", "doc_lengths.png", "meta.json", "train.bin", "val.bin"]  # no scratch

    # The memory-mapped windows are slices of the in-memory training stream.
    memmapped = TokenFileDataset(tmp_path / "out" / "train.bin", 32)
    assert len(memmapped) == (len(train) - 33) // 32 + 1  # windows of 33 tokens (32 inputs + 1 target), 32 apart
    for i in (0, 1, len(memmapped) // 2, len(memmapped) - 1):
        x, y = memmapped[i]
        assert x.tolist() == train[32 * i : 32 * i + 32].tolist()
        assert y.tolist() == train[32 * i + 1 : 32 * i + 33].tolist()


def test_prepare_single_document_matches_load_text_corpus(tmp_path, tokenizer, botchan_stream):
    meta = prepare(BOTCHAN, tmp_path, val_fraction=0.1, workers=1)
    train, val, _ = load_text_corpus(BOTCHAN, tokenizer, 0.1)
    assert np.array_equal(np.fromfile(tmp_path / "train.bin", dtype=np.uint16), train)
    assert np.array_equal(np.fromfile(tmp_path / "val.bin", dtype=np.uint16), val)
    n_val = round(len(botchan_stream) * 0.1)
    assert (meta["split"], meta["train_tokens"], meta["val_tokens"]) == ("tokens", len(botchan_stream) - n_val, n_val)


def test_prepare_leaves_no_partial_files_on_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"a\.jsonl, line 2, column \d+: not valid JSON"):
        prepare(tmp_path / "in", tmp_path / "out", workers=2)
    assert list((tmp_path / "out").iterdir()) == []


def test_token_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such token file"):
        TokenFileDataset(tmp_path / "train.bin", 8)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(UserError, match="3 bytes is not a whole number of uint16 tokens"):
        TokenFileDataset(tmp_path / "odd.bin", 8)
    (tmp_path / "short.bin").write_bytes(np.arange(5, dtype=np.uint16).tobytes())
    with pytest.raises(UserError, match=r"short\.bin has 5 tokens; one window of context_length 8 needs 9"):
        TokenFileDataset(tmp_path / "short.bin", 8)


def test_token_folder_meta_is_checked_against_the_run(tmp_path, tokenizer):
    meta = prepare(BOTCHAN, tmp_path, val_fraction=0.1, workers=1)
    assert check_token_meta(tmp_path, "gpt2", 50257) == meta
    train, val = pretraining_windows(tmp_path, 32, tokenizer, 0.1, vocab_size=50304)  # a padded vocabulary fits
    assert isinstance(train, TokenFileDataset) and isinstance(val, TokenFileDataset)
    with pytest.raises(UserError, match=r"meta\.json: vocab_size 50,257: token ids up to 50,256 do not fit the "
                                        r"model's vocabulary \(model\.vocab_size 1,000\)"):
        pretraining_windows(tmp_path, 32, tokenizer, 0.1, vocab_size=1000)
    with pytest.raises(UserError, match=r"meta\.json: the tokens were written by the tokenizer 'gpt2', but this "
                                        r"run uses 'SmolLM2\.gguf'"):
        check_token_meta(tmp_path, "SmolLM2.gguf", 49152)

    (tmp_path / "meta.json").write_text(json.dumps({**meta, "vocab_size": "50257"}))
    with pytest.raises(UserError, match=r'meta\.json: vocab_size must be a int, got "50257"'):
        check_token_meta(tmp_path, "gpt2", 50257)
    (tmp_path / "meta.json").write_text("[1, 2")
    with pytest.raises(UserError, match=r"meta\.json: not readable JSON \(JSONDecodeError"):
        check_token_meta(tmp_path, "gpt2", 50257)
    (tmp_path / "meta.json").unlink()  # as an interrupted prepare leaves the folder
    with pytest.raises(UserError, match=r"meta\.json: missing, so the token files beside it are incomplete"):
        pretraining_windows(tmp_path, 32, tokenizer, 0.1)


# ---- statistics and command line ----------------------------------------------


def test_dataset_stats_numbers():
    lengths = [7, 1, 300, 42, 42, 5, 19, 1000, 3, 64, 8]
    stats = dataset_stats(lengths)
    assert stats == {
        "documents": len(lengths),
        "tokens": sum(lengths),
        "min": min(lengths),
        "median": statistics.median(lengths),
        "mean": pytest.approx(statistics.mean(lengths)),
        # the 95th percentile interpolated between the two nearest sorted values, like numpy's default
        "p95": pytest.approx(statistics.quantiles(lengths, n=20, method="inclusive")[18]),
        "max": max(lengths),
    }


@pytest.mark.parametrize("lengths, bins", [
    ([5, 10, 10, 2000, 40], np.geomspace(5, 2000, 41)),  # 2000 > 100 * 5: 40 logarithmic bins
    ([3, 5, 5, 9, 12, 12, 12, 40], 40),  # 40 < 100 * 3: 40 even bins
])
def test_length_histogram_draws_the_counts(tmp_path, lengths, bins):
    image = pytest.importorskip("matplotlib.image")
    counts, edges = np.histogram(lengths, bins=bins)
    axes = _length_histogram_figure(np.array(lengths)).axes[0]
    bars = axes.patches
    assert [bar.get_height() for bar in bars] == counts.tolist()
    np.testing.assert_allclose([bar.get_x() for bar in bars], edges[:-1])
    assert axes.get_title() == f"{len(lengths)} documents, {sum(lengths):,} tokens"
    assert axes.get_xscale() == ("linear" if isinstance(bins, int) else "log")

    png = write_length_histogram(lengths, tmp_path / "lengths.png")
    assert png == tmp_path / "lengths.png"
    picture = image.imread(png)
    assert picture.shape == (400, 700, 4)  # 7 x 4 inches at 100 dpi, RGBA
    _length_histogram_figure(np.array(lengths)).savefig(tmp_path / "same.png", dpi=100)
    assert np.array_equal(picture, image.imread(tmp_path / "same.png"))  # the PNG shows the figure checked above
    assert not np.array_equal(picture, image.imread(write_length_histogram([1, 2], tmp_path / "other.png")))


def test_length_histogram_text_fallback(tmp_path, monkeypatch, capsys):
    lengths = [5, 10, 10, 2000, 40, 900, 950]
    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):  # as if matplotlib were not installed
        monkeypatch.setitem(sys.modules, module, None)
    assert write_length_histogram(lengths, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    header, *rows = capsys.readouterr().out.strip().split("\n")
    counts, edges = np.histogram(lengths, bins=10)
    assert header.startswith("tokens per document") and len(rows) == 10
    for row, count, low in zip(rows, counts, edges):  # each row: "low - high count ####"
        cells = row.split()
        assert float(cells[0].replace(",", "")) == pytest.approx(low, abs=0.5)
        assert int(cells[3]) == count
        assert row.count("#") == round(count * 40 / counts.max())  # the longest bar is 40 wide


def test_prepare_cli(tmp_path, capsys, botchan_stream):
    assert prepare_cli([str(BOTCHAN), "--out", str(tmp_path), "--workers", "1", "--val-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    total = len(botchan_stream)
    n_val = round(total * 0.1)
    assert "1 read, 0 empty, 0 duplicate, 1 kept" in out
    assert f"{total:,} = {total - n_val:,} train + {n_val:,} val" in out
    assert (tmp_path / "doc_lengths.png").exists() and (tmp_path / "meta.json").exists()
