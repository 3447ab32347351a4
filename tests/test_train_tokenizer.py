"""`python -m gpt train-tokenizer` and tokenizer folders.

The reference is the Hugging Face `tokenizers` library trained here on the same
documents, set up independently: its own built-in GPT-2 pre-tokenizer
(`ByteLevel(use_regex=True)`) instead of our pattern, so equal ids also show that
our split (GPT2_PATTERN, possessive quantifiers) cuts text as GPT-2's does.
"""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from gpt.__main__ import main as gpt_main
from gpt.checkpoint import save_checkpoint
from gpt.cli import chat_cli
from gpt.config import ModelConfig
from gpt.data.text import clean_document
from gpt.errors import UserError
from gpt.model import GPT
from gpt.prompts import chatml, chat_prompt, format_example
from gpt.tokenizer import get_tokenizer
from gpt.train_tokenizer import train_tokenizer, train_tokenizer_cli
from gpt.weights import convert_cli
from tests.test_byte_tokenizer import random_unicode

BOTCHAN = (Path(__file__).resolve().parents[1] / "data" / "botchan.txt").read_text(encoding="utf-8-sig")
VOCAB_SIZE = 400
HELD_OUT_TEXTS = [
    BOTCHAN[200_000:203_000],
    "naïve café, Ærøskøbing, Ελληνικά, русский, עברית, العربية, हिन्दी, ½ ⅔ Ⅻ ①",
    "hi 👋🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 ok ✅❤️ 日本語のテキストと中文文本和한국어 텍스트。",
    "e\u0301 a\u0308 Z\u0335\u0321 \u0915\u094d\u0937  def f(x):\n\treturn {'a': [x ** 2]}  # 3.14159 1,000,000\n",
    "It's what we've done; they'll see, I'd say.  \n\n\n  spaces   end   ",
    "In 1906 the 12 chapters had 345 pages; 2024-06-01, 10:45, 1,000,000 and 19061906.",
]


def documents() -> list[str]:
    """Botchan paragraphs and a few lines in other scripts: about 20 KB, already clean."""
    paragraphs = [p.strip() for p in BOTCHAN[20_000:40_000].replace("\r\n", "\n").split("\n\n") if p.strip()]
    other = ["日本語の文章です。中文文本和한국어 텍스트。" * 3, "Ελληνικά και русский текст. " * 4, "x = [1, 2, 3]  # 42\n" * 5,
             "Chapter 12, page 345, in 1906; 2024-06-01 at 10:45 and 1,000,000 yen. " * 6]
    return paragraphs + [doc.strip() for doc in other]


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    docs = documents()
    assert all(clean_document(doc) == doc for doc in docs)  # what the reference trains on is what we train on
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", docs)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    return train_tokenizer(corpus, tmp_path_factory.mktemp("out") / "tok", VOCAB_SIZE)


@pytest.fixture(scope="module")
def reference() -> HFTokenizer:
    """`tokenizers`' byte-level BPE, trained on the same documents, specials added after the vocabulary."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 2, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents(), trainer=trainer)
    tokenizer.add_special_tokens(["<|endoftext|>", "<|pad|>"])
    return tokenizer


def test_ids_equal_the_tokenizers_librarys_own(trained, reference):
    tok = get_tokenizer(str(trained.path))
    assert tok.n_vocab == reference.get_vocab_size() == VOCAB_SIZE
    rng = random.Random(0)
    texts = HELD_OUT_TEXTS + [random_unicode(rng, rng.randrange(1, 200)) for _ in range(100)]
    assert tok.encode_batch(texts) == [encoding.ids for encoding in reference.encode_batch(texts)]
    assert trained.checked_pages == 1 and trained.differing_pages == 0  # too little text to hold any out


def test_round_trip_on_arbitrary_unicode(trained):
    tok = get_tokenizer(str(trained.path))
    rng = random.Random(1)
    texts = HELD_OUT_TEXTS + [random_unicode(rng, rng.randrange(1, 300)) for _ in range(200)]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(HELD_OUT_TEXTS[0])) < 0.7 * len(HELD_OUT_TEXTS[0].encode())  # merges learned from English


def test_special_tokens(trained, reference):
    tok = get_tokenizer(str(trained.path))
    eot, pad = reference.token_to_id("<|endoftext|>"), reference.token_to_id("<|pad|>")
    assert (eot, pad) == (VOCAB_SIZE - 2, VOCAB_SIZE - 1)
    assert tok.special_tokens == {"<|endoftext|>": eot, "<|pad|>": pad}
    assert (tok.eot_id, tok.bos_id, tok.pad_id, tok.padding_id, tok.chat_template) == (eot, eot, pad, pad, None)
    text = "end<|endoftext|>pad<|pad|>"
    assert tok.encode(text, allowed_special="all") == reference.encode(text).ids
    assert eot not in tok.encode(text) and pad not in tok.encode(text)  # typed text is not a control token
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_folder_files_and_a_name_that_loads_from_anywhere(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained = train_tokenizer(corpus, "tok", VOCAB_SIZE)
    assert trained.path == tmp_path / "tok"
    assert sorted(p.name for p in trained.path.iterdir()) == ["hf_tokenizer.json", "special_tokens.json",
                                                              "tokenizer.tiktoken"]
    name = get_tokenizer("tok").name
    assert name == str(tmp_path / "tok")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert get_tokenizer(name).encode("Botchan") == get_tokenizer(str(tmp_path / "tok")).encode("Botchan")
    # the library's own file, written beside ours, encodes the same
    hf = HFTokenizer.from_file(str(tmp_path / "tok" / "hf_tokenizer.json"))
    assert hf.encode(HELD_OUT_TEXTS[0]).ids == get_tokenizer(name).encode(HELD_OUT_TEXTS[0])


def test_chat_markers_make_a_tokenizer_chat_can_use(corpus, tmp_path, monkeypatch, capsys):
    trained = train_tokenizer(corpus, tmp_path / "tok", VOCAB_SIZE, chat_markers=True)
    tok = get_tokenizer(str(trained.path))
    first = VOCAB_SIZE - 4
    assert tok.special_tokens == {"<|endoftext|>": first, "<|pad|>": first + 1, "<|im_start|>": first + 2,
                                  "<|im_end|>": first + 3}
    assert (tok.eot_id, tok.bos_id, tok.pad_id) == (first + 3, None, first + 1)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert chat_prompt(messages, tok) == chatml(messages)
    prompt, full = format_example({"instruction": "Add 2 and 3.", "output": "5"}, "model", tok)
    assert full == prompt + "5<|im_end|>"

    # A model that always predicts <|im_end|>: chat must stop there, with an empty reply.
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.n_vocab, context_length=64, d_model=16, n_layer=1, n_head=2))
    with torch.no_grad():
        model.final_norm.weight.zero_()
        model.final_norm.bias.zero_()
        model.final_norm.bias[0] = 1.0  # every hidden state is the unit vector e0 ...
        model.tok_emb.weight[:, 0] = 0.0
        model.tok_emb.weight[tok.eot_id, 0] = 1.0  # ... whose logit is 1 for <|im_end|> only (tied head)
    save_checkpoint(tmp_path / "model.pt", model, tokenizer=tok.name)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert chat_cli(["--checkpoint", str(tmp_path / "model.pt"), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == "you> bot> \nyou> \n"
    with pytest.raises(UserError, match="not supported yet"):
        convert_cli([str(tmp_path / "model.pt"), "--to", "gguf", "--out", str(tmp_path / "model.gguf")])


def test_held_out_pages_measure_bytes_per_token(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr("gpt.train_tokenizer.PAGE_CHARS", 64)  # ~300 pages: every 100th is held out
    trained = train_tokenizer(corpus, tmp_path / "tok", VOCAB_SIZE)
    assert trained.checked_pages >= 2 and trained.differing_pages == 0
    assert 0 < trained.held_out_bytes < 64 * 4 * trained.checked_pages
    assert trained.held_out_tokens < trained.held_out_bytes  # merges compress
    assert trained.held_out_gpt2_tokens < trained.held_out_bytes


def test_limit_stops_reading_early(tmp_path):
    docs = documents()
    corpus = write_corpus(tmp_path / "docs.jsonl", docs)
    trained = train_tokenizer(corpus, tmp_path / "tok", 300, limit_bytes=10)
    assert trained.trained_chars == len(docs[0])
    assert trained.source_bytes == len((json.dumps({"text": docs[0]}) + "\n").encode())


def test_cli_prints_a_summary(corpus, tmp_path, capsys):
    argv = ["train-tokenizer", str(corpus), "--vocab-size", str(VOCAB_SIZE), "--out", str(tmp_path / "t")]
    assert gpt_main(argv) == 0
    out = capsys.readouterr().out
    assert f"vocabulary: {VOCAB_SIZE} tokens" in out and f"--data.tokenizer {tmp_path / 't'}" in out
    assert "warning" not in out
    with pytest.raises(SystemExit) as exit_info:
        train_tokenizer_cli(["--help"])
    assert exit_info.value.code == 0 and "example: python -m gpt train-tokenizer" in capsys.readouterr().out


def test_a_vocabulary_the_text_cannot_fill_is_reported(tmp_path, capsys):
    corpus = tmp_path / "small.txt"
    corpus.write_text("abc abc abc abd", encoding="utf-8")
    assert train_tokenizer_cli([str(corpus), "--vocab-size", "1000", "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "fewer than the 1,000 asked for" in out and "bytes per token not measured" in out
    tok = get_tokenizer(str(tmp_path / "t"))
    assert tok.n_vocab < 300 and len(tok.encode(" abc")) == 1 and tok.decode(tok.encode("abc abd")) == "abc abd"


def test_training_errors(tmp_path):
    with pytest.raises(UserError, match="at least 259"):
        train_tokenizer(write_corpus(tmp_path / "a.jsonl", ["text"]), tmp_path / "t", 258)
    with pytest.raises(UserError, match="at least 261"):
        train_tokenizer(tmp_path / "a.jsonl", tmp_path / "t", 260, chat_markers=True)
    with pytest.raises(UserError, match="missing.txt: no such file"):
        train_tokenizer(tmp_path / "missing.txt", tmp_path / "t", 300)
    with pytest.raises(UserError, match="no text to train on"):
        train_tokenizer(write_corpus(tmp_path / "empty.jsonl", ["", "  \n "]), tmp_path / "t", 300)
    assert not (tmp_path / "t").exists()


def edit_folder(folder: Path, name: str, change) -> None:
    path = folder / name
    if name.endswith(".json"):
        settings = json.loads(path.read_text(encoding="utf-8"))
        change(settings)
        path.write_text(json.dumps(settings), encoding="utf-8")
    else:
        path.write_text(change(path.read_text(encoding="utf-8")), encoding="utf-8")


def remove_line(number: int):
    return lambda text: "".join(text.splitlines(keepends=True)[:number] + text.splitlines(keepends=True)[number + 1:])


FOLDER_ERRORS = {
    "no ranks file": (lambda f: (f / "tokenizer.tiktoken").unlink(), r"tokenizer\.tiktoken: no such file"),
    "no settings file": (lambda f: (f / "special_tokens.json").unlink(), r"special_tokens\.json: no such file"),
    "bad json": (lambda f: (f / "special_tokens.json").write_text("{nope"), r"special_tokens\.json, line 1.*JSON"),
    "bad ranks line": (lambda f: edit_folder(f, "tokenizer.tiktoken", lambda t: t + "nope\n"),
                       r"tokenizer\.tiktoken, line \d+"),
    "rank gap": (lambda f: edit_folder(f, "tokenizer.tiktoken", remove_line(300)), r"tokenizer\.tiktoken: the ranks"),
    "missing byte": (lambda f: edit_folder(f, "tokenizer.tiktoken", lambda t: t.replace("IQ== 0\n", "AAAAAAA= 0\n")),
                     r"tokenizer\.tiktoken: every single byte needs a rank; byte 0x21 has none"),
    "special collides": (lambda f: edit_folder(f, "special_tokens.json",
                                               lambda s: s["special_tokens"].update({"<|pad|>": 5})),
                         r"special_tokens\.json: the special token ids must follow the 398 ranks"),
    "unknown eot": (lambda f: edit_folder(f, "special_tokens.json", lambda s: s.update(eot="<|end|>")),
                    r"special_tokens\.json: 'eot' is '<\|end\|>'"),
    "unknown key": (lambda f: edit_folder(f, "special_tokens.json", lambda s: s.update(eos="x")),
                    r"special_tokens\.json: unknown key\(s\) \['eos'\]"),
    "bad pattern": (lambda f: edit_folder(f, "special_tokens.json", lambda s: s.update(pattern="(")),
                    r"special_tokens\.json: \"pattern\""),
    "a model folder": (lambda f: [p.unlink() for p in f.iterdir()] and (f / "config.json").write_text("{}"),
                       "not a tokenizer folder"),
}


@pytest.mark.parametrize("case", sorted(FOLDER_ERRORS))
def test_folder_errors_name_the_file(trained, tmp_path, case):
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in ("tokenizer.tiktoken", "special_tokens.json"):
        (folder / name).write_bytes((trained.path / name).read_bytes())
    get_tokenizer(str(folder))  # the copy loads
    damage, message = FOLDER_ERRORS[case]
    damage(folder)
    with pytest.raises(UserError, match=message):
        get_tokenizer(str(folder))
