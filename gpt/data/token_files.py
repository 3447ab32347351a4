"""Token files for corpora too big for memory: `prepare` and `python -m gpt prepare`.

    meta = prepare("corpus/", "data/corpus-gpt2", val_fraction=0.005, workers=8)
    # -> data/corpus-gpt2/train.bin and val.bin (token ids), meta.json, data_report.md/.json, doc_lengths.png

The flow: `gpt.data.text` reads each document in blocks and cleans it in pieces;
`_tokenize_tasks` bundles the pieces into tasks; worker processes (`_tokenize_task`)
tokenize the tasks, in order, into one temporary token stream with <|endoftext|> after each
document. A `DocumentFilter` (`gpt.data.filters`) decides each document's fate. By default
(exact duplicates only) a document streams in pieces and its hash decides at its end. Any
other filter (near-duplicates, quality rules, a blocklist, PII scrubbing, normalizations)
needs the document whole: it goes to a worker in one piece, the worker examines it (normalizes,
runs the quality rules and the blocklist, computes its MinHash signature) and tokenizes the
normalized text, and the main process, in document order, decides against the documents before
it (exact and near duplicates). A dropped document is tokenized too (the report counts its
tokens), then taken back out of the stream. `_split_plan` of `gpt.data.corpus` cuts the stream
into train.bin and val.bin. The files hold exactly the tokens `load_text_corpus` would give for
the same input and filters; `TokenFileDataset` (`gpt.data.loader`) reads them through a memory
map. Ids are uint16, or uint32 for a vocabulary of more than 65,536.

Every run fills a `DataReport` (`gpt.data.report`): what each filter removed, examples,
document-length histograms, the most frequent tokens and the split; `prepare` writes it
beside the token files, `--dry-run` only prints it. A run that trains on the files checks
their `meta.json` first (`check_token_meta`): the tokenizer that wrote them, the id type,
and ids that fit the model's vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import hashlib
import json
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from .. import cli_args
from ..config import SEED_LIMIT, DataConfig, FilterConfig, build_config, parse_overrides, read_toml
from ..errors import ConfigError, UserError
from ..files import atomic_write, write_json
from ..tokenizer import Tokenizer, get_tokenizer

from .corpus import _split_plan, dataset_stats, format_stats
from .filters import DocumentFilter, Examined
from .report import EXAMPLE_CHARS, DataReport, format_report, text_histogram, top_tokens, write_report
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

TOKEN_DTYPES = (np.uint16, np.uint32)
_COPY_TOKENS = 1 << 24  # tokens copied at a time from the stream to train.bin / val.bin
_COUNT_TOKENS = 1 << 22  # tokens counted at a time (bincount widens them to 64 bits)


def token_dtype(n_vocab: int) -> type[np.unsignedinteger]:
    """The narrowest unsigned type that holds every id of a vocabulary of `n_vocab`: uint16 up to 65,536."""
    return np.uint16 if n_vocab <= np.iinfo(np.uint16).max + 1 else np.uint32


class _PieceEnd(enum.IntEnum):
    """What follows a piece of text sent to a tokenizer worker."""

    MORE = 0  # more pieces of the same document
    KEEP = 1  # the document ends here: append <|endoftext|>
    DROP = 2  # the document ends here and repeats an earlier one: count its tokens, then take them back out
    WHOLE = 3  # a whole document for the filters: the worker examines it, the main process decides its fate


# A task for a worker: pieces with what follows each, and source bytes read so far.
_Task = tuple[list[tuple[str, _PieceEnd]], int]
# A worker's result for one piece: its tokens, what follows it, and for WHOLE what the filters found.
_Tokenized = tuple[np.ndarray, _PieceEnd, Examined | None]

_worker_tokenizer: Tokenizer | None = None
_worker_filter: DocumentFilter | None = None


def _init_worker(tokenizer_name: str, filters: FilterConfig) -> None:
    global _worker_tokenizer, _worker_filter
    _worker_tokenizer = get_tokenizer(tokenizer_name)
    _worker_filter = DocumentFilter(filters)


def _tokenize_task(task: _Task) -> tuple[list[_Tokenized], int]:
    """Tokenize a task's pieces (in a worker process); a document's last piece gets <|endoftext|>. A WHOLE
    document is examined first (`DocumentFilter.examine`) and its normalized text tokenized; its Examined
    comes back with the text cut to an example's length."""
    pieces, bytes_read = task
    assert _worker_tokenizer is not None and _worker_filter is not None, "_init_worker sets them"
    dtype = token_dtype(_worker_tokenizer.n_vocab)
    results: list[_Tokenized] = []
    for text, end in pieces:
        examined = None
        if end is _PieceEnd.WHOLE:
            examined = _worker_filter.examine(text)
            text = examined.text
            examined = replace(examined, text=text[: EXAMPLE_CHARS + 1])
        ids = _worker_tokenizer.encode(text)
        if end is not _PieceEnd.MORE:
            ids.append(_worker_tokenizer.eot_id)
        results.append((np.asarray(ids, dtype=dtype), end, examined))
    return results, bytes_read


def _document_pieces(blocks: Iterator[str], doc_filter: DocumentFilter, report: DataReport,
                     piece_chars: int) -> Iterator[tuple[str, _PieceEnd]]:
    """One document, cleaned, as pieces for the workers.

    With any filter beyond exact deduplication, the document goes whole (WHOLE), the filters needing all of
    it. By default it streams in pieces of about `piece_chars`, its last marked KEEP, or DROP when its hash
    (complete at its end) repeats an earlier document's; an empty document sends nothing and goes straight
    into the report.
    """
    if doc_filter.active:
        yield "".join(_clean_pieces(blocks, piece_chars)), _PieceEnd.WHOLE
        return
    digest = hashlib.blake2b(digest_size=16)
    first_piece = last_piece = None
    for piece in _clean_pieces(blocks, piece_chars):
        digest.update(piece.encode("utf-8"))
        if last_piece is not None:
            yield last_piece, _PieceEnd.MORE
        first_piece = first_piece or piece
        last_piece = piece
    if last_piece is None:
        report.add_document("empty", 0)
        return
    if doc_filter.cfg.dedup and doc_filter.seen_before(digest.digest()):
        report.add_example("duplicate", first_piece)
        yield last_piece, _PieceEnd.DROP
    else:
        yield last_piece, _PieceEnd.KEEP


def _tokenize_tasks(files: Sequence[Path], progress: _ReadProgress, doc_filter: DocumentFilter, report: DataReport,
                    piece_chars: int, block_bytes: int) -> Iterator[_Task]:
    """Every document of `files`, cleaned and cut into pieces (`_document_pieces`), bundled into tasks of
    about `piece_chars` characters."""
    pieces: list[tuple[str, _PieceEnd]] = []
    chars = 0
    for blocks in _iter_raw_documents(files, progress, block_bytes):
        for piece in _document_pieces(blocks, doc_filter, report, piece_chars):
            pieces.append(piece)
            chars += len(piece[0])
            if chars >= piece_chars:
                yield pieces, progress.bytes_read
                pieces, chars = [], 0
    if pieces:
        yield pieces, progress.bytes_read


class _Throttle:
    """At most `limit` tasks in flight. Pool.imap reads its tasks as fast as it can, which is faster than the
    workers tokenize: without a limit, the whole corpus would wait in memory."""

    def __init__(self, limit: int) -> None:
        self._slots = threading.Semaphore(limit)
        self._closed = False

    def feed(self, tasks: Iterator[_Task]) -> Iterator[_Task]:
        for task in tasks:
            self._slots.acquire()
            if self._closed:
                return
            yield task

    def done(self) -> None:
        """One task's result has been used: its slot is free."""
        self._slots.release()

    def close(self) -> None:
        """Stop feeding (and wake a feeder waiting for a slot, so that the pool can shut down)."""
        self._closed = True
        self._slots.release()


def _tokenize_to_stream(files: Sequence[Path], stream_path: Path, tokenizer_name: str, workers: int,
                        total_bytes: int, doc_filter: DocumentFilter, report: DataReport, piece_chars: int,
                        block_bytes: int) -> None:
    """Write every kept document's tokens, each followed by <|endoftext|>, to `stream_path` in source order,
    telling `report` each document's fate and token count (end-of-text not counted)."""
    progress = _ReadProgress()
    throttle = _Throttle(4 * workers)
    tasks = throttle.feed(_tokenize_tasks(files, progress, doc_filter, report, piece_chars, block_bytes))
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(multiprocessing.Pool(workers, _init_worker, (tokenizer_name, doc_filter.cfg)))
            stack.callback(throttle.close)  # before the pool's exit, which waits for the feeding thread
            results = pool.imap(_tokenize_task, tasks)  # in task order, whichever worker finishes first
        else:
            _init_worker(tokenizer_name, doc_filter.cfg)
            results = map(_tokenize_task, tasks)
        stream = stack.enter_context(open(stream_path, "wb"))
        bar = stack.enter_context(tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None))
        doc_start = written = 0  # in tokens
        for tokenized, bytes_read in results:
            throttle.done()
            for tokens, end, examined in tokenized:
                stream.write(tokens.tobytes())
                written += len(tokens)
                if end is _PieceEnd.MORE:
                    continue
                reason = doc_filter.decide(examined) if examined is not None else \
                    ("duplicate" if end is _PieceEnd.DROP else None)
                report.add_document(reason, written - doc_start - 1)
                if reason is None:
                    doc_start = written
                    continue
                if examined is not None:
                    report.add_example(reason, examined.text)
                stream.seek(doc_start * tokens.itemsize)
                stream.truncate()
                written = doc_start
            bar.update(bytes_read - bar.n)
        bar.update(total_bytes - bar.n)


def _token_counts(stream: np.ndarray, n_vocab: int, eot_id: int) -> np.ndarray:
    """How often each id occurs in `stream` (read in chunks), end-of-text not counted."""
    counts = np.zeros(n_vocab, dtype=np.int64)
    for start in range(0, len(stream), _COUNT_TOKENS):
        counts += np.bincount(stream[start : start + _COUNT_TOKENS], minlength=n_vocab)[:n_vocab]
    counts[eot_id] = 0
    return counts


def _write_ranges(stream: np.ndarray, ranges: Sequence[tuple[int, int]], path: Path) -> None:
    """The tokens of `ranges` of `stream`, in order, into `path` (atomically)."""
    def write(f: BinaryIO) -> None:
        for start, end in ranges:
            for chunk_start in range(start, end, _COPY_TOKENS):
                f.write(stream[chunk_start : min(end, chunk_start + _COPY_TOKENS)].tobytes())

    atomic_write(path, write)


def prepare(input_path: PathLike, out_dir: PathLike, *, val_fraction: float = 0.005, workers: int | None = None,
            tokenizer: str = "gpt2", seed: int = 0, filters: FilterConfig | None = None,
            piece_chars: int = DEFAULT_PIECE_CHARS, block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, Any]:
    """Tokenize a corpus of any size into `out_dir`: `train.bin` and `val.bin` (token ids: uint16, or uint32
    for a vocabulary of more than 65,536), `meta.json` (returned as a dict), and the data report
    (`data_report.md`, `data_report.json`, `doc_lengths.png`: `gpt.data.report`).

    The input is what `read_documents` reads, streamed: a file at a time, a JSON line at a time, a big
    text file `block_bytes` at a time (with filters beyond exact deduplication, a document at a time).
    Cleaning, `filters` (default: FilterConfig(), exact duplicates only), the <|endoftext|> after each
    document and the split are those of `load_text_corpus`, so the files hold exactly the tokens it would
    give. `workers` tokenizer processes (default: one per CPU) work through the text in order, in tasks of
    about `piece_chars` characters, so the output does not depend on their number. Each file is written
    under a temporary name and renamed when complete, meta.json last: an interrupted run leaves no
    truncated file, and no meta.json until all files are complete.
    """
    meta, _ = _prepare(Path(input_path), Path(out_dir), val_fraction, workers, tokenizer, seed, filters,
                       piece_chars=piece_chars, block_bytes=block_bytes)
    return meta


def _prepare(source: Path, out: Path | None, val_fraction: float, workers: int | None, tokenizer: str, seed: int,
             filters: FilterConfig | None, *, dry_run: bool = False, piece_chars: int = DEFAULT_PIECE_CHARS,
             block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[dict[str, Any], DataReport]:
    """`prepare`, also returning the report. A `dry_run` writes no token files and no meta.json (the report
    still goes to `out` when one is given, which only a dry run may leave out)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be at least 0 and below 1, got {val_fraction}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"seed must be in [0, 2**32), got {seed}")
    if out is None and not dry_run:
        raise UserError("prepare needs an output folder (only a dry run can do without one)")
    tok = get_tokenizer(tokenizer)
    doc_filter = DocumentFilter(filters or FilterConfig())
    report = DataReport(stages=tuple(doc_filter.reasons))
    files = source_files(source)
    total_bytes = sum(file.stat().st_size for file in files)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if not dry_run:
            (out / "meta.json").unlink(missing_ok=True)  # no meta.json while the token files are being replaced
    dtype = token_dtype(tok.n_vocab)
    with tempfile.TemporaryDirectory(dir=out, prefix=".prepare-") as scratch:
        stream_path = Path(scratch) / "tokens.stream"
        _tokenize_to_stream(files, stream_path, tokenizer, workers, total_bytes, doc_filter, report, piece_chars,
                            block_bytes)
        if report.documents_kept == 0:
            raise UserError(f"{source}: no text left after cleaning and filtering ({report.documents_read} "
                            f"documents: {_removed_summary(report)})")
        kept = np.asarray(report.lengths_kept, dtype=np.int64)
        train_ranges, val_ranges, mode = _split_plan(kept + 1, val_fraction, seed)
        stream = np.memmap(stream_path, dtype=dtype, mode="r")
        report.top_tokens = top_tokens(_token_counts(stream, tok.n_vocab, tok.eot_id), tok)
        report.split = {"mode": mode, "val_fraction": val_fraction, "seed": seed,
                        "train_tokens": sum(end - start for start, end in train_ranges),
                        "val_tokens": sum(end - start for start, end in val_ranges),
                        "val_documents": len(val_ranges) if mode == "documents" else 0}
        if not dry_run:
            _write_ranges(stream, train_ranges, out / "train.bin")
            _write_ranges(stream, val_ranges, out / "val.bin")
        del stream
    removed = dict(report.removed_documents)
    meta = {
        "source": str(source),
        "source_bytes": total_bytes,
        "tokenizer": tok.name,
        "vocab_size": tok.n_vocab,
        "eot_id": tok.eot_id,
        "dtype": np.dtype(dtype).name,
        "split": mode,
        "val_fraction": val_fraction,
        "seed": seed,
        "train_tokens": report.split["train_tokens"],
        "val_tokens": report.split["val_tokens"],
        "documents": asdict(CleanStats(read=report.documents_read, empty=removed.pop("empty", 0),
                                       duplicate=removed.pop("duplicate", 0), kept=report.documents_kept,
                                       filtered=removed)),
        "filters": (filters or FilterConfig()).to_dict(),
        "document_tokens": dataset_stats(kept),
    }
    if out is not None:
        write_report(report, out, str(source))
        if not dry_run:
            write_json(out / "meta.json", meta)
    return meta, report


def _removed_summary(report: DataReport) -> str:
    """"3 empty, 2 duplicate" from a report's removal counts."""
    return ", ".join(f"{count:,} {reason}" for reason, count in report.removed_documents.items()) or "none"


def check_token_meta(folder: PathLike, tokenizer_name: str, vocab_size: int) -> dict[str, Any]:
    """A prepared folder's meta.json, checked against the run that is about to read its token files:
    written by the tokenizer `tokenizer_name`, in uint16 or uint32, with ids below the model's `vocab_size`.

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
    if meta["dtype"] not in [np.dtype(t).name for t in TOKEN_DTYPES]:
        raise UserError(f"{path}: dtype {meta['dtype']!r}; token files hold "
                        f"{' or '.join(np.dtype(t).name for t in TOKEN_DTYPES)}")
    if meta["tokenizer"] != tokenizer_name:
        raise UserError(f"{path}: the tokens were written by the tokenizer {meta['tokenizer']!r}, but this run "
                        f"uses {tokenizer_name!r}")
    if meta["vocab_size"] > vocab_size:
        raise UserError(f"{path}: vocab_size {meta['vocab_size']:,}: token ids up to {meta['vocab_size'] - 1:,} do "
                        f"not fit the model's vocabulary (model.vocab_size {vocab_size:,})")
    return meta


# ----------------------------------------------------------------------------
# Command line: python -m gpt prepare
# ----------------------------------------------------------------------------


def prepare_cli(argv: list[str]) -> int:
    """`python -m gpt prepare INPUT --out DIR`: see `prepare`; prints statistics, the filters' funnel and a
    text histogram, and writes the data report next to the token files."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt prepare",
        description="Tokenize a corpus into token files for pretraining: DIR/train.bin and DIR/val.bin,\n"
        "DIR/meta.json, and a data report: DIR/data_report.md and .json (documents and tokens each\n"
        "filter removed, examples, length histograms, top tokens, split sizes), DIR/doc_lengths.png.\n"
        "Documents are cleaned (Project Gutenberg header and footer dropped, LF newlines,\n"
        "surrounding whitespace stripped), empty documents and exact duplicates dropped, and\n"
        "each is followed by <|endoftext|>. More filters are off by default: near-duplicates,\n"
        "quality rules, a blocklist, PII scrubbing, normalizations. Large inputs are streamed.",
        epilog="examples:\n"
        "  python -m gpt prepare corpus/ --out data/corpus-gpt2 --workers 8\n"
        "  python -m gpt prepare corpus/ --out data/clean --near-dedup --quality --pii\n"
        "  python -m gpt prepare corpus/ --dry-run --quality --data.quality_min_words 20\n"
        "  python -m gpt prepare corpus/ --out data/clean --config configs/my.toml   # its [data] filters\n"
        "then:    python pretrain.py --data.path data/corpus-gpt2\n\n"
        "filter fields (--data.FIELD VALUE, or the [data] table of --config):\n"
        + "\n".join(FilterConfig.field_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help='a .txt file (one document), a .jsonl file (a "text" field per line), '
                        "or a folder of them (searched recursively)")
    parser.add_argument("--out", type=cli_args.output_folder, metavar="DIR",
                        help="folder for the token files and the report (created if needed); optional with --dry-run")
    parser.add_argument("--dry-run", action="store_true",
                        help="read, filter and tokenize, print the report, write no token files")
    parser.add_argument("--workers", type=cli_args.positive_int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: %(default)s, one per CPU)")
    parser.add_argument("--val-fraction", type=cli_args.fraction, default=0.005,
                        help="share of documents for validation; with too few documents for that, the "
                        "same share of tokens from the end (default: %(default)s)")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2, bytes, a folder from train-tokenizer, or a GGUF "
                        "file (default: %(default)s)")
    parser.add_argument("--seed", type=cli_args.seed, default=0,
                        help="seed for choosing validation documents (default: %(default)s)")
    parser.add_argument("--config", metavar="FILE", help="a TOML file whose [data] table sets the filters "
                        "(other tables and data fields are ignored)")
    switches = parser.add_argument_group("filters (shortcuts for --data.FIELD true)")
    for name, help_text in (("near-dedup", "drop near-duplicates (MinHash LSH; needs datasketch)"),
                            ("quality", "drop documents failing the heuristic quality rules"),
                            ("pii", "replace e-mail addresses, phone numbers and IP addresses"),
                            ("lowercase", "lower-case every document"), ("nfkc", "Unicode NFKC normalization")):
        switches.add_argument(f"--{name}", action="store_true", help=help_text)
    switches.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    switches.add_argument("--blocklist", metavar="FILE", help="drop documents holding a listed word or phrase "
                          "(--data.blocklist_action mask: mask them)")
    args, rest = parser.parse_known_args(argv)
    if args.out is None and not args.dry_run:
        parser.error("--out DIR is required (or --dry-run)")
    filters = _filters_from_args(args, rest)

    started = time.perf_counter()
    meta, report = _prepare(Path(args.input), args.out, args.val_fraction, args.workers, args.tokenizer, args.seed,
                            filters, dry_run=args.dry_run)
    seconds = time.perf_counter() - started
    megabytes = meta["source_bytes"] / 1e6
    if args.dry_run:
        print(format_report(report, str(args.input)))
    else:
        print(format_stats(meta))
        print(text_histogram(report.lengths_kept, before=report.lengths_read))
    print(f"speed:      {megabytes:,.1f} MB in {seconds:.1f} s = {megabytes / seconds:.1f} MB/s "
          f"with {args.workers} worker(s)")
    if args.out is not None:
        written = ([] if args.dry_run else ["train.bin", "val.bin", "meta.json"]) + \
            [p.name for p in args.out.iterdir() if p.name in ("data_report.md", "data_report.json", "doc_lengths.png")]
        print(f"wrote:      {', '.join(str(args.out / name) for name in written)}")
    return 0


def _filters_from_args(args: argparse.Namespace, rest: list[str]) -> FilterConfig:
    """The FilterConfig of --config's [data] table, then --data.FIELD overrides, then the switches."""
    table = read_toml(args.config).get("data", {}) if args.config else {}
    if not isinstance(table, dict):
        raise ConfigError(f"{args.config}: [data] must be a table")
    overrides = parse_overrides(rest)
    unknown = sorted(set(overrides) - {"data"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: prepare takes only --data.FIELD overrides (filters), not --{unknown[0]}.*")
    filter_names = FilterConfig.fields_by_key()
    data = build_config({"data": DataConfig}, {"data": table}, overrides)["data"]
    for key in overrides.get("data", {}):
        if key not in filter_names:
            raise ConfigError(f"data.{key}: not a filter field; prepare takes {', '.join(filter_names)}")
    switched = {"near_dedup": args.near_dedup, "quality": args.quality, "pii": args.pii, "lowercase": args.lowercase,
                "nfkc": args.nfkc}
    settings = data.filter_settings().to_dict()
    settings.update({name: True for name, on in switched.items() if on})
    if args.no_dedup:
        settings["dedup"] = False
    if args.blocklist:
        settings["blocklist"] = args.blocklist
    return FilterConfig.from_dict(settings)
