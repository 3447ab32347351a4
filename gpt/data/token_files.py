"""Token files for corpora too big for memory: `prepare` and `python -m gpt prepare`.

    meta = prepare("corpus/", "data/corpus-gpt2", val_fraction=0.005, workers=8)
    # -> data/corpus-gpt2/train.bin and val.bin (uint16 token ids), meta.json

The flow: `gpt.data.text` reads each document in blocks and cleans it in pieces;
`_tokenize_tasks` bundles the pieces into tasks and drops duplicate documents by
hash; worker processes (`_tokenize_task`) tokenize the tasks, in order, into one
temporary token stream with <|endoftext|> after each document; `_split_plan` of
`gpt.data.corpus` cuts that stream into train.bin and val.bin. The files hold exactly
the tokens `load_text_corpus` would give for the same input; `TokenFileDataset`
(`gpt.data.loader`) reads them through a memory map.

`prepare_cli` adds statistics (`format_stats`) and a histogram of document lengths
(`write_length_histogram`: a PNG with matplotlib, else `text_histogram`). A run that
trains on the files checks their `meta.json` first (`check_token_meta`): the tokenizer
that wrote them, and ids that fit the model's vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from .. import cli_args
from ..config import SEED_LIMIT
from ..errors import UserError
from ..files import atomic_write, write_json
from ..tokenizer import Tokenizer, get_tokenizer

from .corpus import _split_plan, dataset_stats, format_stats
from .text import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_PIECE_CHARS,
    CleanStats,
    PathLike,
    _clean_pieces,
    _iter_raw_documents,
    _ReadProgress,
    source_files,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


def _tokenize_tasks(files: Sequence[Path], progress: _ReadProgress, stats: CleanStats, piece_chars: int,
                    block_bytes: int) -> Iterator[_Task]:
    """Every document of `files`, cleaned and cut into pieces, bundled into tasks of
    about `piece_chars` characters. Counts documents into `stats` as it goes.

    A document's last piece is held back until the document ends, when its hash
    (of the whole cleaned text) tells whether it repeats an earlier document. A
    one-piece duplicate is never sent; a longer one is sent and marked DROP.
    """
    seen: set[bytes] = set()
    pieces: list[tuple[str, _PieceEnd]] = []
    chars = 0
    for blocks in _iter_raw_documents(files, progress, block_bytes):
        stats.read += 1
        digest = hashlib.blake2b(digest_size=16)
        last_piece: str | None = None
        sent_pieces = 0
        for piece in _clean_pieces(blocks, piece_chars):
            digest.update(piece.encode("utf-8"))
            if last_piece is not None:
                pieces.append((last_piece, _PieceEnd.MORE))
                chars += len(last_piece)
                sent_pieces += 1
            last_piece = piece
            if chars >= piece_chars:
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
        if chars >= piece_chars:
            yield pieces, progress.bytes_read
            pieces, chars = [], 0
    if pieces:
        yield pieces, progress.bytes_read


def _tokenize_to_stream(files: Sequence[Path], stream_path: Path, tokenizer_name: str, workers: int,
                        total_bytes: int, piece_chars: int, block_bytes: int) -> tuple[CleanStats, np.ndarray]:
    """Write every kept document's tokens, each followed by <|endoftext|>, to
    `stream_path` in source order. Returns the document counts and each kept
    document's token count (end-of-text not counted)."""
    stats = CleanStats()
    progress = _ReadProgress()
    lengths: list[int] = []
    tasks = _tokenize_tasks(files, progress, stats, piece_chars, block_bytes)
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


def _write_ranges(stream: np.ndarray, ranges: Sequence[tuple[int, int]], path: Path) -> None:
    """The tokens of `ranges` of `stream`, in order, into `path` (atomically)."""
    def write(f: BinaryIO) -> None:
        for start, end in ranges:
            for chunk_start in range(start, end, _COPY_TOKENS):
                f.write(stream[chunk_start : min(end, chunk_start + _COPY_TOKENS)].tobytes())

    atomic_write(path, write)


def prepare(input_path: PathLike, out_dir: PathLike, *, val_fraction: float = 0.005, workers: int | None = None,
            tokenizer: str = "gpt2", seed: int = 0, piece_chars: int = DEFAULT_PIECE_CHARS,
            block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, Any]:
    """Tokenize a corpus of any size into `out_dir`: `train.bin` and `val.bin`
    (uint16 token ids) and `meta.json` (returned as a dict).

    The input is what `read_documents` reads, streamed: a file at a time, a
    JSON line at a time, a big text file `block_bytes` at a time. Cleaning, the
    <|endoftext|> after each document and the split are those of `load_text_corpus`,
    so the files hold exactly the tokens `split_documents` would give. `workers`
    tokenizer processes (default: one per CPU) work through the text in order, in
    tasks of about `piece_chars` characters, so the output does not depend on their
    number. Each file is written under a temporary name and renamed when complete,
    meta.json last: an interrupted run leaves no truncated file, and no meta.json
    until all files are complete.
    """
    meta, _ = _prepare(Path(input_path), Path(out_dir), val_fraction, workers, tokenizer, seed,
                       piece_chars=piece_chars, block_bytes=block_bytes)
    return meta


def _prepare(source: Path, out_dir: Path, val_fraction: float, workers: int | None, tokenizer_name: str,
             seed: int, *, piece_chars: int = DEFAULT_PIECE_CHARS,
             block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[dict[str, Any], np.ndarray]:
    """`prepare`, also returning each kept document's token count (for the histogram)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be at least 0 and below 1, got {val_fraction}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"seed must be in [0, 2**32), got {seed}")
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
        stats, lengths = _tokenize_to_stream(files, stream_path, tokenizer_name, workers, total_bytes, piece_chars,
                                             block_bytes)
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
    write_json(out_dir / "meta.json", meta)
    return meta, lengths


def check_token_meta(folder: PathLike, tokenizer_name: str, vocab_size: int) -> dict[str, Any]:
    """A prepared folder's meta.json, checked against the run that is about to read its token files:
    written by the tokenizer `tokenizer_name`, in uint16, with ids below the model's `vocab_size`.

    `prepare` writes meta.json last, so a folder without one was never completed. A missing,
    damaged or mismatched meta.json is a UserError naming it and the value at fault.
    """
    path = Path(folder) / "meta.json"
    again = f"write the folder again with `python -m gpt prepare SOURCE --out {folder}`"
    if not path.is_file():
        raise UserError(f"{path}: missing, so the token files beside it are incomplete (an interrupted prepare?); "
                        f"{again}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({type(err).__name__}: {err}); {again}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(meta).__name__}; {again}")
    for key, kind in (("tokenizer", str), ("vocab_size", int), ("dtype", str)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise UserError(f"{path}: {key} must be a {kind.__name__}, got {json.dumps(meta.get(key))}; {again}")
    if meta["dtype"] != np.dtype(TOKEN_DTYPE).name:
        raise UserError(f"{path}: dtype {meta['dtype']!r}, but token files hold {np.dtype(TOKEN_DTYPE).name}")
    if meta["tokenizer"] != tokenizer_name:
        raise UserError(f"{path}: the tokens were written by the tokenizer {meta['tokenizer']!r}, but this run "
                        f"uses {tokenizer_name!r}")
    if meta["vocab_size"] > vocab_size:
        raise UserError(f"{path}: vocab_size {meta['vocab_size']:,}: token ids up to {meta['vocab_size'] - 1:,} do "
                        f"not fit the model's vocabulary (model.vocab_size {vocab_size:,})")
    return meta


# ----------------------------------------------------------------------------
# Histograms of document lengths
# ----------------------------------------------------------------------------


def write_length_histogram(lengths: Sequence[int] | np.ndarray, out_path: PathLike) -> Path | None:
    """A histogram of document lengths in tokens: a PNG at `out_path` when
    matplotlib is installed (returns the path), else printed as text (returns None)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    try:
        figure = _length_histogram_figure(lengths)
    except ImportError:  # no matplotlib
        print(text_histogram(lengths))
        return None
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=100)
    return out_path


def _length_histogram_figure(lengths: np.ndarray) -> Figure:
    """The figure `write_length_histogram` saves: 7 x 4 inches, one bar per bin of
    40. Lengths spanning more than two orders of magnitude get logarithmic bins."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    return figure


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
    parser.add_argument("--out", required=True, type=cli_args.output_folder, metavar="DIR",
                        help="folder for the token files (created if needed)")
    parser.add_argument("--workers", type=cli_args.positive_int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: %(default)s, one per CPU)")
    parser.add_argument("--val-fraction", type=cli_args.fraction, default=0.005,
                        help="share of documents for validation; with too few documents for that, the "
                        "same share of tokens from the end (default: %(default)s)")
    parser.add_argument("--tokenizer", default="gpt2", help="tokenizer name or GGUF file (default: %(default)s)")
    parser.add_argument("--seed", type=cli_args.seed, default=0,
                        help="seed for choosing validation documents (default: %(default)s)")
    args = parser.parse_args(argv)

    out_dir = args.out
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
