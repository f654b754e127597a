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


def test_only_the_prompt_backend_in_use_is_part_of_the_key(tiny_config):
    """Settings of a backend the prompts job does not use redo nothing; the one in use does. Keys of
    configs that leave the unused backends alone stay what they were before this rule."""
    from selma_core.typed_yaml import output_dict

    other_backends = {
        "openai": {"model": "gpt-x", "base_url": "http://llm:8000/v1"},
        "transformers": {"model": "x/lm"},
    }
    offline = keys(tiny_config())
    assert changed(offline, keys(tiny_config(prompts=other_backends))) == set()
    on_openai = keys(tiny_config(prompts={"backend": "openai"}))
    assert changed(offline, on_openai) == ALL
    assert (
        changed(
            on_openai, keys(tiny_config(prompts={"backend": "openai", "transformers": {"model": "x/lm"}}))
        )
        == set()
    )
    assert (
        changed(on_openai, keys(tiny_config(prompts={"backend": "openai", "openai": {"model": "gpt-x"}})))
        == ALL
    )
    cfg = load_config(tiny_config(prompts={"backend": "openai", "openai": {"model": "gpt-x"}}))
    assert output_dict(cfg.prompts.keyed()) == output_dict(cfg.prompts)  # what keys hashed until now


ON_OPENAI = {"backend": "openai"}


@pytest.mark.parametrize(
    "before, after",
    [
        # The name of the variable the key is read from: not what the LLM writes.
        ({"prompts": ON_OPENAI}, {"prompts": {**ON_OPENAI, "openai": {"api_key_env": "MY_KEY"}}}),
        # The contamination threshold with no benchmark to compare against.
        ({}, {"prompts": {"contamination": {"rouge_threshold": 0.5}}}),
        # The uniform-image threshold with the filter off.
        ({}, {"images": {"uniform_threshold": 5.0}}),
        # Merge settings that SELMA's linear merge (exact export) never reads.
        ({}, {"merge": {"density": 0.9, "majority_sign_method": "frequency", "seed": 7, "export_rank": 8}}),
        # ties is not random, and reads no seed.
        ({"merge": {"method": "ties"}}, {"merge": {"method": "ties", "seed": 7}}),
        # The models eval compares by default, written out: the same evaluation.
        ({}, {"eval": {"models": ["base", "expert:counting", "expert:spatial", "merged"]}}),
        ({"eval": {"compare_experts": False}}, {"eval": {"models": ["base", "merged"]}}),
        # compare_experts only shapes the default list: with models given, nothing reads it.
        (
            {"eval": {"models": ["base", "merged", "expert:spatial"]}},
            {"eval": {"models": ["base", "merged", "expert:spatial"], "compare_experts": False}},
        ),
    ],
    ids=[
        "api-key-env",
        "contamination-threshold",
        "uniform-threshold-filter-off",
        "linear-merge",
        "ties-seed",
        "eval-default-models-written-out",
        "eval-default-models-without-experts",
        "eval-compare-experts-with-models",
    ],
)
def test_settings_nothing_reads_in_this_configuration_redo_nothing(tiny_config, before, after):
    assert changed(keys(tiny_config(**before)), keys(tiny_config(**after))) == set()


@pytest.mark.parametrize(
    "before, after, invalidated",
    [
        (
            {"images": {"filter_uniform": True}},
            {"images": {"filter_uniform": True, "uniform_threshold": 5.0}},
            ALL - {"prompts:counting", "prompts:spatial"},
        ),
        ({"merge": {"method": "ties"}}, {"merge": {"method": "ties", "density": 0.9}}, {"merge", "eval"}),
        (
            {"merge": {"method": "dare_ties"}},
            {"merge": {"method": "dare_ties", "seed": 7}},
            {"merge", "eval"},
        ),
        (
            {"merge": {"export": "svd", "export_rank": 4}},
            {"merge": {"export": "svd", "export_rank": 8}},
            {"merge", "eval"},
        ),
        ({}, {"eval": {"compare_experts": False}}, {"eval"}),
        # Another order is another report (and another baseline when base is not first).
        ({}, {"eval": {"models": ["merged", "base", "expert:counting", "expert:spatial"]}}, {"eval"}),
    ],
    ids=[
        "uniform-threshold-filter-on",
        "ties-density",
        "dare-seed",
        "svd-rank",
        "compare-experts",
        "models-order",
    ],
)
def test_the_same_settings_where_they_are_read_redo_their_downstream(tiny_config, before, after, invalidated):
    assert changed(keys(tiny_config(**before)), keys(tiny_config(**after))) == invalidated


def test_a_tifa_question_file_without_a_hash_is_keyed_by_its_content(tiny_config, tmp_path):
    """The registry pins no hash for TIFA v1.0: a corrected copy at the same path is scored again."""
    questions = tmp_path / "tifa.json"
    questions.write_text("[]")
    tifa = {"eval": {"benchmark": "tifa", "tifa_questions": str(questions)}}
    first = keys(tiny_config(**tifa))
    assert changed(first, keys(tiny_config(**tifa))) == set()
    questions.write_text('[{"id": "x"}]')
    assert changed(first, keys(tiny_config(**tifa))) == {"eval"}
    # On Kubernetes the path may be one only the pods see: keyed by the path, wherever planned.
    on_kubernetes = {**tifa, "executor": {"kind": "kubernetes"}}
    seen = keys(tiny_config(**on_kubernetes))
    questions.unlink()  # as the controller sees it
    assert changed(seen, keys(tiny_config(**on_kubernetes))) == set()
    # With a hash given, the job checks the file against it: the hash is the key.
    pinned = {"eval": {**tifa["eval"], "tifa_questions_sha256": "ab" * 32}}
    first = keys(tiny_config(**pinned))
    questions.write_text("[]")
    assert changed(first, keys(tiny_config(**pinned))) == set()


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


# -- skills trained on an external dataset ---------------------------------------------------------


def dataset_skills(tmp_path, **dataset) -> tuple:
    """A skills folder: the shipped ones plus ``mine``, an imagefolder dataset in skills/data/mine."""
    import io
    import json
    import shutil

    import yaml
    from conftest import REPO
    from PIL import Image

    skills = tmp_path / "skills"
    if not skills.exists():
        shutil.copytree(REPO / "skills", skills)
    data = skills / "data" / "mine"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(6):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(buffer, "PNG")
        (data / f"{i}.png").write_bytes(buffer.getvalue())
        rows.append({"file_name": f"{i}.png", "text": f"a photo of {i} red cups"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"uri": "data/mine", **dataset}
    (skills / "mine.yaml").write_text(yaml.safe_dump({"name": "mine", "description": "d", "dataset": spec}))
    return skills, data


def plan_of(config_path):
    cfg = load_config(config_path)
    return build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))


def test_a_dataset_skill_has_only_a_train_job(tiny_config, tmp_path):
    skills, _ = dataset_skills(tmp_path)
    plan = plan_of(tiny_config(skills=["counting", "mine"], skills_dir=str(skills)))
    assert {j for j in plan.jobs if j.endswith(":mine")} == {"train:mine"}
    assert plan.jobs["train:mine"].deps == ()
    assert plan.jobs["train:mine"].key.startswith("experts/mine/")
    assert "prompts:counting" in plan.jobs["eval"].deps and "prompts:mine" not in plan.jobs["eval"].deps
    assert set(plan.datasets) == {"mine"} and plan.datasets["mine"].layout == "imagefolder"
    # the generated skill's jobs are keyed as without a dataset skill beside it
    alone = plan_of(tiny_config(skills=["counting"]))
    for job in ("prompts:counting", "images:counting", "train:counting"):
        assert plan.jobs[job].key == alone.jobs[job].key


def test_changed_data_gives_a_new_expert(tiny_config, tmp_path):
    from PIL import Image

    skills, data = dataset_skills(tmp_path)
    config = tiny_config(skills=["counting", "mine"], skills_dir=str(skills))
    before = keys(config)
    assert keys(config) == before  # stable while the data is unchanged
    Image.new("RGB", (8, 8), (1, 2, 3)).save(data / "3.png")
    after_image = keys(config)
    assert changed(before, after_image) == {"train:mine", "merge", "eval"}
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text().replace("3 red", "three red"))
    assert changed(after_image, keys(config)) == {"train:mine", "merge", "eval"}


def test_dataset_settings_and_place(tiny_config, tmp_path):
    import shutil

    skills, data = dataset_skills(tmp_path)
    config = tiny_config(skills=["counting", "mine"], skills_dir=str(skills))
    before = keys(config)
    dataset_skills(tmp_path, heldout=2)  # another split: another expert and other eval prompts
    assert changed(before, keys(config)) == {"train:mine", "merge", "eval"}
    # the same data elsewhere (an absolute path now): the same expert
    dataset_skills(tmp_path)
    shutil.copytree(data, tmp_path / "elsewhere")
    dataset_skills(tmp_path, uri=str(tmp_path / "elsewhere"))
    assert keys(config) == before


def test_phases_a_dataset_skill_lacks_are_named(tiny_config, tmp_path):
    from selma_core.errors import InputError
    from selma_core.plan import missing_input_message

    skills, _ = dataset_skills(tmp_path)
    plan = plan_of(tiny_config(skills=["counting", "mine"], skills_dir=str(skills)))
    for phase in ("prompts", "images"):
        with pytest.raises(KeyError) as info:
            plan.job(phase, "mine")
        assert isinstance(info.value, InputError)  # exit 2 inside a job
        assert str(info.value) == (
            f"skill 'mine' uses an external dataset (data/mine): it has no {phase} job; its train job "
            "reads the dataset (--phase train --skill mine)"
        )
        assert plan.select(phase, ["mine"]) == [] and plan.unselectable(phase, ["mine"]) == ["mine"]
    assert plan.unselectable("train", ["mine"]) == []
    assert [j.id for j in plan.select("images", ["counting", "mine"])] == ["images:counting"]
    assert "uses an external dataset" in missing_input_message("eval", "prompts:mine", plan)
    assert "--phase prompts --skill counting" in missing_input_message("eval", "prompts:counting", plan)


def test_merge_search_candidates_hash_the_heldout_captions(tiny_config, tmp_path):
    skills, data = dataset_skills(tmp_path)
    config = tiny_config(skills=["counting", "mine"], skills_dir=str(skills), merge_search={"enabled": True})
    before = keys(config)
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text().replace("a photo", "an image"))
    redone = changed(before, keys(config))
    assert {"merge-search#000", "merge-search", "merge", "eval", "train:mine"} <= redone
