"""Dropping near-duplicates: a candidate is rejected when its ROUGE-L F-measure against any accepted
prompt exceeds the threshold (SELMA's code uses 0.8; self-instruct 0.7)."""

from __future__ import annotations


class RougeDeduplicator:
    """Keeps the accepted prompts; ``add`` accepts a candidate unless it is too close to one of them.

    Uses ``rouge_score`` (no stemming), the definition the threshold was set with.
    """

    def __init__(self, threshold: float = 0.8) -> None:
        from rouge_score import rouge_scorer

        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"rouge_threshold: expected a number in (0, 1], got {threshold}")
        self.threshold = threshold
        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.accepted: list[str] = []

    def max_similarity(self, candidate: str) -> float:
        best = 0.0
        for text in self.accepted:
            best = max(best, self._scorer.score(text, candidate)["rougeL"].fmeasure)
            if best > self.threshold:
                break
        return best

    def add(self, candidate: str) -> bool:
        if self.max_similarity(candidate) > self.threshold:
            return False
        self.accepted.append(candidate)
        return True
