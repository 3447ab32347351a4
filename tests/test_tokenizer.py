"""Tokenizer tests: GPT-2 ids equal tiktoken's own `r50k_base` (run offline from
our ranks file), and a GGUF-stored BPE equals Hugging Face `tokenizers` built
from the same vocabulary and merges."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import socket
import sys
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from gpt.errors import UserError
from gpt.tokenizer import get_tokenizer, load_tiktoken_ranks

REPO = Path(__file__).resolve().parents[1]
RANKS_FILE = REPO / "gpt" / "assets" / "gpt2.tiktoken"
# tiktoken caches a downloaded blob under sha1(its URL); see tiktoken/load.py.
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's what we've done; they'll see, I'd say.",
    "code": 'def f(x: int) -> int:\n    """Doc."""\n    return {"a": [x ** 2, x // 3]}  # note\n\n\tif x:\n\t\tpass\n',
    "unicode": "naïve café, Ærøskøbing, Ελληνικά, русский, עברית, العربية, हिन्दी, ½ ⅔ Ⅻ ①",
    "emoji": "hi 👋🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 ok ✅❤️",
    "cjk": "日本語のテキストと中文文本和한국어 텍스트。",
    "whitespace": "a  b   c    d\n\n\ne \t\t f\r\n  \n   x  1   22 \u00a0\u3000 end   ",
    "numbers": "3.14159 1,000,000 2024-06-01 0x1F 1e-9 +42 -7 ٣٤٥ 12345678901234567890",
    "eot_inside": "before<|endoftext|>after <|endoftext|> <|endoftext",
    "empty": "",
}


@pytest.fixture(scope="module")
def gpt2():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def r50k(tmp_path_factory):
    """tiktoken's registered `r50k_base`, loaded from our ranks file with the network blocked."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    shutil.copyfile(RANKS_FILE, cache / hashlib.sha1(R50K_URL.encode()).hexdigest())

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.setattr(tiktoken.load, "read_file", no_network)
        mp.setattr(socket.socket, "connect", no_network)
        mp.delitem(tiktoken.registry.ENCODINGS, "r50k_base", raising=False)
        encoding = tiktoken.get_encoding("r50k_base")
    return encoding


def test_ranks_file_is_r50k():
    assert hashlib.sha256(RANKS_FILE.read_bytes()).hexdigest() == R50K_SHA256


def test_hello_world(gpt2):
    assert gpt2.encode("Hello, world!") == [15496, 11, 995, 0]
    assert gpt2.decode([15496, 11, 995, 0]) == "Hello, world!"
    assert (gpt2.name, gpt2.n_vocab, gpt2.eot_id) == ("gpt2", 50257, 50256)
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_gpt2_matches_tiktoken(gpt2, r50k, kind):
    text = TEXTS[kind]
    assert gpt2.encode(text) == r50k.encode_ordinary(text)
    assert gpt2.encode(text, allowed_special="all") == r50k.encode(text, allowed_special="all")
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_matches_tiktoken_on_a_book(gpt2, r50k):
    text = (REPO / "data" / "botchan.txt").read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert ids == r50k.encode_ordinary(text)
    assert len(ids) > 60_000
    assert gpt2.decode(ids) == text


def test_special_tokens_are_text_unless_allowed(gpt2):
    text = "a<|endoftext|>b"
    assert gpt2.encode(text) == [64, 27, 91, 437, 1659, 5239, 91, 29, 65]
    assert gpt2.encode(text, allowed_special="all") == [64, 50256, 65]
    assert gpt2.encode(text, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    with pytest.raises(UserError, match="<|im_end|>"):
        gpt2.encode(text, allowed_special={"<|im_end|>"})


def test_encode_batch(gpt2):
    texts = list(TEXTS.values())
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]
    assert gpt2.encode_batch(texts, allowed_special="all") == [gpt2.encode(t, allowed_special="all") for t in texts]


def test_decode_replaces_invalid_utf8(gpt2):
    ids = gpt2.encode("👋")
    assert len(ids) > 1  # the emoji is split into byte tokens
    assert gpt2.decode_bytes(ids[:1]) == "👋".encode()[: len(gpt2.decode_bytes(ids[:1]))]
    assert gpt2.decode(ids[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="50257"):
        gpt2.decode([1, 50257])


def test_stream_decoder_reassembles_split_characters(gpt2):
    text = "héllo 👋🏽 世界 👨‍👩‍👧"
    ids = gpt2.encode(text)
    stream = gpt2.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces  # some token ended mid-character and was held back
    assert not any("\ufffd" in piece for piece in pieces)


def test_stream_decoder_flushes_a_cut_off_character(gpt2):
    stream = gpt2.stream_decoder()
    first_byte = gpt2.encode("👋")[0]
    assert stream.push(first_byte) == ""
    assert stream.flush() == "\ufffd"


def test_unknown_tokenizer_name():
    with pytest.raises(UserError, match="gpt2"):
        get_tokenizer("no-such-tokenizer")


def test_bad_ranks_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-a-line\n")
    with pytest.raises(UserError, match=r"bad\.tiktoken, line 2"):
        load_tiktoken_ranks(bad)


# --- a tiny GGUF tokenizer ---------------------------------------------------------

CORPUS = [
    "the cat sat on the mat. the dog ate the cat's food!",
    "def main():\n    return 42  # answer\n\n\n",
    "x  1  2   3 ; y = 10 * 20 + 300",
    "Numbers 1234567 and 2024-01-01, naïve café ☕ 日本",
    "    indented    more    spaces    here",
] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MISSING_BYTE = 0x04  # left out of the vocabulary, as SmolLM2 leaves it out
GGUF_TEXTS = [
    "the cat ate the food",
    "def main():\n    return 42\n",
    "x  1   22    333 \n 4",
    "a  1",
    "Numbers 0987 in 2025, naïve ☕ 日本語 👋🏽",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "tail with\x04control",
    "   ",
]


def _tiny_vocab(pre: str):
    """Vocabulary and merges trained by `tokenizers`, with ids shuffled so that an
    id is not the merge order, specials spread out and one byte missing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = _hf_pre_tokenizer(pre)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trainer_tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    missing = chr(256 + MISSING_BYTE)  # byte 0x04 in the byte alphabet
    tokens = [t for t in model["vocab"] if t != missing]
    random.Random(0).shuffle(tokens)
    tokens.insert(0, SPECIALS[0])
    tokens.insert(len(tokens) // 2, SPECIALS[1])
    tokens.append(SPECIALS[2])
    return tokens, merges


def _hf_pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _write_gguf(path: Path, tokens: list[str], merges: list[str], pre: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre", ["smollm", "gpt2"])
def test_gguf_tokenizer_matches_hf_bpe(tmp_path, pre):
    from tokenizers import Tokenizer, decoders, models

    tokens, merges = _tiny_vocab(pre)
    path = tmp_path / f"tiny-{pre}.gguf"
    _write_gguf(path, tokens, merges, pre)
    tok = get_tokenizer(str(path))

    reference = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    )
    reference.pre_tokenizer = _hf_pre_tokenizer(pre)
    reference.decoder = decoders.ByteLevel()
    reference.add_special_tokens(SPECIALS)

    assert tok.n_vocab == len(tokens)
    assert tok.eot_id == tokens.index("<|im_end|>") and tok.bos_id == tokens.index("<|im_start|>")
    assert tok.special_tokens == {t: tokens.index(t) for t in SPECIALS}
    assert tok.chat_template.startswith("{% for m in messages %}")
    for text in GGUF_TEXTS + CORPUS[:5]:
        ids = tok.encode(text, allowed_special="all")
        assert ids == reference.encode(text).ids, text
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=False)
    assert tok.decode(tok.encode("日本語 👋🏽 x  1")) == "日本語 👋🏽 x  1"
    assert tok.encode("<|im_end|>") != [tok.eot_id]  # special text stays text by default


def test_gguf_digit_split_differs_from_gpt2_split(tmp_path):
    """'x  1' shows which pre-tokenizer ran: SmolLM's keeps both spaces together."""
    tokens, merges = _tiny_vocab("smollm")
    ids = {}
    for pre in ("smollm", "gpt2"):
        _write_gguf(tmp_path / f"{pre}.gguf", tokens, merges, pre)
        tok = get_tokenizer(str(tmp_path / f"{pre}.gguf"))
        ids[pre] = [tok.decode([i]) for i in tok.encode("x  1")]
    assert ids == {"smollm": ["x", "  ", "1"], "gpt2": ["x", " ", " ", "1"]}


def test_gguf_errors(tmp_path, monkeypatch):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"nope" * 10)
    with pytest.raises(UserError, match="not a GGUF file"):
        get_tokenizer(str(not_gguf))

    tokens, merges = _tiny_vocab("gpt2")
    unknown_pre = tmp_path / "pre.gguf"
    _write_gguf(unknown_pre, tokens, merges, "mystery")
    with pytest.raises(UserError, match="tokenizer.ggml.pre is 'mystery'"):
        get_tokenizer(str(unknown_pre))

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UserError, match=r"pip install 'gpt\[gguf\]'"):
        get_tokenizer(str(not_gguf))
