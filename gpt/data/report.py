"""What preparing a corpus did to it: the data report.

Both roads to training tokens (`prepare` in `gpt.data.token_files`, `load_text_corpus`
in `gpt.data.corpus`) tell a `DataReport` about every document they read, in order:

    report = DataReport(stages=doc_filter.reasons)     # drop reasons in pipeline order
    report.add_document(reason, n_tokens)              # reason None: kept
    report.add_example(reason, text)                   # keeps the first few per reason
    report.top_tokens = top_tokens(token_counts, tokenizer)
    report.split = {...}                               # train/val documents and tokens
    write_report(report, out_dir)                      # data_report.md, data_report.json, doc_lengths.png

The report holds the funnel (documents and tokens before and after each filter), a few
removed documents per reason (truncated), the token count of every document read and
every document kept (for the length histograms), the most frequent tokens and the
split sizes. Tokens of a document are counted after cleaning and normalization, without
the <|endoftext|> that follows it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import atomic_write, write_json, write_text
from ..tokenizer import Tokenizer

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 300
TOP_TOKENS = 20


@dataclass
class DataReport:
    """The record of one pass over a corpus (see the module docstring)."""

    stages: tuple[str, ...] = ()
    documents_read: int = 0
    removed_documents: dict[str, int] = field(default_factory=dict)
    removed_tokens: dict[str, int] = field(default_factory=dict)
    lengths_read: list[int] = field(default_factory=list)  # tokens of each non-empty document read
    lengths_kept: list[int] = field(default_factory=list)  # tokens of each document kept
    examples: dict[str, list[str]] = field(default_factory=dict)
    top_tokens: list[dict[str, Any]] = field(default_factory=list)
    split: dict[str, Any] = field(default_factory=dict)

    def add_document(self, reason: str | None, n_tokens: int) -> None:
        """One document read: kept (`reason` None) or removed for `reason`, with its token count."""
        self.documents_read += 1
        if n_tokens or reason != "empty":
            self.lengths_read.append(n_tokens)
        if reason is None:
            self.lengths_kept.append(n_tokens)
            return
        self.removed_documents[reason] = self.removed_documents.get(reason, 0) + 1
        self.removed_tokens[reason] = self.removed_tokens.get(reason, 0) + n_tokens

    def add_example(self, reason: str, text: str) -> None:
        """Keep `text` (truncated) as an example of `reason`, if fewer than EXAMPLES_PER_REASON are kept."""
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON and text:
            examples.append(text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + " [...]")

    @property
    def documents_kept(self) -> int:
        return len(self.lengths_kept)

    def removed_line(self) -> str:
        """One line: what the filters removed, per reason, of how many documents and tokens."""
        removed = ", ".join(f"{row['removed_documents']:,} {row['step']} ({row['removed_tokens']:,} tokens)"
                            for row in self.funnel()[1:]) or "nothing"
        return (f"data filters: removed {removed} of {self.documents_read:,} documents "
                f"({sum(self.lengths_read):,} tokens); kept {self.documents_kept:,} ({sum(self.lengths_kept):,} tokens)")

    def funnel(self) -> list[dict[str, Any]]:
        """Documents and tokens after each step: "read" first, then one row per drop reason that occurred,
        in pipeline order (the order of `stages`; others after them), with what that step removed."""
        order = {reason: index for index, reason in enumerate(self.stages)}
        reasons = sorted(self.removed_documents, key=lambda r: (order.get(r, len(order)), r))
        documents, tokens = self.documents_read, sum(self.lengths_read)
        rows = [{"step": "read", "documents": documents, "tokens": tokens, "removed_documents": 0, "removed_tokens": 0}]
        for reason in reasons:
            documents -= self.removed_documents[reason]
            tokens -= self.removed_tokens[reason]
            rows.append({"step": reason, "documents": documents, "tokens": tokens,
                         "removed_documents": self.removed_documents[reason],
                         "removed_tokens": self.removed_tokens[reason]})
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (data_report.json): everything but the per-document lengths, which are summarized."""
        return {
            "funnel": self.funnel(),
            "document_tokens_read": length_summary(self.lengths_read),
            "document_tokens_kept": length_summary(self.lengths_kept),
            "examples": self.examples,
            "top_tokens": self.top_tokens,
            "split": self.split,
        }


def length_summary(lengths: list[int] | np.ndarray) -> dict[str, int | float]:
    """Documents, total tokens and min/median/mean/p95/max tokens per document (zeros for none)."""
    values = np.asarray(lengths, dtype=np.int64)
    if values.size == 0:
        return {"documents": 0, "tokens": 0, "min": 0, "median": 0.0, "mean": 0.0, "p95": 0.0, "max": 0}
    return {
        "documents": int(values.size),
        "tokens": int(values.sum()),
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": float(values.mean()),
        "p95": float(np.percentile(values, 95)),
        "max": int(values.max()),
    }


def top_tokens(counts: np.ndarray, tokenizer: Tokenizer, n: int = TOP_TOKENS) -> list[dict[str, Any]]:
    """The `n` most frequent token ids of `counts` (a bincount), each with its text, count and share."""
    total = int(counts.sum())
    order = np.argsort(-counts, kind="stable")[:n]
    return [{"id": int(i), "text": tokenizer.decode([int(i)]), "count": int(counts[i]),
             "share": float(counts[i] / total) if total else 0.0}
            for i in order if counts[i] > 0]


# ----------------------------------------------------------------------------
# Writing the report
# ----------------------------------------------------------------------------


def format_report(report: DataReport, title: str) -> str:
    """The report as Markdown (data_report.md); also what `prepare --dry-run` prints."""
    lines = [f"# Data report: {title}", "", "## What each step removed", "",
             "| step | documents | tokens | removed documents | removed tokens |", "|---|---:|---:|---:|---:|"]
    for row in report.funnel():
        removed = (f"{row['removed_documents']:,} | {row['removed_tokens']:,}" if row["step"] != "read" else "- | -")
        lines.append(f"| {row['step']} | {row['documents']:,} | {row['tokens']:,} | {removed} |")
    lines += ["", "Tokens are counted after cleaning and normalization, without the <|endoftext|> after each "
              "document.", ""]
    if report.split:
        split = report.split
        how = (f"{split['val_documents']:,} whole documents of {report.documents_kept:,}" if split["mode"] == "documents"
               else "the tail of the token stream: too few documents to hold out whole ones")
        lines += ["## Split", "",
                  f"- training: {split['train_tokens']:,} tokens; validation: {split['val_tokens']:,} tokens "
                  f"({how}; val_fraction {split['val_fraction']}; <|endoftext|> included)", ""]
    lines += ["## Tokens per document", "", "| | documents | tokens | min | median | mean | p95 | max |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, lengths in (("read", report.lengths_read), ("kept", report.lengths_kept)):
        s = length_summary(lengths)
        lines.append(f"| {name} | {s['documents']:,} | {s['tokens']:,} | {s['min']:,} | {s['median']:,.0f} | "
                     f"{s['mean']:,.1f} | {s['p95']:,.0f} | {s['max']:,} |")
    lines += ["", "```", text_histogram(report.lengths_kept, before=report.lengths_read), "```", ""]
    if report.top_tokens:
        lines += ["## Most frequent tokens (kept documents)", "", "| id | token | count | share |",
                  "|---:|---|---:|---:|"]
        lines += [f"| {t['id']} | `{t['text']!r}` | {t['count']:,} | {t['share']:.2%} |" for t in report.top_tokens]
        lines.append("")
    if report.examples:
        lines += ["## Examples of removed documents", ""]
        for reason, examples in report.examples.items():
            lines += [f"### {reason}", ""]
            lines += ["    " + example.replace("\n", "\n    ") + "\n" for example in examples]
    return "\n".join(lines)


def write_report(report: DataReport, out_dir: str | Path, title: str) -> list[Path]:
    """data_report.md, data_report.json and (with matplotlib) doc_lengths.png in `out_dir`; the paths written."""
    out_dir = Path(out_dir)
    write_text(out_dir / "data_report.md", format_report(report, title))
    write_json(out_dir / "data_report.json", report.to_dict(), ensure_ascii=False)
    written = [out_dir / "data_report.md", out_dir / "data_report.json"]
    png = write_length_histogram(report.lengths_kept, out_dir / "doc_lengths.png", before=report.lengths_read)
    return written + ([png] if png else [])


# ----------------------------------------------------------------------------
# Histograms of document lengths
# ----------------------------------------------------------------------------


def write_length_histogram(lengths: list[int] | np.ndarray, out_path: str | Path,
                           before: list[int] | np.ndarray | None = None) -> Path | None:
    """A histogram of document lengths in tokens (with `before`: those lengths too, for comparison), as a PNG
    at `out_path` when matplotlib is installed (returns the path), else printed as text (returns None)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    try:
        figure = _length_histogram_figure(lengths, None if before is None else np.asarray(before, dtype=np.int64))
    except ImportError:  # no matplotlib
        print(text_histogram(lengths, before=before))
        return None
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write(out_path, lambda f: f.write(buffer.getvalue()))
    return Path(out_path)


def _bins(lengths: np.ndarray, count: int) -> tuple[np.ndarray, bool]:
    """`count` bins over `lengths`; logarithmic (True) when they span more than two orders of magnitude."""
    low, high = (int(lengths.min()), int(lengths.max())) if lengths.size else (0, 1)
    if low > 0 and high > 100 * low:
        return np.geomspace(low, high, count + 1), True
    return np.linspace(low, max(high, low + 1), count + 1), False


def _length_histogram_figure(lengths: np.ndarray, before: np.ndarray | None = None) -> Figure:
    """The figure `write_length_histogram` saves: 7 x 4 inches, 40 bins (logarithmic for lengths spanning more
    than two orders of magnitude); `before`, when given, drawn behind in grey."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    everything = lengths if before is None or before.size == 0 else before
    bins, logarithmic = _bins(everything, 40)
    if before is not None:
        axes.hist(before, bins=bins, color="0.75", label=f"read: {before.size:,} documents")
    axes.hist(lengths, bins=bins, label=f"kept: {lengths.size:,} documents")
    if logarithmic:
        axes.set_xscale("log")
    if before is not None:
        axes.legend()
    axes.set_xlabel("tokens per document")
    axes.set_ylabel("documents")
    axes.set_title(f"{lengths.size:,} documents, {int(lengths.sum()):,} tokens")
    return figure


def text_histogram(lengths: list[int] | np.ndarray, bins: int = 10, width: int = 40,
                   before: list[int] | np.ndarray | None = None) -> str:
    """Document lengths as a bar chart in text, one line per bin; with `before`, a column of its counts too."""
    lengths = np.asarray(lengths, dtype=np.int64)
    reference = lengths if before is None or len(before) == 0 else np.asarray(before, dtype=np.int64)
    edges = np.histogram_bin_edges(reference, bins=bins) if reference.size else np.linspace(0, 1, bins + 1)
    counts, _ = np.histogram(lengths, bins=edges)
    before_counts = np.histogram(reference, bins=edges)[0] if before is not None else None
    scale = width / max(int(counts.max(initial=0)), 1)
    header = "tokens per document      documents" + ("      read" if before_counts is not None else "")
    lines = [header]
    for index, (count, low, high) in enumerate(zip(counts, edges[:-1], edges[1:])):
        read = f" {before_counts[index]:>9,}" if before_counts is not None else ""
        lines.append(f"{low:>10,.0f} - {high:<10,.0f} {count:>8,}{read} {'#' * round(count * scale)}")
    return "\n".join(lines)
