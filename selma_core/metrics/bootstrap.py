"""Confidence intervals and paired comparisons for evaluation reports.

Why: an eval table of per-skill means (CLIPScore, TIFA, DSG) says nothing about whether "merged
beats base by 0.8" is more than the luck of a few hundred held-out prompts. These functions put an
interval on every mean and on every difference, without assuming the scores are normal (TIFA and
DSG prompt scores are fractions of a handful of questions: lumpy and bounded).

- ``bootstrap_ci``: the percentile bootstrap of the mean (Efron & Tibshirani 1993, ch. 13): draw
  ``resamples`` samples of size n with replacement, take each one's mean, report the
  ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those means.
- ``paired_difference``: eval draws every variant's image for a prompt with the same seed, so two
  variants' scores on one prompt are paired. Resampling the per-prompt *differences* keeps that
  pairing: the prompt-to-prompt variation (easy vs hard prompts), common to both variants, cancels,
  and the interval is much narrower than one from resampling each variant on its own. Inputs are
  keyed by prompt id, so pairs are matched by id (never by position) and a prompt missing on one
  side is an ``InputError`` naming it. The two-sided p-value is a sign-flip permutation test of
  "the differences are symmetric about 0": exact (all 2^n sign patterns) when 2^n is at most
  ``permutations``, else Monte Carlo with ``(1 + hits) / (1 + permutations)`` (never 0).
- ``per_skill``: one interval per skill plus ``"all"`` (every prompt pooled).

Everything is deterministic for a ``seed`` (numpy ``default_rng``; values are ordered by prompt id
first, so a dict's insertion order does not matter) and vectorised: resamples are drawn as index
matrices in blocks of about ``_BLOCK_ELEMENTS`` entries (bounded memory, no Python loop per
resample). Scores stay in the metric's own units (CLIPScore 0-100, TIFA 0-1); nothing is rescaled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from selma_core.errors import InputError

__all__ = ["Interval", "PairedComparison", "bootstrap_ci", "paired_difference", "per_skill"]

ALL = "all"
# Index entries drawn per block (about 16 MB of int64): bounds memory for large n x resamples.
_BLOCK_ELEMENTS = 1 << 21
# How many ids an error message lists before "... (N in all)".
_SHOW_IDS = 10


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap confidence interval ``[low, high]``, over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def width(self) -> float:
        return self.high - self.low

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """``a`` vs ``b`` on the same ``n`` prompts: ``difference`` = mean of (a - b), with its interval.

    ``p_value``: two-sided sign-flip test of "no difference" (None when not computed);
    ``p_value_method``: ``"exact"`` or ``"monte-carlo"`` (None with it).
    """

    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    n: int
    p_value: float | None = None
    confidence: float = 0.95
    p_value_method: str | None = None

    @property
    def width(self) -> float:
        return self.high - self.low

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_settings(confidence: float, resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a number strictly between 0 and 1, got {confidence!r}")
    if int(resamples) != resamples or resamples < 1:
        raise ValueError(f"resamples: expected an integer >= 1, got {resamples!r}")


def _as_array(values: Iterable[float] | Mapping[str, float], what: str) -> np.ndarray:
    """Finite float64 values; a mapping is read in sorted-key order (insertion order never matters)."""
    if isinstance(values, Mapping):
        values = [values[k] for k in sorted(values)]
    try:
        array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: expected numbers: {e}") from e
    if array.ndim != 1:
        raise InputError(f"{what}: expected a flat sequence of numbers, got shape {array.shape}")
    if array.size == 0:
        raise InputError(f"{what}: no values")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise InputError(f"{what}: value {array[bad[0]]!r} at position {int(bad[0])} is not finite")
    return array


def _ids(ids: Iterable[str]) -> str:
    listed = sorted(ids)
    text = ", ".join(repr(i) for i in listed[:_SHOW_IDS])
    return text + (f", ... ({len(listed)} in all)" if len(listed) > _SHOW_IDS else "")


def _finite_by_id(scores: Mapping[str, float], what: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in scores.items():
        try:
            number = float(value)
        except (TypeError, ValueError) as e:
            raise InputError(f"{what}: prompt {key!r}: score {value!r} is not a number") from e
        if not math.isfinite(number):
            raise InputError(f"{what}: prompt {key!r}: score {value!r} is not finite")
        out[key] = number
    if not out:
        raise InputError(f"{what}: no scores")
    return out


def _bootstrap_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` means of size-n resamples with replacement, drawn in blocks of index rows."""
    n = values.size
    rows = max(1, _BLOCK_ELEMENTS // n)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, rows):
        stop = min(start + rows, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def _percentile_interval(
    values: np.ndarray, confidence: float, resamples: int, seed: int
) -> tuple[float, float, float]:
    if np.all(values == values[0]):
        # Every resample is the same sample: the mean and interval are that value exactly (a float
        # sum would be off by rounding: 37 x 0.1 / 37 is 0.10000000000000002).
        point = float(values[0])
        return point, point, point
    mean = float(values.mean())
    means = _bootstrap_means(values, resamples, np.random.default_rng(seed))
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return mean, float(low), float(high)


def bootstrap_ci(
    values: Iterable[float] | Mapping[str, float],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` with its percentile-bootstrap ``confidence`` interval.

    ``values``: numbers, or ``{prompt id: score}`` (read in sorted-id order). The same values and
    seed give the same interval. A single value, or all-equal values, give a zero-width interval.
    Non-finite or no values are an ``InputError``.
    """
    _check_settings(confidence, resamples)
    array = _as_array(values, "bootstrap_ci")
    mean, low, high = _percentile_interval(array, confidence, resamples, seed)
    return Interval(mean=mean, low=low, high=high, n=int(array.size), confidence=confidence)


def _sign_flip_p_value(differences: np.ndarray, permutations: int, seed: int) -> tuple[float, str]:
    """Two-sided p-value of "differences symmetric about 0": |mean| under random sign flips."""
    n = differences.size
    observed = abs(float(differences.mean()))
    # Means computed in another order differ from ``observed`` by rounding: count those as ties.
    threshold = observed - 1e-9 * float(np.abs(differences).mean())
    if n < 63 and 2**n <= permutations:  # every sign pattern: exact
        patterns = np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64) & 1
        flipped = (1 - 2 * patterns).astype(np.float64) @ differences / n
        return float(np.count_nonzero(np.abs(flipped) >= threshold) / 2**n), "exact"
    rng = np.random.default_rng([seed, 1])  # a stream apart from the bootstrap's
    rows = max(1, _BLOCK_ELEMENTS // n)
    hits = 0
    for start in range(0, permutations, rows):
        count = min(rows, permutations - start)
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(count, n), dtype=np.int8)
        hits += int(np.count_nonzero(np.abs(signs @ differences / n) >= threshold))
    return (1 + hits) / (1 + permutations), "monte-carlo"


def paired_difference(
    a: Mapping[str, float],
    b: Mapping[str, float],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    permutations: int = 10_000,
    labels: tuple[str, str] = ("a", "b"),
) -> PairedComparison:
    """``a`` minus ``b`` on the same prompts (``{prompt id: score}`` each), by the paired bootstrap.

    The interval is ``bootstrap_ci`` of the per-prompt differences ``a[id] - b[id]`` (same seed,
    same interval). ``permutations``: sign-flip draws for the p-value (0: no p-value). Both sides
    must score exactly the same prompt ids; otherwise an ``InputError`` names the missing ids
    (``labels`` name the sides in it, e.g. ``("merged", "base")``).
    """
    _check_settings(confidence, resamples)
    if int(permutations) != permutations or permutations < 0:
        raise ValueError(f"permutations: expected an integer >= 0, got {permutations!r}")
    name_a, name_b = labels
    scores_a = _finite_by_id(a, f"paired_difference ({name_a})")
    scores_b = _finite_by_id(b, f"paired_difference ({name_b})")
    only_a = scores_a.keys() - scores_b.keys()
    only_b = scores_b.keys() - scores_a.keys()
    if only_a or only_b:
        problems = []
        if only_a:
            problems.append(f"{len(only_a)} prompt(s) scored for {name_a} but not {name_b}: {_ids(only_a)}")
        if only_b:
            problems.append(f"{len(only_b)} prompt(s) scored for {name_b} but not {name_a}: {_ids(only_b)}")
        raise InputError(f"paired_difference: the prompt sets differ: {'; '.join(problems)}")
    ids = sorted(scores_a)
    values_a = np.array([scores_a[i] for i in ids])
    values_b = np.array([scores_b[i] for i in ids])
    differences = values_a - values_b
    difference, low, high = _percentile_interval(differences, confidence, resamples, seed)
    p_value, method = None, None
    if permutations:
        if np.all(differences == 0.0):
            p_value, method = 1.0, "exact"
        else:
            p_value, method = _sign_flip_p_value(differences, int(permutations), seed)
    return PairedComparison(
        mean_a=float(values_a.mean()),
        mean_b=float(values_b.mean()),
        difference=difference,
        low=low,
        high=high,
        n=len(ids),
        p_value=p_value,
        confidence=confidence,
        p_value_method=method,
    )


def per_skill(
    scores: Mapping[str, float],
    skill_of: Mapping[str, str],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Interval]:
    """``{skill: Interval}`` for the prompts of each skill, sorted by skill, then ``"all"`` (pooled).

    ``skill_of`` maps prompt id to skill; it may name more prompts than ``scores`` (those are
    ignored), but every scored prompt needs a skill (else an ``InputError`` naming them). A skill
    called ``"all"`` is an error: it would collide with the pooled row. Every group uses ``seed``.
    """
    _check_settings(confidence, resamples)
    checked = _finite_by_id(scores, "per_skill")
    unassigned = [i for i in checked if i not in skill_of]
    if unassigned:
        raise InputError(f"per_skill: {len(unassigned)} scored prompt(s) have no skill: {_ids(unassigned)}")
    groups: dict[str, dict[str, float]] = {}
    for prompt_id, value in checked.items():
        groups.setdefault(skill_of[prompt_id], {})[prompt_id] = value
    if ALL in groups:
        raise InputError(f"per_skill: a skill may not be called {ALL!r} (the pooled row's name)")
    result = {skill: bootstrap_ci(groups[skill], confidence, resamples, seed) for skill in sorted(groups)}
    result[ALL] = bootstrap_ci(checked, confidence, resamples, seed)
    return result
