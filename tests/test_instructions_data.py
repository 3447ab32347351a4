"""data/instructions.json: reproduced by its generator, right counts, disjoint splits,
and every answer recomputed here from its input."""

from __future__ import annotations

import collections
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_PATH = REPO / "data" / "instructions.json"
FAMILIES = ["spam", "phone", "numbers", "date", "json", "spelled", "case", "botchan"]
VAL_COUNTS = {"spam": 13, "phone": 13, "numbers": 13, "date": 13, "json": 12, "spelled": 12, "case": 12, "botchan": 12}


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    return json.loads(DATA_PATH.read_text(encoding="utf-8"))


def by_task(records, task):
    return [r for r in records if r["task"] == task]


def test_generator_reproduces_the_file_byte_for_byte(tmp_path):
    out = tmp_path / "instructions.json"
    subprocess.run([sys.executable, str(REPO / "data" / "make_instructions.py"), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_bytes() == DATA_PATH.read_bytes()


def test_fields_and_counts(records):
    assert len(records) == 1500
    for record in records:
        assert list(record) == ["instruction", "input", "output", "task", "split"]
        assert all(isinstance(value, str) for value in record.values())
        assert record["output"] and record["output"] == record["output"].strip() and "\n" not in record["output"]
    counts = collections.Counter((r["task"], r["split"]) for r in records)
    assert counts == {
        **{(task, "train"): 150 for task in FAMILIES},
        **{(task, "val"): VAL_COUNTS[task] for task in FAMILIES},
        **{(task, "test"): 25 for task in FAMILIES},
    }
    assert [r["split"] for r in records] == ["train"] * 1200 + ["val"] * 100 + ["test"] * 200


def test_splits_share_no_input(records):
    def keys(split):
        # The input; for a record without one (none so far) the instruction is the question.
        return {(r["task"], r["input"] or r["instruction"]) for r in records if r["split"] == split}

    train, val, test = keys("train"), keys("val"), keys("test")
    assert len(train) + len(val) + len(test) == 1500  # also no input twice within a split
    assert not train & test and not train & val and not val & test


@pytest.mark.parametrize("task, answer_key", [
    ("phone", lambda r: r["output"]),  # the number, whatever its format in the message
    ("date", lambda r: r["output"]),  # the calendar date, in either spelling
    ("json", lambda r: r["output"]),  # the person
    ("spelled", lambda r: r["output"]),
    ("case", lambda r: r["output"].lower()),  # the sentence, in either case
])
def test_test_answers_are_not_taught_in_training(records, task, answer_key):
    splits = {split: {answer_key(r) for r in by_task(records, task) if r["split"] == split}
              for split in ("train", "val", "test")}
    assert not splits["test"] & splits["train"] and not splits["val"] & splits["train"]


def test_each_family_varies_its_instructions(records):
    for task in FAMILIES:
        phrasings = {r["instruction"] for r in by_task(records, task)}
        assert len(phrasings) == (4 if task == "case" else 3), task


def test_spam_answers_are_the_collections_labels(records):
    labels = {}
    for line in (REPO / "data" / "sms_spam_collection.tsv").read_text(encoding="utf-8").splitlines():
        label, text = line.split("\t", 1)
        labels[" ".join(text.split())] = label
    spam = by_task(records, "spam")
    assert all(r["output"] == labels[r["input"]] for r in spam)
    assert collections.Counter((r["split"], r["output"]) for r in spam) == {
        ("train", "spam"): 75, ("train", "ham"): 75, ("val", "spam"): 6, ("val", "ham"): 7,
        ("test", "spam"): 12, ("test", "ham"): 13,
    }


def test_phone_answers(records):
    for r in by_task(records, "phone"):
        (area, exchange, line), = re.findall(r"\(?(\d{3})\)?[ .-](\d{3})[ .-](\d{4})", r["input"])
        assert r["output"] == f"{area}-{exchange}-{line}"


def test_numbers_answers(records):
    for r in by_task(records, "numbers"):
        assert r["output"] == ", ".join(re.findall(r"\d+", r["input"]))


def test_date_answers(records):
    for r in by_task(records, "date"):
        layout = "%B %d, %Y" if "," in r["input"] else "%d %B %Y"
        assert r["output"] == datetime.datetime.strptime(r["input"], layout).date().isoformat()


def test_json_answers(records):
    for r in by_task(records, "json"):
        person = json.loads(r["output"])
        assert list(person) == ["name", "age", "city"] and json.dumps(person) == r["output"]
        assert re.findall(r"\d+", r["input"]) == [str(person["age"])]
        words = re.findall(r"[A-Za-z]+", r["input"])
        assert person["name"] in words and person["city"] in words


def test_spelled_answers(records):
    values = {word: n for n, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen".split())}
    values.update({word: 10 * n for n, word in enumerate("twenty thirty forty fifty sixty seventy eighty ninety"
                                                         .split(), start=2)})
    for r in by_task(records, "spelled"):
        total = 0
        for word in re.split(r"[ -]", r["input"]):
            if word == "hundred":
                total *= 100
            elif word != "and":
                total += values[word]
        assert r["output"] == str(total) and 100 <= total <= 999


def test_case_answers(records):
    for r in by_task(records, "case"):
        if "lower" in r["instruction"] or "small letters" in r["instruction"]:
            assert r["output"] == r["input"].lower()
        else:
            assert r["output"] == " ".join(word[0].upper() + word[1:] for word in r["input"].split(" "))
        assert r["output"] != r["input"]


def test_botchan_answers(records):
    for r in by_task(records, "botchan"):
        passage, word = re.fullmatch(r"Passage: (.+)\nWord: ([A-Za-z]+)", r["input"]).groups()
        tokens = passage.split()
        plain = [re.sub(r"[^a-z]", "", token.lower()) for token in tokens]
        assert plain.count(word.lower()) == 1  # the question has one answer
        assert r["output"] == tokens[tokens.index(word) + 1]
        assert 20 <= len(tokens) <= 40
        assert not re.search(r"Gutenberg|Footnote|\[|CHAPTER", passage)
