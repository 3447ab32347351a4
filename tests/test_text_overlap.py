"""Corpus BLEU and ROUGE-L (gpt/evaluate/text_overlap.py) against sacrebleu and rouge-score on varied texts."""

import math
import random

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from gpt.evaluate.text_overlap import corpus_bleu, mean_rouge_l, rouge_l

PAIRS = [  # (answer, reference)
    ("The cat sat on the mat.", "The cat sat on the mat."),
    ("the cat is on the mat", "The cat sat on the mat."),
    ("", "An empty answer scores nothing."),
    ("A reference may be empty too.", ""),
    ("Café, naïve, 東京 and Zürich — «quoted» text…", "Cafe, naive, 東京 and Zurich - \"quoted\" text..."),
    ("It costs $3.50, i.e. 3,500 cents; see p. 12-14.", "It costs $3.50 (3,500 cents); see pp. 12-14!"),
    ("First sentence. Second one!\nA third, on a new line?", "First sentence. Second one? A third line."),
    ('{"name": "Vera", "age": 74, "city": "Lisbon"}', '{"name": "Vera", "age": 47, "city": "Lisboa"}'),
    ("a &amp; b &lt;c&gt; &quot;d&quot; <skipped> hyphen-\nated   ", "a & b <c> \"d\" hyphenated"),
    ("2024-03-05 at 10:30am; 1.5.2 and x.y, z,w", "2024-03-05 at 10:30 am; 1.5.2 and x.y , z,w"),
    ("won't stop, can't stop... ¿Qué? ¡Sí!", "will not stop, cannot stop. Que? Si!"),
    ("İstanbul ΑΒΓ straße", "istanbul αβγ strasse"),
    ("   ", "whitespace only"),
]


def sacrebleu_score(answers: list[str], references: list[str]) -> float:
    return sacrebleu.corpus_bleu(answers, [references]).score


@pytest.mark.parametrize("answer, reference", PAIRS)
def test_rouge_l_equals_rouge_score(answer, reference):
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, answer)["rougeL"].fmeasure
    assert math.isclose(rouge_l(answer, reference), expected, abs_tol=1e-12)


@pytest.mark.parametrize("answer, reference", PAIRS)
def test_bleu_of_one_pair_equals_sacrebleu(answer, reference):
    assert math.isclose(corpus_bleu([answer], [reference]), sacrebleu_score([answer], [reference]), abs_tol=1e-9)


def test_corpus_bleu_pools_the_counts_like_sacrebleu():
    answers, references = [a for a, _ in PAIRS], [r for _, r in PAIRS]
    expected = sacrebleu_score(answers, references)
    assert 0 < expected < 100 and math.isclose(corpus_bleu(answers, references), expected, abs_tol=1e-9)


def test_bleu_smoothing_and_brevity_penalty_like_sacrebleu():
    # Unigram and bigram matches but no 3- or 4-gram match (two smoothed orders), answer shorter than its reference.
    answers, references = ["cat dog bird"], ["cat dog fish bird owl"]
    assert math.isclose(corpus_bleu(answers, references), sacrebleu_score(answers, references), abs_tol=1e-9)
    # Too short for any 4-gram: BLEU is 0 although words match.
    assert corpus_bleu(["cat dog"], ["cat dog"]) == sacrebleu_score(["cat dog"], ["cat dog"]) == 0.0


def test_random_texts_match_both_libraries():
    rng = random.Random(0)
    alphabet = ["the", "cat", "Cat", "dog", "3", "1.5", "x", "é", "東", " ", " ", "\n", ".", ",", "-", "'", "&",
                "&amp;", "(", ")", "$", "!", "?", ";", ":", "/", "\"", "`", "~", "a-b", "0,5", "-\n", "\t"]
    answers, references = [], []
    for _ in range(150):
        answers.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
        references.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
    assert math.isclose(corpus_bleu(answers, references), sacrebleu_score(answers, references), abs_tol=1e-9)
    for start in range(0, 150, 10):  # small sets, where smoothing and brevity decide more
        chunk = slice(start, start + 10)
        assert math.isclose(corpus_bleu(answers[chunk], references[chunk]),
                            sacrebleu_score(answers[chunk], references[chunk]), abs_tol=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)]
    assert math.isclose(mean_rouge_l(answers, references), sum(expected) / len(expected), abs_tol=1e-12)


@pytest.mark.parametrize("metric", [corpus_bleu, mean_rouge_l])
def test_mismatched_or_empty_sets_are_errors(metric):
    with pytest.raises(ValueError, match="2 answers but 1 references"):
        metric(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no answers"):
        metric([], [])
