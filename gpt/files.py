"""Files the project writes and reads: atomic writes, and JSON lines with line numbers.

Everything a run leaves behind (checkpoints, token files, config.json, metrics,
reports, exported models) is written atomically: to a temporary file in the same
folder, fsynced, then renamed over the final name. A crash or a full disk mid-write
leaves the previous file (or none), never a truncated one.

    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.md", markdown)
    atomic_write(path, lambda f: torch.save(state, f))      # any writer that takes a binary file
    with atomic_target(path) as tmp: save_file(tensors, tmp) # a writer that wants a file name

JSON-lines input (`json_lines`) is read a line at a time; a line that is not JSON is a
`UserError` naming the file, the line and the column.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import UserError


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block succeeds, the file is fsynced and
    renamed to `path` (a crash leaves the old file, never a truncated one); when it fails, it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # the permissions a plainly created file would get, not mkstemp's 0600
    try:
        yield Path(tmp_name)
        with open(tmp_name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then put it in place atomically."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_text(path: str | Path, text: str) -> None:
    """`text` as UTF-8 at `path`, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | Path, value: Any, **dumps_options: Any) -> None:
    """`value` as indented JSON (plus a final newline) at `path`, atomically; options go to `json.dumps`."""
    write_text(path, json.dumps(value, **{"indent": 2, **dumps_options}) + "\n")


def parse_json_line(line: str, where: str) -> Any:
    """One JSON value; `where` ("file, line 7") starts the message of the UserError for bad JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}, column {err.colno}: not valid JSON ({err.msg})") from None


def json_lines(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line number from 1, parsed value) for each non-blank line of the JSON-lines file `path` holding `text`.

    Lines are split at newlines only (a JSON string may hold other Unicode line breaks).
    """
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, parse_json_line(line, f"{path}, line {number}")
