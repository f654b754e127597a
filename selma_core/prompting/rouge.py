"""ROUGE-L near-duplicate search, exactly as ``rouge_score`` defines it, without its quadratic cost.

The definition (``rouge_score``, no stemming): lowercase, non-alphanumerics to spaces, split on
whitespace; F = 2·P·R / (P + R) with P = LCS / |candidate| and R = LCS / |reference|. A candidate
is a near-duplicate when its F against some indexed prompt exceeds the threshold.

Why it is fast and still exact:
1. Every prompt is tokenized once, to integer ids.
2. LCS ≤ the size of the two token multisets' intersection, which an inverted index gives for
   every indexed prompt at once (numpy), so most prompts are ruled out without an LCS.
3. The rest are checked best bound first with a bit-parallel LCS (Hyyrö 2004: one word-wide update
   per candidate token, Python ints as bit vectors), stopping at the first that exceeds.
F is computed with rouge_score's own float formula, so every decision is the same as its.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter

import numpy as np

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID = re.compile(r"^[a-z0-9]+$")
# Bounds within this of the threshold are checked exactly rather than trusted to float rounding.
_MARGIN = 1e-9


def plain_text(text: str) -> str:
    """``text`` compared as words: case, spacing and the punctuation around it ignored."""
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'“”‘’")


def rouge_tokens(text: str) -> list[str]:
    """``rouge_score.tokenize.tokenize(text, stemmer=None)``, reproduced."""
    tokens = _SPACES.split(_NON_ALPHANUM.sub(" ", text.lower()))
    return [t for t in tokens if _VALID.match(t)]


def rouge_l_fmeasure(lcs: int, candidate_len: int, reference_len: int) -> float:
    """rouge_score's ``_score_lcs`` F-measure, with its float operations in its order."""
    if not candidate_len or not reference_len:
        return 0.0
    precision = lcs / candidate_len
    recall = lcs / reference_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def lcs_length(reference_masks: dict[int, int], reference_len: int, candidate: list[int]) -> int:
    """LCS of a reference (given as per-token position bit masks) and a candidate token-id list."""
    full = (1 << reference_len) - 1
    v = full
    for token in candidate:
        mask = reference_masks.get(token)
        if mask:
            u = v & mask
            v = ((v + u) | (v - u)) & full
    return reference_len - v.bit_count()


def _position_masks(ids: list[int]) -> dict[int, int]:
    masks: dict[int, int] = {}
    for position, token in enumerate(ids):
        masks[token] = masks.get(token, 0) | (1 << position)
    return masks


class RougeLIndex:
    """Prompts indexed for "is this candidate within ROUGE-L ``threshold`` of any of them?"."""

    def __init__(self, threshold: float) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"rouge_threshold: expected a number in (0, 1], got {threshold}")
        self.threshold = threshold
        self.texts: list[str] = []
        self._vocab: dict[str, int] = {}
        self._masks: list[dict[int, int]] = []
        self._lengths = array("i")
        self._post_docs: dict[int, array] = {}
        self._post_counts: dict[int, array] = {}
        # Every text as plain words: a copy is a duplicate whatever ROUGE-L says (it scores text
        # without ASCII letters or digits 0, and at threshold 1.0 nothing exceeds the threshold).
        self._plain: set[str] = set()

    def __len__(self) -> int:
        return len(self.texts)

    def _ids(self, text: str, grow: bool) -> list[int]:
        ids = []
        for token in rouge_tokens(text):
            tid = self._vocab.get(token)
            if tid is None:
                if not grow:
                    tid = -1 - len(ids)  # unseen: matches nothing indexed, distinct per position
                else:
                    tid = self._vocab[token] = len(self._vocab)
            ids.append(tid)
        return ids

    def add(self, text: str) -> None:
        self._plain.add(plain_text(text))
        ids = self._ids(text, grow=True)
        doc = len(self.texts)
        self.texts.append(text)
        self._masks.append(_position_masks(ids))
        self._lengths.append(len(ids))
        for tid, count in Counter(ids).items():
            self._post_docs.setdefault(tid, array("i")).append(doc)
            self._post_counts.setdefault(tid, array("i")).append(count)

    def max_similarity(self, text: str, stop_above: float | None = None) -> tuple[float, int | None]:
        """The highest ROUGE-L F of ``text`` against the index and which prompt gave it.

        With ``stop_above``, returns as soon as one exceeds it (what a duplicate check needs).
        Prompts whose bound cannot beat ``stop_above`` (or the best so far) are never scored.
        """
        ids = self._ids(text, grow=False)
        n = len(self.texts)
        if not ids or not n:
            return 0.0, None
        overlap = np.zeros(n, dtype=np.int32)
        for tid, count in Counter(ids).items():
            docs = self._post_docs.get(tid)
            if docs is None:
                continue
            doc_ids = np.frombuffer(docs, dtype=np.int32)
            counts = np.frombuffer(self._post_counts[tid], dtype=np.int32)
            overlap[doc_ids] += np.minimum(counts, count)
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        bound = 2.0 * overlap / (len(ids) + lengths)  # F when the LCS is the whole overlap
        floor = (stop_above if stop_above is not None else 0.0) - _MARGIN
        candidates = np.flatnonzero(bound > floor)
        best, best_doc = 0.0, None
        for doc in candidates[np.argsort(-bound[candidates], kind="stable")].tolist():
            if bound[doc] <= best - _MARGIN:
                break  # sorted: no later prompt can beat the best so far
            lcs = lcs_length(self._masks[doc], int(lengths[doc]), ids)
            score = rouge_l_fmeasure(lcs, len(ids), int(lengths[doc]))
            if score > best:
                best, best_doc = score, doc
                if stop_above is not None and score > stop_above:
                    break
        return best, best_doc

    def is_near_duplicate(self, text: str) -> bool:
        if plain_text(text) in self._plain:
            return True
        return self.max_similarity(text, stop_above=self.threshold)[0] > self.threshold
