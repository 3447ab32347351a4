"""Heuristic quality rules for documents, after Gopher's quality and repetition filters (Rae et al., 2021,
"Scaling Language Models: Methods, Analysis & Insights from Training Gopher", appendix A.1.1) and FineWeb's
punctuated-lines rule (Penedo et al., 2024, "The FineWeb Datasets").

    failure = quality_failure(text, cfg)     # None, or the first rule it fails: "quality.min_words", ...

`gpt.data.filters.DocumentFilter` runs them when data.quality is on; the thresholds are FilterConfig's
quality_* fields.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..config import FilterConfig


# Characters that end a sentence or a quotation: FineWeb's stop characters (. ! ? " ')
# plus typographic quotes, the ellipsis and the sentence ends of other scripts.
TERMINAL_PUNCTUATION = frozenset(
    ".!?\"'\u201d\u2019\u00bb\u2026"     # . ! ? " ' ” ’ » …
    "\u300d\u300f\u3002\uff01\uff1f\uff0e\uff61"  # 」 』 。 ！ ？ ． ｡
    "\u061f\u06d4\u0964\u0965\u0589\u1362\u037e"  # Arabic ؟ ۔, Devanagari । ॥, Armenian ։, Ethiopic ።, Greek ;
    "\u203c\u203d\u2047\u2048\u2049"            # ‼ ‽ ⁇ ⁈ ⁉
)
# A whitespace-separated word without a letter (a letter: a word character other than a digit or _).
_LETTERLESS_WORD = re.compile(r"(?<!\S)(?:[^\s\w]|[\d_])++(?!\S)")


def quality_rules(cfg: FilterConfig) -> list[str]:
    """The names of the quality rules `quality_failure` checks under `cfg`, in the order it checks them."""
    top_ngrams, duplicate_ngrams = cfg.ngram_limits()
    return ["quality.min_words", "quality.max_words", "quality.mean_word_length", "quality.symbol_ratio",
            "quality.alpha_words", "quality.punctuated_lines", "quality.duplicate_lines",
            *(f"quality.top_{n}gram" for n in sorted(top_ngrams)),
            *(f"quality.duplicate_{n}gram" for n in sorted(duplicate_ngrams))]


def quality_failure(text: str, cfg: FilterConfig) -> str | None:
    """The name of the first quality rule (`quality_rules`) that `text` fails, or None.

    Words are the whitespace-separated tokens of the text; "characters" below are the
    characters of the words (whitespace not counted). After Gopher (Rae et al., 2021,
    appendix A.1.1, and its table of repetition thresholds):

        min_words / max_words   the number of words lies outside [quality_min_words, quality_max_words]
        mean_word_length        the mean characters per word lies outside
                                [quality_min_mean_word_length, quality_max_mean_word_length]
        symbol_ratio            '#' per word, or ellipses ('...' or '…') per word, exceed
                                quality_max_symbol_ratio (each counted on its own, as in Gopher)
        alpha_words             the share of words holding at least one letter (a word
                                character other than a digit or _) is below quality_min_alpha_words
        duplicate_lines         the share of non-blank lines that repeat an earlier line
                                exceeds quality_max_duplicate_lines
        top_{n}gram             the characters covered by the most frequent word n-gram (one
                                that occurs at least twice) exceed the share set for n in
                                quality_max_top_ngrams
        duplicate_{n}gram       the characters covered by word n-grams that occur more than
                                once exceed the share set for n in quality_max_duplicate_ngrams

    Covered characters count each word once, however many n-grams overlap it. After FineWeb
    (Penedo et al., 2024, its quality filter's line-punctuation rule):

        punctuated_lines        the share of non-blank lines ending (trailing spaces aside) in
                                terminal punctuation (`TERMINAL_PUNCTUATION`) is below
                                quality_min_punctuated_lines

    Rules whose measure is undefined (no words, no lines) pass.
    """
    words = text.split()
    if len(words) < cfg.quality_min_words:
        return "quality.min_words"
    if len(words) > cfg.quality_max_words:
        return "quality.max_words"
    if not words:
        return None
    word_lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))  # (W,)
    word_chars = int(word_lengths.sum())
    if not cfg.quality_min_mean_word_length <= word_chars / len(words) <= cfg.quality_max_mean_word_length:
        return "quality.mean_word_length"
    ellipses = text.count("...") + text.count("\u2026")
    if max(text.count("#"), ellipses) / len(words) > cfg.quality_max_symbol_ratio:
        return "quality.symbol_ratio"
    if (len(words) - len(_LETTERLESS_WORD.findall(text))) / len(words) < cfg.quality_min_alpha_words:
        return "quality.alpha_words"
    lines = [line.rstrip() for line in text.split("\n") if line.strip()]
    punctuated = sum(line[-1] in TERMINAL_PUNCTUATION for line in lines)
    if lines and punctuated / len(lines) < cfg.quality_min_punctuated_lines:
        return "quality.punctuated_lines"
    if lines and (len(lines) - len(set(lines))) / len(lines) > cfg.quality_max_duplicate_lines:
        return "quality.duplicate_lines"
    top_ngrams, duplicate_ngrams = cfg.ngram_limits()
    ngram_ids = _NgramIds(words)
    for n, limit in sorted(top_ngrams.items()):
        if _top_ngram_chars(ngram_ids(n), n, word_lengths) / word_chars > limit:
            return f"quality.top_{n}gram"
    duplicate_limits = sorted(duplicate_ngrams.items())
    for i, (n, limit) in enumerate(duplicate_limits):
        share = _duplicate_ngram_chars(ngram_ids(n), n, word_lengths) / word_chars
        if share > limit:
            return f"quality.duplicate_{n}gram"
        # A repeated (n+1)-gram is made of two repeated n-grams, so longer n-grams cover no more
        # characters: once the share is within every remaining limit, the rest pass.
        if all(share <= later_limit for _, later_limit in duplicate_limits[i + 1:]):
            break
    return None


class _NgramIds:
    """Numbers for the word n-grams of one text, built on demand: `ngram_ids(n)[i]` numbers
    words[i:i+n], equal n-grams getting equal numbers ((W - n + 1,); empty when the text has
    fewer than n words)."""

    def __init__(self, words: list[str]) -> None:
        # Python's string hash (64 bits, per process) tells words apart; only equality matters here.
        hashes = np.fromiter(map(hash, words), dtype=np.int64, count=len(words))  # (W,)
        self._vocabulary_size, word_ids = _dense_ids(hashes)
        self._ids = [word_ids[:0], word_ids]  # indexed by n

    def __call__(self, n: int) -> np.ndarray:
        word_ids = self._ids[1]
        while len(self._ids) <= n:
            m = len(self._ids)
            shorter = self._ids[m - 1][:-1]  # the (m-1)-grams that have a word after them
            pairs = shorter * self._vocabulary_size + word_ids[m - 1:]  # one number per ((m-1)-gram, next word)
            self._ids.append(_dense_ids(pairs)[1])
        return self._ids[n]


def _dense_ids(values: np.ndarray) -> tuple[int, np.ndarray]:
    """(the number of distinct values, each value's rank among them): equal values, equal ids."""
    distinct, inverse = np.unique(values, return_inverse=True)
    return len(distinct), inverse.reshape(-1)


def _covered_chars(starts: np.ndarray, n: int, word_lengths: np.ndarray) -> int:
    """Characters of the words covered by the n-grams starting at `starts`, each word counted once."""
    size = len(word_lengths) + 1
    depth = np.cumsum(np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size))[:-1]  # (W,)
    return int(word_lengths[depth > 0].sum())


def _top_ngram_chars(ids: np.ndarray, n: int, word_lengths: np.ndarray) -> int:
    """Characters covered by the most frequent n-gram (among equally frequent ones, the longest);
    0 when no n-gram occurs twice."""
    if len(ids) == 0:
        return 0
    counts = np.bincount(ids)
    if counts.max() < 2:
        return 0
    ends = np.concatenate(([0], np.cumsum(word_lengths)))
    chars_per_id = np.zeros(len(counts), dtype=np.int64)
    chars_per_id[ids] = ends[n:] - ends[:-n]  # characters of each n-gram (without spaces)
    top = np.flatnonzero(counts == counts.max())
    best = top[np.argmax(chars_per_id[top])]
    return _covered_chars(np.flatnonzero(ids == best), n, word_lengths)


def _duplicate_ngram_chars(ids: np.ndarray, n: int, word_lengths: np.ndarray) -> int:
    """Characters covered by the n-grams that occur more than once."""
    if len(ids) == 0:
        return 0
    repeated = np.bincount(ids)[ids] > 1
    return _covered_chars(np.flatnonzero(repeated), n, word_lengths)
