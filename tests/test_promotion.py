"""Promotion: the decision rule, and the registry moves against a real MLflow server."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from conftest import REPO
from lora_helpers import trained_like_expert

from selma_core.errors import InputError
from selma_core.promotion import decide, scores_from_tags


def test_first_candidate_becomes_champion():
    decision = decide({"mean": 1.0, "a": 1.0}, None, 0.5)
    assert decision.promote and decision.reasons == ["no champion yet"]


def test_mean_must_not_drop_and_no_skill_may_regress_beyond_the_margin():
    champion = {"mean": 10.0, "a": 10.0, "b": 10.0}
    assert decide({"mean": 10.0, "a": 10.4, "b": 9.6}, champion, 0.5).promote
    worse = decide({"mean": 9.9, "a": 10.0, "b": 9.8}, champion, 0.5)
    assert not worse.promote and "mean score 9.900 is below the champion's 10.000" in worse.reasons
    regress = decide({"mean": 10.5, "a": 12.0, "b": 9.0}, champion, 0.5)
    assert not regress.promote and regress.reasons == [
        "skill b drops by 1.000 (more than max_skill_regression 0.5)"
    ]
    assert (
        "REGRESSION" in regress.table() and "| b | 10.000 | 9.000 | -1.000 | REGRESSION |" in regress.table()
    )
    assert not decide({}, champion, 0.5).promote  # never evaluated


def test_a_candidate_without_a_skill_the_champion_has_is_refused_and_means_compare_shared_skills():
    champion = {"mean": 10.0, "a": 10.0, "b": 10.0}
    lost_b = decide({"mean": 12.0, "a": 12.0, "c": 12.0}, champion, 0.5)  # b replaced by a new skill c
    assert not lost_b.promote and lost_b.reasons == [
        "skill b: the champion was scored on it, the candidate was not (a merged model without a "
        "skill the champion has is not promoted by the gate; move the alias by hand if that is intended)"
    ]
    assert [r["skill"] for r in lost_b.rows] == ["a", "c", "b", "mean"]
    assert "| b | 10.000 | - | - | REGRESSION |" in lost_b.table()
    assert lost_b.rows[-1] == {
        "skill": "mean",
        "champion": 10.0,
        "candidate": 12.0,
        "change": 2.0,
        "ok": True,
    }
    # A new skill is welcome, but the means compare over the skills both have (a only here).
    new_skill = decide({"mean": 10.5, "a": 9.8, "b": 10.0, "c": 11.7}, champion, 0.5)
    assert not new_skill.promote and new_skill.reasons == [
        "mean score 9.900 is below the champion's 10.000 (both over the skills they share)"
    ]


def test_scores_come_from_version_tags():
    tags = {"selma.eval.clip_score.a": "1.5", "selma.eval.clip_score.mean": "2", "other": "x"}
    assert scores_from_tags(tags, "clip_score") == {"a": 1.5, "mean": 2.0}


def test_scores_that_are_not_numbers():
    """NaN compares false with everything: a NaN candidate would pass the gate, become champion and
    then block every later candidate. It is refused; a NaN champion score counts as none; a tag
    that is no number at all is an error naming it."""
    nan = float("nan")
    refused = decide({"mean": nan, "a": 1.0}, None, 0.5)
    assert not refused.promote and refused.reasons == [
        "the candidate's score is not a number for mean: evaluate it again"
    ]
    assert refused.rows == []  # nothing non-finite reaches the JSON line
    after_a_nan_champion = decide({"mean": 0.3, "a": 0.3}, {"mean": nan, "a": nan}, 0.5)
    assert after_a_nan_champion.promote, after_a_nan_champion.reasons
    with pytest.raises(InputError, match="tag selma.eval.clip_score.a of version 4 is 'n/a', not a number"):
        scores_from_tags({"selma.eval.clip_score.a": "n/a"}, "clip_score", "4")


def test_promote_ends_with_a_json_line_when_the_registry_fails(tiny_config, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    from jobs import promote as promote_module

    def outage(args):
        raise MlflowException("the registry's database is restarting", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(promote_module, "promote", outage)
    assert promote_module.main(["--config", str(tiny_config())]) == 1
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["promoted"] is False and "restarting" in last["error"]


def promote(config, *args) -> tuple[int, dict, str]:
    result = subprocess.run(
        [sys.executable, "-m", "jobs.promote", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


@pytest.mark.slow
def test_promote_refuse_and_load_the_champion(tiny_config, tmp_path, model_cache, mlflow_server):
    import mlflow

    from selma_core.config import load_config
    from selma_core.models.random_models import materialize_random_model
    from selma_core.tracking import open_tracker

    name = f"selma-promo-{uuid.uuid4().hex[:6]}"
    config = tiny_config(name=name, tracking={"uri": mlflow_server})
    cfg = load_config(config)
    tracker = open_tracker(cfg.tracking)
    adapter = trained_like_expert(model_cache, 0, 2, 2.0, tmp_path / "adapter")
    base = str(materialize_random_model("random:tiny-sd", model_cache))

    def register(mean: float | None, a: float = 0, b: float = 0, settings: str = "same-eval") -> str:
        run = tracker.start_job_run(name, None, "merge", {})
        version = run.register_lora_adapter(adapter, base, name, "candidate", {"selma.skills": "a,b"})
        scores = {
            "selma.eval.clip_score.mean": str(mean),
            "selma.eval.clip_score.a": str(a),
            "selma.eval.clip_score.b": str(b),
        }
        run.tag_model_version(
            name, version, {**(scores if mean is not None else {}), "selma.eval.settings": settings}
        )
        tracker.end_job_run(run, True)
        return version

    v1 = register(10.0, 10.0, 10.0)
    code, out, text = promote(config)
    assert (
        code == 0
        and out["promoted"]
        and out["champion"] is None
        and f"promoted: v{v1} is the champion" in text
    )
    assert tracker.model_version(name, alias="champion").version == v1

    register(9.0, 9.0, 9.0)
    code, out, text = promote(config)
    assert code == 3 and not out["promoted"] and "refused: " in text and "mean score 9.000 is below" in text
    assert tracker.model_version(name, alias="champion").version == v1

    # Scores from another eval (other prompts, sampling or scorers) are not compared at all.
    register(50.0, 50.0, 50.0, settings="a-quick-eval")
    code, out, text = promote(config)
    assert code == 2 and "not comparable" in out["error"]
    assert tracker.model_version(name, alias="champion").version == v1

    register(11.0, 13.0, 9.0)
    code, out, _ = promote(config)
    assert code == 3 and out["reasons"] == ["skill b drops by 1.000 (more than max_skill_regression 0.5)"]
    # What jobs.retrain runs: judged before, on the same scores, champion and gate: nothing new.
    code, out, text = promote(config, "--unless-judged")
    assert code == 0 and out["unchanged"] and not out["promoted"]
    assert "was refused before, on the same scores, against champion v" in out["reasons"][0]
    # A looser gate is something new to judge: it lets the candidate through.
    code, out, _ = promote(config, "--max-skill-regression", "2", "--unless-judged")
    assert code == 0 and out["promoted"]
    v3 = out["candidate"]
    assert tracker.model_version(name, alias="champion").version == v3
    assert tracker.model_version(name, alias="previous").version == v1
    verdict = tracker.model_version(name, version=v3).tags
    assert verdict["selma.promotion.verdict"] == "promoted" and verdict["selma.promotion.judged"]
    code, out, _ = promote(config, "--unless-judged")
    assert code == 0 and out["unchanged"] and out["reasons"] == [f"v{v3} is already the champion"]

    code, out, _ = promote(config, "--version", "99")
    assert code == 2 and "has no version 99" in out["error"]

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)  # another test in this process may have set another
    pipe = mlflow.diffusers.load_model(f"models:/{name}@champion").load_pipeline(
        device="cpu", torch_dtype=None
    )
    image = pipe("two cats on a sofa", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)

    # The champion alias moved by hand to a version with no scores: nothing to compare against, so
    # no candidate passes by default.
    unscored = register(None)
    mlflow.MlflowClient(mlflow_server).set_registered_model_alias(name, "champion", unscored)
    register(1.0, 1.0, 1.0)
    code, out, _ = promote(config)
    assert code == 2 and f"champion v{unscored} has no clip_score scores" in out["error"]
    assert tracker.model_version(name, alias="champion").version == unscored


def test_a_gate_metric_the_eval_phase_does_not_compute_is_refused(tiny_config, capsys):
    """Every version would lack its scores, and the advice to evaluate again could not help."""
    from jobs.promote import main

    config = tiny_config(eval={"metrics": ["pickscore"]})
    assert main(["--config", str(config)]) == 2
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["error"] == (
        f"{config}: promote.metric clip_score is not one of eval.metrics (pickscore), so no version is "
        "ever scored on it; set promote.metric to one of them"
    )


def test_the_regression_margin_defaults_to_the_metrics_own_scale():
    """0.5 is 1.5% of CLIPScore's range but more than the whole of HPS's: each metric has its own."""
    from typing import get_args, get_type_hints

    from selma_core.config import MAX_SKILL_REGRESSION, PromoteConfig

    assert set(MAX_SKILL_REGRESSION) == set(get_args(get_type_hints(PromoteConfig)["metric"]))
    assert PromoteConfig().skill_regression_limit == 0.5  # clip_score, as before
    assert PromoteConfig(metric="hps").skill_regression_limit == 0.005
    assert PromoteConfig(metric="hps", max_skill_regression=0.02).skill_regression_limit == 0.02
    # HPS's spatial falls from 0.30 to 0.05: refused with its own margin (0.5 let it through).
    limit = PromoteConfig(metric="hps").skill_regression_limit
    candidate, champion = {"a": 0.36, "b": 0.05, "mean": 0.205}, {"a": 0.0, "b": 0.30, "mean": 0.15}
    assert not decide(candidate, champion, limit).promote


def test_a_negative_regression_margin_is_refused_before_anything_is_read(tiny_config, capsys):
    """As promote.max_skill_regression is: a negative margin would call an improvement a drop."""
    from jobs.promote import main

    assert main(["--config", str(tiny_config()), "--max-skill-regression", "-1"]) == 2
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["error"] == (
        "--max-skill-regression: expected >= 0, got -1.0"
    )


def test_with_registration_off_there_is_no_candidate_and_promote_says_so(tiny_config, capsys):
    """merge.register false: no version is ever registered, so the alias advice could not help;
    under --unless-judged (jobs.retrain) it is nothing to do, not a failure."""
    from jobs.promote import main

    config = str(tiny_config(merge={"register": False}))
    assert main(["--config", config]) == 2
    said = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert said["error"].startswith("merge.register is false: the merge registers no version")
    assert main(["--config", config, "--unless-judged"]) == 0
    said = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert said["promoted"] is False and "merge.register is false" in json.dumps(said)


def test_a_missing_candidate_is_named_with_the_run_that_registers_it(tiny_config, tmp_path, capsys):
    """No version with the alias: the merge job registers one; but where its output is committed
    already (registered at another tracking server, say), a plain rerun skips it: --force merge."""
    from jobs.promote import main
    from selma_core.config import load_config
    from selma_core.plan import build_plan
    from selma_core.skills import load_skills
    from selma_core.storage import open_store
    from selma_core.tracking import open_tracker

    config = str(tiny_config())
    cfg = load_config(config)
    open_tracker(cfg.tracking)  # a new, empty registry
    assert main(["--config", config]) == 2
    said = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    assert said.endswith(
        f"the merge phase registers one (python -m jobs.submit --phase all --config {config})"
    )

    merge = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills)).jobs["merge"]
    output = tmp_path / "merge-output"
    output.mkdir()
    (output / "merge.json").write_text("{}")
    open_store(cfg.storage).commit_dir(output, merge.key)
    assert main(["--config", config]) == 2
    said = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    assert f"the merge output in the store ({merge.key}) was registered elsewhere" in said
    assert said.endswith(f"(python -m jobs.submit --phase all --force merge --config {config})")


def test_the_candidate_is_this_configurations_merged_model_not_whatever_holds_the_alias(tiny_config, capsys):
    """Two configurations share the pipeline's name (train.steps edited, then put back): the other's
    merge registered last and holds 'candidate'; this one's rerun skipped its committed merge, so
    moved no alias. promote judges this configuration's version, found by its merge output's key,
    and says so; with none registered here, it refuses, naming both, rather than judge another's."""
    import mlflow

    from jobs.promote import main
    from selma_core.config import load_config
    from selma_core.plan import build_plan
    from selma_core.skills import load_skills
    from selma_core.tracking import open_tracker
    from selma_core.tracking.base import TAG_STORE_KEY

    config = str(tiny_config())
    cfg = load_config(config)
    name = cfg.registered_model_name
    mine = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills)).jobs["merge"].key
    tracker = open_tracker(cfg.tracking)
    client = mlflow.MlflowClient(cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    client.create_registered_model(name)

    def version(key: str, mean: float) -> str:
        scores = {f"selma.eval.clip_score.{s}": str(mean) for s in ("a", "mean")}
        made = client.create_model_version(
            name, source=f"{cfg.cache_dir}/nowhere", tags={TAG_STORE_KEY: key, **scores}
        )
        client.set_registered_model_alias(name, "candidate", made.version)
        return str(made.version)

    others = "merged/00000000000000ff"
    version(others, 1.0)
    assert main(["--config", config]) == 2
    error = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    assert f"alias 'candidate' is on v1, the merged model of another configuration ({others})" in error
    assert f"no version is this configuration's ({mine})" in error

    v2 = version(mine, 5.0)
    version(others, 9.0)  # v3, the other configuration's again: it holds the alias
    assert main(["--config", config]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[-1])["candidate"] == v2
    assert f"judging v{v2}, this configuration's ({mine})" in out.err
    assert tracker.model_version(name, alias="champion").version == v2
    # The same CLIPScore settings under another eval section (PickScore added): compared, not
    # refused; other CLIPScore prompts: refused as not comparable, naming the metric's tag.
    v4 = version(mine, 6.0)
    tag = "selma.eval_settings.clip_score"
    client.set_model_version_tag(name, v2, tag, "same-prompts")
    client.set_model_version_tag(name, v2, "selma.eval.settings", "section-1")
    client.set_model_version_tag(name, v4, tag, "same-prompts")
    client.set_model_version_tag(name, v4, "selma.eval.settings", "section-2")
    assert main(["--config", config]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["candidate"] == v4
    v5 = version(mine, 7.0)
    client.set_model_version_tag(name, v5, tag, "other-prompts")
    assert main(["--config", config]) == 2
    error = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    assert f"candidate v{v5} and champion v{v4} have clip_score scores from different sampling or" in error
    assert f"({tag} other-prompts vs same-prompts): not comparable" in error
    client.set_model_version_tag(name, v5, tag, "same-prompts")
    # merge.alias renamed (not part of the merge's key: the committed merge set none): this
    # configuration's version is judged, not a crash.
    renamed = str(tiny_config(merge={"alias": "staging"}))
    assert main(["--config", renamed, "--unless-judged"]) == 0
    out = capsys.readouterr()
    assert f"no version holds alias 'staging'; judging v{v5}" in out.err


def test_a_metrics_scores_are_comparable_by_their_prompts_sampling_and_own_settings_only():
    """What promote compares is per metric: another prompts job (other held-out prompts, other
    scores for the same model) makes scores incomparable; adding PickScore to eval, or another
    PickScore model, leaves CLIPScore's comparable."""
    from dataclasses import replace

    from selma_core.phases.evaluate import METRIC_SETTINGS_PREFIX, EvalConfig, registered_model_tags

    def results(prompts: list[str]) -> dict:
        rows = [{"skill": "a", "prompt_id": f"a-{i}", "prompt": p} for i, p in enumerate(prompts)]
        means = {"a": {"merged": {"mean": 1.0}, "base": {"mean": 0.5}}, "all": {"merged": {"mean": 1.0}}}
        return {"per_prompt": rows, "summary": {"clip_score": means, "pickscore": means}}

    cfg = EvalConfig(metrics=["clip_score", "pickscore"])
    clip, pick = METRIC_SETTINGS_PREFIX + "clip_score", METRIC_SETTINGS_PREFIX + "pickscore"
    first = registered_model_tags(results(["two cats", "three dogs"]), cfg, "eval/1")
    assert (
        first["selma.eval.clip_score.a"] == "1.000000"
        and first["selma.eval.base.clip_score.mean"] == "0.500000"
    )
    other_prompts = registered_model_tags(results(["two cats", "four dogs"]), cfg, "eval/2")
    assert other_prompts[clip] == first[clip] and other_prompts[pick] == first[pick]
    assert other_prompts["selma.eval_prompts.a"] != first["selma.eval_prompts.a"]
    other_pickscore = registered_model_tags(
        results(["two cats", "three dogs"]), replace(cfg, pickscore_model="my/pickscore"), "eval/3"
    )
    assert other_pickscore[clip] == first[clip] and other_pickscore[pick] != first[pick]
    assert other_pickscore["selma.eval.settings"] != first["selma.eval.settings"]  # the whole section's
    fewer_steps = registered_model_tags(
        results(["two cats", "three dogs"]), replace(cfg, num_inference_steps=20), "e"
    )
    assert fewer_steps[clip] != first[clip]
    batch = registered_model_tags(results(["two cats", "three dogs"]), replace(cfg, batch_size=1), "e")
    assert batch[clip] == first[clip]  # how many at once changes no image


def test_a_candidate_with_a_new_skill_compares_on_the_prompts_of_the_skills_both_have():
    """Adding a skill is SELMA's main workflow: the new skill's prompts are not the champion's, the
    shared skills' are, and the gate goes on (a refusal, if any, is the gate's, exit 3). Other
    prompts on a shared skill (another prompts job) are refused as not comparable, naming it."""
    from jobs.promote import _check_comparable
    from selma_core.errors import ConfigError
    from selma_core.tracking.base import ModelVersion

    settings = {"selma.eval_settings.clip_score": "s1"}
    champion = ModelVersion(
        "m", "1", {**settings, "selma.eval_prompts.a": "pa", "selma.eval_prompts.b": "pb"}, []
    )
    new_skill = ModelVersion(
        "m",
        "2",
        {
            **settings,
            "selma.eval_prompts.a": "pa",
            "selma.eval_prompts.b": "pb",
            "selma.eval_prompts.c": "pc",
        },
        [],
    )
    _check_comparable("m", "clip_score", new_skill, champion, "c.yaml")  # no error
    other_b = ModelVersion(
        "m", "3", {**settings, "selma.eval_prompts.a": "pa", "selma.eval_prompts.b": "pb2"}, []
    )
    with pytest.raises(
        ConfigError, match=r"from different prompts of skill\(s\) b \(selma.eval_prompts.<skill>\)"
    ):
        _check_comparable("m", "clip_score", other_b, champion, "c.yaml")
    # Versions tagged before: the eval section's hash, as then.
    old = ModelVersion("m", "4", {"selma.eval.settings": "x"}, [])
    with pytest.raises(ConfigError, match=r"selma.eval.settings y vs x"):
        _check_comparable(
            "m", "clip_score", ModelVersion("m", "5", {"selma.eval.settings": "y", **settings}, []), old, "c"
        )
