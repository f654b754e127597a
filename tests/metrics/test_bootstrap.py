"""Bootstrap intervals, the paired comparison and the per-skill breakdown (selma_core.metrics.bootstrap)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from selma_core.errors import InputError
from selma_core.metrics.bootstrap import (
    Interval,
    PairedComparison,
    bootstrap_ci,
    paired_difference,
    per_skill,
)


def test_same_seed_same_interval_other_seed_other_interval():
    values = np.random.default_rng(1).normal(size=300)
    first = bootstrap_ci(values, seed=7, resamples=2000)
    assert bootstrap_ci(values, seed=7, resamples=2000) == first
    assert bootstrap_ci(values, seed=8, resamples=2000) != first
    assert first.n == 300 and first.confidence == 0.95
    assert first.mean == pytest.approx(values.mean())
    assert first.low < first.mean < first.high


def test_a_mapping_is_read_by_id_not_insertion_order():
    scores = {f"p{i:03d}": float(v) for i, v in enumerate(np.random.default_rng(2).normal(size=50))}
    reversed_scores = dict(reversed(list(scores.items())))
    assert bootstrap_ci(scores, resamples=500) == bootstrap_ci(reversed_scores, resamples=500)


def test_constant_values_give_a_zero_width_interval():
    interval = bootstrap_ci([0.1] * 37)
    assert interval == Interval(mean=0.1, low=0.1, high=0.1, n=37, confidence=0.95)
    assert interval.width == 0.0
    assert bootstrap_ci([3.5]) == Interval(3.5, 3.5, 3.5, 1)


def test_two_point_sample_has_the_known_interval():
    # Resample means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 95% interval is [0, 1],
    # the 40% interval (quantiles 0.3 and 0.7) is [0.5, 0.5].
    assert bootstrap_ci([0.0, 1.0], resamples=4000) == Interval(0.5, 0.0, 1.0, 2)
    narrow = bootstrap_ci([0.0, 1.0], confidence=0.4, resamples=4000)
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_standard_normal_sample_interval_is_the_textbook_one():
    n = 4000
    values = np.random.default_rng(3).standard_normal(n)
    interval = bootstrap_ci(values, resamples=4000)
    assert interval.low < 0.0 < interval.high
    expected_width = 2 * 1.96 / math.sqrt(n)
    assert interval.width == pytest.approx(expected_width, rel=0.1)
    # Roughly symmetric around the mean.
    assert interval.mean - interval.low == pytest.approx(interval.high - interval.mean, rel=0.2)
    # A 99% interval contains the 95% one.
    wider = bootstrap_ci(values, confidence=0.99, resamples=4000)
    assert wider.low < interval.low and wider.high > interval.high


def test_bad_input_is_refused():
    with pytest.raises(InputError, match="no values"):
        bootstrap_ci([])
    with pytest.raises(InputError, match="not finite"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([1.0, 2.0], resamples=0)


def _correlated_pairs(n: int = 200, seed: int = 4) -> tuple[dict[str, float], dict[str, float]]:
    """Scores of two variants on the same prompts: a shared prompt difficulty (sd 5) dominates, the
    variants differ by 0.5 plus a little per-image noise (sd 0.2)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(25.0, 5.0, size=n)
    a = difficulty + 0.5 + rng.normal(0.0, 0.2, size=n)
    b = difficulty + rng.normal(0.0, 0.2, size=n)
    ids = [f"prompt-{i}" for i in range(n)]
    return dict(zip(ids, a.tolist(), strict=True)), dict(zip(ids, b.tolist(), strict=True))


def test_paired_interval_is_much_narrower_than_the_unpaired_one():
    a, b = _correlated_pairs()
    paired = paired_difference(a, b, resamples=3000, permutations=2000)
    assert isinstance(paired, PairedComparison)
    assert paired.n == 200
    assert paired.difference == pytest.approx(paired.mean_a - paired.mean_b)
    assert paired.low < 0.5 < paired.high
    assert paired.low > 0.0  # the pairing finds the 0.5 difference ...
    assert paired.p_value is not None and paired.p_value < 0.01
    assert paired.p_value_method == "monte-carlo"
    ci_a = bootstrap_ci(a, resamples=3000)
    ci_b = bootstrap_ci(b, resamples=3000, seed=1)
    unpaired_width = math.hypot(ci_a.width, ci_b.width)  # independent means: widths add in quadrature
    assert unpaired_width > 1.0  # ... which the unpaired comparison cannot tell from 0
    assert paired.width < unpaired_width / 10


def test_pairs_are_matched_by_prompt_id():
    a, b = _correlated_pairs()
    same = paired_difference(a, dict(reversed(list(b.items()))), resamples=1000, permutations=0)
    assert same == paired_difference(a, b, resamples=1000, permutations=0)
    # Scores attached to the wrong prompts lose the pairing: the interval is as wide as unpaired.
    ids = list(b)
    shuffled = dict(zip(ids, [b[i] for i in np.random.default_rng(5).permutation(ids)], strict=True))
    broken = paired_difference(a, shuffled, resamples=1000, permutations=0)
    assert broken.width > 5 * same.width
    assert same.p_value is None and same.p_value_method is None


def test_paired_interval_is_the_bootstrap_of_the_differences():
    a, b = _correlated_pairs(n=50)
    paired = paired_difference(a, b, resamples=1000, seed=3, permutations=0)
    of_differences = bootstrap_ci({k: a[k] - b[k] for k in a}, resamples=1000, seed=3)
    assert (paired.low, paired.high) == (of_differences.low, of_differences.high)
    assert paired.difference == pytest.approx(of_differences.mean)


def test_sign_flip_p_value_exact_for_small_samples():
    # Five positive differences: only "no flip" and "flip all" are as extreme: p = 2 / 2**5.
    a = {f"p{i}": 1.0 + i for i in range(5)}
    b = {f"p{i}": 0.0 for i in range(5)}
    result = paired_difference(a, b, resamples=500)
    assert result.p_value == pytest.approx(2 / 32)
    assert result.p_value_method == "exact"
    # No difference at all: p = 1.
    assert paired_difference(b, b, resamples=500).p_value == 1.0


def test_sign_flip_p_value_is_large_without_an_effect():
    rng = np.random.default_rng(6)
    ids = [f"p{i}" for i in range(100)]
    a = dict(zip(ids, rng.normal(size=100).tolist(), strict=True))
    b = dict(zip(ids, rng.normal(size=100).tolist(), strict=True))
    result = paired_difference(a, b, resamples=1000, permutations=2000)
    assert 0.05 < result.p_value <= 1.0
    assert result.low < 0.0 < result.high
    assert paired_difference(a, b, resamples=1000, permutations=2000) == result  # deterministic


def test_mismatched_prompt_sets_name_the_missing_ids():
    a = {"p1": 1.0, "p2": 2.0, "p3": 3.0}
    b = {"p1": 1.0, "p2": 2.0, "p4": 4.0}
    with pytest.raises(InputError) as error:
        paired_difference(a, b, labels=("merged", "base"))
    message = str(error.value)
    assert "scored for merged but not base: 'p3'" in message
    assert "scored for base but not merged: 'p4'" in message
    many = {f"q{i:02d}": 0.0 for i in range(30)}
    with pytest.raises(InputError, match=r"30 prompt\(s\).*'q00'.*\(30 in all\)"):
        paired_difference({**a, **many}, a)


def test_per_skill_groups_prompts_and_adds_all():
    scores = {"c1": 1.0, "c2": 3.0, "s1": 10.0, "s2": 10.0, "s3": 10.0}
    skill_of = {"c1": "counting", "c2": "counting", "s1": "spatial", "s2": "spatial", "s3": "spatial"}
    skill_of["unscored"] = "text"  # extra prompts in the mapping are ignored
    table = per_skill(scores, skill_of, resamples=1000)
    assert list(table) == ["counting", "spatial", "all"]
    assert table["counting"].n == 2 and table["counting"].mean == 2.0
    assert table["spatial"] == Interval(10.0, 10.0, 10.0, 3)
    assert table["all"].n == 5 and table["all"].mean == pytest.approx(34.0 / 5)
    assert table["counting"] == bootstrap_ci([1.0, 3.0], resamples=1000)
    report = json.loads(json.dumps({k: v.to_dict() for k, v in table.items()}))
    assert report["spatial"] == {"mean": 10.0, "low": 10.0, "high": 10.0, "n": 3, "confidence": 0.95}


def test_per_skill_refuses_prompts_without_a_skill_and_a_skill_called_all():
    with pytest.raises(InputError, match="have no skill: 'p2'"):
        per_skill({"p1": 1.0, "p2": 2.0}, {"p1": "counting"})
    with pytest.raises(InputError, match="'all'"):
        per_skill({"p1": 1.0}, {"p1": "all"})


def test_paired_comparison_to_dict_is_json():
    a, b = _correlated_pairs(n=20)
    data = json.loads(json.dumps(paired_difference(a, b, resamples=500).to_dict()))
    assert set(data) == {
        "mean_a",
        "mean_b",
        "difference",
        "low",
        "high",
        "n",
        "p_value",
        "confidence",
        "p_value_method",
    }
