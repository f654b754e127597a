"""Diversity statistics of a prompt set."""

from __future__ import annotations

import random
from itertools import combinations

from selma_core.prompting.rouge import lcs_length, rouge_l_fmeasure, rouge_tokens


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams (Li et al., 2016), on lowercase words."""
    total, seen = 0, set()
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def mean_pairwise_rouge_l(texts: list[str], sample: int = 200, seed: int = 0) -> float:
    """Mean ROUGE-L F over all pairs of a deterministic sample (lower: more diverse)."""
    chosen = texts if len(texts) <= sample else random.Random(seed).sample(texts, sample)
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(t, len(vocab)) for t in rouge_tokens(text)] for text in chosen]
    scores = []
    for a, b in combinations(ids, 2):
        masks: dict[int, int] = {}
        for position, token in enumerate(a):
            masks[token] = masks.get(token, 0) | (1 << position)
        scores.append(rouge_l_fmeasure(lcs_length(masks, len(a), b), len(b), len(a)))
    return sum(scores) / len(scores) if scores else 0.0
