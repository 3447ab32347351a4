"""`python -m gpt train-tokenizer`: a byte-level BPE vocabulary learned from your own text.

    trained = train_tokenizer("corpus/", "tok/", vocab_size=4096)
    tok = get_tokenizer("tok/")                     # then: pretrain.py --data.tokenizer tok/

The Hugging Face `tokenizers` library does the training: text is cut by GPT-2's
pre-tokenizer (`gpt.tokenizer.GPT2_PATTERN`, which the library's regex engine
compiles as it is, possessive `++` included), each piece becomes its bytes
written in GPT-2's byte alphabet, and `BpeTrainer` learns merges, most frequent
pair first, over an alphabet of all 256 bytes. The trainer numbers the 256 bytes
first (in the order of their stand-in characters, as GPT-2 does), then each new
token in the order its merge was learned. That numbering is exactly tiktoken's
notion of a rank (lower ranks merge first), so the trained vocabulary is written
with ranks = ids (`gpt.tokenizer.write_tokenizer_folder`) and the special tokens
(`<|endoftext|>`, `<|pad|>`, and with `chat_markers` ChatML's `<|im_start|>` and
`<|im_end|>`) follow them. Our tokenizer then encodes through tiktoken, as fast
as GPT-2's; `train_tokenizer` checks its ids against the library's own encoding.

The corpus is streamed, as `prepare` reads it (`gpt.data.text`): a file at a
time, a JSON line at a time, a big text file a block at a time, each document
cleaned and cut into pages of about `PAGE_CHARS` characters at whitespace (a
place where GPT-2's pre-tokenizer always starts a new piece, so the words counted
are those of the whole text). Every `HELD_OUT_EVERY`-th page, up to
`HELD_OUT_MAX_CHARS`, is held out from training to measure bytes per token on.

With `chat_markers`, `<|im_end|>` is the end-of-text token (where `chat` and
`generate` stop, and what separates documents in pretraining) and the folder
carries a ChatML chat template, so a model pretrained and fine-tuned with this
vocabulary ends its replies the way `python -m gpt chat` expects.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import cli_args
from .data.text import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_PIECE_CHARS,
    _clean_pieces,
    _iter_raw_documents,
    _ReadProgress,
    _split_pieces,
    source_files,
)
from .errors import UserError
from .files import write_text
from .tokenizer import GPT2_EOT, GPT2_PATTERN, Tokenizer, byte_alphabet, get_tokenizer, write_tokenizer_folder

PAD = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML as a Hugging Face-style Jinja template: what `gpt.prompts.chatml` writes.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HF_TOKENIZER_FILE = "hf_tokenizer.json"  # the trained `tokenizers` model too, for use outside this project

PAGE_CHARS = 4096
HELD_OUT_EVERY = 100
HELD_OUT_MAX_CHARS = 1 << 20
MB = 1_000_000


@dataclass
class TrainedTokenizer:
    """What `train_tokenizer` did: the folder, the vocabulary, the text read, and the held-out measurements."""

    path: Path
    vocab_size: int  # mergeable tokens + special tokens
    special_tokens: list[str]
    source_bytes: int  # bytes of the input read (all of it, or up to the limit)
    trained_chars: int
    held_out_bytes: int  # UTF-8 bytes of the held-out pages (0: too little text to hold any out)
    held_out_tokens: int  # their token count with the trained vocabulary
    held_out_gpt2_tokens: int  # and with GPT-2's
    checked_pages: int  # pages on which our ids were compared with the `tokenizers` library's
    differing_pages: int  # of those, pages where they differ (0 expected)
    seconds: float


def special_token_list(chat_markers: bool) -> list[str]:
    """The special tokens of a trained vocabulary, in id order."""
    return [GPT2_EOT, PAD] + ([IM_START, IM_END] if chat_markers else [])


def train_tokenizer(
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int,
    *,
    chat_markers: bool = False,
    min_frequency: int = 2,
    limit_bytes: int | None = None,
) -> TrainedTokenizer:
    """Train byte-level BPE on `data` (what `gpt.data.text.read_documents` reads) and write the tokenizer
    folder `out_dir`: `tokenizer.tiktoken`, `special_tokens.json` and `hf_tokenizer.json`.

    `vocab_size` counts the special tokens; a pair must occur `min_frequency` times to be merged, so a small
    corpus may give fewer tokens. `limit_bytes` stops reading after the document during which about that
    many bytes of input were read.
    """
    tokenizers = _tokenizers_library()
    specials = special_token_list(chat_markers)
    smallest = 256 + len(specials) + 1
    if vocab_size < smallest:
        raise UserError(f"--vocab-size {vocab_size} leaves no room for merges: the 256 bytes and {len(specials)} "
                        f"special tokens ({', '.join(specials)}) take {smallest - 1}; ask for at least {smallest}")
    started = time.perf_counter()
    files = source_files(data)
    total_bytes = sum(file.stat().st_size for file in files)
    if limit_bytes is not None:
        total_bytes = min(total_bytes, limit_bytes)

    hf_tokenizer = _untrained_byte_level_bpe(tokenizers)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),  # the specials are added after training, to take the last ids
        min_frequency=min_frequency,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    progress = _ReadProgress()
    split = _HeldOutSplit()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="reading", disable=None) as bar:
        def pages() -> Iterator[str]:
            for page in _pages(files, progress, limit_bytes):
                bar.update(min(progress.bytes_read, total_bytes) - bar.n)
                yield page

        hf_tokenizer.train_from_iterator(split.training_pages(pages()), trainer=trainer)
        bar.update(total_bytes - bar.n)
    if not split.trained_chars:
        raise UserError(f"{data}: no text to train on (every document is empty after cleaning)")
    hf_tokenizer.add_special_tokens(specials)

    ranks = _tiktoken_ranks(hf_tokenizer.get_vocab(with_added_tokens=False))
    path = write_tokenizer_folder(
        out_dir, ranks, GPT2_PATTERN, specials,
        eot=IM_END if chat_markers else GPT2_EOT,
        bos=None if chat_markers else GPT2_EOT,
        pad=PAD,
        chat_template=CHATML_TEMPLATE if chat_markers else None,
    )  # fmt: skip
    write_text(path / HF_TOKENIZER_FILE, hf_tokenizer.to_str(pretty=True))
    tokenizer = get_tokenizer(str(path))

    checked = split.held_out or split.first_page  # a page of training text when nothing was held out
    ours = tokenizer.encode_batch(checked, allowed_special="all")  # the library splits off special tokens too
    theirs = [encoding.ids for encoding in hf_tokenizer.encode_batch(checked, add_special_tokens=False)]
    return TrainedTokenizer(
        path=path,
        vocab_size=tokenizer.n_vocab,
        special_tokens=specials,
        source_bytes=progress.bytes_read,
        trained_chars=split.trained_chars,
        held_out_bytes=sum(len(page.encode("utf-8")) for page in split.held_out),
        held_out_tokens=_token_count(tokenizer, split.held_out),
        held_out_gpt2_tokens=_token_count(get_tokenizer("gpt2"), split.held_out),
        checked_pages=len(checked),
        differing_pages=sum(a != b for a, b in zip(ours, theirs, strict=True)),
        seconds=time.perf_counter() - started,
    )


def _tokenizers_library() -> Any:
    """The Hugging Face `tokenizers` library (the `data` extra; transformers brings it too), or a UserError saying
    how to get it."""
    try:
        import tokenizers
    except ImportError:
        raise UserError("train-tokenizer needs the Hugging Face tokenizers library: pip install 'gpt[data]' "
                        "(or pip install tokenizers)") from None
    return tokenizers


def _untrained_byte_level_bpe(tokenizers: Any) -> Any:
    """A `tokenizers` BPE with GPT-2's split and the byte-level alphabet, before training."""
    pre_tokenizers = tokenizers.pre_tokenizers
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> stand-in characters only
    ])
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    return tokenizer


def _pages(files: list[Path], progress: _ReadProgress, limit_bytes: int | None) -> Iterator[str]:
    """Every document of `files`, cleaned, in pages of about `PAGE_CHARS` cut at whitespace; stops
    after the document during which `limit_bytes` of input have been read."""
    for blocks in _iter_raw_documents(files, progress, DEFAULT_BLOCK_BYTES):
        yield from _split_pieces(_clean_pieces(blocks, DEFAULT_PIECE_CHARS), PAGE_CHARS)
        if limit_bytes is not None and progress.bytes_read >= limit_bytes:
            return


@dataclass
class _HeldOutSplit:
    """Sends pages to training, but every `HELD_OUT_EVERY`-th (up to `HELD_OUT_MAX_CHARS`) to `held_out`."""

    held_out: list[str] = field(default_factory=list)
    held_out_chars: int = 0
    trained_chars: int = 0
    first_page: list[str] = field(default_factory=list)  # the first training page, alone

    def training_pages(self, pages: Iterator[str]) -> Iterator[str]:
        for number, page in enumerate(pages):
            if number % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 and self.held_out_chars < HELD_OUT_MAX_CHARS:
                self.held_out.append(page)
                self.held_out_chars += len(page)
                continue
            if not self.first_page:
                self.first_page.append(page)
            self.trained_chars += len(page)
            yield page


def _tiktoken_ranks(vocab: dict[str, int]) -> dict[bytes, int]:
    """The trained vocabulary (tokens in the byte alphabet -> ids) as tiktoken ranks: bytes -> id."""
    alphabet = byte_alphabet()
    ranks = {bytes(alphabet[char] for char in token): token_id for token, token_id in vocab.items()}
    if sorted(ranks.values()) != list(range(len(vocab))) or len(ranks) < 256:
        raise RuntimeError("the trained vocabulary's ids are not 0..n-1 with all 256 bytes; cannot use them as ranks")
    return ranks


def _token_count(tokenizer: Tokenizer, pages: list[str]) -> int:
    return sum(map(len, tokenizer.encode_batch(pages)))


# ----------------------------------------------------------------------------
# Command line: python -m gpt train-tokenizer
# ----------------------------------------------------------------------------


def train_tokenizer_cli(argv: list[str]) -> int:
    """`python -m gpt train-tokenizer DATA --vocab-size N --out DIR`: see `train_tokenizer`."""
    parser = argparse.ArgumentParser(
        prog="python -m gpt train-tokenizer",
        description="Train a byte-level BPE vocabulary on your own text (GPT-2's pre-tokenizer, the Hugging Face\n"
        "`tokenizers` trainer) and write DIR/tokenizer.tiktoken (tiktoken's ranks), DIR/special_tokens.json\n"
        "(special tokens, end of text, padding, chat template) and DIR/hf_tokenizer.json (the same vocabulary\n"
        "for the `tokenizers` library). Every script and verb loads DIR as a tokenizer. The special tokens are\n"
        "<|endoftext|> and <|pad|>, plus ChatML's <|im_start|> and <|im_end|> with --chat-markers. Documents\n"
        "are read and cleaned as `prepare` does, streamed; 1 page in 100 is held out to measure bytes per token.",
        epilog="example: python -m gpt train-tokenizer data/botchan.txt --vocab-size 4096 --out tok/\n"
        "then:    python pretrain.py --data.tokenizer tok/\n"
        "         python -m gpt prepare corpus/ --out data/corpus-tok --tokenizer tok/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", help='a .txt file (one document), a .jsonl file (a "text" field per line), '
                        "or a folder of them (searched recursively)")
    parser.add_argument("--vocab-size", type=cli_args.positive_int, required=True,
                        help="tokens in the vocabulary, special tokens included (at least 259, or 261 with "
                        "--chat-markers); a small corpus may support fewer")
    parser.add_argument("--out", required=True, type=cli_args.output_folder, metavar="DIR",
                        help="folder for the tokenizer files (created if needed)")
    parser.add_argument("--chat-markers", action="store_true",
                        help="add <|im_start|> and <|im_end|>, a ChatML chat template, and make <|im_end|> the "
                        "end-of-text token (for models you will chat with)")
    parser.add_argument("--min-frequency", type=cli_args.positive_int, default=2,
                        help="occurrences a pair needs to be merged (default: %(default)s)")
    parser.add_argument("--limit-mb", type=cli_args.positive_int, default=None, metavar="M",
                        help="read only about the first M MB of the input")
    args = parser.parse_args(argv)

    trained = train_tokenizer(args.data, args.out, args.vocab_size, chat_markers=args.chat_markers,
                              min_frequency=args.min_frequency,
                              limit_bytes=None if args.limit_mb is None else args.limit_mb * MB)
    print(_summary(trained, args.vocab_size))
    return 0


def _summary(trained: TrainedTokenizer, asked: int) -> str:
    """What train-tokenizer prints when done."""
    lines = [f"vocabulary: {trained.vocab_size:,} tokens ({trained.vocab_size - len(trained.special_tokens):,} "
             f"byte-level BPE tokens + {', '.join(trained.special_tokens)})"]
    if trained.vocab_size < asked:
        lines.append(f"            fewer than the {asked:,} asked for: no other pair occurs often enough "
                     "(--min-frequency) in this text")
    lines.append(f"read:       {trained.source_bytes / MB:,.1f} MB in {trained.seconds:.1f} s; "
                 f"trained on {trained.trained_chars:,} characters")
    if trained.held_out_bytes:
        ours = trained.held_out_bytes / trained.held_out_tokens
        gpt2 = trained.held_out_bytes / trained.held_out_gpt2_tokens
        lines.append(f"held out:   {trained.held_out_bytes:,} bytes; bytes per token {ours:.2f} "
                     f"(GPT-2's vocabulary: {gpt2:.2f})")
    else:
        lines.append(f"held out:   nothing (fewer than {HELD_OUT_EVERY} pages of {PAGE_CHARS:,} characters): "
                     "bytes per token not measured")
    if trained.differing_pages:
        lines.append(f"warning:    our ids differ from the tokenizers library's own encoding on "
                     f"{trained.differing_pages} of {trained.checked_pages} pages")
    lines.append(f"wrote:      {trained.path} (tokenizer.tiktoken, special_tokens.json, {HF_TOKENIZER_FILE})")
    lines.append(f"use it:     --data.tokenizer {trained.path}")
    return "\n".join(lines)
