"""RougeDeduplicator: ROUGE-L F-measure (rouge_score, no stemming) against every accepted prompt."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from selma_core.prompting.dedup import RougeDeduplicator

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(reference: str, candidate: str) -> float:
    return SCORER.score(reference, candidate)["rougeL"].fmeasure


BASE = "three red apples on a wooden kitchen table"
NEAR = "three red apples on a wooden kitchen counter"  # one word of eight changed
DISTINCT = "two dogs sitting side by side on a green lawn"


def test_near_duplicate_dropped_and_distinct_kept():
    assert rouge_l(BASE, NEAR) == pytest.approx(7 / 8)  # LCS 7 of 8 words each way
    dedup = RougeDeduplicator(0.8)
    assert dedup.add(BASE) is True
    assert dedup.add(NEAR) is False
    assert dedup.add(DISTINCT) is True
    assert dedup.accepted == [BASE, DISTINCT]


def test_exact_duplicate_is_dropped_even_at_threshold_one():
    # F = 1.0 is not > 1.0: at threshold 1.0 ROUGE-L drops nothing, but a copy (up to case,
    # spacing and the punctuation around it) is still a duplicate.
    assert RougeDeduplicator(0.99).add(BASE)
    dedup = RougeDeduplicator(0.99)
    dedup.add(BASE)
    assert dedup.add(BASE) is False
    lenient = RougeDeduplicator(1.0)
    lenient.add(BASE)
    assert lenient.add(BASE) is False and lenient.add(f"  {BASE.capitalize()}. ") is False
    assert lenient.add(BASE.replace("red", "red,")) is True  # F = 1.0, not above 1.0: not a copy
    assert lenient.accepted == [BASE, BASE.replace("red", "red,")]


def test_a_copy_of_text_rouge_cannot_tokenize_is_a_duplicate():
    """rouge_score's tokens are ASCII letters and digits: Cyrillic or Chinese text has none and
    scores 0 against everything. A copy is still a duplicate; other such text is not."""
    dedup = RougeDeduplicator(0.8)
    assert dedup.add("пять красных яблок на столе") is True
    assert dedup.add("Пять красных яблок на столе.") is False
    assert dedup.add("桌子上有五个红苹果") is True and dedup.add("桌子上有五个红苹果") is False


def test_threshold_boundary_matches_rouge_score():
    # Same word count, a shorter common subsequence: F is rouge_score's own number, not a guess.
    candidate = "three green apples on a wooden kitchen bench"
    f = rouge_l(BASE, candidate)
    assert 0.0 < f < 1.0
    assert f == pytest.approx(6 / 8)

    at = RougeDeduplicator(f)  # F == threshold: not above it, so kept
    at.add(BASE)
    assert at.max_similarity(candidate) == f
    assert at.add(candidate) is True

    below = RougeDeduplicator(f - 1e-9)  # F just above the threshold: dropped
    below.add(BASE)
    assert below.add(candidate) is False
    assert below.accepted == [BASE]


def test_max_similarity_is_the_best_over_accepted_prompts():
    dedup = RougeDeduplicator(0.95)
    others = [DISTINCT, "five yellow tulips in a clear glass vase", BASE]
    for text in others:
        assert dedup.add(text)
    candidate = "three red apples on a plate"
    expected = max(rouge_l(text, candidate) for text in others)
    assert expected == rouge_l(BASE, candidate)
    assert dedup.max_similarity(candidate) == pytest.approx(expected)
    assert RougeDeduplicator(0.5).max_similarity(candidate) == 0.0  # nothing accepted yet


def test_no_stemming():
    # With a stemmer "apples" and "apple" would match; the threshold was set without one.
    f = rouge_l("three apples", "three apple")
    assert f == pytest.approx(0.5)
    dedup = RougeDeduplicator(0.6)
    dedup.add("three apples")
    assert dedup.max_similarity("three apple") == pytest.approx(f)
    assert dedup.add("three apple") is True


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, 2.0])
def test_invalid_threshold(threshold):
    with pytest.raises(ValueError, match="rouge_threshold"):
        RougeDeduplicator(threshold)
