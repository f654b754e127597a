"""End to end: ``jobs.submit --phase all`` on tiny random models, then every artifact is checked.

(a) local folder store + embedded MLflow (SQLite); (b) a real moto S3 endpoint + a real
``mlflow server`` process whose artifacts go to that S3. Each runs the real pipeline twice: the
second run must report every job skipped. (a) then goes on incrementally: a skill edited, one added,
a job forced.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import REPO, S3_BUCKET, submit_all
from lora_helpers import fused_deltas

from selma_core.config import load_config
from selma_core.models.loading import load_diffusion_pipeline
from selma_core.plan import build_plan
from selma_core.skills import load_skills
from selma_core.storage import open_store

pytestmark = pytest.mark.slow
SKILLS = ["counting", "spatial"]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` from the project root, as a user runs it; its output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def check_pipeline(config_path, model_cache, tmp_path) -> None:
    summary, stderr = submit_all(config_path)
    jobs = summary["jobs"]
    assert sorted(j["job"] for j in jobs) == sorted(
        [f"{p}:{s}" for p in ("prompts", "images", "train") for s in SKILLS] + ["merge", "eval"]
    )
    assert {j["status"] for j in jobs} == {"ran"}
    assert "| counting |" in stderr and "| spatial |" in stderr  # the results table

    cfg = load_config(config_path)
    # The jobs were forked by the fork server (executor.fork_server's default), started once.
    servers = list(Path(cfg.executor.log_dir).glob("*/fork-server.log"))
    assert len(servers) == 1 and "fork server: ready" in servers[0].read_text()
    assert "fork server is unavailable" not in stderr
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    store = open_store(cfg.storage)
    run_ids = {j["job"]: j["run_id"] for j in jobs}
    fetched = {}
    for job in plan.jobs.values():
        manifest = store.read_manifest(job.key)
        assert manifest["metadata"]["mlflow_run_id"] == run_ids[job.id]
        assert manifest["metadata"]["inputs"] == {d: plan.jobs[d].key for d in job.deps}
        fetched[job.id] = store.fetch_dir(job.key, tmp_path / "fetch")  # checksums verified

    # prompts: the requested count, a held-out split, every record complete
    for skill in SKILLS:
        records = [
            json.loads(x) for x in (fetched[f"prompts:{skill}"] / "prompts.jsonl").read_text().splitlines()
        ]
        assert len(records) == cfg.prompts.num_prompts
        assert {r["split"] for r in records} == {"train", "heldout"}
        assert all(
            set(r) == {"id", "skill", "text", "source", "request_id", "model", "split"} for r in records
        )
        train_ids = {r["id"] for r in records if r["split"] == "train"}
        # images: one per training prompt (never a held-out one), with its prompt, seed and model
        # (every shard that shards.json lists, in order)
        shards = json.loads((fetched[f"images:{skill}"] / "shards.json").read_text())["shards"]
        names = []
        for shard in shards:
            with tarfile.open(fetched[f"images:{skill}"] / shard["name"]) as tar:
                first_json = next(n for n in tar.getnames() if n.endswith(".json"))
                names += tar.getnames()
                meta = json.loads(tar.extractfile(first_json).read())
                assert set(meta) == {"id", "prompt", "seed", "model"} and meta["model"] == "random:tiny-sd"
        assert {n.rsplit(".", 1)[0] for n in names} == train_ids and len(names) == 2 * len(train_ids)

    # experts and the merged adapter load with vanilla diffusers; merged ΔW = mean of the experts' ΔW
    deltas = {}
    adapter_dirs = {f"train:{s}": fetched[f"train:{s}"] for s in SKILLS} | {
        "merge": fetched["merge"] / "adapter"
    }
    for name, path in adapter_dirs.items():
        pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
        pipe.load_lora_weights(str(path), adapter_name=name.replace(":", "_"))
        assert pipe.get_active_adapters() == [name.replace(":", "_")]
        deltas[name] = fused_deltas(model_cache, path)
    for layer, merged in deltas["merge"].items():
        mean = sum(deltas[f"train:{s}"][layer] for s in SKILLS) / len(SKILLS)
        torch.testing.assert_close(merged, mean, rtol=1e-4, atol=1e-6)

    # eval: base vs each expert vs merged on every skill
    results = json.loads((fetched["eval"] / "results.json").read_text())
    assert results["variants"] == ["base", "expert:counting", "expert:spatial", "merged"]
    for skill in [*SKILLS, "all"]:
        row = results["summary"]["clip_score"][skill]
        assert all(
            math.isfinite(row[v]["mean"]) and row[v]["low"] <= row[v]["high"] for v in results["variants"]
        )
        paired = results["paired"]["clip_score"][skill]
        assert set(paired) == {"expert:counting", "expert:spatial", "merged"}
        assert all(p["baseline"] == "base" and p["n"] == row["base"]["n"] for p in paired.values())
    # the report: one page and its figures as PNG, beside the images it shows
    assert (fetched["eval"] / "report.html").is_file() and list((fetched["eval"] / "figures").glob("*.png"))
    assert all((fetched["eval"] / r["image"]).is_file() for r in results["per_prompt"])
    # a human A/B set straight from the pipeline's eval output: one pair per held-out prompt
    from selma_core import human_eval

    ab = tmp_path / "ab"
    assert (
        human_eval.main(
            ["export", "--config", str(config_path), "--a", "base", "--b", "merged", "--out", str(ab)]
        )
        == 0
    )
    pairs = json.loads((ab / "key.json").read_text())["pairs"]
    assert len(pairs) == results["summary"]["clip_score"]["all"]["base"]["n"] and (ab / "page.html").is_file()

    check_mlflow(cfg, run_ids)
    # The kohya/A1111 exports load with diffusers and apply the same ΔW as the diffusers files.
    kohya = {
        "merge": fetched["merge"] / "kohya" / "selma_merged_lora.safetensors",
        "train:counting": fetched["train:counting"] / "kohya" / "selma_counting_lora.safetensors",
    }
    for name, path in kohya.items():
        for layer, delta in fused_deltas(model_cache, path).items():
            torch.testing.assert_close(delta, deltas[name][layer], rtol=1e-4, atol=1e-6)

    promoted = run_module("jobs.promote", "--config", str(config_path))
    assert promoted.returncode == 0 and "is the champion" in promoted.stdout, promoted.stderr[-3000:]

    # Another evaluation tagged the merged version since (other scores, and a metric this one does
    # not compute): the rerun skips eval and puts this evaluation's tags back, whole.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    version = client.get_model_version_by_alias(cfg.name, "candidate").version

    def eval_tags() -> dict:
        tags = client.get_model_version(cfg.name, version).tags
        return {k: v for k, v in tags.items() if k.startswith(("selma.eval.", "selma.eval_settings."))}

    mine = eval_tags()
    assert mine["selma.eval.key"] == plan.job("eval").key and "selma.eval_settings.clip_score" in mine
    for key, value in {
        "selma.eval.key": "eval/00000000000000ff",
        "selma.eval.clip_score.mean": "1.0",
        "selma.eval.pickscore.mean": "0.5",
    }.items():
        client.set_model_version_tag(cfg.name, version, key, value)
    second, stderr = submit_all(config_path)
    assert {j["status"] for j in second["jobs"]} == {"skipped"}
    assert eval_tags() == mine and "its scores tagged again from this pipeline's evaluation" in stderr


def check_mlflow(cfg, run_ids: dict) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.name)
    assert experiment is not None
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    parents = {runs[rid].data.tags["mlflow.parentRunId"] for rid in run_ids.values()}
    assert len(parents) == 1 and runs[parents.pop()].info.status == "FINISHED"
    for job_id, run_id in run_ids.items():
        run = runs[run_id]
        phase, _, skill = job_id.partition(":")
        assert run.info.status == "FINISHED"
        assert run.data.tags["selma.phase"] == phase and run.data.tags["selma.skill"] == skill
        assert run.data.tags["selma.config_hash"] == cfg.config_hash()
        assert len(run.data.tags["selma.git_commit"]) >= 7
    losses = client.get_metric_history(run_ids["train:counting"], "train.loss")
    assert [m.step for m in losses] == list(
        range(cfg.train.log_every, cfg.train.steps + 1, cfg.train.log_every)
    )
    assert "prompts.accepted" in runs[run_ids["prompts:spatial"]].data.metrics
    images_run = runs[run_ids["images:counting"]].data
    assert images_run.params["generator_model"] == cfg.generator  # the model that drew, not trained
    assert images_run.tags["images.guidance_scale_used"] == str(cfg.images.guidance_scale or 7.5)
    assert "clip_score.counting.merged" in runs[run_ids["eval"]].data.metrics
    assert "clip_score.all.merged.vs_base" in runs[run_ids["eval"]].data.metrics
    logged = {a.path for a in client.list_artifacts(run_ids["eval"], "eval")}
    assert {"eval/report.html", "eval/figures"} <= logged

    version = client.get_model_version_by_alias(cfg.name, "candidate")
    assert version.run_id == run_ids["merge"]
    assert version.tags["selma.skills"] == "counting,spatial"
    # The eval phase put the merged model's scores on its version, for promotion.
    assert {"selma.eval.clip_score.counting", "selma.eval.clip_score.mean"} <= set(version.tags)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    mlflow.set_registry_uri(cfg.tracking.uri)  # another test in this process may have set another
    model = mlflow.diffusers.load_model(f"models:/{cfg.name}@candidate")
    pipe = model.load_pipeline(device="cpu", torch_dtype=None)
    image = pipe("two cats on a sofa", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)


# Recognisable fake credentials in the environment of every job: none may reach an output.
FAKE_SECRETS = {
    "HF_TOKEN": "hf_SELMAFAKESECRET0hf",
    "OPENAI_API_KEY": "sk-SELMAFAKESECRET1openai",
    "MLFLOW_TRACKING_PASSWORD": "SELMAFAKESECRET2mlflow",
    "AWS_SESSION_TOKEN": "SELMAFAKESECRET3aws",
}


def test_pipeline_on_local_store_and_sqlite_tracking(tiny_config, model_cache, tmp_path, monkeypatch):
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    skills = tmp_path / "skills"  # a copy, edited at the end
    shutil.copytree(REPO / "skills", skills)
    config = tiny_config(skills_dir=str(skills))
    check_pipeline(config, model_cache, tmp_path)

    # No credential in the store, the MLflow database and artifacts, the logs, or the manifests a
    # Kubernetes submission would send (every file of this run lives under tmp_path).
    dry_run = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--phase", "all", "--config", str(config)]
        + ["--backend", "kubernetes", "--dry-run"],
        capture_output=True,
        cwd=REPO,
        timeout=300,
    )
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    outputs = [(f"dry-run of {config}", dry_run.stdout + dry_run.stderr)]
    outputs += [(str(path), path.read_bytes()) for path in tmp_path.rglob("*") if path.is_file()]
    assert len(outputs) > 50
    for name, value in FAKE_SECRETS.items():
        leaks = [where for where, data in outputs if value.encode() in data]
        assert not leaks, f"{name} leaked into {leaks}"

    check_incremental(config, skills, tiny_config)


def statuses(config, *extra: str) -> dict[str, str]:
    return {j["job"]: j["status"] for j in submit_all(config, *extra)[0]["jobs"]}


def check_incremental(config, skills: Path, tiny_config) -> None:
    """On a finished pipeline: a change redoes exactly its downstream, --force reruns on purpose, and
    the status table tells what happened."""
    # Editing one skill's seeds and adding another (in one submission, which spares a second merge
    # and eval) redoes the edited skill's chain, runs the new one's, then merge and eval; nothing else.
    path = skills / "spatial.yaml"
    path.write_text(
        path.read_text().replace("a red ball to the left of a blue box", "a red ball left of a box")
    )
    added = tiny_config(skills_dir=str(skills), skills=["counting", "spatial", "everyday"])
    after = statuses(added)
    redone = {
        f"{phase}:{skill}" for phase in ("prompts", "images", "train") for skill in ("spatial", "everyday")
    }
    redone |= {"merge", "eval"}
    assert {j for j, s in after.items() if s == "ran"} == redone
    assert {j for j, s in after.items() if s == "skipped"} == set(after) - redone
    status = run_module("jobs.status", "--config", str(added))
    assert status.returncode == 0, status.stderr[-3000:]
    table = {row["job"]: row["state"] for row in json.loads(status.stdout.strip().splitlines()[-1])["jobs"]}
    assert table["train:spatial"] == "done" and table["train:counting"] == "skipped"

    # --force reruns a finished job and everything downstream of it, on purpose.
    forced = statuses(added, "--force", "train:counting")
    assert {j for j, s in forced.items() if s == "ran"} == {"train:counting", "merge", "eval"}


def test_pipeline_on_s3_and_an_mlflow_server(tiny_config, model_cache, tmp_path, moto_s3, mlflow_server):
    import boto3

    config = tiny_config(
        storage={"uri": f"s3://{S3_BUCKET}/e2e", "endpoint_url": moto_s3},
        tracking={"uri": mlflow_server},
    )
    check_pipeline(config, model_cache, tmp_path)

    # The champion, from the registry (served by the MLflow server, artifacts in S3), is the merged
    # adapter: evaluated beside it, it draws the same images and gets the same scores.
    from jobs import submit as controller

    flags = ["--phase", "eval", "--model", "merged", "models:/selma-test@champion", "--config", str(config)]
    assert controller.main(flags) == 0
    cfg = load_config(config)
    cfg.eval.models = ["merged", "models:/selma-test/1"]
    key = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills)).job("eval").key
    results = json.loads(open_store(cfg.storage).read_output_file(key, "results.json"))
    scores = {v: {} for v in results["variants"]}
    for row in results["per_prompt"]:
        scores[row["variant"]][row["prompt_id"]] = row["scores"]["clip_score"]
    assert scores["models:/selma-test/1"] == scores["merged"] and results["cache"]["images_cached"] > 0
    assert list((model_cache / "registry").glob("eval-*")) == []  # its download removed with the job
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket=S3_BUCKET, Prefix="e2e/merged/")["Contents"]]
    assert any(k.endswith("pytorch_lora_weights.safetensors") for k in stored)
    # The MLflow server keeps its artifacts (the registered adapter among them) in the same S3.
    artifacts = s3.list_objects_v2(Bucket=S3_BUCKET, Prefix="mlartifacts/").get("Contents", [])
    assert any(o["Key"].endswith("pytorch_lora_weights.safetensors") for o in artifacts)
