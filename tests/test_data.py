"""Tests for gpt.data: reading, cleaning, splitting, windows, batches, token files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt import data
from gpt.data import (
    BatchLoader,
    SlidingWindowDataset,
    TokenFileDataset,
    clean_documents,
    dataset_stats,
    iterate_eval,
    join_documents,
    load_text_corpus,
    prepare,
    prepare_cli,
    read_documents,
    split_documents,
    tokenize_documents,
    write_length_histogram,
)
from gpt.errors import UserError
from gpt.tokenizer import get_tokenizer

BOTCHAN = Path(__file__).resolve().parent.parent / "data" / "botchan.txt"
EOT = 50256


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("gpt2")


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
        ('{"text": "ok"', "line 2: not valid JSON"),
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


def test_non_utf8_names_byte_offset(tmp_path, monkeypatch):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xc3\xa9 ok\n" * 10 + b"na\xefve")  # 0xef starts a 3-byte sequence; 'v' cannot continue it
    with pytest.raises(UserError, match=r"latin1\.txt: not UTF-8 text: byte 0xef at byte offset 92"):
        read_documents(path)
    monkeypatch.setattr(data, "_BLOCK_BYTES", 7)  # the same offset when the bad byte lies in a later block
    with pytest.raises(UserError, match="byte offset 92"):
        read_documents(path)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl, line 2: not UTF-8 text: byte 0xff at byte offset 24"):
        read_documents(jsonl)


def test_small_blocks_read_the_same_text(tmp_path, monkeypatch):
    text = "héllo wörld ✓ " * 50
    path = tmp_path / "u.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(data, "_BLOCK_BYTES", 5)  # multi-byte characters straddle blocks
    assert read_documents(path) == [text]


# ---- cleaning -----------------------------------------------------------------


def test_gutenberg_header_footer_and_newlines():
    (doc,), stats = clean_documents([GUTENBERG])
    assert doc == "Chapter 1\nIt was a dark night.\nThe end."
    assert stats == data.CleanStats(read=1, empty=0, duplicate=0, kept=1)


def test_gutenberg_botchan():
    (raw,) = read_documents(BOTCHAN)
    (doc,), _ = clean_documents([raw])
    assert doc.startswith("Produced by David Starner and the Online Distributed Proofreading Team\nBOTCHAN")
    assert doc.endswith("[R: Rad]\nEnd of Project Gutenberg's Botchan (Master Darling), by Kin-nosuke Natsume")
    assert "*** START OF" not in doc and "*** END OF" not in doc and "LICENSE" not in doc
    assert len(doc) == 255_286 and "\r" not in doc


def test_text_without_gutenberg_markers_only_stripped():
    (doc,), _ = clean_documents(["  \r\n line one\r\nline two\r\r\n\t "])
    assert doc == "line one\nline two"


def test_dedupe_and_empty_keep_first_order():
    docs, stats = clean_documents(["b", " a\r\n", "", "a\n", "\n\t", "c", "b"])
    assert docs == ["b", "a", "c"]
    assert stats == data.CleanStats(read=7, empty=2, duplicate=2, kept=3)


def test_pieces_tokenize_like_the_whole(monkeypatch, tokenizer):
    (raw,) = read_documents(BOTCHAN)
    (whole,), _ = clean_documents([raw])
    monkeypatch.setattr(data, "_PIECE_CHARS", 2000)  # >= the Gutenberg header, so START is in the first piece
    pieces = list(data._clean_pieces(raw[i : i + 777] for i in range(0, len(raw), 777)))
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
    train, val = split_documents(doc_tokens, 0.1, EOT, seed=3)
    assert (val == EOT).sum() == 2 and (train == EOT).sum() == 18  # two whole documents
    again_train, again_val = split_documents(doc_tokens, 0.1, EOT, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert sorted(train.tolist() + val.tolist()) == sorted(join_documents(doc_tokens, EOT).tolist())


def test_single_document_splits_at_token_tail(tokenizer):
    train, val, stats = load_text_corpus(BOTCHAN, tokenizer, 0.1)
    total = 64_866 + 1  # botchan's tokens plus the end-of-text
    assert len(train) + len(val) == total and len(val) == round(total * 0.1) == 6_487
    assert val[-1] == EOT and EOT not in train
    assert stats["split"] == "tokens" and stats["document_tokens"]["tokens"] == 64_866


# ---- windows ------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_tokens, context_length, stride, expected",
    [(11, 10, 1, 1), (12, 10, 1, 2), (100, 10, 10, 9), (101, 10, 10, 10), (100, 10, 3, 30), (100, 4, 7, 14)],
)
def test_sliding_window_count(n_tokens, context_length, stride, expected):
    windows = SlidingWindowDataset(np.arange(n_tokens), context_length, stride)
    assert len(windows) == expected
    last_x, last_y = windows[expected - 1]
    assert last_y[-1].item() <= n_tokens - 1
    with pytest.raises(IndexError):
        windows[expected]


def test_sliding_window_shift_and_stride():
    windows = SlidingWindowDataset(np.arange(50, dtype=np.uint16), context_length=4, stride=3)
    x, y = windows[2]
    assert x.dtype == torch.int64 and x.shape == (4,)
    assert x.tolist() == [6, 7, 8, 9] and y.tolist() == [7, 8, 9, 10]


def test_too_short_corpus_names_both_numbers():
    with pytest.raises(UserError, match=r"has 64 tokens; one window of context_length 64 needs 65"):
        SlidingWindowDataset(np.zeros(64, dtype=np.int64), 64, 64)


# ---- batches ------------------------------------------------------------------


def _windows(n_tokens=1000, context_length=8):
    return SlidingWindowDataset(np.arange(n_tokens), context_length, stride=context_length)  # 124 windows


def test_batch_loader_resume_equals_uninterrupted():
    reference = BatchLoader(_windows(), 8, seed=5)  # 15 batches an epoch
    expected = [reference.next_batch() for _ in range(40)]
    first = BatchLoader(_windows(), 8, seed=5)
    for _ in range(17):
        first.next_batch()
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 2} and all(type(v) is int for v in state.values())
    resumed = BatchLoader(_windows(), 8, seed=5)
    resumed.load_state_dict(state)
    for x_expected, y_expected in expected[17:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)
    assert resumed.epoch == 2


def test_batch_loader_epochs_are_permutations():
    loader = BatchLoader(_windows(), 4, seed=0)  # 31 batches, 124 windows
    epoch0 = torch.cat([loader.next_batch()[0][:, 0] for _ in range(31)])
    epoch1 = torch.cat([loader.next_batch()[0][:, 0] for _ in range(31)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(0, 992, 8))
    assert not torch.equal(epoch0, epoch1)


def test_ddp_shards_are_disjoint_and_make_the_global_batch():
    whole = BatchLoader(_windows(), 6, seed=1)
    ranks = [BatchLoader(_windows(), 3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(25):  # crosses an epoch boundary (20 batches an epoch)
        x_all, y_all = whole.next_batch()
        (x0, y0), (x1, y1) = (loader.next_batch() for loader in ranks)
        assert not set(x0[:, 0].tolist()) & set(x1[:, 0].tolist())
        assert torch.equal(torch.cat([x0, x1]), x_all) and torch.equal(torch.cat([y0, y1]), y_all)


def test_keep_last_completes_the_batch_and_too_small_set_errors():
    loader = BatchLoader(SlidingWindowDataset(np.arange(11), 2, 2), 3, shuffle=False, drop_last=False)  # 5 windows
    firsts = [loader.next_batch()[0][:, 0].tolist() for _ in range(2)]
    assert firsts == [[0, 2, 4], [6, 8, 0]]
    with pytest.raises(UserError, match="has 5 windows; one batch needs 8"):
        BatchLoader(SlidingWindowDataset(np.arange(11), 2, 2), 4, world_size=2)


def test_iterate_eval_is_fixed():
    windows = _windows()  # 124 windows
    sizes = [x.shape[0] for x, _ in iterate_eval(windows, 50)]
    assert sizes == [50, 50, 24]
    capped = [x[:, 0].tolist() for x, _ in iterate_eval(windows, 2, max_batches=2)]
    assert capped == [[0, 248], [496, 744]]  # spread evenly, the same each time
    assert capped == [x[:, 0].tolist() for x, _ in iterate_eval(windows, 2, max_batches=2)]


# ---- token files --------------------------------------------------------------


def _make_corpus(folder: Path) -> None:
    (folder / "books").mkdir(parents=True)
    (folder / "books" / "botchan.txt").write_bytes(BOTCHAN.read_bytes())
    (folder / "books" / "copy.txt").write_bytes(BOTCHAN.read_bytes())  # a duplicate of a multi-piece document
    (folder / "books" / "tiny.txt").write_bytes(GUTENBERG.encode("utf-8"))
    lines = [json.dumps({"text": f"Story {i}: " + "once upon a time " * (i % 7) + "<|endoftext|> end."}) for i in range(300)]
    lines += [json.dumps({"text": "Story 3: " + "once upon a time " * 3 + "<|endoftext|> end."}), '{"text": "  "}']
    (folder / "stories.jsonl").write_text("\n".join(lines) + "\n")


def test_prepare_with_workers_equals_in_memory_pipeline(tmp_path, monkeypatch, tokenizer):
    corpus = tmp_path / "corpus"
    _make_corpus(corpus)
    monkeypatch.setattr(data, "_PIECE_CHARS", 4000)  # many pieces and tasks
    monkeypatch.setattr(data, "_BLOCK_BYTES", 3000)

    meta = prepare(corpus, tmp_path / "out", val_fraction=0.01, workers=2)

    docs, stats = clean_documents(read_documents(corpus))
    train, val = split_documents(tokenize_documents(docs, tokenizer), 0.01, EOT)
    train_bin = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val_bin = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert np.array_equal(train_bin, train) and np.array_equal(val_bin, val)
    assert stats == data.CleanStats(read=305, empty=1, duplicate=2, kept=302)
    assert meta["documents"] == {"read": 305, "empty": 1, "duplicate": 2, "kept": 302}
    assert meta["split"] == "documents" and (val_bin == EOT).sum() == 3
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]

    memmapped = TokenFileDataset(tmp_path / "out" / "train.bin", 32)
    in_memory = SlidingWindowDataset(train, 32, 32)
    assert len(memmapped) == len(in_memory) == (len(train) - 1) // 32
    for i in (0, 1, len(in_memory) // 2, len(in_memory) - 1):
        assert all(torch.equal(a, b) for a, b in zip(memmapped[i], in_memory[i]))


def test_prepare_single_document_matches_load_text_corpus(tmp_path, tokenizer):
    meta = prepare(BOTCHAN, tmp_path, val_fraction=0.1, workers=1)
    train, val, _ = load_text_corpus(BOTCHAN, tokenizer, 0.1)
    assert np.array_equal(np.fromfile(tmp_path / "train.bin", dtype=np.uint16), train)
    assert np.array_equal(np.fromfile(tmp_path / "val.bin", dtype=np.uint16), val)
    assert (meta["split"], meta["train_tokens"], meta["val_tokens"]) == ("tokens", 58_380, 6_487)


def test_prepare_leaves_no_partial_files_on_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"a\.jsonl, line 2: not valid JSON"):
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


# ---- statistics and command line ----------------------------------------------


def test_dataset_stats_numbers():
    stats = dataset_stats(list(range(1, 101)))
    assert stats == {"documents": 100, "tokens": 5050, "min": 1, "median": 50.5, "mean": 50.5,
                     "p95": pytest.approx(95.05), "max": 100}


def test_length_histogram_png_and_text_fallback(tmp_path, monkeypatch, capsys):
    png = write_length_histogram([5, 10, 10, 2000, 40], tmp_path / "lengths.png")
    assert png == tmp_path / "lengths.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):  # as if matplotlib were not installed
        monkeypatch.setitem(sys.modules, module, None)
    assert write_length_histogram([5, 10, 10, 2000, 40], tmp_path / "none.png") is None
    out = capsys.readouterr().out
    assert "tokens per document" in out and " 4 ####" in out and not (tmp_path / "none.png").exists()


def test_prepare_cli(tmp_path, capsys):
    assert prepare_cli([str(BOTCHAN), "--out", str(tmp_path), "--workers", "1", "--val-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "1 read, 0 empty, 0 duplicate, 1 kept" in out and "64,867 = 58,380 train + 6,487 val" in out
    assert (tmp_path / "doc_lengths.png").exists() and (tmp_path / "meta.json").exists()
