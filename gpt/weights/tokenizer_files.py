"""Hugging Face tokenizer files for a converted model: `tokenizer.json` and `tokenizer_config.json`.

Both tokenizers this project uses are byte-level BPE, which the `tokenizers`
library describes in one JSON file: the vocabulary (each token written in the
byte alphabet, e.g. "Ġthe" for b" the"), the merges in priority order, the
pre-tokenizer (how text is cut before merging), plus the special tokens.
`tokenizer_config.json` names the tokenizer class, the bos/eos/unk/pad tokens,
the context length and the chat template.

* GPT-2: tiktoken's ranks file holds no merge list, only each token's rank. The
  merge that makes a token is found by running BPE on the token's own bytes with
  only the lower-ranked tokens allowed: it stops at exactly two parts.
* GGUF: the vocabulary, merges, token types and special ids are in the
  `tokenizer.ggml.*` metadata already; only the pre-tokenizer has to be chosen
  from `tokenizer.ggml.pre`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..files import write_json
from ..errors import UserError
from ..tokenizer import byte_alphabet, load_tiktoken_ranks
from ..gguf_file import metadata_array, metadata_value, open_gguf

GPT2_EOT = "<|endoftext|>"

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# tokenizer.ggml.pre -> the `tokenizers` pre-tokenizer that cuts text the same way.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt2": BYTE_LEVEL,
    "gpt-2": BYTE_LEVEL,  # llama.cpp's own name for GPT-2's split
    # SmolLM: every digit is a piece of its own, then GPT-2's split.
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
}

# llama.cpp's token types (tokenizer.ggml.token_type) that mark special tokens.
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


@dataclass
class WrittenTokenizer:
    """What a writer produced: the file names, and the ids of the bos and eos tokens (None if unknown)."""

    files: list[str]
    bos_id: int | None
    eos_id: int | None


def char_of_byte() -> list[str]:
    """GPT-2's byte alphabet as a list: the visible character that stands for byte b is at index b."""
    chars = [""] * 256
    for char, byte in byte_alphabet().items():
        chars[byte] = char
    return chars


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list equivalent to tiktoken ranks: for each token of two or more bytes, in rank order,
    the two parts BPE leaves when only lower-ranked tokens may form."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe(token, ranks, below=rank)
        if len(parts) != 2:
            raise UserError(f"BPE ranks: token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _bpe(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Merge adjacent parts of `token`, lowest rank first, using only ranks < `below`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        candidates = [(ranks.get(parts[i] + parts[i + 1], below), i) for i in range(len(parts) - 1)]
        rank, i = min(candidates)
        if rank >= below:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def gpt2_vocabulary() -> tuple[dict[str, int], list[str]]:
    """GPT-2's mergeable tokens (from the bundled ranks file) written in the byte alphabet, token -> id,
    and its merges as "left right" strings in priority order; `<|endoftext|>` (id 50256) is not included."""
    with resources.as_file(resources.files("gpt") / "assets" / "gpt2.tiktoken") as ranks_path:
        ranks = load_tiktoken_ranks(ranks_path)
    alphabet = char_of_byte()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}  # GPT-2's ids are its ranks
    merges = [f"{text(a)} {text(b)}" for a, b in merges_from_ranks(ranks)]
    return vocab, merges


def write_gpt2_tokenizer(out_dir: Path, context_length: int) -> WrittenTokenizer:
    """GPT-2's tokenizer (from the bundled ranks file) as Hugging Face files."""
    vocab, merges = gpt2_vocabulary()
    eot_id = len(vocab)
    special = {GPT2_EOT: eot_id}
    tokens = {"bos_token": GPT2_EOT, "eos_token": GPT2_EOT, "unk_token": GPT2_EOT}
    files = _write_files(out_dir, vocab, merges, special, PRE_TOKENIZERS["gpt2"], tokens, context_length, None)
    return WrittenTokenizer(files, bos_id=eot_id, eos_id=eot_id)


def write_gguf_tokenizer(gguf_path: Path, out_dir: Path, context_length: int) -> WrittenTokenizer:
    """The tokenizer stored in a GGUF file's metadata as Hugging Face files."""
    reader = open_gguf(gguf_path)
    model = metadata_value(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"{gguf_path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') can be written")
    pre = metadata_value(reader, "tokenizer.ggml.pre") or "gpt2"
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{gguf_path}: tokenizer.ggml.pre is {pre!r}; known: {', '.join(PRE_TOKENIZERS)}")
    tokens = metadata_array(reader, "tokenizer.ggml.tokens")
    merges = metadata_array(reader, "tokenizer.ggml.merges")
    if tokens is None or merges is None:
        raise UserError(f"{gguf_path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    token_types = metadata_array(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise UserError(f"{gguf_path}: {len(tokens)} tokens but {len(token_types)} token types")
    special = {token: i for i, (token, kind) in enumerate(zip(tokens, token_types, strict=True))
               if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}  # fmt: skip
    ids, named = {}, {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = metadata_value(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            ids[role], named[f"{role}_token"] = token_id, tokens[token_id]
    vocab = {token: i for i, token in enumerate(tokens)}
    chat_template = metadata_value(reader, "tokenizer.chat_template")
    files = _write_files(out_dir, vocab, merges, special, PRE_TOKENIZERS[pre], named, context_length, chat_template)
    return WrittenTokenizer(files, bos_id=ids.get("bos"), eos_id=ids.get("eos"))


def _write_files(
    out_dir: Path,
    vocab: dict[str, int],
    merges: list[str],
    special: dict[str, int],
    pre_tokenizer: dict[str, Any],
    named_tokens: dict[str, str],
    context_length: int,
    chat_template: str | None,
) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json; `merges` are "left right" strings in the byte alphabet."""
    added_tokens = [
        {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for content, token_id in sorted(special.items(), key=lambda item: item[1])
    ]  # fmt: skip
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {**vocab, **special}, "merges": merges,
        },
    }  # fmt: skip
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
        **named_tokens,
    }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    for name, value in (("tokenizer.json", tokenizer), ("tokenizer_config.json", tokenizer_config)):
        write_json(out_dir / name, value, ensure_ascii=False)
    return ["tokenizer.json", "tokenizer_config.json"]
