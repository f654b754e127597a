"""Per-skill means with confidence intervals, and paired differences against the base model.

``summarize(rows, ...)`` turns per-prompt rows (one per variant and prompt, with a ``scores``
mapping) into the two tables an eval report shows:

- ``summary[metric][skill][variant]``: the mean and its bootstrap interval (``Interval.to_dict``),
  per skill and ``"all"`` (every prompt pooled);
- ``paired[metric][skill][variant]``: ``variant - baseline`` on the same prompts (eval draws every
  variant's image for a prompt with the same seed), its paired-bootstrap interval and sign-flip
  p-value (``PairedComparison.to_dict`` plus ``baseline``).

A metric missing on some rows (say computed for one variant only) is summarised where it exists
and compared only where both sides have it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from selma_core.metrics.bootstrap import ALL, bootstrap_ci, paired_difference

__all__ = ["summarize"]


def summarize(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    skills: Sequence[str],
    variants: Sequence[str],
    baseline: str | None = "base",
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[dict, dict]:
    """``(summary, paired)`` as described in the module docstring."""
    scores: dict[tuple[str, str], dict[str, dict[str, float]]] = {}  # (metric, variant) -> skill -> id -> x
    for row in rows:
        for metric, value in row["scores"].items():
            if value is not None:
                by_skill = scores.setdefault((metric, row["variant"]), {})
                by_skill.setdefault(row["skill"], {})[row["prompt_id"]] = float(value)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    paired: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in metrics:
        summary[metric] = {}
        paired[metric] = {}
        for skill in [*skills, ALL]:
            summary[metric][skill] = {}
            paired[metric][skill] = {}
            for variant in variants:
                values = _values(scores.get((metric, variant), {}), skill)
                if values:
                    summary[metric][skill][variant] = bootstrap_ci(
                        values, confidence, resamples, seed
                    ).to_dict()
            if baseline is None:
                continue
            base = _values(scores.get((metric, baseline), {}), skill)
            for variant in variants:
                if variant == baseline:
                    continue
                other = _values(scores.get((metric, variant), {}), skill)
                shared = other.keys() & base.keys()
                if not shared:
                    continue
                comparison = paired_difference(
                    {i: other[i] for i in shared},
                    {i: base[i] for i in shared},
                    confidence,
                    resamples,
                    seed,
                    labels=(variant, baseline),
                )
                paired[metric][skill][variant] = {"baseline": baseline, **comparison.to_dict()}
    return summary, paired


def _values(by_skill: dict[str, dict[str, float]], skill: str) -> dict[str, float]:
    if skill == ALL:
        return {i: v for group in by_skill.values() for i, v in group.items()}
    return dict(by_skill.get(skill, {}))
