"""Filters inside the two roads to training tokens (prepare's token files and the in-memory corpus),
the data report, uint32 token files and `python -m gpt prepare`'s filter options.

The corpus is crafted so that each document's fate is known by construction; expected token counts
come from tiktoken's ids for the expected text, the top tokens from a Counter over the kept tokens.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from gpt.config import FilterConfig
from gpt.data import TokenFileDataset, load_text_corpus, prepare, prepare_cli, pretraining_windows, split_documents
from gpt.data import token_files
from gpt.data.report import EXAMPLE_CHARS
from gpt.data.token_files import token_dtype
from gpt.errors import ConfigError
from gpt.tokenizer import get_tokenizer

WORDS = ("river mountain lantern harbor meadow violin candle pebble orchard thunder compass blanket "
         "garden falcon marble window saddle ribbon cottage ladder kettle velvet anchor bramble "
         "chimney feather glacier hammock island jasmine kitten lemon mirror nutmeg oyster parrot "
         "quartz rocket silver tulip umbrella valley walnut yellow zephyr basket copper dragon").split()


def _document(seed: int, sentences: int = 12) -> str:
    """A document that passes every quality rule: sentences of 8 random words, one per line, each ending in '.'."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(sentences)]
    return "\n".join(lines)


def _corpus() -> tuple[list[str], list[tuple[str, str | None]]]:
    """The raw documents, and for each the text the filters should leave and the reason to drop it (None: kept)."""
    a, b, c, d = (_document(seed) for seed in range(4))
    near_a = a.replace(a.split()[3], "sapphire", 1)  # 1 of 96 words: Jaccard of 5-word shingles about 0.9
    blocked = c.replace(c.split("\n")[2], "They spoke of the Forbidden\n  Phrase today.")  # the phrase across lines
    with_email = d + "\nWrite to jane.doe@example.org for more."
    raw = [a, b, near_a, b, "Too short to keep.", blocked, "   ", with_email] + [_document(seed) for seed in range(10, 18)]
    expected = [(a, None), (b, None), (near_a, "near_duplicate"), (b, "duplicate"),
                ("Too short to keep.", "quality.min_words"), (blocked, "blocklist"), ("", "empty"),
                (d + "\nWrite to <EMAIL> for more.", None)] + [(_document(seed), None) for seed in range(10, 18)]
    return raw, expected


@pytest.fixture
def corpus(tmp_path):
    raw, expected = _corpus()
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in raw), encoding="utf-8")
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# words we do not want\nforbidden phrase\n", encoding="utf-8")
    filters = FilterConfig(near_dedup=True, quality=True, pii=True, blocklist=str(blocklist))
    return path, expected, filters


def test_both_roads_apply_the_filters_and_report_what_they_removed(tmp_path, corpus):
    path, expected, filters = corpus
    gpt2 = get_tokenizer("gpt2")
    kept = [gpt2.encode(text) for text, reason in expected if reason is None]
    want_train, want_val = split_documents([np.asarray(t) for t in kept], 0.1, gpt2.eot_id)

    train, val, summary = load_text_corpus(path, gpt2, 0.1, filters=filters)
    assert np.array_equal(train, want_train) and np.array_equal(val, want_val)
    # Small pieces and two workers: the token files hold the same tokens.
    meta = prepare(path, tmp_path / "out", val_fraction=0.1, workers=2, filters=filters, piece_chars=200)
    assert np.array_equal(np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16), want_train)
    assert np.array_equal(np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16), want_val)
    assert meta["documents"] == summary["documents"] == {
        "read": 16, "empty": 1, "duplicate": 1, "kept": 11,
        "filtered": {"near_duplicate": 1, "quality.min_words": 1, "blocklist": 1}}

    # The funnel: read, then each reason in pipeline order, with the tokens of the documents it removed.
    tokens_of = {reason: len(gpt2.encode(text)) for text, reason in expected if reason}
    read_tokens = sum(len(gpt2.encode(text)) for text, _ in expected)
    report = json.loads((tmp_path / "out" / "data_report.json").read_text(encoding="utf-8"))
    steps = [(row["step"], row["removed_documents"], row["removed_tokens"]) for row in report["funnel"]]
    assert steps == [("read", 0, 0), ("empty", 1, 0), ("duplicate", 1, tokens_of["duplicate"]),
                     ("quality.min_words", 1, tokens_of["quality.min_words"]),
                     ("blocklist", 1, tokens_of["blocklist"]), ("near_duplicate", 1, tokens_of["near_duplicate"])]
    assert report["funnel"][0]["tokens"] == read_tokens
    assert report["funnel"][-1]["documents"] == 11 and report["funnel"][-1]["tokens"] == sum(map(len, kept))
    assert report["examples"]["quality.min_words"] == ["Too short to keep."]
    assert report["examples"]["duplicate"] == [expected[1][0][:EXAMPLE_CHARS] + " [...]"]
    assert report["document_tokens_kept"]["documents"] == 11
    assert report["split"]["train_tokens"] == len(want_train) and report["split"]["val_documents"] == 1

    counts = Counter(token for tokens in kept for token in tokens)
    top = report["top_tokens"]
    assert [t["count"] for t in top] == [count for _, count in counts.most_common(20)]
    assert all(counts[t["id"]] == t["count"] and t["text"] == gpt2.decode([t["id"]]) for t in top)
    assert top[0]["share"] == pytest.approx(top[0]["count"] / sum(counts.values()))
    markdown = (tmp_path / "out" / "data_report.md").read_text(encoding="utf-8")
    assert "| near_duplicate | 11 |" in markdown and "Too short to keep." in markdown
    assert (tmp_path / "out" / "doc_lengths.png").stat().st_size > 0


def test_pretraining_windows_filter_text_and_say_what_they_removed(corpus, capsys):
    path, expected, filters = corpus
    gpt2 = get_tokenizer("gpt2")
    train, _ = pretraining_windows(path, 16, gpt2, 0.1, filters=filters, verbose=True)
    want_train, _, _ = load_text_corpus(path, gpt2, 0.1, filters=filters)
    assert train.tokens.tolist() == want_train.tolist()
    line = capsys.readouterr().out
    assert line.startswith("data filters: removed 1 empty (0 tokens), 1 duplicate (")
    assert "1 near_duplicate (" in line and "of 16 documents" in line and "kept 11 (" in line


def test_token_dtype_widens_past_uint16():
    assert token_dtype(50257) is np.uint16 and token_dtype(65536) is np.uint16
    assert token_dtype(65537) is np.uint32 and token_dtype(151_936) is np.uint32


def test_uint32_token_files_round_trip(tmp_path, corpus, monkeypatch):
    """A vocabulary too big for uint16 gets uint32 files; forced here for GPT-2, whose ids fit either."""
    path, _, _ = corpus
    monkeypatch.setattr(token_files, "token_dtype", lambda n_vocab: np.uint32)
    gpt2 = get_tokenizer("gpt2")
    meta = prepare(path, tmp_path / "out", val_fraction=0.1, workers=1)
    train, val, _ = load_text_corpus(path, gpt2, 0.1)
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * len(train)
    assert np.array_equal(np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint32), train)
    windows, val_windows = pretraining_windows(tmp_path / "out", 16, gpt2, 0.1)
    assert isinstance(windows, TokenFileDataset)
    assert windows.tokens.tolist() == train.tolist() and val_windows.tokens.tolist() == val.tolist()


def test_dry_run_prints_the_report_and_writes_no_token_files(tmp_path, corpus, capsys):
    path, _, _ = corpus
    blocklist = tmp_path / "blocklist.txt"
    assert prepare_cli([str(path), "--dry-run", "--workers", "1", "--quality", "--blocklist", str(blocklist)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Data report") and "| quality.min_words | 13 | " in out and "| blocklist | 12 |" in out
    assert prepare_cli([str(path), "--dry-run", "--out", str(tmp_path / "report"), "--workers", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "data_report.json", "data_report.md", "doc_lengths.png"]


def test_prepare_takes_filters_from_a_config_and_overrides(tmp_path, corpus, capsys):
    path, _, _ = corpus
    config = tmp_path / "run.toml"
    config.write_text('[model]\nn_layer = 2\n\n[data]\npath = "elsewhere"\nquality = true\n', encoding="utf-8")
    out = tmp_path / "out"
    assert prepare_cli([str(path), "--out", str(out), "--workers", "1", "--config", str(config)]) == 0
    assert json.loads((out / "meta.json").read_text())["documents"]["filtered"] == {"quality.min_words": 1}
    # The override lowers the word minimum below the short document's 4 words.
    assert prepare_cli([str(path), "--out", str(out), "--workers", "1", "--config", str(config),
                        "--data.quality_min_words", "4"]) == 0
    assert json.loads((out / "meta.json").read_text())["documents"]["filtered"] == {}
    capsys.readouterr()
    with pytest.raises(ConfigError, match="data.path: not a filter field"):
        prepare_cli([str(path), "--out", str(out), "--data.path", "x"])
    with pytest.raises(ConfigError, match="prepare takes only --data.FIELD"):
        prepare_cli([str(path), "--out", str(out), "--train.lr", "1"])
    with pytest.raises(ConfigError, match="data.near_dedup_threshold"):
        prepare_cli([str(path), "--out", str(out), "--data.near_dedup_threshold", "2"])


def test_filters_asked_of_a_token_folder_get_a_note(tmp_path, corpus, capsys):
    path, _, filters = corpus
    prepare(path, tmp_path / "out", val_fraction=0.1, workers=1)
    gpt2 = get_tokenizer("gpt2")
    pretraining_windows(tmp_path / "out", 16, gpt2, 0.1, filters=FilterConfig(), verbose=True)
    assert capsys.readouterr().out == ""
    pretraining_windows(tmp_path / "out", 16, gpt2, 0.1, filters=filters, verbose=True)
    assert "the data.* filters apply to text" in capsys.readouterr().out
