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

The quality rules (`gpt.data.quality`) follow Gopher's quality and repetition filters and
FineWeb's punctuated-lines rule; near-duplicate removal (`gpt.data.near_duplicates`) uses
MinHash signatures with locality-sensitive hashing (the `datasketch` library).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, UserError
from .near_duplicates import NearDuplicateIndex
from .quality import quality_failure, quality_rules
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
