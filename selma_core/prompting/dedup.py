"""Keeping only novel prompts: a candidate is dropped when its ROUGE-L F-measure against any accepted
prompt exceeds the threshold (SELMA's code uses 0.8; self-instruct 0.7)."""

from __future__ import annotations

from selma_core.prompting.rouge import RougeLIndex


class RougeDeduplicator:
    """The accepted prompts; ``add`` accepts a candidate unless it is too close to one of them.

    Exactly ``rouge_score``'s ROUGE-L (no stemming), searched fast (``selma_core.prompting.rouge``).
    """

    def __init__(self, threshold: float = 0.8) -> None:
        self.index = RougeLIndex(threshold)
        self.threshold = threshold

    @property
    def accepted(self) -> list[str]:
        return self.index.texts

    def max_similarity(self, candidate: str) -> float:
        return self.index.max_similarity(candidate)[0]

    def add(self, candidate: str) -> bool:
        if self.index.is_near_duplicate(candidate):
            return False
        self.index.add(candidate)
        return True
