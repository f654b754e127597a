"""Content-addressed keys: a change invalidates exactly its downstream; execution-only settings nothing."""

from __future__ import annotations

import pytest

from selma_core.config import load_config
from selma_core.plan import build_plan
from selma_core.skills import load_skills


def keys(config_path) -> dict[str, str]:
    cfg = load_config(config_path)
    return {
        job.id: job.key for job in build_plan(cfg, load_skills(cfg.skills_path, cfg.skills)).jobs.values()
    }


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {job for job in before if before[job] != after[job]}


ALL = {f"{p}:{s}" for p in ("prompts", "images", "train") for s in ("counting", "spatial")} | {
    "merge",
    "eval",
}


@pytest.mark.parametrize(
    "override, invalidated",
    [
        ({"train": {"steps": 9}}, {"train:counting", "train:spatial", "merge", "eval"}),
        ({"merge": {"weights": {"counting": 0.7, "spatial": 0.3}}}, {"merge", "eval"}),
        ({"eval": {"num_inference_steps": 3}}, {"eval"}),
        ({"images": {"guidance_scale": 5.0}}, ALL - {"prompts:counting", "prompts:spatial"}),
        ({"prompts": {"num_prompts": 13}}, ALL),
        ({"generator_model": "random:tiny-sd-v"}, ALL - {"prompts:counting", "prompts:spatial"}),
        (
            # the generator defaults to the base model, so the images change too
            {"base_model": "random:tiny-sd-v"},
            ALL - {"prompts:counting", "prompts:spatial"},
        ),
        (
            {"base_model": "random:tiny-sd-v", "generator_model": "random:tiny-sd"},
            {"train:counting", "train:spatial", "merge", "eval"},
        ),
    ],
)
def test_a_change_invalidates_exactly_its_downstream(tiny_config, override, invalidated):
    base = keys(tiny_config())
    assert changed(base, keys(tiny_config(**override))) == invalidated


@pytest.mark.parametrize(
    "override",
    [
        {"images": {"batch_size": 3}},
        {"eval": {"batch_size": 2}},
        {"train": {"log_every": 1}},
        {"prompts": {"max_requests": 7, "openai": {"timeout_s": 5.0, "max_retries": 1}}},
        {"executor": {"max_parallel": 1}},
    ],
)
def test_execution_only_settings_redo_nothing(tiny_config, override):
    assert changed(keys(tiny_config()), keys(tiny_config(**override))) == set()


def test_a_skill_edit_invalidates_only_that_skill(tiny_config, tmp_path):
    import shutil

    from conftest import REPO

    skills = tmp_path / "skills"
    shutil.copytree(REPO / "skills", skills)
    base = keys(tiny_config(skills_dir=str(skills)))
    path = skills / "spatial.yaml"
    path.write_text(
        path.read_text().replace("a red ball to the left of a blue box", "a red ball left of a box")
    )
    assert changed(base, keys(tiny_config(skills_dir=str(skills)))) == {
        "prompts:spatial",
        "images:spatial",
        "train:spatial",
        "merge",
        "eval",
    }


def test_keys_are_stable_and_name_their_phase(tiny_config):
    first, second = keys(tiny_config()), keys(tiny_config())
    assert first == second
    assert first["train:counting"].startswith("experts/counting/") and first["merge"].startswith("merged/")
