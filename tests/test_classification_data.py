"""Classification data (gpt.data.labeled_files, gpt.data.classification): reading labelled files,
dedup, label names, splits, balance, datasets and loaders, and the [data] section of finetune_classifier.py.

Expected values are derived here from the inputs, by hand (the count spelled out) or with plain Python.
"""

from __future__ import annotations

import collections
import json
import random
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.data import (
    ClassificationBatchLoader,
    ClassificationDataConfig,
    ClassificationDataset,
    LabeledText,
    Splits,
    check_labels,
    class_weights,
    deduplicate_texts,
    describe_splits,
    downsample_classes,
    label_names,
    read_labeled_texts,
    read_splits,
    stratified_split,
    tokenize_splits,
)
from gpt.errors import ConfigError, UserError
from gpt.tokenizer import get_tokenizer


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A headerless TSV of (label, text) rows, the SMS Spam Collection's layout."""
    return write(path, "".join(f"{label}\t{text}\n" for label, text in rows))


def pairs(examples: list[LabeledText]) -> list[tuple[str, str]]:
    return [(e.label, e.text) for e in examples]


# ----------------------------------------------------------------------------
# Reading, dedup, labels, splits, balance, datasets and loaders
# ----------------------------------------------------------------------------


def test_tsv_without_header_is_label_then_text(tmp_path):
    path = write(tmp_path / "d.tsv", 'ham\tsee you "soon"\n\nspam\tWIN now\r\nham\t  padded text  \n')
    examples = read_labeled_texts(path)
    assert [(e.text, e.label) for e in examples] == [('see you "soon"', "ham"), ("WIN now", "spam"),
                                                     ("padded text", "ham")]
    assert examples[1].source == f"{path}, line 3"


def test_csv_with_header_quoting_and_chosen_columns(tmp_path):
    path = write(tmp_path / "d.csv", 'id,body,category\n1,"hello, world",a\n2,"two\nlines",b\n3,plain,a\n')
    examples = read_labeled_texts(path, text_column="body", label_column="category")
    assert [(e.text, e.label) for e in examples] == [("hello, world", "a"), ("two\nlines", "b"), ("plain", "a")]
    assert examples[2].source == f"{path}, line 5"  # a quoted cell spanned lines 3-4
    by_index = read_labeled_texts(path, text_column="1", label_column="2", header="true")
    assert by_index == examples


def test_header_auto_detected_from_text_and_label_names(tmp_path):
    path = write(tmp_path / "d.tsv", "text\tlabel\nhi\tx\nyo\ty\n")
    assert [(e.text, e.label) for e in read_labeled_texts(path)] == [("hi", "x"), ("yo", "y")]


def test_jsonl_with_integer_labels_sorted_by_value(tmp_path):
    lines = [{"text": text, "label": label} for text, label in (("a", 10), ("b", 2), ("c", "2"), ("d", 0))]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n")
    examples = read_labeled_texts(path)
    assert [e.label for e in examples] == ["10", "2", "2", "0"]
    assert label_names(e.label for e in examples) == ["0", "2", "10"]
    assert label_names(["spam", "ham", "spam"]) == ["ham", "spam"]


@pytest.mark.parametrize("name, content, options, message", [
    ("d.tsv", "ham\tok\nspam\tfine\nham\n", {}, r"d\.tsv, line 3: 1 tab-separated columns, but line 1 has 2"),
    ("d.tsv", "ham\tok\nspam\ttoo\tmany\n", {}, r"d\.tsv, line 2: 3 tab-separated columns"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', {},
     r"d\.jsonl, line 2, column \d+: not valid JSON"),
    ("d.jsonl", '{"body": "a", "label": "x"}\n', {}, r"d\.jsonl, line 1: no 'text' field"),
    ("d.jsonl", '{"text": "a", "label": 1.5}\n', {}, r"line 1: 'label' must be a string or an integer, got 1.5"),
    ("d.csv", "text,label\nhi,x\n", {"text_column": "body"}, r"no column named 'body' in the header"),
    ("d.tsv", "ham\thi\n", {"text_column": "body"}, r"no column named 'body' in the header \(line 1: 'ham', 'hi'\)"),
    ("d.tsv", "ham\thi\n", {"text_column": "body", "header": "false"},
     r"'body' names a column, but the file has no header"),
    ("d.tsv", "ham\thi\n", {"text_column": "5"}, r"data.text_column 5 does not exist: line 1 has 2"),
    ("d.tsv", "ham\thi\nspam\t   \n", {}, r"d\.tsv, line 2: empty text"),
    ("d.tsv", "ham\thi\n\tthere\n", {}, r"d\.tsv, line 2: empty label"),
    ("d.csv", 'text,label\n"open quote,x\n', {}, r"d\.csv, line 2: malformed CSV"),
    ("d.txt", "ham\thi\n", {}, r"cannot tell the format"),
    ("d.tsv", "\n\n", {}, r"no examples"),
])
def test_bad_data_names_file_and_line(tmp_path, name, content, options, message):
    with pytest.raises(UserError, match=message):
        read_labeled_texts(write(tmp_path / name, content), **options)


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_bytes(b"ham\tok\nspam\tbad \xff byte\n")
    with pytest.raises(UserError, match=r"d\.tsv, line 2: not UTF-8"):
        read_labeled_texts(path)


def test_single_class_is_an_error():
    with pytest.raises(UserError, match=r"every example has the label 'ham'; a classifier needs at least two"):
        label_names(["ham", "ham"], "d.tsv")


def test_deduplicate_keeps_the_first_copy():
    examples = read_labeled_texts_from([("a", "x"), ("b", "y"), ("a", "x"), ("a", "y"), ("c", "x")])
    kept, stats = deduplicate_texts(examples)
    assert [e.text for e in kept] == ["a", "b", "c"]
    assert (stats.read, stats.duplicates, stats.conflicting_labels) == (5, 2, 1)


def read_labeled_texts_from(pairs):
    return [LabeledText(text, label, f"line {i}") for i, (text, label) in enumerate(pairs, start=1)]


def test_stratified_split_is_disjoint_stratified_and_seeded():
    labels = np.array([0] * 90 + [1] * 10 + [2] * 1)
    train, val, test = stratified_split(labels, 0.1, 0.2, seed=5)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(101))
    assert [int((labels[test] == c).sum()) for c in range(3)] == [18, 2, 0]
    assert [int((labels[val] == c).sum()) for c in range(3)] == [9, 1, 0]
    assert (labels[train] == 2).sum() == 1  # a class too small to split stays in training
    again = stratified_split(labels, 0.1, 0.2, seed=5)
    other = stratified_split(labels, 0.1, 0.2, seed=6)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    assert not np.array_equal(test, other[2])


def test_downsampling_and_class_weights():
    labels = np.array([0] * 6 + [1] * 2)
    kept = downsample_classes(labels, seed=0)
    assert np.bincount(labels[kept]).tolist() == [2, 2]
    weights = class_weights(labels, 3)
    torch.testing.assert_close(weights, torch.tensor([8 / (3 * 6), 8 / (3 * 2), 0.0]))


def test_dataset_cuts_and_batches_trim_padding():
    dataset = ClassificationDataset([[1, 2, 3, 4, 5], [6], [7, 8]], [0, 1, 0], max_length=4, pad_id=9)
    assert dataset.num_truncated == 1
    assert dataset.ids.tolist() == [[1, 2, 3, 4], [6, 9, 9, 9], [7, 8, 9, 9]]
    loader = ClassificationBatchLoader(dataset, 2, shuffle=False)
    ids, lengths, labels = loader.next_batch()
    assert ids.tolist() == [[1, 2, 3, 4], [6, 9, 9, 9]] and lengths.tolist() == [4, 1] and labels.tolist() == [0, 1]
    ids, lengths, _ = ClassificationBatchLoader(dataset, 1, shuffle=False, seed=0).next_batch()
    assert ids.shape == (1, 4)


def test_group_by_length_batches_similar_lengths_and_resumes():
    rng = random.Random(0)
    token_ids = [[1] * rng.randint(1, 60) for _ in range(400)]
    dataset = ClassificationDataset(token_ids, [0] * 400, max_length=64)
    plain = ClassificationBatchLoader(dataset, 8, seed=1)
    grouped = ClassificationBatchLoader(dataset, 8, seed=1, group_by_length=True)
    def spread(lengths: torch.Tensor) -> int:
        return int(lengths.max() - lengths.min())

    grouped_batches = [grouped.next_batch() for _ in range(50)]
    assert max(spread(lengths) for _, lengths, _ in grouped_batches) <= 3
    assert np.mean([spread(plain.next_batch()[1]) for _ in range(50)]) > 30
    shortest = [int(lengths.min()) for _, lengths, _ in grouped_batches]
    assert shortest != sorted(shortest)  # the batches themselves come in random order
    assert sum(int(b[1].numel()) for b in grouped_batches) == 400  # one epoch: every text once
    assert sorted(torch.cat([b[1] for b in grouped_batches]).tolist()) == sorted(len(t) for t in token_ids)

    first = ClassificationBatchLoader(dataset, 8, seed=1, group_by_length=True)
    for _ in range(57):
        first.next_batch()
    second = ClassificationBatchLoader(dataset, 8, seed=1, group_by_length=True)
    second.load_state_dict(first.state_dict())
    for _ in range(60):
        assert all(torch.equal(a, b) for a, b in zip(first.next_batch(), second.next_batch()))


# ----------------------------------------------------------------------------
# The [data] section and read_splits / tokenize_splits / describe_splits
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"format": "xml"}, "data.format: must be one of auto, tsv, csv, jsonl; got 'xml'"),
    ({"header": "yes"}, "data.header: must be one of auto, true, false; got 'yes'"),
    ({"balance": "oversample"}, "data.balance: must be one of none, downsample, weight; got 'oversample'"),
    ({"val_fraction": 0.0}, "data.val_fraction (0.0) and data.test_fraction (0.1) must be positive"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.val_fraction (0.5) and data.test_fraction (0.5) must be"),
])
def test_data_config_checks_its_choices(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ClassificationDataConfig(**fields)


def test_data_config_ignores_the_fraction_of_a_split_read_from_a_file():
    cfg = ClassificationDataConfig(val_fraction=0.0, val_path="val.tsv", test_fraction=0.0, test_path="test.tsv")
    assert (cfg.val_path, cfg.test_path) == ("val.tsv", "test.tsv")


def test_read_splits_with_separate_val_and_test_files(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [
        ("ham", "see you"), ("spam", "WIN cash"), ("ham", "at lunch"), ("spam", "claim prize"),
        ("ham", "see you"),  # a copy with the same label
        ("spam", "at lunch"),  # a copy with another label: the first copy (ham) stays
    ])
    val = write_tsv(tmp_path / "val.tsv", [("ham", "see you"), ("spam", "free txt"), ("ham", "love mum")])
    test = write_tsv(tmp_path / "test.tsv", [("spam", "urgent call"), ("ham", "ok later"), ("ham", "ok later")])
    splits = read_splits(ClassificationDataConfig(path=str(train), val_path=str(val), test_path=str(test)))

    assert splits.labels == ["ham", "spam"]
    # Val and test come from their files, so the whole training file trains, deduplicated, in file order.
    assert pairs(splits.train) == [("ham", "see you"), ("spam", "WIN cash"), ("ham", "at lunch"),
                                   ("spam", "claim prize")]
    assert pairs(splits.val) == [("spam", "free txt"), ("ham", "love mum")]  # "see you" is in training: dropped
    assert [e.source for e in splits.val] == [f"{val}, line 2", f"{val}, line 3"]
    assert pairs(splits.test) == [("spam", "urgent call"), ("ham", "ok later")]
    assert splits.ids(splits.val) == [1, 0]
    assert splits.notes == [
        f"{train}: 6 examples, 2 duplicate texts dropped (1 of them with another label than the first copy)",
        f"{val}: 3 examples, 0 duplicate texts dropped, 1 also in training dropped",
        f"{test}: 3 examples, 1 duplicate texts dropped",
    ]


def test_read_splits_refuses_a_label_training_never_saw(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("ham", "see you"), ("spam", "WIN cash"), ("ham", "at lunch"),
                                               ("spam", "claim prize")])  # two of each: no label is rare
    test = write_tsv(tmp_path / "test.tsv", [("ham", "hello"), ("maybe", "who knows")])
    cfg = ClassificationDataConfig(path=str(train), test_path=str(test), val_fraction=0.5)
    message = f"{test}, line 2: label 'maybe' never appears in the training data (training labels: ham, spam)"
    with pytest.raises(UserError, match=re.escape(message)):
        read_splits(cfg)


def labelled(*labels: str) -> list[LabeledText]:
    return [LabeledText(f"text {i}", label, f"d.tsv, line {i}") for i, label in enumerate(labels, start=1)]


@pytest.mark.parametrize("labels, settings, message", [
    (("ham", "spam", "ham", "spma", "spam"), {},
     "the data: label 'spma' (1x: line 4) occurs fewer than data.min_label_count (2) times: a typo? Fix the file, "
     "or accept rare labels with --data.min_label_count 1"),
    (("a", "b", "a", "b", "c", "d", "d"), {"min_count": 3},
     "labels 'c' (1x: line 5), 'a' (2x: line 1, line 3), 'b' (2x: line 2, line 4), 'd' (2x: line 6, line 7) occur "
     "fewer than data.min_label_count (3) times"),
    (("ham", "Ham", "ham", "spam", "spam", "ham", "Ham", "ham", "ham"), {},
     "labels 'ham' (5x: line 1, line 3, line 6 and 2 more), 'Ham' (2x: line 2, line 7) differ only in case or "
     "spacing; fix the file, or keep them as separate classes with --data.allow_label_variants true"),
    (("not spam", "not  spam", "spam", "not spam", "spam", "not  spam"), {},
     "labels 'not spam' (2x: line 1, line 4), 'not  spam' (2x: line 2, line 6) differ only in case or spacing"),
])
def test_check_labels_refuses_labels_that_look_like_mistakes(labels, settings, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_labels(labelled(*labels), **settings)


def test_check_labels_accepts_what_it_is_told_to():
    """Each set is refused by default and accepted with its flag; integer labels are never variants."""
    rare, variants = labelled("ham", "spam", "ham", "spma", "spam"), labelled("ham", "Ham", "ham", "Ham")
    with pytest.raises(UserError, match="spma"):
        check_labels(rare)
    assert check_labels(rare, min_count=1) is None
    with pytest.raises(UserError, match="Ham"):
        check_labels(variants)
    assert check_labels(variants, allow_variants=True) is None
    assert check_labels(labelled("1", "2", "10", "1", "2", "10")) is None


def test_the_shipped_data_passes_the_label_checks():
    cfg = ClassificationDataConfig()  # finetune_classifier.py's defaults, and configs/classifier*.toml's file
    data = Path(__file__).resolve().parents[1] / cfg.path
    examples = deduplicate_texts(read_labeled_texts(data))[0]
    assert check_labels(examples, cfg.min_label_count, cfg.allow_label_variants) is None
    # Counted independently from the file's first column: two labels, each far above the threshold.
    counts = collections.Counter(line.split("\t", 1)[0] for line in data.read_text(encoding="utf-8").splitlines()
                                 if line.strip())
    assert set(counts) == {"ham", "spam"} and min(counts.values()) >= 100 * cfg.min_label_count
    assert {e.label for e in examples} == set(counts)


def test_read_splits_splits_one_file_by_class(tmp_path):
    rows = [("ham", f"ham text {i}") for i in range(20)] + [("spam", f"spam text {i}") for i in range(10)]
    random.Random(0).shuffle(rows)
    path = write_tsv(tmp_path / "d.tsv", rows)
    cfg = ClassificationDataConfig(path=str(path), val_fraction=0.1, test_fraction=0.2, seed=4)
    splits = read_splits(cfg)

    # Per class: test round(n * 0.2), val round(n * 0.1), the rest trains. ham (20): 4, 2, 14; spam (10): 2, 1, 7.
    def per_class(split):
        return dict(collections.Counter(e.label for e in split))

    assert per_class(splits.test) == {"ham": 4, "spam": 2}
    assert per_class(splits.val) == {"ham": 2, "spam": 1}
    assert per_class(splits.train) == {"ham": 14, "spam": 7}
    every = pairs(splits.train) + pairs(splits.val) + pairs(splits.test)
    assert sorted(every) == sorted(rows)  # disjoint, and nothing lost
    for split in (splits.train, splits.val, splits.test):  # each split keeps the file order
        lines = [int(e.source.rsplit(" ", 1)[1]) for e in split]
        assert lines == sorted(lines)
    assert pairs(read_splits(cfg).test) == pairs(splits.test)  # the seed fixes the split
    others = [pairs(read_splits(ClassificationDataConfig(path=str(path), val_fraction=0.1, test_fraction=0.2,
                                                         seed=seed)).test) for seed in range(5, 9)]
    assert any(other != pairs(splits.test) for other in others)


def test_read_splits_downsamples_training_to_the_smallest_class(tmp_path):
    rows = [("ham", f"ham {i}") for i in range(6)] + [("spam", f"spam {i}") for i in range(3)]
    path = write_tsv(tmp_path / "d.tsv", rows)
    val = write_tsv(tmp_path / "val.tsv", [("ham", "v1"), ("spam", "v2")])
    test = write_tsv(tmp_path / "test.tsv", [("ham", "t1"), ("spam", "t2")])
    splits = read_splits(ClassificationDataConfig(path=str(path), val_path=str(val), test_path=str(test),
                                                  balance="downsample"))
    kept = pairs(splits.train)
    assert collections.Counter(label for label, _ in kept) == {"ham": 3, "spam": 3}  # 6 ham cut to the 3 spam
    assert [row for row in rows if row in kept] == kept  # a subset, in file order
    assert splits.notes[-1] == "training split downsampled to the smallest class: 9 -> 6 examples"


def test_read_splits_refuses_an_empty_split(tmp_path):
    # Two examples per class: round(2 * 0.1) = 0 go to validation (and to test).
    path = write_tsv(tmp_path / "d.tsv", [("ham", "a"), ("ham", "b"), ("spam", "c"), ("spam", "d")])
    with pytest.raises(UserError, match=re.escape(f"{path}: the val split is empty: too few examples")):
        read_splits(ClassificationDataConfig(path=str(path)))
    # With val and test from their files all of d.tsv trains, so a validation file whose every text is in d.tsv
    # is empty once those are dropped.
    val = write_tsv(tmp_path / "val.tsv", [("ham", "a"), ("spam", "c")])
    test = write_tsv(tmp_path / "test.tsv", [("ham", "e"), ("spam", "f")])
    cfg = ClassificationDataConfig(path=str(path), val_path=str(val), test_path=str(test))
    with pytest.raises(UserError, match=re.escape(f"{val}: the val split is empty: too few examples")):
        read_splits(cfg)


def test_tokenize_splits_sorts_val_and_test_by_length_and_keeps_the_training_order():
    tokenizer = get_tokenizer("gpt2")

    def examples(*items):
        return [LabeledText(text, label, f"line {i}") for i, (label, text) in enumerate(items, start=1)]

    splits = Splits(
        labels=["a", "b"],
        train=examples(("b", "one two three four five six"), ("a", "hi"), ("a", "three small words")),
        val=examples(("a", "x y z w"), ("b", "p q"), ("a", "ok"), ("b", "hi there")),
        test=examples(("b", "a longer text comes here"), ("a", "tiny")),
        notes=[],
    )
    datasets = tokenize_splits(splits, tokenizer, max_length=5, pad_id=50256)
    assert list(datasets) == ["train", "val", "test"]

    def n_tokens(example):
        return len(tokenizer.encode(example.text))

    expected = {"train": splits.train,  # training keeps its order: the loader shuffles it
                "val": sorted(splits.val, key=n_tokens),  # shortest first; "p q" and "hi there" tie, order kept
                "test": sorted(splits.test, key=n_tokens)}
    assert [e.text for e in expected["val"]] == ["ok", "p q", "hi there", "x y z w"]
    for name, order in expected.items():
        dataset = datasets[name]
        ids = [tokenizer.encode(e.text)[:5] for e in order]
        assert dataset.ids.tolist() == [row + [50256] * (5 - len(row)) for row in ids]
        assert dataset.lengths.tolist() == [len(row) for row in ids]
        assert dataset.labels.tolist() == [splits.labels.index(e.label) for e in order]
        assert dataset.num_truncated == sum(n_tokens(e) > 5 for e in order)


def test_describe_splits_counts_each_class():
    def examples(*labels):
        return [LabeledText(f"text {i}", label, f"line {i}") for i, label in enumerate(labels)]

    splits = Splits(labels=["ham", "spam"], train=examples("ham", "spam", "ham", "ham"),
                    val=examples("spam", "ham"), test=examples("spam", "spam"), notes=[])
    token_lengths = {"train": [1, 2, 3, 12], "val": [4, 5], "test": [6, 7]}
    datasets = {name: ClassificationDataset([[1] * n for n in lengths], splits.ids(getattr(splits, name)),
                                            max_length=8)
                for name, lengths in token_lengths.items()}
    header, train, val, test, tokens = describe_splits(splits, datasets).split("\n")
    assert header.split() == ["split", "examples", "ham", "spam"]
    assert train.split() == ["train", "4", "3", "1"]  # 4 examples: 3 ham, 1 spam
    assert val.split() == ["val", "2", "1", "1"]
    assert test.split() == ["test", "2", "0", "2"]
    cut = [min(n, 8) for lengths in token_lengths.values() for n in lengths]  # the 12-token text is cut to 8
    p95 = statistics.quantiles(cut, n=20, method="inclusive")[18]
    assert tokens == (f"tokens per text (all splits, after cutting): min {min(cut)}, median {statistics.median(cut):.0f}, "
                      f"mean {statistics.mean(cut):.1f}, p95 {p95:.0f}, max {max(cut)}; 1 texts cut to max_length 8")
