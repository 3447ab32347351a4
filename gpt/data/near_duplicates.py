"""Near-duplicate documents: MinHash signatures of word shingles with locality-sensitive hashing (Broder, 1997;
the `datasketch` library, installed with `pip install 'gpt[data]'`).

    index = NearDuplicateIndex(threshold=0.8, ngram=5, num_perm=128)
    index.is_near_duplicate(text)            # True if an earlier kept text shares most of its 5-grams

`gpt.data.filters.DocumentFilter` computes the signature in `examine` and asks the index in `decide`.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from ..errors import ConfigError, UserError


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
