"""The eval phase on benchmarks, with random test models (their scores test plumbing, not accuracy):
DSG-1k and TIFA items drawn, questions answered by a VQA model, scored by the benchmark's own rule,
summarised with intervals, reported; and a second evaluation that calls no model at all."""

from __future__ import annotations

import json
import re

import pytest
from conftest import BENCHMARKS, needs_benchmarks

from jobs import run as job_run
from selma_core.config import load_config
from selma_core.errors import ConfigError
from selma_core.metrics.dsg import load_annotations, normalize_answer, score_dsg
from selma_core.phases.evaluate import EvalConfig, eval_variants, variant_slug
from selma_core.plan import build_plan
from selma_core.skills import load_skills
from selma_core.storage import open_store

DSG = BENCHMARKS / "dsg" / "dsg-1k-anns.csv"
TIFA_SAMPLE = BENCHMARKS / "tifa" / "sample_question_answers.json"


def plan_of(config):
    cfg = load_config(config)
    return cfg, build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))


def test_default_variants_are_base_each_expert_and_merged():
    assert eval_variants(EvalConfig(), ["counting", "spatial"]) == [
        "base",
        "expert:counting",
        "expert:spatial",
        "merged",
    ]
    assert eval_variants(EvalConfig(compare_experts=False), ["counting"]) == ["base", "merged"]
    assert eval_variants(EvalConfig(models=["merged", "models:/m/3"]), ["a"]) == ["merged", "models:/m/3"]
    with pytest.raises(ConfigError, match="expert:nope: no such skill"):
        eval_variants(EvalConfig(models=["expert:nope"]), ["counting"])
    with pytest.raises(ConfigError, match="resolves it to a version"):
        eval_variants(EvalConfig(models=["models:/m@champion"]), ["counting"])
    assert variant_slug("expert:counting") == "expert_counting"
    assert variant_slug("models:/selma/3") == "registry_selma_3"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"metrics": ["clip_score", "fid"]}, "unknown 'fid'"),
        ({"metrics": ["clip_score", "clip_score"]}, "each metric once"),
        ({"models": ["best-one"]}, "is not base, merged"),
        ({"models": []}, "distinct models"),
        ({"confidence": 1.5}, "between 0 and 1"),
        ({"bootstrap_resamples": 5}, ">= 100"),
    ],
)
def test_bad_eval_settings_are_refused_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**settings)


def test_prompt_ids_that_differ_only_in_unsafe_characters_get_their_own_image_files():
    from selma_core.phases.evaluate import _file_safe

    assert _file_safe("tifa160_1") == "tifa160_1" and _file_safe("counting-00012") == "counting-00012"
    names = {_file_safe(i) for i in ("tifa160_1", "tifa160 1", "tifa160/1", "tifa160:1")}
    assert len(names) == 4 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)


def test_eval_depends_only_on_what_it_compares(tiny_config):
    _, plan = plan_of(tiny_config())
    assert set(plan.job("eval").deps) == {
        "merge",
        "train:counting",
        "train:spatial",
        "prompts:counting",
        "prompts:spatial",
    }
    _, plan = plan_of(tiny_config(eval={"benchmark": "dsg1k", "models": ["base"]}))
    assert plan.job("eval").deps == ()
    _, plan = plan_of(tiny_config(eval={"benchmark": "dsg1k", "models": ["base", "expert:spatial"]}))
    assert plan.job("eval").deps == ("train:spatial",)


def benchmark_config(tiny_config, **eval_settings):
    return tiny_config(
        eval={
            "clip_model": "random:tiny-clip",
            "num_inference_steps": 1,
            "height": 32,
            "width": 32,
            "models": ["base"],
            "vqa_model": "random:tiny-blip2",
            "dsg_annotations": str(DSG),
            "max_prompts_per_skill": 1,
            "bootstrap_resamples": 200,
            "report_samples_per_skill": 1,
            **eval_settings,
        }
    )


def run_eval(config) -> dict:
    assert job_run.main(["--phase", "eval", "--config", str(config)]) == 0
    cfg, plan = plan_of(config)
    store = open_store(cfg.storage)
    return json.loads(store.read_output_file(plan.job("eval").key, "results.json"))


@needs_benchmarks
def test_dsg1k_scores_with_the_dsg_rule_and_a_rerun_calls_no_model(tiny_config, monkeypatch):
    first = run_eval(benchmark_config(tiny_config, benchmark="dsg1k"))
    assert first["benchmark"] == "dsg1k"
    # one item per DSG category, in upstream's order, each mapped to the SELMA skill it measures
    assert first["skills"] == [
        "tifa",
        "paragraph",
        "relation",
        "count",
        "real_user",
        "pose",
        "defying",
        "text",
    ]
    assert first["skill_of_group"]["count"] == "counting" and first["skill_of_group"]["pose"] is None
    assert list(first["metrics"]) == ["dsg", "clip_score"]
    assert first["metrics"]["dsg"]["convention"] == "dsg-official"
    rows = first["per_prompt"]
    assert len(rows) == 8 and all(0.0 <= r["scores"]["dsg"] <= 1.0 for r in rows)
    # the per-category figure is DSG's own rule applied to the VQA model's answers
    figures = first["benchmark_scores"]["base"]
    assert figures["convention"] == "dsg-official" and figures["categories"]["all"]["items"] == 8
    for skill in first["skills"]:
        interval = first["summary"]["dsg"][skill]["base"]
        assert interval["n"] == 1 and interval["low"] <= interval["mean"] <= interval["high"]
        assert round(100 * interval["mean"], 1) == figures["categories"][skill]["score"]

    # Another aggregation (SELMA's convention) is another output: nothing is drawn or asked again.
    def no_model(*args, **kwargs):
        raise AssertionError("a model was called although every answer and image is cached")

    monkeypatch.setattr("selma_core.metrics.vqa._GenerativeVqa._generate", no_model)
    monkeypatch.setattr("selma_core.metrics.clip_score.ClipScorer.score", no_model)
    monkeypatch.setattr("selma_core.phases.evaluate.LazyPipeline.get", no_model)
    second = run_eval(benchmark_config(tiny_config, benchmark="dsg1k", dsg_convention="selma"))
    assert second["cache"] == {"images_cached": 8, "images_drawn": 0}
    assert second["benchmark_scores"]["base"]["convention"] == "selma"
    # The tables average items; SELMA's own (pooled) figures are benchmark_scores: labelled so.
    assert second["metrics"]["dsg"]["label"] == "DSG (selma zeroing, mean of items)"
    assert [r["scores"]["clip_score"] for r in second["per_prompt"]] == [
        r["scores"]["clip_score"] for r in rows
    ]
    # the VQA answers are in the results: DSG's rule applied to them by hand gives the figures
    items = {i: item for i, item in load_annotations(DSG).items() if i in {r["prompt_id"] for r in rows}}
    answers = {
        (r["prompt_id"], int(qid)): normalize_answer(a)
        for r in second["per_prompt"]
        for qid, a in r["answers"].items()
    }
    assert answers == {
        (r["prompt_id"], int(qid)): normalize_answer(a) for r in rows for qid, a in r["answers"].items()
    }
    by_hand = score_dsg(items, answers, convention="selma")
    assert second["benchmark_scores"]["base"]["categories"] == by_hand.to_json()["categories"]
    assert {r["prompt_id"]: r["scores"]["dsg"] for r in second["per_prompt"]} == by_hand.item_scores
    cfg, plan = plan_of(benchmark_config(tiny_config, benchmark="dsg1k", dsg_convention="selma"))
    outputs = open_store(cfg.storage).fetch_dir(plan.job("eval").key, cfg.cache_dir)
    assert (outputs / "report.html").is_file() and (outputs / "results.md").is_file()
    assert all((outputs / r["image"]).is_file() for r in second["per_prompt"])


@needs_benchmarks
def test_tifa_scores_multiple_choice_answers_per_prompt(tiny_config):
    results = run_eval(
        benchmark_config(
            tiny_config,
            benchmark="tifa",
            tifa_questions=str(TIFA_SAMPLE),
            tifa_embedding_model="random:tiny-lm",
            max_prompts_per_skill=None,
        )
    )
    assert results["benchmark"] == "tifa" and list(results["metrics"]) == ["tifa", "clip_score"]
    figures = results["benchmark_scores"]["base"]
    questions = json.loads(TIFA_SAMPLE.read_text())
    assert figures["prompts"] == len({q["id"] for q in questions}) and figures["questions"] == len(questions)
    assert 0.0 <= figures["tifa_average"] <= 1.0 and set(figures["accuracy_by_type"]) == {
        q["element_type"] for q in questions
    }
    per_prompt = {r["prompt_id"]: r["scores"]["tifa"] for r in results["per_prompt"]}
    mean = sum(per_prompt.values()) / len(per_prompt)
    assert mean == pytest.approx(figures["tifa_average"])


@needs_benchmarks
def test_every_image_text_metric_runs_through_the_phase(tiny_config, tmp_path):
    results = run_eval(
        benchmark_config(
            tiny_config,
            benchmark="dsg1k",
            metrics=["clip_score", "pickscore", "image_reward", "hps", "vqascore"],
            pickscore_model="random:tiny-clip",
            image_reward_model="random:tiny-image-reward",
            hps_model="random:tiny-clip",
            vqascore_model="random:tiny-instructblip",
        )
    )
    assert list(results["metrics"]) == ["dsg", "clip_score", "pickscore", "image_reward", "hps", "vqascore"]
    for row in results["per_prompt"]:
        scores = row["scores"]
        assert 0.0 <= scores["clip_score"] <= 100.0 and -1.0 <= scores["hps"] <= 1.0
        assert 0.0 <= scores["vqascore"] <= 1.0
        assert all(isinstance(scores[m], float) for m in ("pickscore", "image_reward"))
    assert results["metrics"]["image_reward"]["model"].startswith("random:tiny-image-reward")


def test_eval_pipeline_attends_through_sdpa_even_when_saved_with_another_processor(tiny_config, model_cache):
    """Evaluation draws as the images phase does: a model that comes with the classic attention
    processor is switched to SDPA (``speed.prepare_for_inference``) when the eval job loads it."""
    from types import SimpleNamespace

    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from selma_core.models.loading import load_diffusion_pipeline
    from selma_core.phases.evaluate import LazyPipeline

    pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
    pipe.unet.set_attn_processor(AttnProcessor())
    loads = []

    def load(*args, **kwargs):
        loads.append(args)
        return pipe

    cfg = load_config(tiny_config())
    lazy = LazyPipeline(SimpleNamespace(config=cfg), "cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("selma_core.models.loading.load_diffusion_pipeline", load)
        assert lazy.get() is pipe and lazy.get() is pipe
    assert len(loads) == 1
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}


def test_cached_eval_images_follow_the_committed_weights_not_the_jobs_key(tiny_config, model_cache, tmp_path):
    """--force train commits other weights under the same key: the eval image cache must not give
    back the previous expert's images; the same weights committed again still hit it."""
    from lora_helpers import trained_like_expert

    from selma_core.context import JobContext
    from selma_core.phases.evaluate import resolve_variant

    cfg, plan = plan_of(tiny_config())
    store = open_store(cfg.storage)
    ctx = JobContext(cfg, {}, plan, plan.job("eval"), store, None)
    key = plan.job("train", "counting").key
    first = trained_like_expert(model_cache, 1, 2, 2.0, tmp_path / "first")
    other = trained_like_expert(model_cache, 2, 2, 2.0, tmp_path / "other")
    identities = []
    for expert in (first, other, first):  # the first expert, a forced rerun's other weights, the first again
        store.commit_dir(expert, key)
        identities.append(resolve_variant(ctx, "expert:counting").identity)
    assert identities[0] != identities[1] and identities[0] == identities[2]


@pytest.mark.parametrize(
    "registered, pinned, refused",
    [("r1", "r2", True), ("r1", "r1", False), (None, "r2", False), ("r1", None, False)],
)
def test_a_registry_adapter_for_another_base_model_revision_is_refused(tmp_path, registered, pinned, refused):
    """Drawn on another revision of the base, a version's scores would not be its own."""
    from types import SimpleNamespace

    from selma_core.errors import InputError
    from selma_core.phases.evaluate import resolve_variant

    def download(name, version, dst):
        (dst / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
        return {"adapter_path": str(dst), "base_model": "org/sd", "base_model_revision": registered}

    ctx = SimpleNamespace(
        config=SimpleNamespace(base_model="org/sd", base_model_revision=pinned, cache_dir=str(tmp_path)),
        run=SimpleNamespace(download_registered_adapter=download),
    )
    if refused:
        with pytest.raises(InputError, match="at revision r1, not this pipeline's base_model_revision r2"):
            resolve_variant(ctx, "models:/selma/3", tmp_path / "downloads")
    else:
        variant = resolve_variant(ctx, "models:/selma/3", tmp_path / "downloads")
        assert variant.identity.startswith("registry-adapter:")


def test_a_skipped_evaluation_tags_only_this_pipelines_merged_model(tiny_config, tmp_path):
    """After a rerun whose eval is skipped, the controller puts the committed evaluation's scores
    back on the version merge.json names, but only if that version is this pipeline's merged model
    (its store key): after a registry reset, the same number may be another configuration's."""
    import mlflow

    from selma_core.phases.evaluate import retag_registered_model
    from selma_core.tracking import open_tracker
    from selma_core.tracking.base import TAG_STORE_KEY

    cfg, plan = plan_of(tiny_config())
    store, tracker = open_store(cfg.storage), open_tracker(cfg.tracking)
    name, merge_key, eval_key = cfg.registered_model_name, plan.job("merge").key, plan.job("eval").key
    for key, file, content in (
        (merge_key, "merge.json", {"registered": {"name": name, "version": "1", "alias": "candidate"}}),
        (eval_key, "results.json", {
            "variants": ["base", "merged"],
            "per_prompt": [{"skill": "counting", "prompt_id": "c-1", "prompt": "two cats"}],
            "summary": {"clip_score": {"counting": {"base": {"mean": 1.0}, "merged": {"mean": 2.0}}}},
        }),
    ):  # fmt: skip
        folder = tmp_path / key.replace("/", "_")
        folder.mkdir()
        (folder / file).write_text(json.dumps(content))
        store.commit_dir(folder, key)
    client = mlflow.MlflowClient(cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    client.create_registered_model(name)
    others = {TAG_STORE_KEY: "merged/00000000000000ff", "selma.eval.clip_score.mean": "20.0"}
    client.create_model_version(name, source=str(tmp_path), tags=others)
    said = retag_registered_model(store, plan, cfg.eval, tracker)
    assert said.startswith(f"warning: {name} v1 in {cfg.tracking.uri} is not this pipeline's merged model")
    assert client.get_model_version(name, "1").tags == others  # another model's scores, untouched

    client.set_model_version_tag(
        name, "1", TAG_STORE_KEY, merge_key
    )  # this pipeline's, tagged by another eval
    said = retag_registered_model(store, plan, cfg.eval, tracker)
    assert said.startswith(f"{name} v1: its scores tagged again from this pipeline's evaluation ({eval_key}")
    tags = client.get_model_version(name, "1").tags
    assert tags["selma.eval.clip_score.mean"] == "2.000000" and tags["selma.eval.key"] == eval_key
    assert retag_registered_model(store, plan, cfg.eval, tracker) is None  # tagged already: nothing to do
