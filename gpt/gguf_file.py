"""Reading GGUF files (llama.cpp's format): the file check and metadata as plain Python values.

Both the tokenizer (`tokenizer.*` keys) and the weight importer (`general.*`,
`llama.*` keys and the tensors) read GGUF files through these few functions, built on
the `gguf` package (an optional extra: `pip install 'gpt[gguf]'`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import UserError


def import_gguf() -> Any:
    """The `gguf` package, or a UserError saying how to install it."""
    try:
        import gguf
    except ImportError as err:
        raise UserError("reading GGUF files needs the gguf package: pip install 'gpt[gguf]'") from err
    return gguf


def is_gguf_file(path: Path) -> bool:
    """Whether the file starts with GGUF's magic bytes."""
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """A `gguf.GGUFReader` over the (memory-mapped) file."""
    gguf = import_gguf()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GGUF file not found")
    if not is_gguf_file(path):
        raise UserError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as err:  # a truncated or damaged file
        raise UserError(f"{path}: cannot read this GGUF file ({type(err).__name__}: {err})") from None


def metadata_value(reader: Any, key: str) -> Any:
    """A scalar metadata value (int, float, bool or str) as a Python value; None if the key is absent."""
    gguf = import_gguf()
    field = reader.fields.get(key)
    if field is None:
        return None
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        raise UserError(f"GGUF key {key} holds an array where a single value was expected")
    part = field.parts[field.data[0]]
    if field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    if field.types[0] == gguf.GGUFValueType.FLOAT32:
        # The shortest decimal that is this float32: 1e-05 rather than 9.999999747378752e-06.
        return float(str(part[0]))
    return part.tolist()[0]


def metadata_array(reader: Any, key: str) -> list[Any] | None:
    """An array of scalars or strings as a Python list; None if the key is absent."""
    gguf = import_gguf()
    field = reader.fields.get(key)
    if field is None:
        return None
    if field.types[0] != gguf.GGUFValueType.ARRAY:
        raise UserError(f"GGUF key {key} holds a single value where an array was expected")
    if field.types[-1] == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    return [field.parts[i].tolist()[0] for i in field.data]


def array_length(reader: Any, key: str) -> int | None:
    """How many items the array under `key` holds; None if the key is absent."""
    field = reader.fields.get(key)
    return None if field is None else len(field.data)


def read_metadata(reader: Any, prefix: str) -> dict[str, Any]:
    """Every metadata key starting with `prefix`, scalars and arrays alike, as Python values."""
    gguf = import_gguf()
    return {key: metadata_array(reader, key) if field.types[0] == gguf.GGUFValueType.ARRAY
            else metadata_value(reader, key)
            for key, field in reader.fields.items() if key.startswith(prefix)}
