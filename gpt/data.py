"""Data for training: text in, next-token windows and batches out.

Pretraining data (this part of the module), in the order it flows:

    docs = read_documents("data/botchan.txt")         # a .txt file, a .jsonl file, or a folder of them
    docs, clean_stats = clean_documents(docs)         # Gutenberg header/footer off, LF newlines, no empties/duplicates
    doc_tokens = tokenize_documents(docs, tokenizer)  # one int32 array per document
    train, val = split_documents(doc_tokens, 0.1, tokenizer.eot_id)  # token streams, <|endoftext|> after each document
    windows = SlidingWindowDataset(train, context_length=256, stride=256)
    loader = BatchLoader(windows, batch_size=8, seed=0)
    x, y = loader.next_batch()                        # (B, T) inputs and targets; resumable, DDP-aware

`load_text_corpus` does the first four steps for a small corpus held in memory.
A corpus too big for memory goes through `prepare` (`python -m gpt prepare`): it
streams the same cleaning through tokenizer worker processes into `train.bin` and
`val.bin` (uint16 token ids), which `TokenFileDataset` reads through a memory map.
Both roads give the same tokens for the same input.

Long documents are handled in pieces of about a megabyte, cut just before a run of
whitespace. GPT-2's pre-tokenizer always starts a new piece of text at such a point,
so tokenizing the pieces one by one gives exactly the tokens of the whole document.

Classification data (labelled texts from TSV, CSV or JSONL, deduplicated, split
by class, tokenized and right-padded) has its own section at the end of the module.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import enum
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from gpt.errors import UserError
from gpt.tokenizer import Tokenizer, get_tokenizer

PathLike = str | os.PathLike[str]

# Bytes read from a text file at a time, and the size (in characters) of the pieces
# a document is cleaned and tokenized in. Tests shrink both to exercise the seams.
_BLOCK_BYTES = 1 << 20
_PIECE_CHARS = 1 << 20

SOURCE_SUFFIXES = (".txt", ".jsonl")

# Unicode's White_Space characters: exactly what GPT-2's pre-tokenizer calls `\s`.
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


# ----------------------------------------------------------------------------
# Reading documents
# ----------------------------------------------------------------------------


@dataclass
class _ReadProgress:
    """Bytes of the source read so far (drives the progress bar of `prepare`)."""

    bytes_read: int = 0


def read_documents(path: PathLike) -> list[str]:
    """The raw documents under `path`, in a fixed order.

    A `.jsonl` file holds one document per line, a JSON object with a string
    `text` field (blank lines are skipped). Any other file is one plain-text
    document. A folder stands for every `.txt` and `.jsonl` file inside it, searched
    recursively and sorted by relative path. Files must be UTF-8; a leading byte
    order mark is dropped. Newlines and whitespace are left as they are (see
    `clean_documents`).
    """
    files = source_files(path)
    return ["".join(blocks) for blocks in _iter_raw_documents(files, _ReadProgress())]


def source_files(path: PathLike) -> list[Path]:
    """The files `read_documents(path)` reads, in order."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if not path.is_dir():
        return [path]
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise UserError(f"{path}: the folder holds no .txt or .jsonl files")
    return files


def _iter_raw_documents(files: Sequence[Path], progress: _ReadProgress) -> Iterator[Iterator[str]]:
    """Each document in `files` as an iterator over its raw text in blocks.

    Consume one document's blocks before asking for the next document.
    """
    for file in files:
        if file.suffix == ".jsonl":
            for text in _read_jsonl_texts(file, progress):
                yield iter((text,))
        else:
            yield _read_text_blocks(file, progress)


def _open_binary(file: Path) -> BinaryIO:
    try:
        return open(file, "rb")
    except OSError as err:
        raise UserError(f"{file}: cannot read: {err.strerror}") from err


def _not_utf8(where: str, offset: int, byte: int) -> UserError:
    return UserError(f"{where}: not UTF-8 text: byte 0x{byte:02x} at byte offset {offset} cannot be decoded")


def _read_text_blocks(file: Path, progress: _ReadProgress) -> Iterator[str]:
    """The text of a UTF-8 file in blocks of about `_BLOCK_BYTES`, its byte order mark dropped."""
    with _open_binary(file) as f:
        undecoded = b""  # an incomplete UTF-8 sequence left at the end of the last block
        offset = 0  # file offset of undecoded[0]
        at_start = True
        while True:
            try:
                block = f.read(_BLOCK_BYTES)
            except OSError as err:
                raise UserError(f"{file}: cannot read: {err.strerror}") from err
            progress.bytes_read += len(block)
            data = undecoded + block
            try:
                text, used = codecs.utf_8_decode(data, "strict", not block)
            except UnicodeDecodeError as err:
                raise _not_utf8(str(file), offset + err.start, data[err.start]) from None
            undecoded, offset = data[used:], offset + used
            if at_start and text:
                text, at_start = text.removeprefix("\ufeff"), False
            if text:
                yield text
            if not block:
                return


def _read_jsonl_texts(file: Path, progress: _ReadProgress) -> Iterator[str]:
    """The `text` field of every non-blank line of a JSON-lines file."""
    with _open_binary(file) as f:
        offset = 0  # file offset of the current line
        for line_number, raw in enumerate(f, start=1):
            progress.bytes_read += len(raw)
            where = f"{file}, line {line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(where, offset + err.start, raw[err.start]) from None
            offset += len(raw)
            if line_number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise UserError(f'{where}: expected a JSON object with a "text" field')
            text = record["text"]
            if not isinstance(text, str):
                raise UserError(f'{where}: "text" must be a string, got {type(text).__name__}')
            yield text


# ----------------------------------------------------------------------------
# Cleaning
# ----------------------------------------------------------------------------

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF[^\n]*", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF", re.MULTILINE)


@dataclass
class CleanStats:
    """How many documents were read, found empty, found duplicate, and kept."""

    read: int = 0
    empty: int = 0
    duplicate: int = 0
    kept: int = 0


def clean_documents(docs: Iterable[str]) -> tuple[list[str], CleanStats]:
    """Clean every document (`clean_document`), then drop empty ones and exact
    duplicates (the first copy stays, order is kept)."""
    stats = CleanStats()
    kept: list[str] = []
    seen: set[str] = set()
    for doc in docs:
        stats.read += 1
        text = clean_document(doc)
        if not text:
            stats.empty += 1
        elif text in seen:
            stats.duplicate += 1
        else:
            seen.add(text)
            kept.append(text)
    stats.kept = len(kept)
    return kept, stats


def clean_document(text: str) -> str:
    """One document, cleaned: newlines become LF (from CRLF or CR); a Project
    Gutenberg header and footer are dropped (only what lies between the
    `*** START OF` line and the `*** END OF` line stays; the START line must lie in
    the first megabyte); surrounding whitespace is stripped."""
    return "".join(_clean_pieces((text,)))


def _clean_pieces(blocks: Iterable[str]) -> Iterator[str]:
    """A document given as raw text blocks, cleaned, in pieces of about
    `_PIECE_CHARS` that each start with whitespace (but the first), so that
    tokenizing them one by one equals tokenizing their concatenation."""
    cleaner = _DocumentCleaner()
    for piece in _split_pieces(_normalize_newlines(blocks)):
        text = cleaner.feed(piece)
        if text:
            yield text


def _normalize_newlines(blocks: Iterable[str]) -> Iterator[str]:
    """CRLF and CR -> LF, also when a CRLF straddles two blocks."""
    held_cr = ""
    for block in blocks:
        block = held_cr + block
        held_cr = "\r" if block.endswith("\r") else ""
        if held_cr:
            block = block[:-1]
        yield block.replace("\r\n", "\n").replace("\r", "\n")
    if held_cr:
        yield "\n"


def _split_pieces(texts: Iterable[str]) -> Iterator[str]:
    """Regroup text into pieces of at most about `_PIECE_CHARS`, each cut just
    before a whitespace run that holds a line break (so lines stay whole), or
    failing that before any whitespace run."""
    held = ""
    for text in texts:
        held += text
        start = 0  # held[:start] has been yielded
        while len(held) - start >= _PIECE_CHARS:
            cut = _last_cut(held, start, start + _PIECE_CHARS) or _last_cut(held, start, len(held))
            if not cut:
                break  # no whitespace at all: wait for more text
            yield held[start:cut]
            start = cut
        held = held[start:]
    if held:
        yield held


def _last_cut(text: str, low: int, high: int) -> int:
    """The last index in (low, high) where a whitespace run holding a line break
    starts (else a whitespace run of any kind) after non-space text; 0 if none."""
    for mark in ("\n", " "):
        start = text.rfind(mark, low, high)
        while start > low and text[start - 1] in _WHITESPACE:  # walk back to the start of the run
            start -= 1
        if start > low:
            return start
    return 0


class _DocumentCleaner:
    """Cleans one document that arrives piece by piece (see `clean_document`).

    Pieces never split a line, so the Gutenberg markers are found whole. Trailing
    whitespace of a piece is held back and released only if more text follows, which
    strips the document's end without knowing in advance which piece is the last.
    """

    def __init__(self) -> None:
        self._first_piece = True
        self._is_gutenberg = False  # a START line was found: look for the END line
        self._ended = False  # the END line was seen: ignore the rest
        self._started = False  # non-space text was emitted: leading whitespace is behind us
        self._held_space = ""

    def feed(self, piece: str) -> str:
        """The cleaned text of `piece` that is certain to belong to the output."""
        if self._ended:
            return ""
        if self._first_piece:
            self._first_piece = False
            start = _GUTENBERG_START.search(piece)
            if start:
                self._is_gutenberg = True
                piece = piece[start.end():]
        if self._is_gutenberg:
            end = _GUTENBERG_END.search(piece)
            if end:
                self._ended = True
                piece = piece[: end.start()]
        if not self._started:
            piece = piece.lstrip(_WHITESPACE)
            self._started = bool(piece)
        body = piece.rstrip(_WHITESPACE)
        if not body:
            self._held_space += piece
            return ""
        text = self._held_space + body
        self._held_space = piece[len(body):]
        return text


# ----------------------------------------------------------------------------
# Tokenizing, joining and splitting
# ----------------------------------------------------------------------------


def tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Token ids of each document (int32 arrays). Special-token text inside a
    document is encoded as ordinary text."""
    return [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(list(docs))]


def join_documents(doc_tokens: Sequence[np.ndarray], eot_id: int) -> np.ndarray:
    """One token stream: every document followed by `<|endoftext|>` (`eot_id`),
    the last one included, so each document's end is marked the same way."""
    parts: list[np.ndarray] = []
    eot = np.array([eot_id], dtype=np.int32)
    for tokens in doc_tokens:
        parts += [np.asarray(tokens, dtype=np.int32), eot]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def split_documents(
    doc_tokens: Sequence[np.ndarray], val_fraction: float, eot_id: int, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation token streams (see `join_documents`).

    With enough documents (`floor(n_docs * val_fraction) >= 1`) that many whole
    documents, chosen at random from `seed`, go to validation, and both sides keep
    the original order. Otherwise (a single document, say) validation is the last
    `val_fraction` of the joined tokens (at least one token). Deterministic.
    """
    train, val, _ = _split_joined(doc_tokens, val_fraction, eot_id, seed)
    return train, val


def _split_joined(
    doc_tokens: Sequence[np.ndarray], val_fraction: float, eot_id: int, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    joined = join_documents(doc_tokens, eot_id)
    train_ranges, val_ranges, mode = _split_plan([len(t) + 1 for t in doc_tokens], val_fraction, seed)
    return _take_ranges(joined, train_ranges), _take_ranges(joined, val_ranges), mode


def _split_plan(
    doc_sizes: Sequence[int], val_fraction: float, seed: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], str]:
    """Where the joined stream splits: token ranges [start, end) for training and
    for validation, and "documents" or "tokens" for how it was split.
    `doc_sizes` counts each document's tokens in the stream, its end-of-text included.
    The rule is `split_documents`'s; `prepare` applies the same plan to its token file."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be at least 0 and below 1, got {val_fraction}")
    total = int(sum(doc_sizes))
    n_val_docs = math.floor(len(doc_sizes) * val_fraction)
    if n_val_docs >= 1:
        chosen = np.sort(np.random.default_rng(seed).choice(len(doc_sizes), n_val_docs, replace=False))
        offsets = np.concatenate([[0], np.cumsum(doc_sizes)])
        val_ranges = [(int(offsets[i]), int(offsets[i + 1])) for i in chosen]
        mode = "documents"
    else:
        n_val = min(max(1, round(total * val_fraction)), total - 1) if val_fraction > 0 else 0
        val_ranges = [(total - n_val, total)] if n_val > 0 else []
        mode = "tokens"
    train_ranges, position = [], 0
    for start, end in val_ranges:
        if start > position:
            train_ranges.append((position, start))
        position = end
    if position < total:
        train_ranges.append((position, total))
    return train_ranges, val_ranges, mode


def _take_ranges(tokens: np.ndarray, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    if not ranges:
        return tokens[:0].copy()
    return np.concatenate([tokens[start:end] for start, end in ranges])


def load_text_corpus(
    path: PathLike, tokenizer: Tokenizer, val_fraction: float, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A small corpus, read, cleaned, tokenized and split in memory.

    Returns the training and validation token streams (int32) and a summary with
    the same keys as a prepared folder's meta.json (see `format_stats`).
    """
    docs, clean_stats = clean_documents(read_documents(path))
    if not docs:
        raise UserError(f"{path}: no text left after cleaning ({clean_stats.read} documents, all empty or duplicates)")
    doc_tokens = tokenize_documents(docs, tokenizer)
    train, val, mode = _split_joined(doc_tokens, val_fraction, tokenizer.eot_id, seed)
    stats = {
        "source": str(path),
        "tokenizer": tokenizer.name,
        "split": mode,
        "val_fraction": val_fraction,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "documents": asdict(clean_stats),
        "document_tokens": dataset_stats([len(t) for t in doc_tokens]),
    }
    return train, val, stats


# ----------------------------------------------------------------------------
# Next-token windows
# ----------------------------------------------------------------------------


class SlidingWindowDataset(Dataset):
    """Windows over one token stream for next-token prediction.

    Window `i` covers `tokens[i*stride : i*stride + context_length + 1]`; it yields
    `(input, target)`, two int64 tensors of shape (context_length,), the target
    being the input shifted left by one token. Only full windows count, so the
    last `(len(tokens) - context_length - 1) % stride` tokens are not used.
    `tokens` may be any 1-D integer array, a `numpy.memmap` included: a window is
    copied out only when asked for.
    """

    def __init__(self, tokens: np.ndarray | Sequence[int] | torch.Tensor, context_length: int, stride: int,
                 *, name: str = "the corpus") -> None:
        if context_length < 1 or stride < 1:
            raise UserError(f"context_length and stride must be at least 1, got {context_length} and {stride}")
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 1:
            raise UserError(f"{name}: expected a 1-D token stream, got shape {self.tokens.shape}")
        self.context_length = context_length
        self.stride = stride
        window_tokens = context_length + 1  # inputs, plus the token that follows the last one
        if len(self.tokens) < window_tokens:
            raise UserError(
                f"{name} has {len(self.tokens):,} tokens; one window of context_length {context_length} "
                f"needs {window_tokens:,} (the inputs plus one next token)"
            )
        self.num_windows = (len(self.tokens) - window_tokens) // stride + 1

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} is out of range (0..{self.num_windows - 1})")
        start = index * self.stride
        window = torch.from_numpy(self.tokens[start : start + self.context_length + 1].astype(np.int64))  # (T + 1,)
        return window[:-1], window[1:]  # (T,), (T,)


class TokenFileDataset(SlidingWindowDataset):
    """Windows over a uint16 token file written by `prepare`, read through a memory map.

    Windows sit `stride` tokens apart, `context_length` by default: each token is
    an input once (windows overlap only by the one target token). The windows are
    fixed, so shuffling and exact resume are left to `BatchLoader`, whose state is
    two integers.
    """

    def __init__(self, path: PathLike, context_length: int, stride: int | None = None) -> None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such token file (write one with `python -m gpt prepare`)")
        size = path.stat().st_size
        if size % 2:
            raise UserError(f"{path}: {size} bytes is not a whole number of uint16 tokens")
        tokens = np.memmap(path, dtype=np.uint16, mode="r") if size else np.zeros(0, dtype=np.uint16)
        super().__init__(tokens, context_length, stride or context_length, name=str(path))
        self.path = path


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


def _collate(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Stack the items at `indices` field by field: (x, y) pairs become (B, T) tensors."""
    items = [dataset[i] for i in indices]
    return tuple(torch.stack(field) for field in zip(*items))


class BatchLoader:
    """Training batches in an order that is a pure function of (seed, epoch).

    Epoch `e` visits the dataset's items in the permutation drawn by a
    `torch.Generator` seeded with `seed + e` (or in index order without shuffle).
    Each step takes the next global batch of `batch_size * world_size` items from
    that order; rank `r` gets the `r`-th block of `batch_size` of them, so the ranks'
    batches are disjoint and together are the global batch. With `drop_last` an
    epoch has `len(dataset) // (batch_size * world_size)` batches; without, the last
    batch is completed with items from the start of the same epoch's order, so every
    item is seen and every batch has the same shape.

    `state_dict()` is two integers (epoch, batches taken in it); a new loader
    given it continues with exactly the batches the old one would have produced.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch_size = batch_size * world_size
        self.num_items = len(dataset)
        if self.num_items == 0 or (drop_last and self.num_items < self.global_batch_size):
            raise UserError(
                f"the data set has {self.num_items:,} windows; one batch needs {self.global_batch_size:,} "
                f"({batch_size} per rank x {world_size} ranks)"
            )
        if drop_last:
            self.batches_per_epoch = self.num_items // self.global_batch_size
        else:
            self.batches_per_epoch = math.ceil(self.num_items / self.global_batch_size)
        self._epoch = 0
        self._position = 0  # batches already taken from this epoch
        self._order = torch.arange(self.num_items)
        self._order_epoch: int | None = None  # the epoch `_order` belongs to

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (counting from 0)."""
        return self._epoch if self._position < self.batches_per_epoch else self._epoch + 1

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed + self._epoch)
                self._order = torch.randperm(self.num_items, generator=generator)
            self._order_epoch = self._epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next batch: inputs and targets, each (batch_size, context_length) int64."""
        if self._position == self.batches_per_epoch:
            self._epoch, self._position = self._epoch + 1, 0
        first = self._position * self.global_batch_size + self.rank * self.batch_size
        slots = torch.arange(first, first + self.batch_size) % self.num_items
        self._position += 1
        return _collate(self.dataset, self._epoch_order()[slots].tolist())  # (B, T), (B, T)

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands: plain integers, for a checkpoint."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()` of a loader with the same data, seed and batch size."""
        epoch, position = state.get("epoch"), state.get("position")
        if not isinstance(epoch, int) or not isinstance(position, int) or epoch < 0 or position < 0:
            raise UserError(f"data loader state must hold non-negative integers epoch and position, got {state}")
        if position > self.batches_per_epoch:
            raise UserError(
                f"data loader state is at batch {position} of epoch {epoch}, but an epoch here has only "
                f"{self.batches_per_epoch} batches: the data set or batch size changed since it was saved"
            )
        self._epoch, self._position = epoch, position


def iterate_eval(dataset: Dataset, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Fixed evaluation batches, the same on every call.

    All windows in index order (the last batch may be smaller), or, when
    `max_batches * batch_size` is fewer than there are, that many windows spread
    evenly over the data set so that a capped evaluation still sees all of it.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    n = len(dataset)
    count = n if max_batches is None else min(n, max_batches * batch_size)
    indices = np.arange(count) * n // max(count, 1)
    for start in range(0, count, batch_size):
        yield _collate(dataset, indices[start : start + batch_size].tolist())


# ----------------------------------------------------------------------------
# Token files for corpora that do not fit in memory
# ----------------------------------------------------------------------------

TOKEN_DTYPE = np.uint16
_COPY_TOKENS = 1 << 24  # tokens copied at a time from the stream to train.bin / val.bin


class _PieceEnd(enum.IntEnum):
    """What follows a piece of text sent to a tokenizer worker."""

    MORE = 0  # more pieces of the same document
    KEEP = 1  # the document ends here: append <|endoftext|>
    DROP = 2  # the document ends here and duplicates an earlier one: take it back out


# A task for a worker: pieces with what follows each, and source bytes read so far.
_Task = tuple[list[tuple[str, _PieceEnd]], int]

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_name: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(tokenizer_name)


def _tokenize_task(task: _Task) -> tuple[list[tuple[np.ndarray, _PieceEnd]], int]:
    """Tokenize a task's pieces (in a worker process); a document's last piece gets <|endoftext|>."""
    pieces, bytes_read = task
    assert _worker_tokenizer is not None, "_init_worker sets the tokenizer"
    results = []
    for text, end in pieces:
        ids = _worker_tokenizer.encode(text)
        if end is not _PieceEnd.MORE:
            ids.append(_worker_tokenizer.eot_id)
        results.append((np.asarray(ids, dtype=TOKEN_DTYPE), end))
    return results, bytes_read


def _tokenize_tasks(files: Sequence[Path], progress: _ReadProgress, stats: CleanStats) -> Iterator[_Task]:
    """Every document of `files`, cleaned and cut into pieces, bundled into tasks of
    about `_PIECE_CHARS` characters. Counts documents into `stats` as it goes.

    A document's last piece is held back until the document ends, when its hash
    (of the whole cleaned text) tells whether it repeats an earlier document. A
    one-piece duplicate is never sent; a longer one is sent and marked DROP.
    """
    seen: set[bytes] = set()
    pieces: list[tuple[str, _PieceEnd]] = []
    chars = 0
    for blocks in _iter_raw_documents(files, progress):
        stats.read += 1
        digest = hashlib.blake2b(digest_size=16)
        last_piece: str | None = None
        sent_pieces = 0
        for piece in _clean_pieces(blocks):
            digest.update(piece.encode("utf-8"))
            if last_piece is not None:
                pieces.append((last_piece, _PieceEnd.MORE))
                chars += len(last_piece)
                sent_pieces += 1
            last_piece = piece
            if chars >= _PIECE_CHARS:
                yield pieces, progress.bytes_read
                pieces, chars = [], 0
        if last_piece is None:
            stats.empty += 1
            continue
        if digest.digest() in seen:
            stats.duplicate += 1
            if sent_pieces == 0:
                continue
            end = _PieceEnd.DROP
        else:
            seen.add(digest.digest())
            stats.kept += 1
            end = _PieceEnd.KEEP
        pieces.append((last_piece, end))
        chars += len(last_piece)
        if chars >= _PIECE_CHARS:
            yield pieces, progress.bytes_read
            pieces, chars = [], 0
    if pieces:
        yield pieces, progress.bytes_read


def _tokenize_to_stream(files: Sequence[Path], stream_path: Path, tokenizer_name: str, workers: int,
                        total_bytes: int) -> tuple[CleanStats, np.ndarray]:
    """Write every kept document's tokens, each followed by <|endoftext|>, to
    `stream_path` in source order. Returns the document counts and each kept
    document's token count (end-of-text not counted)."""
    stats = CleanStats()
    progress = _ReadProgress()
    lengths: list[int] = []
    tasks = _tokenize_tasks(files, progress, stats)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(workers, _init_worker, (tokenizer_name,)))
            results = pool.imap(_tokenize_task, tasks)  # in task order, whichever worker finishes first
        else:
            _init_worker(tokenizer_name)
            results = map(_tokenize_task, tasks)
        stream = stack.enter_context(open(stream_path, "wb"))
        bar = stack.enter_context(tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None))
        doc_start = written = 0  # in tokens
        for tokenized, bytes_read in results:
            for tokens, end in tokenized:
                stream.write(tokens.tobytes())
                written += len(tokens)
                if end is _PieceEnd.KEEP:
                    lengths.append(written - doc_start - 1)
                    doc_start = written
                elif end is _PieceEnd.DROP:
                    stream.seek(doc_start * np.dtype(TOKEN_DTYPE).itemsize)
                    stream.truncate()
                    written = doc_start
            bar.update(bytes_read - bar.n)
        bar.update(total_bytes - bar.n)
    return stats, np.asarray(lengths, dtype=np.int64)


@contextlib.contextmanager
def _atomic_output(path: Path) -> Iterator[BinaryIO]:
    """A file to write that appears under `path` only once complete: a temporary
    file beside it, fsynced, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_ranges(stream: np.ndarray, ranges: Sequence[tuple[int, int]], path: Path) -> None:
    with _atomic_output(path) as f:
        for start, end in ranges:
            for chunk_start in range(start, end, _COPY_TOKENS):
                f.write(stream[chunk_start : min(end, chunk_start + _COPY_TOKENS)].tobytes())


def prepare(input_path: PathLike, out_dir: PathLike, *, val_fraction: float = 0.005, workers: int | None = None,
            tokenizer: str = "gpt2", seed: int = 0) -> dict[str, Any]:
    """Tokenize a corpus of any size into `out_dir`: `train.bin` and `val.bin`
    (uint16 token ids) and `meta.json` (returned as a dict).

    The input is what `read_documents` reads, streamed: a file at a time, a
    JSON line at a time, a big text file a megabyte at a time. Cleaning, the
    <|endoftext|> after each document and the split are those of `load_text_corpus`,
    so the files hold exactly the tokens `split_documents` would give. `workers`
    tokenizer processes (default: one per CPU) work through the text in order, so
    the output does not depend on their number. Each file is written under a
    temporary name and renamed when complete, meta.json last: an interrupted run
    leaves no truncated file, and no meta.json until all files are complete.
    """
    meta, _ = _prepare(Path(input_path), Path(out_dir), val_fraction, workers, tokenizer, seed)
    return meta


def _prepare(source: Path, out_dir: Path, val_fraction: float, workers: int | None, tokenizer_name: str,
             seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """`prepare`, also returning each kept document's token count (for the histogram)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be at least 0 and below 1, got {val_fraction}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    tokenizer = get_tokenizer(tokenizer_name)
    id_limit = np.iinfo(TOKEN_DTYPE).max + 1
    if tokenizer.n_vocab > id_limit:
        raise UserError(f"tokenizer {tokenizer.name} has {tokenizer.n_vocab:,} tokens; uint16 token files "
                        f"hold ids below {id_limit:,}")
    files = source_files(source)
    total_bytes = sum(file.stat().st_size for file in files)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # no meta.json while the token files are being replaced
    stream_path = out_dir / ".tokens.stream.tmp"
    try:
        stats, lengths = _tokenize_to_stream(files, stream_path, tokenizer.name, workers, total_bytes)
        if stats.kept == 0:
            raise UserError(f"{source}: no text left after cleaning ({stats.read} documents, all empty or duplicates)")
        train_ranges, val_ranges, mode = _split_plan(lengths + 1, val_fraction, seed)
        stream = np.memmap(stream_path, dtype=TOKEN_DTYPE, mode="r")
        _write_ranges(stream, train_ranges, out_dir / "train.bin")
        _write_ranges(stream, val_ranges, out_dir / "val.bin")
    finally:
        stream_path.unlink(missing_ok=True)
    meta = {
        "source": str(source),
        "source_bytes": total_bytes,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.n_vocab,
        "eot_id": tokenizer.eot_id,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "split": mode,
        "val_fraction": val_fraction,
        "seed": seed,
        "train_tokens": sum(end - start for start, end in train_ranges),
        "val_tokens": sum(end - start for start, end in val_ranges),
        "documents": asdict(stats),
        "document_tokens": dataset_stats(lengths),
    }
    with _atomic_output(out_dir / "meta.json") as f:
        f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return meta, lengths


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------


def dataset_stats(doc_token_lengths: Sequence[int] | np.ndarray) -> dict[str, int | float]:
    """Documents, total tokens, and min/median/mean/p95/max tokens per document."""
    lengths = np.asarray(doc_token_lengths, dtype=np.int64)
    if lengths.size == 0:
        raise UserError("no documents to describe: every document was empty or a duplicate")
    return {
        "documents": int(lengths.size),
        "tokens": int(lengths.sum()),
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "mean": float(lengths.mean()),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }


def format_stats(summary: dict[str, Any]) -> str:
    """A few readable lines about a corpus: `prepare`'s meta or `load_text_corpus`'s stats."""
    docs, lengths = summary["documents"], summary["document_tokens"]
    total = summary["train_tokens"] + summary["val_tokens"]
    split = ("whole documents" if summary["split"] == "documents" else "the tail of the token stream")
    return "\n".join([
        f"source:     {summary['source']} (tokenizer {summary['tokenizer']})",
        f"documents:  {docs['read']:,} read, {docs['empty']:,} empty, {docs['duplicate']:,} duplicate, "
        f"{docs['kept']:,} kept",
        f"tokens:     {total:,} = {summary['train_tokens']:,} train + {summary['val_tokens']:,} val "
        f"(val_fraction {summary['val_fraction']} of {split}; <|endoftext|> after each document)",
        f"per doc:    min {lengths['min']:,}, median {lengths['median']:,.0f}, mean {lengths['mean']:,.1f}, "
        f"p95 {lengths['p95']:,.0f}, max {lengths['max']:,}",
    ])


def write_length_histogram(lengths: Sequence[int] | np.ndarray, out_path: PathLike) -> Path | None:
    """A histogram of document lengths in tokens: a PNG at `out_path` when
    matplotlib is installed (returns the path), else printed as text (returns None).
    Lengths spanning more than two orders of magnitude get logarithmic bins."""
    lengths = np.asarray(lengths, dtype=np.int64)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(text_histogram(lengths))
        return None
    figure = Figure(figsize=(7, 4), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    low, high = int(lengths.min()), int(lengths.max())
    if low > 0 and high > 100 * low:
        axes.hist(lengths, bins=np.geomspace(low, high, 41))
        axes.set_xscale("log")
    else:
        axes.hist(lengths, bins=40)
    axes.set_xlabel("tokens per document")
    axes.set_ylabel("documents")
    axes.set_title(f"{lengths.size:,} documents, {int(lengths.sum()):,} tokens")
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=100)
    return out_path


def text_histogram(lengths: Sequence[int] | np.ndarray, bins: int = 10, width: int = 40) -> str:
    """Document lengths as a bar chart in text, one line per bin."""
    lengths = np.asarray(lengths, dtype=np.int64)
    counts, edges = np.histogram(lengths, bins=bins)
    scale = width / max(int(counts.max()), 1)
    lines = ["tokens per document      documents"]
    for count, low, high in zip(counts, edges[:-1], edges[1:]):
        lines.append(f"{low:>10,.0f} - {high:<10,.0f} {count:>8,} {'#' * round(count * scale)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Command line: python -m gpt prepare
# ----------------------------------------------------------------------------


def prepare_cli(argv: list[str]) -> int:
    """`python -m gpt prepare INPUT --out DIR`: see `prepare`; prints statistics and
    writes a document-length histogram next to the token files."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt prepare",
        description="Tokenize a corpus into uint16 token files for pretraining: DIR/train.bin and\n"
        "DIR/val.bin, DIR/meta.json (token and document counts) and DIR/doc_lengths.png.\n"
        "Documents are cleaned (Project Gutenberg header and footer dropped, LF newlines,\n"
        "surrounding whitespace stripped, empty documents and exact duplicates dropped),\n"
        "and each is followed by <|endoftext|>. Large inputs are streamed, never loaded whole.",
        epilog="example: python -m gpt prepare corpus/ --out data/corpus-gpt2 --workers 8\n"
        "then:    python pretrain.py --data.path data/corpus-gpt2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help='a .txt file (one document), a .jsonl file (a "text" field per line), '
                        "or a folder of them (searched recursively)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the token files (created if needed)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: %(default)s, one per CPU)")
    parser.add_argument("--val-fraction", type=float, default=0.005,
                        help="share of documents for validation; with too few documents for that, the "
                        "same share of tokens from the end (default: %(default)s)")
    parser.add_argument("--tokenizer", default="gpt2", help="tokenizer name or GGUF file (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing validation documents (default: %(default)s)")
    args = parser.parse_args(argv)

    out_dir = Path(args.out)
    started = time.perf_counter()
    meta, lengths = _prepare(Path(args.input), out_dir, args.val_fraction, args.workers, args.tokenizer, args.seed)
    seconds = time.perf_counter() - started
    megabytes = meta["source_bytes"] / 1e6
    print(format_stats(meta))
    print(f"speed:      {megabytes:,.1f} MB in {seconds:.1f} s = {megabytes / seconds:.1f} MB/s "
          f"with {args.workers} worker(s)")
    histogram = write_length_histogram(lengths, out_dir / "doc_lengths.png")
    written = ["train.bin", "val.bin", "meta.json"] + ([histogram.name] if histogram else [])
    print(f"wrote:      {', '.join(str(out_dir / name) for name in written)}")
    return 0


# ----------------------------------------------------------------------------
# Classification data: labelled texts from TSV, CSV or JSONL
# ----------------------------------------------------------------------------
#
#     examples = read_labeled_texts("data/sms_spam_collection.tsv")   # [LabeledText(text, label, source)]
#     examples, dedup = deduplicate_texts(examples)                   # the first copy of each text stays
#     labels = label_names(e.label for e in examples)                 # ["ham", "spam"]: class ids are positions
#     y = [labels.index(e.label) for e in examples]
#     train, val, test = stratified_split(y, val_fraction=0.1, test_fraction=0.1, seed=0)
#     dataset = ClassificationDataset.from_texts(texts, y, tokenizer, max_length=128)
#     loader = ClassificationBatchLoader(dataset, batch_size=16, seed=0)
#     ids, lengths, labels = loader.next_batch()   # (B, T) right-padded to the batch's longest text, (B,), (B,)
#
# Texts are right-padded, so under causal attention no real token ever sees a
# padding token: a classifier reading the last real token (or the mean over real
# tokens) gives the same answer however much padding a batch adds.

CLASSIFICATION_FORMATS = ("auto", "tsv", "csv", "jsonl")
_FORMAT_OF_SUFFIX = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl"}


@dataclass(frozen=True)
class LabeledText:
    """One example: its text, its label as the file writes it, and where it is (`"file, line 7"`)."""

    text: str
    label: str
    source: str


def read_labeled_texts(
    path: PathLike, *, file_format: str = "auto", text_column: str = "", label_column: str = "",
    header: str = "auto",
) -> list[LabeledText]:
    """Every labelled text in a TSV, CSV or JSONL file, in file order; blank lines are skipped.

    `file_format` "auto" goes by the suffix (.tsv/.tab, .csv, .jsonl). A column is
    named by a header name or a 0-based index ("1"); "" picks the default:

    * JSONL: one object per line; the text under `text_column` (default "text"), the
      label under `label_column` (default "label"), a string or an integer.
    * TSV/CSV: `header` "true"/"false" says whether line 1 names the columns; "auto"
      takes it as a header when a column is chosen by name, or when both are left
      to default and line 1 holds the cells "text" and "label" (names match in any
      case). With a header the default columns are those named "text" and "label";
      without one they are label = column 0, text = column 1 (the layout of the
      SMS Spam Collection).
      TSV has no quoting (a tab always separates); CSV follows RFC 4180 quoting.
      Every row must have as many columns as line 1.

    Raises UserError naming the file and line for a malformed line, an empty text or
    label, a column that does not exist, or a file with no examples.
    """
    path = Path(path)
    if file_format == "auto":
        file_format = _FORMAT_OF_SUFFIX.get(path.suffix.lower(), "")
        if not file_format:
            raise UserError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                            "set data.format to tsv, csv or jsonl")
    if file_format not in CLASSIFICATION_FORMATS:
        raise UserError(f"data.format: must be one of {', '.join(CLASSIFICATION_FORMATS)}; got {file_format!r}")
    text = _read_utf8_file(path)
    if file_format == "jsonl":
        examples = list(_labeled_jsonl(path, text, text_column or "text", label_column or "label"))
    else:
        rows = _tsv_rows(text) if file_format == "tsv" else _csv_rows(path, text)
        examples = list(_labeled_rows(path, rows, file_format, text_column, label_column, header))
    if not examples:
        raise UserError(f"{path}: no examples in the file")
    return examples


def _read_utf8_file(path: Path) -> str:
    """A whole UTF-8 file (byte order mark dropped); bad bytes are reported by line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise _not_utf8(f"{path}, line {line}", err.start, data[err.start]) from None


def _tsv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank line, split at each tab."""
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: texts may hold \x0c, \u2028, ...
        line = line.removesuffix("\r")
        if line.strip():
            yield number, line.split("\t")


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number, cells) of every non-blank CSV record; a quoted cell may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    next_line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise UserError(f"{path}, line {next_line}: malformed CSV ({err})") from None
        first_line, next_line = next_line, reader.line_num + 1
        if any(cell.strip() for cell in row):
            yield first_line, row


def _labeled_rows(
    path: Path, rows: Iterator[tuple[int, list[str]]], file_format: str, text_column: str, label_column: str,
    header: str,
) -> Iterator[LabeledText]:
    """LabeledTexts from table rows: find the header and the two columns, then check each row."""
    if header not in ("auto", "true", "false"):
        raise UserError(f"data.header: must be auto, true or false; got {header!r}")
    first = next(rows, None)
    if first is None:
        return
    first_line, first_cells = first
    cells = [cell.strip() for cell in first_cells]
    folded = [cell.casefold() for cell in cells]  # header names match regardless of case
    by_name = [spec for spec in (text_column, label_column) if spec and not spec.isdigit()]
    if header == "auto":
        has_header = bool(by_name) or (not text_column and not label_column and {"text", "label"} <= set(folded))
    else:
        has_header = header == "true"
    what = "tab-separated" if file_format == "tsv" else "comma-separated"

    def column(spec: str, role: str, default_name: str, default_index: int) -> int:
        if spec.isdigit():
            index = int(spec)
            if index >= len(cells):
                raise UserError(f"{path}: data.{role}_column {index} does not exist: line {first_line} has "
                                f"{len(cells)} {what} columns (0-based indices 0..{len(cells) - 1})")
            return index
        if not has_header:
            if spec:
                raise UserError(f"{path}: data.{role}_column {spec!r} names a column, but the file has no header "
                                f"row (line {first_line} is data); give a 0-based column index or set data.header true")
            return default_index
        name = spec or default_name
        if name.casefold() not in folded:
            raise UserError(f"{path}: no column named {name!r} in the header (line {first_line}: "
                            f"{', '.join(map(repr, cells))}); choose one with data.{role}_column")
        return folded.index(name.casefold())

    text_index = column(text_column, "text", "text", 1)
    label_index = column(label_column, "label", "label", 0)
    if text_index >= len(cells) or label_index >= len(cells):
        raise UserError(f"{path}, line {first_line}: expected at least {max(text_index, label_index) + 1} "
                        f"{what} columns, found {len(cells)}")
    if text_index == label_index:
        raise UserError(f"{path}: the text and the label are both column {text_index}")
    for number, row in (rows if has_header else itertools.chain([first], rows)):
        source = f"{path}, line {number}"
        if len(row) != len(cells):
            raise UserError(f"{source}: {len(row)} {what} columns, but line {first_line} has {len(cells)}")
        yield _checked_example(row[text_index], row[label_index].strip(), source)


def _labeled_jsonl(path: Path, text: str, text_key: str, label_key: str) -> Iterator[LabeledText]:
    """LabeledTexts from JSON lines, each an object with a string text and a string or integer label."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        source = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{source}, column {err.colno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(record).__name__}")
        for key in (text_key, label_key):
            if key not in record:
                raise UserError(f"{source}: no {key!r} field (fields: {', '.join(map(repr, record))}); "
                                f"choose the field with data.{'text' if key == text_key else 'label'}_column")
        text_value, label = record[text_key], record[label_key]
        if not isinstance(text_value, str):
            raise UserError(f"{source}: {text_key!r} must be a string, got {type(text_value).__name__}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise UserError(f"{source}: {label_key!r} must be a string or an integer, got {json.dumps(label)}")
        yield _checked_example(text_value, str(label).strip(), source)


def _checked_example(text: str, label: str, source: str) -> LabeledText:
    text = text.strip()
    if not text:
        raise UserError(f"{source}: empty text")
    if not label:
        raise UserError(f"{source}: empty label")
    return LabeledText(text, label, source)


@dataclass
class DedupStats:
    """Texts read, copies dropped, and how many of those copies carried another label than the first."""

    read: int = 0
    duplicates: int = 0
    conflicting_labels: int = 0


def deduplicate_texts(examples: Iterable[LabeledText]) -> tuple[list[LabeledText], DedupStats]:
    """Keep the first example of each distinct text (after stripping), in order."""
    stats = DedupStats()
    label_of: dict[str, str] = {}
    kept: list[LabeledText] = []
    for example in examples:
        stats.read += 1
        if example.text in label_of:
            stats.duplicates += 1
            stats.conflicting_labels += label_of[example.text] != example.label
            continue
        label_of[example.text] = example.label
        kept.append(example)
    return kept, stats


def label_names(labels: Iterable[str], source: str = "the data") -> list[str]:
    """The distinct labels in a fixed order, the class ids being their positions.

    Integer labels sort by value ("2" before "10"), others alphabetically. A
    classifier needs at least two classes: one alone raises UserError.
    """
    distinct = set(labels)
    if all(_is_integer_text(label) for label in distinct):
        names = sorted(distinct, key=int)
    else:
        names = sorted(distinct)
    if len(names) < 2:
        found = f"every example has the label {names[0]!r}" if names else "there are no examples"
        raise UserError(f"{source}: {found}; a classifier needs at least two classes")
    return names


def _is_integer_text(text: str) -> bool:
    return text.lstrip("-").isdigit()


def stratified_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the training, validation and test examples (each sorted), class by class.

    Each class's examples are shuffled (numpy generator seeded with `seed`);
    round(n * test_fraction) go to test, round(n * val_fraction) to validation,
    the rest to training, which always keeps at least one example of each class
    (test gives way first). A fraction of 0 leaves that split empty.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise UserError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be at least 0 "
                        "and sum to less than 1")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n = len(members)
        n_val = min(round(n * val_fraction), n - 1)
        n_test = min(round(n * test_fraction), n - 1 - n_val)
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test:n_test + n_val])
        parts[0].append(members[n_test + n_val:])
    train, val, test = (np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)
    return train, val, test


def downsample_classes(labels: Sequence[int] | np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of a class-balanced subset: every class cut at random to the smallest class's size."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    keep = [rng.permutation(np.flatnonzero(labels == c))[: counts.min()] for c in classes]
    return np.sort(np.concatenate(keep))


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Cross-entropy weights n / (K * n_c) (K classes, n_c examples of class c): every class weighs
    the same in total. A class without examples gets weight 0. float32, shape (K,)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.divide(counts.sum(), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


class ClassificationDataset(Dataset):
    """Tokenized labelled texts, each cut to `max_length` tokens (its start is kept) and right-padded.

    Item i is (ids (max_length,), length (), label ()), all int64; `ClassificationBatchLoader`
    and `iterate_classification_eval` trim a batch's padding to its longest text.
    """

    def __init__(self, token_ids: Sequence[Sequence[int]], labels: Sequence[int], max_length: int,
                 pad_id: int = 0) -> None:
        if max_length < 1:
            raise UserError(f"max_length must be at least 1, got {max_length}")
        if len(token_ids) != len(labels):
            raise ValueError(f"{len(token_ids)} token lists but {len(labels)} labels")
        self.max_length = max_length
        full_lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
        if (full_lengths == 0).any():
            raise UserError(f"text {int(np.argmin(full_lengths))} has no tokens")
        self.num_truncated = int((full_lengths > max_length).sum())
        self.lengths = torch.from_numpy(np.minimum(full_lengths, max_length))  # (N,)
        self.ids = torch.full((len(token_ids), max_length), pad_id, dtype=torch.int64)  # (N, max_length)
        for row, ids in enumerate(token_ids):
            kept = ids[:max_length]
            self.ids[row, :len(kept)] = torch.as_tensor(kept, dtype=torch.int64)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))  # (N,)

    @classmethod
    def from_texts(cls, texts: Sequence[str], labels: Sequence[int], tokenizer: Tokenizer, max_length: int,
                   pad_id: int | None = None) -> ClassificationDataset:
        """Tokenize `texts` (special-token text stays ordinary text); pad with `pad_id`, by default the
        tokenizer's padding token or else its end-of-text token (padding is never attended to)."""
        if pad_id is None:
            pad_id = tokenizer.padding_id
        return cls(tokenizer.encode_batch(list(texts)), labels, max_length, pad_id)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ids[index], self.lengths[index], self.labels[index]


def trim_padding(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(ids (B, max_length), lengths, labels) -> ids cut to the batch's longest text (B, T), lengths, labels."""
    ids, lengths, labels = batch
    return ids[:, :int(lengths.max())], lengths, labels


class ClassificationBatchLoader(BatchLoader):
    """`BatchLoader` over a ClassificationDataset, each batch trimmed to its longest text.

    With `group_by_length`, batches hold texts of similar length, so they carry little
    padding: each epoch's shuffled order is cut into windows of `LENGTH_WINDOW_BATCHES`
    global batches, each window is sorted by text length and cut into batches, and the
    batches of the epoch are shuffled. The order stays a pure function of (seed, epoch),
    so `state_dict` and exact resume work as before.
    """

    LENGTH_WINDOW_BATCHES = 64

    def __init__(self, dataset: ClassificationDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, group_by_length: bool = False) -> None:
        super().__init__(dataset, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size,
                         drop_last=drop_last)
        self.group_by_length = group_by_length
        self._grouped_order = self._order
        self._grouped_epoch: int | None = None  # the epoch `_grouped_order` belongs to

    def _epoch_order(self) -> torch.Tensor:
        order = super()._epoch_order()
        if not self.group_by_length:
            return order
        if self._grouped_epoch != self._epoch:
            self._grouped_order, self._grouped_epoch = self._grouped_by_length(order), self._epoch
        return self._grouped_order

    def _grouped_by_length(self, order: torch.Tensor) -> torch.Tensor:
        lengths = self.dataset.lengths
        window = self.global_batch_size * self.LENGTH_WINDOW_BATCHES
        chunks = [order[start:start + window] for start in range(0, len(order), window)]
        order = torch.cat([chunk[torch.argsort(lengths[chunk], stable=True)] for chunk in chunks])
        whole = len(order) // self.global_batch_size * self.global_batch_size
        batches = order[:whole].view(-1, self.global_batch_size)  # (batches, global batch)
        generator = torch.Generator().manual_seed(self.seed + self._epoch)
        shuffled = batches[torch.randperm(len(batches), generator=generator)]
        return torch.cat([shuffled.flatten(), order[whole:]])

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """(ids (B, T), lengths (B,), labels (B,)): this rank's next batch."""
        return trim_padding(super().next_batch())


def iterate_classification_eval(
    dataset: ClassificationDataset, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, ...]]:
    """`iterate_eval` over a ClassificationDataset, each batch trimmed to its longest text."""
    for batch in iterate_eval(dataset, batch_size, max_batches):
        yield trim_padding(batch)


# ----------------------------------------------------------------------------
# Instruction data: prompt + response sequences with the loss on the response
# ----------------------------------------------------------------------------
#
#     records = read_instruction_records("data/instructions.json")          # gpt.prompts
#     dataset = InstructionDataset.from_records(records, "model", tokenizer, max_length=256, mask_prompt=True)
#     loader = InstructionBatchLoader(dataset, batch_size=8, seed=0)
#     inputs, targets, lengths = loader.next_batch()   # (B, T), (B, T) with -100 where no loss, (B,)
#
# A sequence is prompt + response + the template's end-of-turn marker, tokenized as
# two parts (the prompt exactly as generation will see it, then the rest). Targets
# are the sequence shifted by one; padding gets -100, and with `mask_prompt` the
# prompt's own tokens do too, so the loss falls on the response and on the end
# marker, which teaches the model where to stop.


@dataclass
class InstructionStats:
    """What tokenizing a set of records did: kept, prompts cut from the left, records dropped."""

    records: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    dropped_too_long: int = 0


def tokenize_instruction(record: dict[str, Any], template: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the response ids end with the template's end-of-turn marker."""
    from .prompts import format_example

    prompt, full = format_example(record, template, tokenizer)
    return (tokenizer.encode(prompt, allowed_special="all"),
            tokenizer.encode(full[len(prompt):], allowed_special="all"))


class InstructionDataset(Dataset):
    """Tokenized instruction records, right-padded to the longest; item i is (inputs, targets, length).

    `max_length` bounds the model's input (inputs are the sequence minus its last token).
    A record that is too long loses prompt tokens from the left; one whose response alone
    does not fit is dropped. Neither happens silently: `stats` counts both.
    """

    def __init__(self, sequences: Sequence[tuple[list[int], list[int]]], max_length: int, mask_prompt: bool,
                 pad_id: int = 0) -> None:
        self.stats = InstructionStats(records=len(sequences))
        self.mask_prompt = mask_prompt
        kept: list[tuple[list[int], int]] = []  # (ids, prompt length)
        for prompt_ids, response_ids in sequences:
            room = max_length + 1 - len(response_ids)  # tokens left for the prompt
            if room < 1:
                self.stats.dropped_too_long += 1
                continue
            if len(prompt_ids) > room:
                self.stats.prompt_truncated += 1
                prompt_ids = prompt_ids[-room:]
            kept.append((prompt_ids + response_ids, len(prompt_ids)))
        self.stats.kept = len(kept)
        if not kept:
            raise UserError(f"no instruction record fits in {max_length} tokens "
                            f"({self.stats.dropped_too_long} dropped as too long)")
        width = max(len(ids) for ids, _ in kept) - 1
        self.inputs = torch.full((len(kept), width), pad_id, dtype=torch.int64)  # (N, width)
        self.targets = torch.full((len(kept), width), -100, dtype=torch.int64)  # (N, width)
        self.lengths = torch.tensor([len(ids) - 1 for ids, _ in kept], dtype=torch.int64)  # (N,)
        for row, (ids, prompt_length) in enumerate(kept):
            sequence = torch.as_tensor(ids, dtype=torch.int64)
            self.inputs[row, :len(ids) - 1] = sequence[:-1]
            self.targets[row, :len(ids) - 1] = sequence[1:]
            if mask_prompt:  # targets 0 .. prompt_length-2 predict prompt tokens 1 .. prompt_length-1
                self.targets[row, :prompt_length - 1] = -100

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], template: str, tokenizer: Tokenizer, max_length: int,
                     mask_prompt: bool) -> InstructionDataset:
        pad_id = tokenizer.padding_id
        sequences = [tokenize_instruction(record, template, tokenizer) for record in records]
        return cls(sequences, max_length, mask_prompt, pad_id)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index], self.lengths[index]


def trim_instruction_batch(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(inputs, targets, lengths) -> inputs and targets cut to the batch's longest sequence."""
    inputs, targets, lengths = batch
    width = int(lengths.max())
    return inputs[:, :width], targets[:, :width], lengths


class InstructionBatchLoader(BatchLoader):
    """`BatchLoader` over an InstructionDataset, each batch trimmed to its longest sequence."""

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        return trim_instruction_batch(super().next_batch())
