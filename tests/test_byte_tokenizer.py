"""The built-in byte tokenizer (`get_tokenizer("bytes")`): its ids are the UTF-8 bytes Python itself
writes, 256 is end of text, and it serves everywhere a tokenizer is loaded by name."""

from __future__ import annotations

import random

import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.model import GPT
from gpt.tokenizer import get_tokenizer
from gpt.weights import convert_cli
from gpt.weights.load import load_model_and_tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's what we've done.",
    "emoji": "hi 👋🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵 ✅❤️",
    "cjk": "日本語のテキストと中文文本和한국어 텍스트。",
    "combining": "e\u0301 a\u0308 n\u0303 Z\u0335\u0321\u0322 \u0915\u094d\u0937",
    "whitespace": "a  b\n\n\ne \t\t f\r\n \u00a0\u3000 end   ",
    "controls": "\x00\x01\x7f\x80 nul and del",
    "empty": "",
}


def random_unicode(rng: random.Random, length: int) -> str:
    """Code points from all planes, surrogates excluded (they are not valid in UTF-8)."""
    chars = []
    while len(chars) < length:
        code = rng.choice([rng.randrange(0x80), rng.randrange(0x800), rng.randrange(0x10000), rng.randrange(0x110000)])
        if not 0xD800 <= code <= 0xDFFF:
            chars.append(chr(code))
    return "".join(chars)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("bytes")


def test_vocabulary(tok):
    assert (tok.name, tok.n_vocab, tok.eot_id, tok.bos_id, tok.pad_id) == ("bytes", 257, 256, 256, None)
    assert tok.padding_id == 256 and tok.special_tokens == {"<|endoftext|>": 256}
    assert tok.chat_template is None


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_ids_are_the_utf8_bytes(tok, kind):
    text = TEXTS[kind]
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_on_random_unicode(tok):
    rng = random.Random(0)
    texts = [random_unicode(rng, rng.randrange(1, 300)) for _ in range(200)]
    assert tok.encode_batch(texts) == [list(text.encode("utf-8")) for text in texts]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def test_long_text_is_one_token_per_byte(tok):
    text = ("word " * 600 + "日本語" * 500) * 3  # longer than any piece the pattern cuts
    assert tok.encode(text) == list(text.encode("utf-8"))


def test_end_of_text_is_special_only_when_allowed(tok):
    text = "a<|endoftext|>b"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.encode(text, allowed_special="all") == [ord("a"), 256, ord("b")]
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == [ord("a"), 256, ord("b")]
    assert tok.decode([ord("a"), 256, ord("b")]) == text
    with pytest.raises(UserError, match="<|im_start|>"):
        tok.encode(text, allowed_special={"<|im_start|>"})


def test_decoding_invalid_bytes_and_ids(tok):
    assert tok.decode_bytes([0xE6, 0x97]) == b"\xe6\x97"
    assert tok.decode([0xE6, 0x97, ord("x")]) == "\ufffdx"
    with pytest.raises(ValueError, match="outside the vocabulary of bytes"):
        tok.decode([257])


def test_stream_decoder_joins_a_character_split_over_tokens(tok):
    stream = tok.stream_decoder()
    pieces = [stream.push(byte) for byte in "a👋b".encode("utf-8")]
    assert pieces == ["a", "", "", "", "👋", "b"] and stream.flush() == ""


def test_a_checkpoint_that_records_bytes_loads_with_it(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=257, context_length=16, d_model=16, n_layer=1, n_head=2))
    save_checkpoint(tmp_path / "model.pt", model, tokenizer="bytes")
    loaded = load_model_and_tokenizer(str(tmp_path / "model.pt"))
    assert loaded.tokenizer_name == "bytes" and loaded.tokenizer is get_tokenizer("bytes")


def test_export_says_it_is_not_supported_yet(tmp_path):
    save_checkpoint(tmp_path / "model.pt", GPT(ModelConfig(vocab_size=257, context_length=16, d_model=16, n_layer=1,
                                                           n_head=2)), tokenizer="bytes")
    for target in (["--out", str(tmp_path / "hf")], ["--to", "gguf", "--out", str(tmp_path / "model.gguf")]):
        with pytest.raises(UserError, match="tokenizer 'bytes' .* not supported yet"):
            convert_cli([str(tmp_path / "model.pt"), *target])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
