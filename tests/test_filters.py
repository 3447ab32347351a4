"""Tests for gpt.data.filters: normalization, PII scrubbing, the blocklist, the quality
rules, near-duplicate detection and the DocumentFilter pipeline.

Every document here is built so that the measure a rule checks is known by construction
(the counts are spelled out next to it); Jaccard similarities are computed independently
with plain Python sets.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gpt.config import FilterConfig
from gpt.data.filters import (
    DocumentFilter,
    allowed_chars_pattern,
    blocklist_pattern,
    mask_matches,
    normalize,
    read_blocklist,
    scrub_pii,
)
from gpt.data.near_duplicates import NearDuplicateIndex, shingles
from gpt.data.quality import quality_failure
from gpt.data.text import clean_document
from gpt.errors import ConfigError, UserError

BOTCHAN_WORDS = clean_document((Path(__file__).resolve().parents[1] / "data" / "botchan.txt")
                               .read_text(encoding="utf-8-sig")).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def distinct_words(count: int, length: int = 5, offset: int = 0) -> list[str]:
    """`count` different words of exactly `length` lower-case letters (the numbers offset.. in base 26)."""
    words = []
    for number in range(offset, offset + count):
        letters = ""
        for _ in range(length):
            number, digit = divmod(number, 26)
            letters = LETTERS[digit] + letters
        words.append(letters)
    assert len(set(words)) == count
    return words


def lines_of(words: list[str], per_line: int = 10, end: str = ".") -> str:
    """The words as lines of `per_line` words, each line ending in `end`."""
    return "\n".join(" ".join(words[i:i + per_line]) + end for i in range(0, len(words), per_line))


def quality(**overrides) -> FilterConfig:
    return FilterConfig(quality=True, **overrides)


# Repetition tests: one unpunctuated line of 5-letter words, so that characters = 5 x words.
REPETITION = dict(quality_min_punctuated_lines=0.0)


# ----------------------------------------------------------------------------
# Normalization
# ----------------------------------------------------------------------------


def test_nfkc_lowercase_and_allowed_chars():
    assert normalize("\ufb01ne \uff11\uff12\uff13 \uff28\uff45\uff4c\uff4c\uff4f", FilterConfig(nfkc=True)) == \
        "fine 123 Hello"  # the fi ligature, full-width digits and letters
    assert normalize("\ufb01ne", FilterConfig()) == "\ufb01ne"  # off by default
    assert normalize("HeLLo W\u00d6RLD", FilterConfig(lowercase=True)) == "hello w\u00f6rld"
    assert normalize("H\u00e9llo, world! 42", FilterConfig(lowercase=True, allowed_chars="a-z ")) == "hllo world "
    # NFKC comes before the removal: the ligature survives as the two letters it stands for.
    assert normalize("\ufb01ne", FilterConfig(nfkc=True, allowed_chars="a-z")) == "fine"
    assert normalize("a\nb", FilterConfig(allowed_chars="a-z")) == "ab"
    assert normalize("a\nb", FilterConfig(allowed_chars=r"a-z\n")) == "a\nb"


@pytest.mark.parametrize("allowed", ["a-z]", "z-a", "[a-z", "^a-z", "a-z\\", "a--z"])
def test_bad_allowed_chars_is_a_config_error(allowed):
    with pytest.raises(ConfigError, match="data.allowed_chars"):
        allowed_chars_pattern(allowed)
    with pytest.raises(ConfigError, match="data.allowed_chars"):
        DocumentFilter(FilterConfig(allowed_chars=allowed))


def test_escaped_brackets_are_allowed_characters():
    assert normalize("[a] (b) c!", FilterConfig(allowed_chars=r"a-z\[\] ")) == "[a] b c"


# ----------------------------------------------------------------------------
# PII
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("write to jane.doe+news@mail.example.co.uk.", "write to <EMAIL>."),
    ("<a href='mailto:bob_99@example.org'>", "<a href='mailto:<EMAIL>'>"),
    ("call +44 7700 900123 now", "call <PHONE> now"),
    ("call +1 (555) 123-4567", "call <PHONE>"),
    ("call +33 1 23 45 67 89", "call <PHONE>"),
    ("call +491701234567", "call <PHONE>"),
    ("(555) 123-4567, 555-123-4567 or 555.123.4567", "<PHONE>, <PHONE> or <PHONE>"),
    ("mobile 07700 900123, office 020 7946 0958", "mobile <PHONE>, office <PHONE>"),
    ("server 192.168.0.1, gateway 10.0.0.254.", "server <IP>, gateway <IP>."),
    ("ipv6 2001:db8::ff00:42:8329 and ::1 and fe80::1", "ipv6 <IP> and <IP> and <IP>"),
    ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334 mapped ::ffff:192.0.2.128", "full <IP> mapped <IP>"),
])
def test_pii_is_replaced(text, expected):
    assert scrub_pii(text) == expected


@pytest.mark.parametrize("text", [
    "In 2024, 12,000 people paid $19.99 (or 1,234,567 yen) for version 1.2.3.",
    "It starts at 12:30:45 on 2024-01-15; see John 3:16 and std::vector.",
    "Octets end at 255: 256.1.1.1 and 999.10.10.10 are no addresses; MAC 00:1a:2b:3c:4d:5e.",
    "Call 555-1234 or extension 42; the score was 3-1; ISBN 978-3-16-148410-0.",
    "an @mention, user@localhost and a lone :: stay",
    "a gain of +12 and then +1 234 points",  # too few digits for a phone number
])
def test_pii_leaves_look_alikes(text):
    assert scrub_pii(text) == text


def test_pii_runs_after_lowercasing_in_normalize():
    cfg = FilterConfig(lowercase=True, pii=True)
    assert normalize("Mail ME at Jane@Example.COM", cfg) == "mail me at <EMAIL>"


# ----------------------------------------------------------------------------
# Blocklist
# ----------------------------------------------------------------------------


@pytest.fixture
def blocklist_file(tmp_path) -> Path:
    path = tmp_path / "blocklist.txt"
    path.write_text("# words we do not want\n\n  darn  \nheck\nbad   word\n# bad\n", encoding="utf-8")
    return path


def test_read_blocklist(blocklist_file):
    assert read_blocklist(blocklist_file) == ["darn", "heck", "bad   word"]


def test_blocklist_matches_whole_words_and_phrases_case_insensitively():
    pattern = blocklist_pattern(["darn", "bad word", "bad"])
    def matches(text: str) -> list[str]:
        return [match.group(0) for match in pattern.finditer(text)]
    assert matches("DARN it. Darn!") == ["DARN", "Darn"]
    assert matches("a Bad\n   WORD here") == ["Bad\n   WORD"]  # the phrase across a line break, not just "Bad"
    assert matches("darned darnit undarn bad_word badword") == []  # never inside a longer word
    assert matches("bad, words") == ["bad"]  # "bad word" needs the whole word "word"
    assert matches("a bad-word") == ["bad"]  # a hyphen is no whitespace


def test_blocklist_drop(blocklist_file):
    doc_filter = DocumentFilter(FilterConfig(blocklist=str(blocklist_file)))
    assert doc_filter.apply("What the Heck is this")[1] == "blocklist"
    assert doc_filter.apply("a BAD\nword")[1] == "blocklist"
    assert doc_filter.apply("darned good, hecklers and badword")[1] is None


def test_blocklist_mask(blocklist_file):
    doc_filter = DocumentFilter(FilterConfig(blocklist=str(blocklist_file), blocklist_action="mask"))
    assert doc_filter.apply("What the Heck, a BAD\nword, darned") == ("What the ****, a ********, darned", None)
    assert "blocklist" not in doc_filter.reasons
    assert mask_matches("x darn y", blocklist_pattern(["darn"])) == "x **** y"


def test_blocklist_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match="missing.txt.*cannot read"):
        DocumentFilter(FilterConfig(blocklist=str(missing)))
    comments = tmp_path / "comments.txt"
    comments.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="comments.txt.*no words"):
        read_blocklist(comments)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("darn\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt, line 2: not UTF-8.*0xe9"):
        read_blocklist(latin1)


# ----------------------------------------------------------------------------
# Quality rules
# ----------------------------------------------------------------------------


def test_real_prose_passes_the_default_rules():
    assert quality_failure(" ".join(BOTCHAN_WORDS[5000:7000]) + ".", quality()) is None


def test_word_count():
    assert quality_failure(lines_of(distinct_words(49)), quality()) == "quality.min_words"
    assert quality_failure(lines_of(distinct_words(50)), quality()) is None
    assert quality_failure(lines_of(distinct_words(61)), quality(quality_max_words=60)) == "quality.max_words"
    assert quality_failure(lines_of(distinct_words(60)), quality(quality_max_words=60)) is None


def test_mean_word_length():
    # 50 words in 5 lines, each line's last word carrying its ".": (50 x L + 5) / 50 characters per word.
    assert quality_failure(lines_of(distinct_words(50, length=2)), quality()) == "quality.mean_word_length"  # 2.1
    assert quality_failure(lines_of(distinct_words(50, length=3)), quality()) is None  # 3.1
    assert quality_failure(lines_of(distinct_words(50, length=10)), quality()) == "quality.mean_word_length"  # 10.1
    assert quality_failure(lines_of(distinct_words(50, length=9)), quality()) is None  # 9.1


def with_marks(count: int, mark: str, words: int = 100) -> str:
    """`words` words in lines of 10; the first `count` of them (never a line's last) get `mark` appended."""
    positions = [i for i in range(words) if i % 10 != 9][:count]
    marked = [word + mark if i in positions else word for i, word in enumerate(distinct_words(words))]
    assert sum(word.endswith(mark) for word in marked) == count
    return lines_of(marked)


def test_symbol_ratio():
    # 100 words: 11 hashes is 0.11 per word (> 0.1), 10 is 0.10 (not above).
    assert quality_failure(with_marks(11, "#"), quality()) == "quality.symbol_ratio"
    assert quality_failure(with_marks(10, "#"), quality()) is None
    assert quality_failure(with_marks(11, "..."), quality()) == "quality.symbol_ratio"
    assert quality_failure(with_marks(11, "\u2026"), quality()) == "quality.symbol_ratio"
    assert quality_failure(with_marks(10, "..."), quality()) is None
    # Gopher bounds hashes and ellipses each on its own: 6 of each is 0.06 and 0.06 per word.
    marks = {i: "#" for i in range(6)} | {i: "..." for i in range(10, 16)}
    six_and_six = lines_of([word + marks.get(i, "") for i, word in enumerate(distinct_words(100))])
    assert six_and_six.count("#") == 6 and six_and_six.count("...") == 6
    assert quality_failure(six_and_six, quality()) is None


def test_alpha_words():
    # 100 words, of which k are digits only (e.g. "12345", with a "." at a line end: still no letter).
    def doc(numbers: int) -> str:
        words = [str(10_000 + i) if i < numbers else word for i, word in enumerate(distinct_words(100))]
        return lines_of(words)
    assert quality_failure(doc(21), quality()) == "quality.alpha_words"  # 79% hold a letter
    assert quality_failure(doc(20), quality()) is None  # 80%
    # A word holding any letter counts: with 20 numbers, each of these 20 words must count to pass.
    lettered = ["3rd", "x86", "#tag", "e.g.", "caf\u00e9!"] * 4
    doc_words = [str(10_000 + i) for i in range(20)] + lettered + distinct_words(60)
    relaxed = quality(quality_max_symbol_ratio=1.0, quality_max_top_ngrams="", quality_max_duplicate_ngrams="")
    assert quality_failure(lines_of(doc_words), relaxed) is None
    assert quality_failure(lines_of(doc_words[:-1] + ["-42-"]), relaxed) == "quality.alpha_words"


def test_punctuated_lines():
    # 25 lines of 4 words; k end in terminal punctuation: 3/25 = 0.12 passes, 2/25 = 0.08 fails.
    words = distinct_words(100)
    def doc(ends: list[str]) -> str:
        lines = [" ".join(words[4 * i: 4 * i + 4]) + (ends[i] if i < len(ends) else "") for i in range(25)]
        return "\n".join(lines)
    assert quality_failure(doc([".", "!"]), quality()) == "quality.punctuated_lines"
    assert quality_failure(doc([".", "!", "?"]), quality()) is None
    assert quality_failure(doc(["\u201d", "\"", "'   "]), quality()) is None  # closing quotes, trailing spaces
    assert quality_failure(doc([",", ";", ":"]), quality()) == "quality.punctuated_lines"
    # Blank lines do not count: with 10 of them, still 3 of 25 non-blank lines.
    assert quality_failure(doc([".", "!", "?"]) + "\n" * 10 + " \n", quality()) is None


def test_duplicate_lines():
    # 100 lines of 4 words: 69 different lines, then 31 (or 30) copies of earlier ones.
    words = distinct_words(400)
    unique_lines = [" ".join(words[4 * i: 4 * i + 4]) + "." for i in range(100)]
    def doc(repeats: int) -> str:
        return "\n".join(unique_lines[:100 - repeats] + unique_lines[:repeats])
    no_ngram_rules = quality(quality_max_top_ngrams="", quality_max_duplicate_ngrams="")
    assert quality_failure(doc(31), no_ngram_rules) == "quality.duplicate_lines"  # 0.31 > 0.30
    assert quality_failure(doc(30), no_ngram_rules) is None  # 0.30
    # The 30 copied lines (120 of 400 words, in order) repeat their 5-grams too: with the n-gram
    # rules on, those catch the document.
    assert quality_failure(doc(30), quality()) == "quality.duplicate_5gram"


def test_top_ngram():
    # 100 words of 5 letters (500 characters); the bigram "aaaaa bbbbb" k times, each time
    # followed by a different word, then more different words: the top bigram covers 2k words.
    def doc(repeats: int) -> str:
        others = iter(distinct_words(100, offset=1000))
        words = [word for _ in range(repeats) for word in ("aaaaa", "bbbbb", next(others))]
        return " ".join(words + [next(others) for _ in range(100 - len(words))])
    assert quality_failure(doc(11), quality(**REPETITION)) == "quality.top_2gram"  # 110/500 = 0.22 > 0.20
    assert quality_failure(doc(10), quality(**REPETITION)) is None  # 100/500 = 0.20
    # Overlapping occurrences count each word once: a run of 20 equal words holds the bigram 19
    # times but covers 20 words, 100/500 = 0.20 (19 x 2 words would be 0.38); its trigram too
    # covers those 20 words, 0.20 > 0.18.
    run = " ".join(["zzzzz"] * 20 + distinct_words(80, offset=1000))
    assert quality_failure(run, quality(**REPETITION)) == "quality.top_3gram"


def test_duplicate_ngrams():
    # 100 words of 5 letters; a sequence of k different words appears twice, all other words
    # are different: every n-gram inside the sequence (n <= k) repeats, covering 2k words.
    def doc(k: int) -> str:
        sequence = distinct_words(k, offset=5000)
        others = distinct_words(100 - 2 * k, offset=1000)
        half = len(others) // 2
        return " ".join(others[:half] + sequence + others[half:] + sequence)
    # k = 8: 80/500 = 0.16 > 0.15 (5-grams).
    assert quality_failure(doc(8), quality(**REPETITION)) == "quality.duplicate_5gram"
    # k = 7: 70/500 = 0.14 passes 5-grams (0.15) and 6-grams (0.14) but not 7-grams (0.13);
    # counting each repeated 5-gram occurrence instead (3 x 2 x 25 = 150/500) would fail 5-grams.
    assert quality_failure(doc(7), quality(**REPETITION)) == "quality.duplicate_7gram"
    # k = 6: 60/500 = 0.12 passes 5- and 6-grams, and no longer n-gram repeats.
    assert quality_failure(doc(6), quality(**REPETITION)) is None


# ----------------------------------------------------------------------------
# Near duplicates
# ----------------------------------------------------------------------------


def word_ngram_set(text: str, n: int) -> set[tuple[str, ...]]:
    """The reference shingle set: lower-cased word n-grams (all words when fewer than n)."""
    words = text.lower().split()
    if len(words) < n:
        return {tuple(words)}
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def passage(start: int, words: int = 200) -> list[str]:
    return BOTCHAN_WORDS[start:start + words]


def changed(words: list[str], positions: list[int]) -> str:
    return " ".join("zebra" if i in positions else word for i, word in enumerate(words))


def test_shingles():
    text = "The cat sat on THE mat, the cat sat"
    assert shingles(text, 3) == {" ".join(gram) for gram in word_ngram_set(text, 3)}
    assert shingles("Two words", 5) == {"two words"}
    assert shingles("  ", 5) == set()


def test_near_duplicate_pair_is_caught_and_distinct_pair_is_not():
    original = passage(10_000)
    edited = changed(original, [40, 100, 160])  # 3 of 200 words
    other = " ".join(passage(20_000))
    assert jaccard(word_ngram_set(" ".join(original), 5), word_ngram_set(edited, 5)) > 0.8
    assert jaccard(word_ngram_set(" ".join(original), 5), word_ngram_set(other, 5)) < 0.1
    index = NearDuplicateIndex(threshold=0.8, ngram=5, num_perm=128)
    assert not index.is_near_duplicate(" ".join(original))
    assert index.is_near_duplicate(edited)
    assert index.is_near_duplicate(edited.upper())  # shingles are lower-cased
    assert not index.is_near_duplicate(other)
    assert index.is_near_duplicate(other)  # it was kept, so its copy is caught


def test_first_of_a_cluster_is_kept():
    base = passage(30_000)
    versions = [changed(base, [10 * k]) for k in range(1, 5)]  # each 1 word off the base
    index = NearDuplicateIndex()
    assert [index.is_near_duplicate(text) for text in versions] == [False, True, True, True]


def test_minhash_estimates_the_jaccard_similarity():
    index = NearDuplicateIndex(num_perm=256)
    base = passage(40_000, words=300)
    for edits in (0, 5, 15, 40, 100):
        other = changed(base, list(range(7, 7 + 3 * edits, 3)))
        exact = jaccard(word_ngram_set(" ".join(base), 5), word_ngram_set(other, 5))
        estimate = index.minhash(" ".join(base)).jaccard(index.minhash(other))
        # standard error sqrt(J (1 - J) / 256) <= 0.031; 0.1 is over 3 of them
        assert estimate == pytest.approx(exact, abs=0.1), (edits, exact, estimate)
    unrelated = index.minhash(" ".join(passage(45_000))).jaccard(index.minhash(" ".join(base)))
    assert unrelated < 0.1


def test_near_duplicate_threshold_decides():
    base = passage(10_000)
    half = changed(base, list(range(0, 200, 8)))  # every 8th word: about a third of the shingles survive
    exact = jaccard(word_ngram_set(" ".join(base), 5), word_ngram_set(half, 5))
    assert 0.1 < exact < 0.5
    strict, loose = NearDuplicateIndex(threshold=0.8), NearDuplicateIndex(threshold=0.05)
    for index in (strict, loose):
        index.is_near_duplicate(" ".join(base))
    assert not strict.is_near_duplicate(half)
    assert loose.is_near_duplicate(half)


def test_near_duplicates_need_the_estimate_at_the_threshold():
    # LSH proposes candidates; a document counts only when the signatures estimate a Jaccard
    # similarity at the threshold or above, and documents well above it are found.
    base = passage(20_000)
    probe = NearDuplicateIndex(threshold=0.5)
    for edits in range(1, 40):
        other = changed(base, list(range(3, 3 + 5 * edits, 5)))
        index = NearDuplicateIndex(threshold=0.5)
        index.is_near_duplicate(" ".join(base))
        estimate = probe.minhash(" ".join(base)).jaccard(probe.minhash(other))
        found = index.is_near_duplicate(other)
        assert not found or estimate >= 0.5, (edits, estimate)
        assert found or estimate < 0.8, (edits, estimate)


def test_near_duplicate_odd_texts():
    index = NearDuplicateIndex()
    assert not index.is_near_duplicate("   ")
    assert not index.is_near_duplicate("short one")
    assert index.is_near_duplicate("SHORT  one")  # fewer than 5 words: one shingle of all of them
    assert not index.is_near_duplicate("a lone surrogate \ud800 from JSON and \u00e9t\u00e9 text")


def test_missing_datasketch_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasketch", None)  # makes `import datasketch` fail
    with pytest.raises(UserError, match=r"pip install 'gpt\[data\]'.*data.near_dedup false"):
        NearDuplicateIndex()
    with pytest.raises(UserError, match=r"pip install 'gpt\[data\]'"):
        DocumentFilter(FilterConfig(near_dedup=True))
    DocumentFilter(FilterConfig())  # not needed unless near_dedup is on


def test_unbandable_threshold_is_a_config_error():
    with pytest.raises(ConfigError, match="data.near_dedup_threshold = 1.0 with data.near_dedup_num_perm = 128"):
        DocumentFilter(FilterConfig(near_dedup=True, near_dedup_threshold=1.0))


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


def test_default_filter_drops_empty_and_exact_duplicates_only():
    doc_filter = DocumentFilter(FilterConfig())
    assert not doc_filter.active
    assert doc_filter.reasons == ["empty", "duplicate"]
    assert doc_filter.apply("Hello there") == ("Hello there", None)
    assert doc_filter.apply("Hello there") == ("Hello there", "duplicate")
    assert doc_filter.apply("hello there") == ("hello there", None)  # case matters unless lower-cased
    assert doc_filter.apply("#") == ("#", None)  # no quality rules by default
    assert doc_filter.apply(" \n ") == ("", "empty")
    assert DocumentFilter(FilterConfig(dedup=False)).apply("x")[1] is None


def test_duplicates_are_found_after_normalization():
    doc_filter = DocumentFilter(FilterConfig(lowercase=True, allowed_chars="a-z "))
    assert doc_filter.apply("*** Hello World ***") == ("hello world", None)  # stripped after the removal
    assert doc_filter.apply("hello world!") == ("hello world", "duplicate")
    assert doc_filter.apply("123 !!!") == ("", "empty")


def test_pipeline_order(blocklist_file):
    cfg = FilterConfig(quality=True, near_dedup=True, blocklist=str(blocklist_file))
    doc_filter = DocumentFilter(cfg)
    short = "Just a few words, and heck."  # fails quality (5 words) and the blocklist
    assert doc_filter.apply(short)[1] == "quality.min_words"
    assert doc_filter.apply(short)[1] == "duplicate"  # both a duplicate and low quality: the first check wins
    base = passage(35_000)
    blocked = " ".join(base[:100] + ["heck"] + base[101:]) + "."
    assert doc_filter.apply(blocked)[1] == "blocklist"
    # The blocked document never entered the near-duplicate index, so its clean twin is kept...
    twin = " ".join(base) + "."
    assert doc_filter.apply(twin)[1] is None
    # ...and the next variant is a near-duplicate of the twin.
    assert doc_filter.apply(changed(base, [50]) + ".")[1] == "near_duplicate"
    assert doc_filter.reasons == [
        "empty", "duplicate",
        "quality.min_words", "quality.max_words", "quality.mean_word_length", "quality.symbol_ratio",
        "quality.alpha_words", "quality.punctuated_lines", "quality.duplicate_lines",
        "quality.top_2gram", "quality.top_3gram", "quality.top_4gram",
        "quality.duplicate_5gram", "quality.duplicate_6gram", "quality.duplicate_7gram",
        "quality.duplicate_8gram", "quality.duplicate_9gram", "quality.duplicate_10gram",
        "blocklist", "near_duplicate"]


@pytest.mark.parametrize("setting", [dict(near_dedup=True), dict(quality=True), dict(pii=True),
                                     dict(lowercase=True), dict(nfkc=True), dict(allowed_chars="a-z")])
def test_active_when_text_must_be_seen_whole(setting):
    assert DocumentFilter(FilterConfig(**setting)).active


def test_active_with_a_blocklist(blocklist_file):
    for action in ("drop", "mask"):
        assert DocumentFilter(FilterConfig(blocklist=str(blocklist_file), blocklist_action=action)).active
