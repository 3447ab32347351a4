"""The real SmolLM2-135M-Instruct tokenizer, read from its GGUF file, against
transformers' tokenizer loaded from the same file.

Skipped unless the file is already in the cache (`python -m gpt fetch
smollm2-135m-instruct`). transformers does not know llama.cpp's "smollm"
pre-tokenizer and splits digits GPT-2's way, so the reference gets the
pre-tokenizer of Hugging Face's own SmolLM2 tokenizer.json: individual digits,
then byte-level GPT-2 splitting.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt.tokenizer import get_tokenizer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog. It's, we've, they'll.",
    'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tx = [1]\n',
    "3.14159 and 1,000,000 and 2024-06-01, x  1   22    333\n\n4 ٣٤٥ ½ Ⅻ",
    "naïve café, Ærøskøbing, Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト, 中文, 한국어",
    "emoji 👋🏽 👨‍👩‍👧‍👦 🇯🇵 ✅❤️ and  whitespace   runs\t\t\r\n  \n   end   ",
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return get_tokenizer(str(smollm2_gguf))


@pytest.fixture(scope="module")
def reference(ours, smollm2_gguf):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return hf


def _chat(reference) -> str:
    messages = [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 = 42."},
        {"role": "user", "content": "Thanks! 👍"},
    ]
    return reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_metadata(ours):
    assert ours.n_vocab == 49152
    assert ours.eot_id == ours.special_tokens["<|im_end|>"] == 2
    assert ours.bos_id == ours.special_tokens["<|im_start|>"] == 1
    assert ours.special_tokens["<|endoftext|>"] == 0 and len(ours.special_tokens) == 17
    assert "<|im_start|>" in ours.chat_template
    assert ours.encode("Hello, world!") == [19556, 28, 905, 17]


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_matches_transformers(ours, reference, index):
    text = TEXTS[index]
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == reference.decode(ids) == text


def test_chat_template_text_with_special_tokens(ours, reference):
    text = _chat(reference)
    assert text.startswith("<|im_start|>system\n")
    ids = ours.encode(text, allowed_special="all")
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ids.count(ours.special_tokens["<|im_start|>"]) == 5 and ids.count(ours.eot_id) == 4
    assert ours.decode(ids) == text
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False, split_special_tokens=True)


def test_matches_transformers_on_a_book(ours, reference):
    text = (REPO / "data" / "botchan.txt").read_text(encoding="utf-8")
    chunks = [text[i : i + 4000] for i in range(0, len(text), 4000)]
    assert ours.encode_batch(chunks) == [reference.encode(c, add_special_tokens=False) for c in chunks]
