"""How much of a reference answer a generated answer reproduces: corpus BLEU and ROUGE-L.

    corpus_bleu(answers, references)     # 0-100, as sacrebleu's default corpus BLEU reports it
    mean_rouge_l(answers, references)    # 0-1, the mean ROUGE-L F-measure of rouge-score's defaults

BLEU (Papineni et al., 2002) is computed over the whole set at once, the way sacrebleu
does by default: each text loses its trailing whitespace and is cut into words by the
`13a` tokenizer of WMT's mteval-v13a script (`bleu_words`); the n-grams of order 1 to 4
of each answer are counted against its one reference, a count at most as often as the
reference has it; the four precisions are combined by a geometric mean, an order with no
match counted as 1 / (2^k * its n-gram total) for the k-th such order (mteval's "exp"
smoothing); and a brevity penalty exp(1 - r/c) applies when the answers' c words fall
short of the references' r. No match at all, or an order with no n-grams, gives 0.

ROUGE-L (Lin, 2004) compares each answer with its reference by their longest common
subsequence of words, as rouge-score's scorer does without stemming: both are lower-cased
and cut into runs of ASCII letters and digits (`rouge_words`; everything else, accented
and non-Latin letters included, separates words), and the score is the F-measure of
LCS / answer words (precision) and LCS / reference words (recall). An empty side gives 0.
The set's score is the plain mean over answers.

The tests check both against sacrebleu and rouge-score on varied texts.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

MAX_ORDER = 4

# mteval-v13a's language-dependent rules, applied in this order to the padded line:
# every ASCII punctuation mark except ' , - . stands alone; a period or comma stands alone
# unless a digit comes before it, then unless a digit follows it; a dash after a digit stands alone.
_SYMBOLS = "".join(sorted(set(string.punctuation) - set("',-.")))
_BLEU_RULES = [
    (re.compile("([" + re.escape(_SYMBOLS) + "])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]
_ENTITIES = [("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")]  # decoded in this order
_ROUGE_WORD = re.compile(r"[a-z0-9]+")


def bleu_words(text: str) -> list[str]:
    """The words BLEU counts: `text` without trailing whitespace, through the 13a tokenizer."""
    line = text.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, character in _ENTITIES:
        line = line.replace(entity, character)
    line = f" {line} "
    for pattern, replacement in _BLEU_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(words: list[str]) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i:i + n]) for n in range(1, MAX_ORDER + 1) for i in range(len(words) - n + 1))


def corpus_bleu(answers: Sequence[str], references: Sequence[str]) -> float:
    """BLEU (0-100) of `answers` against one reference each, pooled over the whole set."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    if not answers:
        raise ValueError("no answers to score")
    matches, totals = [0] * MAX_ORDER, [0] * MAX_ORDER
    answer_length = reference_length = 0
    for answer, reference in zip(answers, references):
        words, reference_words = bleu_words(answer), bleu_words(reference)
        answer_length += len(words)
        reference_length += len(reference_words)
        available = _ngrams(reference_words)
        for ngram, count in _ngrams(words).items():
            totals[len(ngram) - 1] += count
            matches[len(ngram) - 1] += min(count, available[ngram])
    if not any(matches) or not all(totals):
        return 0.0
    log_precisions, halvings = [], 0
    for matched, total in zip(matches, totals):
        if matched == 0:
            halvings += 1
            log_precisions.append(math.log(100.0 / (2**halvings * total)))
        else:
            log_precisions.append(math.log(100.0 * matched / total))
    brevity = 1.0 if answer_length >= reference_length else math.exp(1 - reference_length / answer_length)
    return brevity * math.exp(sum(log_precisions) / MAX_ORDER)


def rouge_words(text: str) -> list[str]:
    """The words ROUGE-L compares: runs of ASCII letters and digits of the lower-cased text."""
    return _ROUGE_WORD.findall(text.lower())


def _longest_common_subsequence(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (0-1) of one answer against its reference."""
    words, reference_words = rouge_words(answer), rouge_words(reference)
    common = _longest_common_subsequence(reference_words, words) if words and reference_words else 0
    if common == 0:
        return 0.0
    precision, recall = common / len(words), common / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def mean_rouge_l(answers: Sequence[str], references: Sequence[str]) -> float:
    """The mean ROUGE-L F-measure over answers, each against its own reference."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    if not answers:
        raise ValueError("no answers to score")
    return sum(rouge_l(a, r) for a, r in zip(answers, references)) / len(answers)
