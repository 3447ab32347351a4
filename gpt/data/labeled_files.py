"""Labelled-text files in, `LabeledText` examples out: the first stage of the classification data.

    examples = read_labeled_texts("data/sms_spam_collection.tsv")   # [LabeledText(text, label, source)]

A file is TSV, CSV or JSONL (`CLASSIFICATION_FORMATS`; "auto" goes by the suffix).
The file is decoded whole, its rows are found (`_tsv_rows`, `_csv_rows`, or JSON
lines), the header and the text and label columns are settled from the first row,
and every row becomes a `LabeledText` that remembers its file and line, so every
later error can say where an example came from. Deduplication, label names and
splits follow in `gpt.data.classification`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import check_choice
from ..errors import UserError
from ..files import json_lines

from .text import PathLike, _not_utf8

CLASSIFICATION_FORMATS = ("auto", "tsv", "csv", "jsonl")
HEADER_CHOICES = ("auto", "true", "false")
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
    check_choice("data.format", file_format, CLASSIFICATION_FORMATS)
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
    check_choice("data.header", header, HEADER_CHOICES)
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
    for number, record in json_lines(path, text):
        source = f"{path}, line {number}"
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
