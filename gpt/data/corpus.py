"""Clean documents in, training and validation token streams out.

    doc_tokens = tokenize_documents(docs, tokenizer)                 # one int32 array per document
    train, val = split_documents(doc_tokens, 0.1, tokenizer.eot_id)  # <|endoftext|> after each document

`load_text_corpus` runs the whole road for a small corpus held in memory: read and
clean (`gpt.data.text`), filter (`gpt.data.filters`), tokenize, join, split; its summary has the keys of a
prepared folder's meta.json, which `format_stats` prints. The split rule lives in
`_split_plan`, which `gpt.data.token_files` applies to its token file, so both roads
give the same tokens for the same input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from ..config import FilterConfig
from ..errors import UserError
from ..tokenizer import Tokenizer

from .filters import DocumentFilter
from .report import DataReport, length_summary
from .text import CleanStats, PathLike, clean_document, read_documents


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
    doc_sizes: Sequence[int] | np.ndarray, val_fraction: float, seed: int
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
    path: PathLike, tokenizer: Tokenizer, val_fraction: float, *, seed: int = 0, filters: FilterConfig | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A small corpus, read, cleaned, filtered, tokenized and split in memory.

    `filters` (`gpt.data.filters`; default: FilterConfig(), exact duplicates only) decide which
    documents stay. Returns the training and validation token streams (int32) and a summary with
    the same keys as a prepared folder's meta.json (see `format_stats`) plus "report", the
    `DataReport` of what the filters removed.
    """
    filters = filters or FilterConfig()
    doc_filter = DocumentFilter(filters)
    report = DataReport(stages=tuple(doc_filter.reasons))
    verdicts = [doc_filter.apply(clean_document(doc)) for doc in read_documents(path)]
    all_tokens = tokenize_documents([text for text, _ in verdicts], tokenizer)
    doc_tokens = []
    for (text, reason), tokens in zip(verdicts, all_tokens):
        report.add_document(reason, len(tokens))
        if reason is None:
            doc_tokens.append(tokens)
        else:
            report.add_example(reason, text)
    if not doc_tokens:
        removed = ", ".join(f"{count:,} {reason}" for reason, count in report.removed_documents.items())
        raise UserError(f"{path}: no text left after cleaning and filtering ({report.documents_read} documents: "
                        f"{removed})")
    train, val, mode = _split_joined(doc_tokens, val_fraction, tokenizer.eot_id, seed)
    removed = dict(report.removed_documents)
    stats = {
        "source": str(path),
        "tokenizer": tokenizer.name,
        "split": mode,
        "val_fraction": val_fraction,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "documents": asdict(CleanStats(read=report.documents_read, empty=removed.pop("empty", 0),
                                       duplicate=removed.pop("duplicate", 0), kept=len(doc_tokens),
                                       filtered=removed)),
        "document_tokens": dataset_stats([len(t) for t in doc_tokens]),
        "report": report,
    }
    return train, val, stats


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------


def dataset_stats(doc_token_lengths: Sequence[int] | np.ndarray) -> dict[str, int | float]:
    """Documents, total tokens, and min/median/mean/p95/max tokens per document."""
    if len(doc_token_lengths) == 0:
        raise UserError("no documents to describe: every document was empty or a duplicate")
    return length_summary(doc_token_lengths)


def format_stats(summary: dict[str, Any]) -> str:
    """A few readable lines about a corpus: `prepare`'s meta or `load_text_corpus`'s stats."""
    docs, lengths = summary["documents"], summary["document_tokens"]
    total = summary["train_tokens"] + summary["val_tokens"]
    split = ("whole documents" if summary["split"] == "documents" else "the tail of the token stream")
    filtered = "".join(f"{count:,} {reason}, " for reason, count in docs.get("filtered", {}).items())
    return "\n".join([
        f"source:     {summary['source']} (tokenizer {summary['tokenizer']})",
        f"documents:  {docs['read']:,} read, {docs['empty']:,} empty, {docs['duplicate']:,} duplicate, "
        f"{filtered}{docs['kept']:,} kept",
        f"tokens:     {total:,} = {summary['train_tokens']:,} train + {summary['val_tokens']:,} val "
        f"(val_fraction {summary['val_fraction']} of {split}; <|endoftext|> after each document)",
        f"per doc:    min {lengths['min']:,}, median {lengths['median']:,.0f}, mean {lengths['mean']:,.1f}, "
        f"p95 {lengths['p95']:,.0f}, max {lengths['max']:,}",
    ])
