"""Which documents of a corpus to keep, and in what form: normalization, quality rules,
a blocklist, exact and near-duplicate removal.

    doc_filter = DocumentFilter(cfg)         # cfg: a FilterConfig (the [data] section)
    for doc in docs:                         # cleaned documents (`gpt.data.text.clean_document`)
        text, reason = doc_filter.apply(doc) # reason: None (keep text), "duplicate", "quality.min_words", ...

`DocumentFilter.apply` runs, in this order (each step switchable in FilterConfig):

    normalize        NFKC, lower-case, characters outside data.allowed_chars removed,
                     e-mail addresses / phone numbers / IP addresses -> <EMAIL> <PHONE> <IP>,
                     blocklisted words masked with asterisks (data.blocklist_action = "mask")
    empty            nothing but whitespace is left
    duplicate        the same normalized text was seen before (a 16-byte BLAKE2b digest per document)
    quality.*        the first heuristic quality rule the document fails (`quality_failure`)
    blocklist        a blocklisted word or phrase occurs (data.blocklist_action = "drop")
    near_duplicate   an earlier kept document shares most of its word 5-grams (`NearDuplicateIndex`)

The quality rules follow Gopher's quality and repetition filters (Rae et al., 2021,
"Scaling Language Models: Methods, Analysis & Insights from Training Gopher", appendix
A.1.1) and FineWeb's punctuated-lines rule (Penedo et al., 2024, "The FineWeb Datasets").
Near-duplicate removal uses MinHash signatures with locality-sensitive hashing (Broder,
1997; the `datasketch` library, installed with `pip install 'gpt[data]'`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, UserError
from .text import _WHITESPACE

if TYPE_CHECKING:
    from ..config import FilterConfig


# ----------------------------------------------------------------------------
# Normalization
# ----------------------------------------------------------------------------


def allowed_chars_pattern(allowed: str) -> re.Pattern[str]:
    """A pattern matching each run of characters outside the character class `[allowed]`
    (data.allowed_chars, written without its brackets: `a-z0-9 \\n.,!?`).

    A class that does not compile, starts with `^` (which would negate it), or holds an
    unescaped `[` or `]` (which would end the class early or nest a set) is a ConfigError
    naming data.allowed_chars.
    """
    if allowed.startswith("^"):
        raise ConfigError(f"data.allowed_chars: {allowed!r} starts with ^, which would negate the class; list the "
                          "characters to keep (escape a literal ^ as \\^)")
    escaped = False
    for char in allowed:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char in "[]":
            raise ConfigError(f"data.allowed_chars: {allowed!r} holds an unescaped {char!r}; write the class "
                              f"without its brackets and escape a literal one as \\{char}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # set operations such as -- or && inside a class
            return re.compile(f"[^{allowed}]+")
    except (re.error, FutureWarning) as err:
        raise ConfigError(f"data.allowed_chars: {allowed!r} is not a regular-expression character class: "
                          f"{err}") from None


def remove_disallowed(text: str, pattern: re.Pattern[str]) -> str:
    """`text` without the characters `pattern` (from `allowed_chars_pattern`) matches."""
    return pattern.sub("", text)


_EMAIL = re.compile(
    r"(?<![\w.+-])[\w.+-]+@"                          # local part, starting at a token boundary
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"  # domain labels
    r"[A-Za-z]{2,}(?![\w-])"                          # top-level domain
)
_IPV4_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"{_IPV4_OCTET}(?:\.{_IPV4_OCTET}){{3}}"
_IPV4_ADDRESS = re.compile(rf"(?<![\w.]){_IPV4}(?!\w|\.\d)")
# Anything shaped like an IPv6 address (hex groups and at least two colons, maybe an IPv4 tail);
# `_ip_or_keep` lets through only what `ipaddress` accepts, so times like 12:30:45 stay.
_IPV6_CANDIDATE = re.compile(rf"(?<![\w:.])(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:{_IPV4}|[0-9A-Fa-f]{{1,4}})?(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,5}"  # international: +44 7700 900123, +1 (555) 123-4567
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"                       # (555) 123-4567
    r"|\d{3}(?P<sep>[ .-])\d{3}(?P=sep)\d{4}"                # 555-123-4567, 555.123.4567, 555 123 4567
    r"|0\d{2,4}[ -]\d{3,4}[ -]?\d{3,4}"                      # a national number with trunk prefix: 07700 900123
    r")(?!\w)"
)
# The digits in a phone number: E.164 allows at most 15, and fewer than 7 is no dialable number.
_PHONE_DIGITS = (7, 15)


def _ip_or_keep(match: re.Match[str]) -> str:
    candidate = match.group(0)
    if not any(char in "0123456789abcdefABCDEF" for char in candidate):
        return candidate  # "::" alone: punctuation, not an address
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return candidate
    return "<IP>"


def _phone_or_keep(match: re.Match[str]) -> str:
    digits = sum(char.isdigit() for char in match.group(0))
    low, high = _PHONE_DIGITS
    return "<PHONE>" if low <= digits <= high else match.group(0)


def scrub_pii(text: str) -> str:
    """`text` with personal data replaced by placeholders: e-mail addresses by <EMAIL>,
    IPv6 and IPv4 addresses by <IP> (IPv4 octets 0-255; IPv6 as `ipaddress` parses it),
    and phone numbers by <PHONE>.

    Phone numbers are recognized in these shapes only (7 to 15 digits): international
    (`+44 7700 900123`, `+1 (555) 123-4567`, `+33 1 23 45 67 89`), North American
    (`(555) 123-4567`, `555-123-4567`, `555.123.4567`, `555 123 4567`) and national with
    a trunk 0 (`07700 900123`, `020 7946 0958`), so years, prices, counts such as 12,000
    and version numbers stay. A rule-based scrubber misses some data and catches some
    look-alikes (a version 1.2.3.4 is a valid IPv4 address).
    """
    if "@" in text:
        text = _EMAIL.sub("<EMAIL>", text)
    if ":" in text:
        text = _IPV6_CANDIDATE.sub(_ip_or_keep, text)
    if "." in text:
        text = _IPV4_ADDRESS.sub("<IP>", text)
    return _PHONE.sub(_phone_or_keep, text)


def mask_matches(text: str, pattern: re.Pattern[str]) -> str:
    """`text` with each match of `pattern` (a blocklist) replaced by as many asterisks as it has characters."""
    return pattern.sub(lambda match: "*" * len(match.group(0)), text)


class Normalizer:
    """The normalizations a FilterConfig asks for, compiled once; calling it normalizes one text.

    In this order: Unicode NFKC (data.nfkc), lower-casing (data.lowercase), removal of the
    characters outside data.allowed_chars, PII placeholders (data.pii, `scrub_pii`), and
    masking of blocklisted words (data.blocklist with data.blocklist_action = "mask").
    With everything off, a text comes back unchanged.
    """

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self._disallowed = allowed_chars_pattern(cfg.allowed_chars) if cfg.allowed_chars else None
        self._mask = blocklist_for(cfg) if cfg.blocklist_action == "mask" else None

    def __call__(self, text: str) -> str:
        if self.cfg.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if self.cfg.lowercase:
            text = text.lower()
        if self._disallowed is not None:
            text = remove_disallowed(text, self._disallowed)
        if self.cfg.pii:
            text = scrub_pii(text)
        if self._mask is not None:
            text = mask_matches(text, self._mask)
        return text


def normalize(text: str, cfg: FilterConfig) -> str:
    """One text normalized as `cfg` asks (see `Normalizer`; build one Normalizer for many texts)."""
    return Normalizer(cfg)(text)


# ----------------------------------------------------------------------------
# Blocklist
# ----------------------------------------------------------------------------


def read_blocklist(path: str | Path) -> list[str]:
    """The words and phrases of a blocklist file: UTF-8, one per line, surrounding whitespace
    stripped; blank lines and lines starting with `#` are skipped. A file that is missing,
    unreadable, not UTF-8 or without any entry is a UserError naming it (and the line)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read the blocklist (data.blocklist): {err.strerror}") from None
    entries = []
    for number, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            entry = line.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise UserError(f"{path}, line {number}: not UTF-8 text: byte 0x{line[err.start]:02x} "
                            "cannot be decoded") from None
        if entry and not entry.startswith("#"):
            entries.append(entry)
    if not entries:
        raise UserError(f"{path}: the blocklist (data.blocklist) holds no words or phrases "
                        "(one per line; blank lines and # comments are skipped)")
    return entries


def blocklist_pattern(entries: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive pattern matching any of `entries` as whole words or phrases: not
    inside a longer word, and with the words of a phrase separated by any run of whitespace
    (line breaks included). Where one entry extends another, the longer match wins.

    The entries go into the pattern as a trie (entries sharing a start share its test), so a
    search costs about the same for ten entries as for a thousand.
    """
    trie: dict[str, Any] = {}
    for entry in entries:
        node = trie
        for i, word in enumerate(entry.split()):
            if i:
                node = node.setdefault(_SPACE_RUN, {})
            for char in word:
                node = node.setdefault(char.lower() if len(char.lower()) == 1 else char, {})
        if node is not trie:
            node[_ENTRY_END] = {}
    return re.compile(rf"(?<!\w){_trie_pattern(trie)}(?!\w)", re.IGNORECASE)


_SPACE_RUN = " "  # the trie's step between the words of a phrase (words hold no whitespace)
_ENTRY_END = ""  # the trie's mark that an entry ends at a node


def _trie_pattern(node: dict[str, Any]) -> str:
    """A regular expression matching the strings spelled by the paths from `node` to an entry's end."""
    branches = [(r"\s+" if unit == _SPACE_RUN else re.escape(unit)) + _trie_pattern(child)
                for unit, child in sorted(node.items()) if unit != _ENTRY_END]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else f"(?:{'|'.join(branches)})"
    if _ENTRY_END not in node:
        return body
    return f"(?:{body})?" if len(branches) == 1 else f"{body}?"  # greedy: the longer entry first


def blocklist_for(cfg: FilterConfig) -> re.Pattern[str] | None:
    """data.blocklist read and compiled (its entries NFKC-normalized when data.nfkc is on, as
    the text is); None when no blocklist is set."""
    if not cfg.blocklist:
        return None
    entries = read_blocklist(cfg.blocklist)
    if cfg.nfkc:
        entries = [unicodedata.normalize("NFKC", entry) for entry in entries]
    return blocklist_pattern(entries)


# ----------------------------------------------------------------------------
# Quality rules
# ----------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------
# Near duplicates
# ----------------------------------------------------------------------------

_NGRAM_BASE = np.uint64(0x100000001B3)  # combines the word hashes of an n-gram (mod 2^64)
_BATCH = 4096  # shingle hashes per MinHash.update_batch call: bounds its (batch, num_perm) temporary


def shingles(text: str, ngram: int) -> set[str]:
    """The set near-duplicate detection compares: the lower-cased word n-grams of `text`
    (words joined by single spaces); a text of fewer than `ngram` words is one shingle of
    all its words, an empty text none."""
    words = text.lower().split()
    if len(words) < ngram:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)}


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: spreads every input bit over the whole 64-bit word (uint64 arrays)."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """A 32-bit hash of each shingle of `text` (see `shingles`; one per n-gram position, so
    repeats included): CRC-32 of each word, combined per n-gram in numpy. (S,) uint64."""
    words = text.lower().split()
    if not words:
        return np.zeros(0, dtype=np.uint64)
    # Words hold no ASCII space, and no UTF-8 sequence holds its byte: splitting the joined bytes
    # at spaces gives each word's bytes, without encoding word by word.
    word_bytes = " ".join(words).encode("utf-8", "surrogatepass").split(b" ")  # lone surrogates can come from JSON
    word_hashes = np.fromiter(map(zlib.crc32, word_bytes), dtype=np.uint64, count=len(words))  # (W,)
    n = min(ngram, len(words))
    combined = word_hashes[: len(words) - n + 1].copy()  # (S,)
    for k in range(1, n):
        combined = combined * _NGRAM_BASE + word_hashes[k: k + len(combined)]
    return _mix64(combined) >> np.uint64(32)


def _import_datasketch() -> Any:
    try:
        import datasketch
    except ImportError:
        raise UserError("data.near_dedup needs the datasketch library: pip install 'gpt[data]' "
                        "(or set data.near_dedup false)") from None
    return datasketch


class NearDuplicateIndex:
    """Finds documents whose shingle sets (`shingles`) are near-duplicates of an earlier kept one.

    Each document gets a MinHash signature of `num_perm` values (datasketch's MinHash with
    `seed`, fed 32-bit shingle hashes); LSH buckets (datasketch's MinHashLSH, banded for
    `threshold`) propose earlier documents that probably share a bucket, and a proposal
    counts when the signatures estimate a Jaccard similarity of at least `threshold`.
    Estimates have a standard error of about sqrt(J (1 - J) / num_perm), and LSH misses
    a few pairs near the threshold.
    """

    def __init__(self, threshold: float = 0.8, ngram: int = 5, num_perm: int = 128, seed: int = 1) -> None:
        datasketch = _import_datasketch()
        self.threshold = threshold
        self.ngram = ngram
        self._empty = datasketch.MinHash(num_perm=num_perm, seed=seed, hashfunc=int)  # copied per document
        try:
            self._lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
        except ValueError as err:  # too few permutations to split into at least two bands at this threshold
            raise ConfigError(f"data.near_dedup_threshold = {threshold} with data.near_dedup_num_perm = {num_perm}: "
                              f"datasketch's LSH cannot band the signatures ({err}); lower the threshold or raise "
                              "num_perm") from None
        self._signatures: list[np.ndarray] = []  # the kept documents' signatures, by LSH key

    def minhash(self, text: str) -> Any:
        """The datasketch MinHash of `text`'s shingles (`.jaccard(other)` estimates their Jaccard similarity)."""
        signature = self._empty.copy()
        hashes = shingle_hashes(text, self.ngram)
        for start in range(0, len(hashes), _BATCH):
            signature.update_batch(hashes[start: start + _BATCH].tolist())
        return signature

    def signature(self, text: str) -> np.ndarray:
        """The MinHash values of `text` (num_perm,): what `add_unless_near_duplicate` compares. A function of
        the text alone, so worker processes can compute it."""
        return self.minhash(text).hashvalues

    def add_unless_near_duplicate(self, signature: np.ndarray) -> bool:
        """Whether the document of `signature` is a near-duplicate of one kept before; if not, it is kept:
        added to the index, so the first of each cluster stays."""
        query = self._empty.copy()
        query.hashvalues = signature
        for key in self._lsh.query(query):
            if np.mean(signature == self._signatures[key]) >= self.threshold:
                return True
        self._lsh.insert(len(self._signatures), query)
        self._signatures.append(signature)
        return False

    def is_near_duplicate(self, text: str) -> bool:
        """`add_unless_near_duplicate` of `text`'s signature; a text without a word is never one (nor kept)."""
        return bool(text.strip()) and self.add_unless_near_duplicate(self.signature(text))


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


@dataclass
class Examined:
    """What `DocumentFilter.examine` finds in one document on its own, before comparing it with others."""

    text: str  # normalized, stripped of surrounding whitespace
    digest: bytes  # BLAKE2b (16 bytes) of the text: exact duplicates
    failure: str | None  # "empty", a quality rule or "blocklist": what the document fails by itself
    signature: np.ndarray | None  # MinHash values (data.near_dedup on and nothing failed)


class DocumentFilter:
    """The filters a FilterConfig switches on, applied to one document after another
    (stateful: it remembers what it kept, for duplicate and near-duplicate removal).

    `apply` takes a cleaned document (`gpt.data.text.clean_document`) and returns its
    normalized text, stripped of surrounding whitespace, and the reason to drop it (one of
    `reasons`) or None to keep it. It is two steps, which `prepare` runs apart: `examine`
    does everything that needs only the document (normalizing, the quality rules, the
    blocklist, the MinHash signature), in worker processes; `decide` compares with the
    documents before it (exact and near duplicates), in order, in the main process.
    """

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self._normalize = Normalizer(cfg)
        self._blocklist = blocklist_for(cfg) if cfg.blocklist_action == "drop" else None
        self._digests: set[bytes] = set()
        self._near_duplicates = (NearDuplicateIndex(cfg.near_dedup_threshold, cfg.near_dedup_ngram,
                                                    cfg.near_dedup_num_perm) if cfg.near_dedup else None)

    @property
    def active(self) -> bool:
        """Whether anything beyond exact deduplication is on: then a document must be seen whole."""
        cfg = self.cfg
        return bool(cfg.near_dedup or cfg.quality or cfg.blocklist or cfg.pii or cfg.lowercase or cfg.nfkc
                    or cfg.allowed_chars)

    @property
    def reasons(self) -> list[str]:
        """The drop reasons `apply` can give under this config, in pipeline order (a report's funnel)."""
        cfg = self.cfg
        return ["empty",
                *(["duplicate"] if cfg.dedup else []),
                *(quality_rules(cfg) if cfg.quality else []),
                *(["blocklist"] if self._blocklist is not None else []),
                *(["near_duplicate"] if cfg.near_dedup else [])]

    def seen_before(self, digest: bytes) -> bool:
        """Whether a document with this blake2b digest (16 bytes, of its UTF-8 text) came before; remembers it.
        `prepare` hashes a long document piece by piece and asks here at its end."""
        if digest in self._digests:
            return True
        self._digests.add(digest)
        return False

    def examine(self, text: str) -> Examined:
        """The checks of one document that need no other document (see `Examined`)."""
        text = self._normalize(text).strip(_WHITESPACE)
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        failure = None
        if not text:
            failure = "empty"
        elif self.cfg.quality:
            failure = quality_failure(text, self.cfg)
        if failure is None and self._blocklist is not None and self._blocklist.search(text):
            failure = "blocklist"
        signature = (self._near_duplicates.signature(text)
                     if failure is None and self._near_duplicates is not None else None)
        return Examined(text, digest, failure, signature)

    def decide(self, examined: Examined) -> str | None:
        """The reason to drop an examined document, or None to keep it; call in document order."""
        if examined.failure == "empty":
            return "empty"
        if self.cfg.dedup and self.seen_before(examined.digest):
            return "duplicate"
        if examined.failure is not None:
            return examined.failure
        if examined.signature is not None and self._near_duplicates is not None \
                and self._near_duplicates.add_unless_near_duplicate(examined.signature):
            return "near_duplicate"
        return None

    def apply(self, text: str) -> tuple[str, str | None]:
        """(the normalized document, the reason to drop it or None to keep it): `decide` of `examine`."""
        examined = self.examine(text)
        return examined.text, self.decide(examined)
