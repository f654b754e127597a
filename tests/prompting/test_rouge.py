"""The fast ROUGE-L search gives rouge_score's numbers exactly."""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer, tokenize

from selma_core.prompting.rouge import RougeLIndex, lcs_length, rouge_tokens

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
WORDS = [
    "a",
    "the",
    "red",
    "blue",
    "cat",
    "cats",
    "dog",
    "on",
    "of",
    "in",
    "two",
    "three",
    "table",
    "box",
    "left",
    "right",
    "Café",
    "naïve",
    "3-legged",
    "x,y",
]


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12))) + rng.choice(
        ["", "!!", " ÉCOLE", "\n\t"]
    )


def test_tokens_are_rouge_scores_tokens():
    rng = random.Random(0)
    for _ in range(3000):
        text = random_text(rng)
        assert rouge_tokens(text) == tokenize.tokenize(text, None)


def test_max_similarity_equals_the_naive_maximum_exactly():
    rng = random.Random(1)
    texts = [random_text(rng) for _ in range(300)]
    index = RougeLIndex(0.5)
    for i, text in enumerate(texts):
        if i:
            naive = max(SCORER.score(prior, text)["rougeL"].fmeasure for prior in texts[:i])
            best, doc = index.max_similarity(text)
            assert best == naive  # the same float, not approximately
            if doc is not None:
                assert SCORER.score(texts[doc], text)["rougeL"].fmeasure == naive
            for threshold in (0.3, 0.5, 0.8):
                assert (index.max_similarity(text, stop_above=threshold)[0] > threshold) == (
                    naive > threshold
                )
        index.add(text)


def test_bit_parallel_lcs_against_dynamic_programming():
    rng = random.Random(2)
    for _ in range(500):
        a = [rng.randint(0, 5) for _ in range(rng.randint(1, 30))]
        b = [rng.randint(0, 5) for _ in range(rng.randint(0, 30))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        masks: dict[int, int] = {}
        for position, token in enumerate(a):
            masks[token] = masks.get(token, 0) | (1 << position)
        assert lcs_length(masks, len(a), b) == table[-1][-1]


def test_empty_and_unseen_text():
    index = RougeLIndex(0.8)
    assert index.max_similarity("anything") == (0.0, None)
    index.add("three red apples")
    assert index.max_similarity("") == (0.0, None)
    assert index.max_similarity("zebras galore") == (0.0, None)
    assert index.is_near_duplicate("Three red apples!")


def test_threshold_is_validated():
    with pytest.raises(ValueError, match="rouge_threshold"):
        RougeLIndex(0.0)
