"""Byte-level BPE tokenizers: GPT-2's, raw bytes, a trained one, and the one inside a GGUF model file.

All are the same algorithm. Text is first cut into pieces by a regular
expression (the pre-tokenizer: words with their leading space, runs of digits,
punctuation, whitespace), each piece becomes its UTF-8 bytes, and adjacent
pieces of bytes are merged, most frequent pair first, until no learned merge
applies. tiktoken runs that loop in Rust; this module only feeds it the right
tables:

* GPT-2 (`get_tokenizer("gpt2")`): the ranks file shipped in `gpt/assets/`
  (`base64(token) rank` per line, identical to tiktoken's `r50k_base`), GPT-2's
  pre-tokenizer and the special token `<|endoftext|>` = 50256. No network.
* Bytes (`get_tokenizer("bytes")`): every byte is a token of its own (ids
  0..255 are the byte values) and 256 is `<|endoftext|>`: no merges at all, for
  the character-level model a learner trains first (one token per character of ASCII).
* A tokenizer folder (`get_tokenizer("tok/")`, written by `python -m gpt
  train-tokenizer`): `tokenizer.tiktoken` holds the ranks (`base64(token) rank`
  per line, ranks 0..n-1 are the ids) and `special_tokens.json` the rest:

      {"pattern": "<pre-tokenizer regex>", "special_tokens": {"<|endoftext|>": 4094, "<|pad|>": 4095},
       "bos": "<|endoftext|>", "eot": "<|endoftext|>", "pad": "<|pad|>", "chat_template": null}

  Special ids follow the ranks. The tokenizer's name is the folder's absolute
  path, so a checkpoint that records it finds the folder from any directory.
* A GGUF file (`get_tokenizer("model.gguf")` or a known model name from
  `gpt.fetch`): the vocabulary, merges and token types from the file's
  `tokenizer.ggml.*` metadata. tiktoken wants each token's *rank* (its merge
  order) as its number, which need not be the token's id in the model, so the
  tokenizer keeps a rank -> id table and translates.

    tok = get_tokenizer("gpt2")
    tok.encode("Hello, world!")            # [15496, 11, 995, 0]
    tok.decode([15496, 11, 995, 0])        # 'Hello, world!'
    stream = tok.stream_decoder()          # for printing tokens as they arrive
    text = "".join(stream.push(i) for i in ids) + stream.flush()

Special tokens (`<|endoftext|>`, `<|im_start|>`, ...) typed into the input are
encoded as ordinary text unless `allowed_special` says otherwise, so untrusted
text can never inject a control token.
"""

from __future__ import annotations

import base64
import codecs
import functools
import json
import os
from collections.abc import Iterable, Sequence, Set
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tiktoken

from .errors import UserError
from .fetch import KNOWN_MODELS, resolve_model
from .files import write_json, write_text
from .gguf_file import open_gguf, read_metadata

# GPT-2's pre-tokenizer: contractions, a letter run or a digit run or a
# punctuation run each with at most one leading space, then whitespace. A
# whitespace run followed by a word leaves its last space to that word. The
# possessive `++` only stops useless backtracking; it does not change a split.
GPT2_PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# SmolLM's pre-tokenizer (Hugging Face: `Digits(individual_digits=True)` then
# `ByteLevel`; llama.cpp: pre-tokenizer type "smollm"): every number character
# is a piece of its own, then GPT-2's pattern runs on the text between them.
# Written as one expression: `\p{N}` comes first, the ` ?\p{N}++` branch is
# gone, and a whitespace run directly before a digit counts as ending its
# segment, which is what `(?![^\s\p{N}])` says in place of GPT-2's `(?!\S)`.
SMOLLM_PATTERN = r"""\p{N}|'(?:s|t|re|ve|m|ll|d)| ?\p{L}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?![^\s\p{N}])|\s"""

# `tokenizer.ggml.pre` values this module knows how to split for ("gpt-2" is llama.cpp's name for GPT-2's split).
GGUF_PRE_TOKENIZERS = {"gpt2": GPT2_PATTERN, "gpt-2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN}

GPT2_EOT = "<|endoftext|>"
GPT2_N_MERGEABLE = 50256

# With no merges the split cannot change the ids (every byte is its own token);
# pieces of at most 1,024 characters only keep tiktoken's work per piece small.
BYTES_PATTERN = r"[\s\S]{1,1024}"

# The two files of a tokenizer folder, and the keys of its JSON file.
RANKS_FILE = "tokenizer.tiktoken"
SPECIAL_TOKENS_FILE = "special_tokens.json"
_FOLDER_KEYS = ("pattern", "special_tokens", "bos", "eot", "pad", "chat_template")

# llama.cpp's token types (`tokenizer.ggml.token_type`).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4


class Tokenizer:
    """Text <-> token ids for one vocabulary; build it with `get_tokenizer`.

    Attributes: `name`, `n_vocab` (ids run 0..n_vocab-1), `eot_id` (end of
    text / end of turn: where generation stops), `bos_id` (or None), `pad_id`
    (or None), `special_tokens` (text -> id) and `chat_template` (a Jinja
    string, or None).
    """

    def __init__(
        self,
        name: str,
        encoding: tiktoken.Encoding,
        bytes_of_id: list[bytes],
        special_tokens: dict[str, int],
        eot_id: int,
        bos_id: int | None = None,
        pad_id: int | None = None,
        chat_template: str | None = None,
        id_of_rank: np.ndarray | None = None,
    ) -> None:
        """`id_of_rank[r]` is the model id of tiktoken's rank `r`, -1 for a rank
        to drop; None when ranks already are ids."""
        self.name = name
        self.n_vocab = len(bytes_of_id)
        self.eot_id = eot_id
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self._encoding = encoding
        self._bytes_of_id = bytes_of_id
        self._id_of_rank = id_of_rank

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"

    @property
    def padding_id(self) -> int:
        """The id to pad batches with: the padding token if the vocabulary has one, else end-of-text."""
        return self.pad_id if self.pad_id is not None else self.eot_id

    def encode(self, text: str, allowed_special: Literal["all"] | Set[str] = frozenset()) -> list[int]:
        """Token ids of `text`. Special-token text is ordinary text unless named in
        `allowed_special` (a set of special-token strings, or "all")."""
        allowed = self._allowed_special(allowed_special)
        ranks = self._encoding.encode(text, allowed_special=allowed, disallowed_special=())
        return self._ids_of_ranks(ranks)

    def encode_batch(
        self, texts: Sequence[str], allowed_special: Literal["all"] | Set[str] = frozenset()
    ) -> list[list[int]]:
        """`encode` for many texts at once, on tiktoken's thread pool."""
        allowed = self._allowed_special(allowed_special)
        batches = self._encoding.encode_batch(list(texts), allowed_special=allowed, disallowed_special=())
        return [self._ids_of_ranks(ranks) for ranks in batches]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes that `ids` stand for (a token can end mid-character)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.n_vocab):
            bad = next(i for i in ids if not 0 <= i < self.n_vocab)
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.name} (0..{self.n_vocab - 1})")
        return b"".join([self._bytes_of_id[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """The text `ids` stand for; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        """A decoder that takes one token at a time and returns only finished text."""
        return StreamDecoder(self)

    def _allowed_special(self, allowed_special: Literal["all"] | Set[str]) -> Set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        unknown = sorted(set(allowed_special) - self.special_tokens.keys())
        if unknown:
            raise UserError(
                f"allowed_special names {unknown}, which {self.name} does not have; "
                f"its special tokens are {sorted(self.special_tokens)}"
            )
        return set(allowed_special)

    def _ids_of_ranks(self, ranks: list[int]) -> list[int]:
        if self._id_of_rank is None:
            return ranks
        ids = self._id_of_rank[np.asarray(ranks, dtype=np.int64)]
        return ids[ids >= 0].tolist()


class StreamDecoder:
    """Turns token ids, one at a time, into text that is safe to print.

    A multi-byte character can be split across tokens (an emoji is often three
    or four byte tokens); `push` holds back an incomplete UTF-8 sequence until
    the token that completes it arrives. Joining every `push` and the final
    `flush` gives exactly `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """End of stream: return what is held back (U+FFFD for a cut-off character)."""
        return self._utf8.decode(b"", final=True)


def get_tokenizer(name_or_path: str = "gpt2") -> Tokenizer:
    """The tokenizer called `name_or_path`: "gpt2", "bytes", a tokenizer folder
    (from `python -m gpt train-tokenizer`), a GGUF file, or a known model name
    from `gpt.fetch.KNOWN_MODELS` (fetched on first use)."""
    if name_or_path == "gpt2":
        return _gpt2_tokenizer()
    if name_or_path == "bytes":
        return _bytes_tokenizer()
    path = Path(name_or_path).expanduser()
    if not path.exists() and name_or_path not in KNOWN_MODELS:
        raise UserError(
            f"unknown tokenizer {name_or_path!r}: expected 'gpt2', 'bytes', a tokenizer folder, a .gguf file, "
            f"or a known model ({', '.join(sorted(KNOWN_MODELS))})"
        )
    path = resolve_model(name_or_path).resolve()
    if path.is_dir():
        return _folder_tokenizer(path)
    stat = path.stat()
    return _gguf_tokenizer(str(path), stat.st_mtime_ns, stat.st_size)


# --- GPT-2 ---------------------------------------------------------------------


def load_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as err:
                raise UserError(f"{path}, line {line_number}: expected 'base64-token rank', got {line[:80]!r}") from err
    return ranks


@functools.lru_cache(maxsize=1)
def _gpt2_tokenizer() -> Tokenizer:
    with resources.as_file(resources.files("gpt") / "assets" / "gpt2.tiktoken") as ranks_path:
        ranks = load_tiktoken_ranks(ranks_path)
    if len(ranks) != GPT2_N_MERGEABLE or sorted(ranks.values()) != list(range(GPT2_N_MERGEABLE)):
        raise UserError(f"{ranks_path} is not GPT-2's ranks file: expected ranks 0..{GPT2_N_MERGEABLE - 1}")
    eot_id = GPT2_N_MERGEABLE
    encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={GPT2_EOT: eot_id})
    bytes_of_id = [b""] * (eot_id + 1)
    for token, rank in ranks.items():
        bytes_of_id[rank] = token
    bytes_of_id[eot_id] = GPT2_EOT.encode()
    return Tokenizer("gpt2", encoding, bytes_of_id, {GPT2_EOT: eot_id}, eot_id=eot_id, bos_id=eot_id)


# --- bytes ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bytes_tokenizer() -> Tokenizer:
    byte_tokens = [bytes([byte]) for byte in range(256)]
    eot_id = len(byte_tokens)
    ranks = {token: byte for byte, token in enumerate(byte_tokens)}
    special_tokens = {GPT2_EOT: eot_id}
    encoding = tiktoken.Encoding("bytes", pat_str=BYTES_PATTERN, mergeable_ranks=ranks, special_tokens=special_tokens)
    bytes_of_id = [*byte_tokens, GPT2_EOT.encode()]
    return Tokenizer("bytes", encoding, bytes_of_id, special_tokens, eot_id=eot_id, bos_id=eot_id)


# --- a tokenizer folder --------------------------------------------------------


def write_tokenizer_folder(
    out_dir: str | os.PathLike[str],
    ranks: dict[bytes, int],
    pattern: str,
    special_tokens: Sequence[str],
    eot: str,
    bos: str | None = None,
    pad: str | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a tokenizer folder that `get_tokenizer` loads; returns its absolute path.

    `ranks` are the mergeable tokens (ranks 0..n-1, which are their ids); the
    special tokens take ids n, n+1, ... in the order given. Both files are
    written atomically.
    """
    out_dir = Path(out_dir).resolve()
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in by_rank]
    first_special = len(ranks)
    settings = {
        "pattern": pattern,
        "special_tokens": {token: first_special + n for n, token in enumerate(special_tokens)},
        "bos": bos,
        "eot": eot,
        "pad": pad,
        "chat_template": chat_template,
    }
    write_text(out_dir / RANKS_FILE, "".join(lines))
    write_json(out_dir / SPECIAL_TOKENS_FILE, settings, ensure_ascii=False)
    return out_dir


def _folder_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a folder holding `tokenizer.tiktoken` and `special_tokens.json`."""
    ranks_path, settings_path = path / RANKS_FILE, path / SPECIAL_TOKENS_FILE
    if not ranks_path.is_file() and not settings_path.is_file():
        raise UserError(
            f"{path} is a folder without {RANKS_FILE} and {SPECIAL_TOKENS_FILE}, so not a tokenizer folder "
            "(`python -m gpt train-tokenizer` writes one); for any other model the tokenizer comes from its .gguf file"
        )
    for required in (ranks_path, settings_path):
        if not required.is_file():
            raise UserError(f"{required}: no such file; a tokenizer folder holds both {RANKS_FILE} "
                            f"and {SPECIAL_TOKENS_FILE}")
    stats = ranks_path.stat(), settings_path.stat()
    return _cached_folder_tokenizer(str(path), tuple((stat.st_mtime_ns, stat.st_size) for stat in stats))


@functools.lru_cache(maxsize=4)
def _cached_folder_tokenizer(path_str: str, file_stats: tuple[tuple[int, int], ...]) -> Tokenizer:
    """Build a folder's tokenizer (cached on the path and both files' mtime and size)."""
    path = Path(path_str)
    ranks_path, settings_path = path / RANKS_FILE, path / SPECIAL_TOKENS_FILE
    ranks = load_tiktoken_ranks(ranks_path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{ranks_path}: the ranks must be 0..{len(ranks) - 1}, each once (they are the token ids)")
    missing_bytes = [byte for byte in range(256) if bytes([byte]) not in ranks]
    if missing_bytes:
        raise UserError(f"{ranks_path}: every single byte needs a rank; byte 0x{missing_bytes[0]:02x} has none")
    settings = _read_folder_settings(settings_path, first_special=len(ranks))
    special_tokens: dict[str, int] = settings["special_tokens"]
    try:
        encoding = tiktoken.Encoding(
            path.name, pat_str=settings["pattern"], mergeable_ranks=ranks, special_tokens=special_tokens
        )
    except ValueError as err:
        raise UserError(f"{settings_path}: \"pattern\" is not a regular expression tiktoken accepts: {err}") from None
    bytes_of_id = [b""] * (len(ranks) + len(special_tokens))
    for token, rank in ranks.items():
        bytes_of_id[rank] = token
    for token, token_id in special_tokens.items():
        bytes_of_id[token_id] = token.encode("utf-8")

    def id_of(role: str) -> int | None:
        return None if settings[role] is None else special_tokens[settings[role]]

    return Tokenizer(
        path_str,
        encoding,
        bytes_of_id,
        special_tokens,
        eot_id=special_tokens[settings["eot"]],
        bos_id=id_of("bos"),
        pad_id=id_of("pad"),
        chat_template=settings["chat_template"],
    )


def _read_folder_settings(path: Path, first_special: int) -> dict[str, Any]:
    """`special_tokens.json`, checked: special ids are first_special, first_special + 1, ... and the
    bos/eot/pad roles name special tokens."""
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path}: expected a JSON object with the keys {', '.join(_FOLDER_KEYS)}")
    unknown = sorted(settings.keys() - set(_FOLDER_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; known: {', '.join(_FOLDER_KEYS)}")
    settings = {"bos": None, "pad": None, "chat_template": None, **settings}
    for key in ("pattern", "special_tokens", "eot"):
        if key not in settings:
            raise UserError(f"{path}: missing {key!r}")
    if not isinstance(settings["pattern"], str) or not settings["pattern"]:
        raise UserError(f"{path}: \"pattern\" must be a non-empty string (the pre-tokenizer's regular expression)")
    special_tokens = settings["special_tokens"]
    if not isinstance(special_tokens, dict) or not special_tokens or not all(
        isinstance(token, str) and token and type(token_id) is int for token, token_id in special_tokens.items()
    ):
        raise UserError(f"{path}: \"special_tokens\" must be a non-empty object of token text -> integer id")
    expected_ids = list(range(first_special, first_special + len(special_tokens)))
    if sorted(special_tokens.values()) != expected_ids:
        raise UserError(
            f"{path}: the special token ids must follow the {first_special} ranks of {RANKS_FILE}, "
            f"i.e. be {first_special}..{expected_ids[-1]}, got {sorted(special_tokens.values())}"
        )
    for role in ("bos", "eot", "pad"):
        if settings[role] is not None and (not isinstance(settings[role], str) or settings[role] not in special_tokens):
            raise UserError(f"{path}: {role!r} is {settings[role]!r}, which is not one of \"special_tokens\"")
    if settings["chat_template"] is not None and not isinstance(settings["chat_template"], str):
        raise UserError(f"{path}: \"chat_template\" must be a string (a Jinja template) or null")
    return settings


# --- GGUF ----------------------------------------------------------------------


def byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: char -> byte.

    Byte-level vocabularies are stored as text, with every byte written as a
    visible character: printable Latin-1 bytes stand for themselves, and the
    other 68 (control bytes, space, ...) take the characters from U+0100 on,
    in byte order. So a leading space shows up as "Ġ" (U+0120).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of_byte = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in char_of_byte]
    char_of_byte.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {char: b for b, char in char_of_byte.items()}


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path_str: str, mtime_ns: int, size: int) -> Tokenizer:
    """Build the tokenizer of a GGUF file (cached on path, mtime and size)."""
    path = Path(path_str)
    meta = read_metadata(open_gguf(path), "tokenizer.")

    def require(key: str) -> Any:
        if key not in meta:
            raise UserError(f"{path} has no {key!r} metadata, which its tokenizer needs")
        return meta[key]

    model = require("tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    pre = require("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise UserError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
    tokens: list[str] = require("tokenizer.ggml.tokens")
    token_types: list[int] = meta.get("tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens))
    if len(token_types) != len(tokens):
        raise UserError(f"{path}: {len(tokens)} tokens but {len(token_types)} token types")

    bytes_of_id, special_tokens = _vocabulary_bytes(path, tokens, token_types)
    mergeable_ranks, id_of_rank = _merge_ranks(path, tokens, token_types, bytes_of_id, require("tokenizer.ggml.merges"))
    # Special tokens take the ranks after all others; tiktoken matches them as whole strings.
    special_ranks = {token: len(id_of_rank) + n for n, token in enumerate(special_tokens)}
    id_of_rank.extend(special_tokens.values())
    encoding = tiktoken.Encoding(
        path.name, pat_str=GGUF_PRE_TOKENIZERS[pre], mergeable_ranks=mergeable_ranks, special_tokens=special_ranks
    )
    eos_id = require("tokenizer.ggml.eos_token_id")
    return Tokenizer(
        path.name,
        encoding,
        bytes_of_id,
        special_tokens,
        eot_id=meta.get("tokenizer.ggml.eot_token_id", eos_id),
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        pad_id=meta.get("tokenizer.ggml.padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        id_of_rank=np.asarray(id_of_rank, dtype=np.int64),
    )


def _vocabulary_bytes(path: Path, tokens: list[str], token_types: list[int]) -> tuple[list[bytes], dict[str, int]]:
    """Each token's bytes, and the special tokens (control and user-defined) by text.

    Special tokens are stored as plain text, every other token in the byte alphabet.
    """
    alphabet = byte_alphabet()
    bytes_of_id: list[bytes] = []
    special_tokens: dict[str, int] = {}
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types, strict=True)):
        if token_type in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED):
            special_tokens[token] = token_id
            bytes_of_id.append(token.encode("utf-8"))
            continue
        try:
            bytes_of_id.append(bytes(alphabet[char] for char in token))
        except KeyError as err:
            raise UserError(f"{path}: token {token_id} ({token!r}) is not written in the byte-level alphabet") from err
    return bytes_of_id, special_tokens


def _merge_ranks(
    path: Path, tokens: list[str], token_types: list[int], bytes_of_id: list[bytes], merges: list[str]
) -> tuple[dict[bytes, int], list[int]]:
    """tiktoken's ranks (bytes -> rank) and the id of each rank (-1: drop it).

    A rank is a merge's priority: single bytes first, then each merge's result
    in merge order, so that of two adjacent pairs tiktoken merges the one whose
    result ranks lower, just as BPE applies the earlier merge first. A normal
    token that no merge makes gets no rank: BPE can never produce it.
    """
    id_of_token = {
        token: token_id
        for token_id, (token, token_type) in enumerate(zip(tokens, token_types, strict=True))
        if token_type not in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    }
    ranked_ids = [id_of_token[char] for char in byte_alphabet() if char in id_of_token]
    for merge_index, merge in enumerate(merges):
        pair = merge.split(" ")
        merged_id = id_of_token.get("".join(pair)) if len(pair) == 2 else None
        if merged_id is None:
            raise UserError(f"{path}: merge {merge_index} ({merge!r}) does not make a token of the vocabulary")
        ranked_ids.append(merged_id)

    mergeable_ranks: dict[bytes, int] = {}
    id_of_rank: list[int] = []
    for token_id in ranked_ids:
        if bytes_of_id[token_id] not in mergeable_ranks:
            mergeable_ranks[bytes_of_id[token_id]] = len(id_of_rank)
            id_of_rank.append(token_id)
    # A byte missing from the vocabulary (SmolLM2 lacks 21, e.g. 0x04) still
    # needs a rank for tiktoken to hold it; like Hugging Face's BPE without an
    # unknown token, we then drop it from the ids.
    for byte in range(256):
        if bytes([byte]) not in mergeable_ranks:
            mergeable_ranks[bytes([byte])] = len(id_of_rank)
            id_of_rank.append(-1)
    return mergeable_ranks, id_of_rank
