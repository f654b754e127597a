"""Changing only the merge method redoes merge and eval, and SELMA's two ways of combining experts
(one exact merged adapter; the experts side by side with set_adapters) score the same."""

from __future__ import annotations

import json

import pytest
from conftest import submit_all

from selma_core.config import load_config
from selma_core.plan import build_plan
from selma_core.skills import load_skills
from selma_core.storage import open_store

pytestmark = pytest.mark.slow


def jobs_of(config) -> list[dict]:
    return submit_all(config)[0]["jobs"]


def merged_scores(config) -> dict:
    cfg = load_config(config)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    results = json.loads(open_store(cfg.storage).read_output_file(plan.job("eval").key, "results.json"))
    return {
        r["prompt_id"]: r["scores"]["clip_score"] for r in results["per_prompt"] if r["variant"] == "merged"
    }


def test_adapters_side_by_side_score_like_the_exact_merge(tiny_config):
    first = jobs_of(tiny_config(eval={"compare_experts": False}))
    assert {j["status"] for j in first} == {"ran"}
    linear = merged_scores(tiny_config(eval={"compare_experts": False}))

    config = tiny_config(eval={"compare_experts": False}, merge={"method": "adapters"})
    second = {j["job"]: j["status"] for j in jobs_of(config)}
    assert second.pop("merge") == "ran" and second.pop("eval") == "ran"
    assert set(second.values()) == {"skipped"}  # prompts, images and experts are reused
    side_by_side = merged_scores(config)
    assert side_by_side.keys() == linear.keys()
    for prompt_id, score in linear.items():
        assert side_by_side[prompt_id] == pytest.approx(score, abs=0.05)
