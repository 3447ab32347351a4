"""Argument types for the `python -m gpt` verbs: each value is checked when argparse reads it.

    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--top-p", type=probability, default=None)
    parser.add_argument("--out", type=output_file, default=None)

A bad value raises `argparse.ArgumentTypeError`, which argparse turns into one usage
line and `prog: error: argument --flag: <message>` with exit code 2, before any model
is loaded or any file written. The messages say what the value must be and repeat it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from .config import SEED_LIMIT
from .errors import UserError
from .run_folder import refuse_run_folder


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A type function for integers >= `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def port(text: str) -> int:
    """A TCP port to listen on: 1 to 65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {value}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**32), what numpy and torch both accept."""
    value = non_negative_int(text)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be below 2**32, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a temperature)."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def probability(text: str) -> float:
    """A probability mass in (0, 1] (nucleus sampling's top-p)."""
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1) (a validation fraction)."""
    value = _finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def non_empty_text(text: str) -> str:
    """Text with at least one character (a prompt)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def existing_file(text: str) -> Path:
    """A file to read: it exists and is not a folder."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def output_file(text: str) -> Path:
    """A file to write: not a folder, and either writable or creatable (missing parent folders included)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    _not_a_runs(path)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: no permission to write this file")
        return path
    _check_creatable(text, path.parent)
    return path


def output_folder(text: str) -> Path:
    """A folder to write into: an existing folder we may write to, or one that can be created."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder name, got ''")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    _not_a_runs(path)
    _check_creatable(text, path)
    return path


def _not_a_runs(path: Path) -> None:
    """No verb writes over a training run's folder or files (gpt.run_folder)."""
    try:
        refuse_run_folder(path, "this")
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("this: ")) from None


def _check_creatable(text: str, folder: Path) -> None:
    """`folder` exists and is writable, or the nearest existing folder above it is (so it can be created)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: no permission to write in {existing}")
