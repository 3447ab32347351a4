"""Files the project writes and reads: atomic writes, and JSON lines with line numbers.

Everything a run leaves behind (checkpoints, token files, config.json, metrics,
reports, exported models) is written atomically: to a temporary file in the same
folder, fsynced, then renamed over the final name. A crash or a full disk mid-write
leaves the previous file (or none), never a truncated one.

    write_json(run_dir / "report.json", report)
    write_text(run_dir / "report.md", markdown)
    atomic_write(path, lambda f: torch.save(state, f))      # any writer that takes a binary file
    with atomic_target(path) as tmp: save_file(tensors, tmp) # a writer that wants a file name

A full disk (or a file-size limit) while writing is a `UserError` naming the path and
the space needed; the temporary file is removed and the previous file stays. A writer
killed outright (kill -9) cannot clean up: its temporary file, which carries the
writer's process id, is removed by the next write of the same file, and
`remove_stale_temporaries` sweeps a whole folder (a run folder does at the start of a run).

JSON-lines input (`json_lines`) is read a line at a time; a line that is not JSON is a
`UserError` naming the file, the line and the column.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import UserError


MiB = 2**20
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota exceeded, file-size limit


@contextlib.contextmanager
def atomic_target(path: str | Path, size_hint: int = 0) -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block succeeds, the file is fsynced and
    renamed to `path` (a crash leaves the old file, never a truncated one); when it fails, it is removed,
    and a full disk becomes a UserError naming `path` and the space needed (`size_hint` bytes, when the
    writer knows about how much it writes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_name, 0o666 & ~umask)  # the permissions a plainly created file would get, not mkstemp's 0600
    try:
        yield Path(tmp_name)
        with open(tmp_name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        written = Path(tmp_name).stat().st_size if Path(tmp_name).exists() else 0
        Path(tmp_name).unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full_error(path, err, max(written, size_hint)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, says the disk (or a quota or size limit) is full.
    torch.save reports it as a RuntimeError raised while handling the OSError."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def disk_full_error(path: Path, err: BaseException, needed: int = 0) -> UserError:
    """The message for a write that ran out of space: the path, the space it needs (at least `needed`
    bytes, or the size of the file it replaces), the space left."""
    needed = max(needed, path.stat().st_size if path.is_file() else 0)
    free = shutil.disk_usage(path.parent).free
    previous = f"; the previous {path.name} is intact" if path.is_file() else ""
    return UserError(f"{path}: no space left on the device (the file needs about {needed / MiB:,.1f} MiB, "
                     f"{free / MiB:,.1f} MiB are free there){previous}. Free some space and run again.")


def remove_stale_temporaries(folder: Path, name: str = "*") -> list[Path]:
    """Remove the temporary files that writers of `name` (any name by default) in `folder` left when
    they were killed mid-write: those whose writer process is gone. Returns what was removed."""
    removed = []
    for tmp in folder.glob(f".{name if name == '*' else glob.escape(name)}.*.tmp"):
        pid_text = tmp.name[: -len(".tmp")].rsplit(".", 2)[-2]
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any], size_hint: int = 0) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then put it in place atomically."""
    with atomic_target(path, size_hint) as tmp, open(tmp, "wb") as f:
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
