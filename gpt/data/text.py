"""Raw text in, clean documents out: the first stage of the pretraining data.

    docs = read_documents("data/botchan.txt")    # a .txt file, a .jsonl file, or a folder of them
    docs, stats = clean_documents(docs)          # Gutenberg header/footer off, LF newlines, no empties/duplicates

`read_documents` and `clean_documents` hold whole documents in memory (for
`load_text_corpus` in `gpt.data.corpus`). `gpt.data.token_files` streams the same
steps instead: `_iter_raw_documents` yields each document as blocks of about
`block_bytes` bytes, and `_clean_pieces` turns those blocks into cleaned pieces of
about `piece_chars` characters, each cut just before a run of whitespace. GPT-2's
pre-tokenizer always starts a new piece of text at such a point, so tokenizing the
pieces one by one gives exactly the tokens of the whole document.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import UserError
from ..files import parse_json_line

PathLike = str | os.PathLike[str]

# Bytes read from a text file at a time, and the size (in characters) of the pieces
# a document is cleaned and tokenized in.
DEFAULT_BLOCK_BYTES = 1 << 20
DEFAULT_PIECE_CHARS = 1 << 20

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


def read_documents(path: PathLike, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> list[str]:
    """The raw documents under `path`, in a fixed order.

    A `.jsonl` file holds one document per line, a JSON object with a string
    `text` field (blank lines are skipped). Any other file is one plain-text
    document, read `block_bytes` at a time. A folder stands for every `.txt` and
    `.jsonl` file inside it, searched recursively and sorted by relative path.
    Files must be UTF-8; a leading byte order mark is dropped. Newlines and
    whitespace are left as they are (see `clean_documents`).
    """
    files = source_files(path)
    return ["".join(blocks) for blocks in _iter_raw_documents(files, _ReadProgress(), block_bytes)]


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


def _iter_raw_documents(files: Sequence[Path], progress: _ReadProgress, block_bytes: int) -> Iterator[Iterator[str]]:
    """Each document in `files` as an iterator over its raw text in blocks.

    Consume one document's blocks before asking for the next document.
    """
    for file in files:
        if file.suffix == ".jsonl":
            for text in _read_jsonl_texts(file, progress):
                yield iter((text,))
        else:
            yield _read_text_blocks(file, progress, block_bytes)


def _open_binary(file: Path) -> BinaryIO:
    try:
        return open(file, "rb")
    except OSError as err:
        raise UserError(f"{file}: cannot read: {err.strerror}") from err


def _not_utf8(where: str, offset: int, byte: int) -> UserError:
    """The error for a byte that is not UTF-8 (also used for labelled-text files)."""
    return UserError(f"{where}: not UTF-8 text: byte 0x{byte:02x} at byte offset {offset} cannot be decoded")


def _read_text_blocks(file: Path, progress: _ReadProgress, block_bytes: int) -> Iterator[str]:
    """The text of a UTF-8 file in blocks of about `block_bytes`, its byte order mark dropped."""
    with _open_binary(file) as f:
        undecoded = b""  # an incomplete UTF-8 sequence left at the end of the last block
        offset = 0  # file offset of undecoded[0]
        at_start = True
        while True:
            try:
                block = f.read(block_bytes)
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
            record = parse_json_line(line, where)
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
    """How many documents were read, found empty, found duplicate, removed by another filter (by reason,
    `gpt.data.filters`), and kept."""

    read: int = 0
    empty: int = 0
    duplicate: int = 0
    kept: int = 0
    filtered: dict[str, int] = field(default_factory=dict)


def clean_documents(docs: Iterable[str], *, piece_chars: int = DEFAULT_PIECE_CHARS) -> tuple[list[str], CleanStats]:
    """Clean every document (`clean_document`), then drop empty ones and exact
    duplicates (the first copy stays, order is kept)."""
    stats = CleanStats()
    kept: list[str] = []
    seen: set[str] = set()
    for doc in docs:
        stats.read += 1
        text = clean_document(doc, piece_chars=piece_chars)
        if not text:
            stats.empty += 1
        elif text in seen:
            stats.duplicate += 1
        else:
            seen.add(text)
            kept.append(text)
    stats.kept = len(kept)
    return kept, stats


def clean_document(text: str, *, piece_chars: int = DEFAULT_PIECE_CHARS) -> str:
    """One document, cleaned: newlines become LF (from CRLF or CR); a Project
    Gutenberg header and footer are dropped (only what lies between the
    `*** START OF` line and the `*** END OF` line stays; the START line must lie in
    the first piece, about `piece_chars` characters); surrounding whitespace is stripped."""
    return "".join(_clean_pieces((text,), piece_chars))


def _clean_pieces(blocks: Iterable[str], piece_chars: int) -> Iterator[str]:
    """A document given as raw text blocks, cleaned, in pieces of about
    `piece_chars` that each start with whitespace (but the first), so that
    tokenizing them one by one equals tokenizing their concatenation."""
    cleaner = _DocumentCleaner()
    for piece in _split_pieces(_normalize_newlines(blocks), piece_chars):
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


def _split_pieces(texts: Iterable[str], piece_chars: int) -> Iterator[str]:
    """Regroup text into pieces of at most about `piece_chars`, each cut just
    before a whitespace run that holds a line break (so lines stay whole), or
    failing that before any whitespace run."""
    held = ""
    for text in texts:
        held += text
        start = 0  # held[:start] has been yielded
        while len(held) - start >= piece_chars:
            cut = _last_cut(held, start, start + piece_chars) or _last_cut(held, start, len(held))
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
