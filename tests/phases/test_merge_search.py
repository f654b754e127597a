"""Merge-weight search: the candidates, the plan's parallel jobs, and a real search end to end."""

from __future__ import annotations

import json

import pytest
from conftest import submit_all

from selma_core.config import load_config
from selma_core.errors import ConfigError
from selma_core.phases.merge_search import MergeSearchConfig, candidate_weights
from selma_core.plan import build_plan
from selma_core.skills import load_skills


def test_grid_candidates_start_with_selmas_uniform_weights():
    weights = candidate_weights(MergeSearchConfig(grid_points=3), 2)
    assert weights[0] == [0.5, 0.5]
    assert [0.0, 0.0] not in weights and [1.0, 0.5] in weights and len(weights) == 8  # 3x3 - (0,0)

    with pytest.raises(
        ConfigError, match=r"has 9 candidates \(with SELMA's 1/N\), more than max_candidates 4"
    ):
        candidate_weights(MergeSearchConfig(grid_points=3, max_candidates=4), 2)
    # 1/3 is off a grid of 0, 0.5, 1: 26 grid points and 1/N make 27, none dropped silently.
    assert len(candidate_weights(MergeSearchConfig(grid_points=3, max_candidates=27), 3)) == 27
    with pytest.raises(ConfigError, match="has 27 candidates .* more than max_candidates 26"):
        candidate_weights(MergeSearchConfig(grid_points=3, max_candidates=26), 3)


def test_random_candidates_are_reproducible_and_in_range():
    cfg = MergeSearchConfig(strategy="random", samples=5, low=0.2, high=0.8, seed=7)
    first, second = candidate_weights(cfg, 3), candidate_weights(cfg, 3)
    assert first == second and len(first) == 6
    assert all(0.2 <= w <= 0.8 for vector in first[1:] for w in vector)
    with pytest.raises(ValueError, match=r"samples: 32 random candidates and SELMA's 1/N make 33, more than"):
        MergeSearchConfig(strategy="random", samples=32, max_candidates=32)


def test_the_plan_runs_candidates_in_parallel_before_the_merge(tiny_config):
    cfg = load_config(tiny_config(merge_search={"enabled": True, "grid_points": 2}))
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    candidates = [j for j in plan.jobs.values() if j.phase == "merge-search" and j.shard is not None]
    assert [j.id for j in candidates] == [
        "merge-search#000",
        "merge-search#001",
        "merge-search#002",
        "merge-search#003",
    ]
    assert all(
        set(j.deps) == {"train:counting", "train:spatial", "prompts:counting", "prompts:spatial"}
        for j in candidates
    )
    assert set(plan.job("merge-search").deps) == {j.id for j in candidates}
    assert "merge-search" in plan.job("merge").deps
    fixed = load_config(
        tiny_config(merge_search={"enabled": True}, merge={"weights": {"counting": 1, "spatial": 1}})
    )
    assert (
        "merge-search"
        not in build_plan(fixed, load_skills(fixed.skills_path, fixed.skills)).job("merge").deps
    )


def test_candidates_are_keyed_by_the_search_metric_and_its_model(tiny_config):
    def candidate_keys(**search) -> list[str]:
        cfg = load_config(
            tiny_config(
                merge_search={"enabled": True, "grid_points": 2, **search},
                eval={"pickscore_model": "random:tiny-clip"},
            )
        )
        plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
        return [j.key for j in plan.jobs.values() if j.phase == "merge-search" and j.shard is not None]

    clip = candidate_keys()
    assert candidate_keys(metric="clip_score") == clip  # the default, as keyed before the setting
    pick = candidate_keys(metric="pickscore")
    assert not set(pick) & set(clip)
    with pytest.raises(ConfigError, match="merge_search: metric: unknown 'dsg'; known: clip_score"):
        candidate_keys(metric="dsg")


@pytest.mark.slow
def test_a_search_picks_the_best_weights_and_the_merge_uses_them(tiny_config, tmp_path):
    # Scored with PickScore (a random test model): the metric the search was told to use.
    config = tiny_config(
        merge_search={"enabled": True, "grid_points": 2, "max_prompts_per_skill": 2, "metric": "pickscore"},
        eval={"compare_experts": False, "pickscore_model": "random:tiny-clip"},
    )
    summary, _ = submit_all(config)
    jobs = {j["job"]: j["status"] for j in summary["jobs"]}
    assert {jobs[f"merge-search#{i:03d}"] for i in range(4)} == {"ran"} and jobs["merge-search"] == "ran"

    cfg = load_config(config)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    from selma_core.storage import open_store

    store = open_store(cfg.storage)
    search = json.loads(store.read_output_file(plan.job("merge-search").key, "search.json"))
    assert [c["index"] for c in search["candidates"]] == [0, 1, 2, 3]
    assert search["metric"] == "pickscore" and {c["metric"] for c in search["candidates"]} == {"pickscore"}
    best = max(search["candidates"], key=lambda c: c["mean"])
    assert search["best"] == best and "(best)" in search["table"]
    merge = json.loads(store.read_output_file(plan.job("merge").key, "merge.json"))
    assert {s: e["weight"] for s, e in merge["experts"].items()} == best["weights"]


def test_a_candidate_without_a_finite_score_is_refused_not_silently_ranked(tmp_path):
    """NaN compares false with everything: ranked, a NaN first candidate (SELMA's 1/N) would beat
    every other, and a later one would silently drop out."""
    from types import SimpleNamespace

    from selma_core.errors import InputError
    from selma_core.phases.merge_search import select_best
    from selma_core.storage import LocalArtifactStore

    store = LocalArtifactStore(tmp_path / "store")
    jobs = {}
    for index, mean in enumerate([float("nan"), 32.0, 35.0]):
        key = f"merge-search/candidate-{index:03d}/{index:016x}"
        folder = tmp_path / f"candidate-{index}"
        folder.mkdir()
        scores = {"a": mean, "b": mean}
        candidate = {"index": index, "weights": {"a": 0.5, "b": 0.5}, "scores": scores, "mean": mean}
        (folder / "candidate.json").write_text(json.dumps(candidate))
        store.commit_dir(folder, key)
        jobs[f"merge-search#{index:03d}"] = SimpleNamespace(phase="merge-search", key=key)
    ctx = SimpleNamespace(job=SimpleNamespace(deps=tuple(jobs)), plan=SimpleNamespace(jobs=jobs), store=store)
    with pytest.raises(InputError, match=r"candidate\(s\) \[0\] have no finite mean score"):
        select_best(ctx)


def test_a_score_that_is_not_finite_stops_the_candidate_naming_the_prompt(monkeypatch):
    import selma_core.phases.images as images
    from selma_core.errors import InputError
    from selma_core.phases.evaluate import EvalConfig, draw_and_score

    class HalfPrecisionOverflow:
        def score(self, images, texts):
            return [0.3, float("nan")][: len(texts)]

    monkeypatch.setattr(images, "draw_images", lambda pipe, texts, seeds, cfg, device: [None] * len(texts))
    heldout = {
        "counting": [{"id": "counting-00001", "text": "two cats"}, {"id": "counting-00002", "text": "3 dogs"}]
    }
    with pytest.raises(InputError, match=r"scored nan on skill counting, prompt counting-00002 \('3 dogs'\)"):
        draw_and_score(None, HalfPrecisionOverflow(), heldout, EvalConfig(batch_size=2), "cpu")
