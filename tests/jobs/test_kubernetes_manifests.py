"""Every manifest the Kubernetes executor renders: valid against the official schemas, and carrying
what the cluster and the controller rely on (names, labels, GPU pools, failure policy, no secrets)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from jobs.executors import job_command
from jobs.executors.kubernetes import KubernetesExecutor
from jobs.executors.kubernetes_manifests import GPU, POD_CONFIG_DIR, pod_files
from selma_core.config import load_config
from selma_core.errors import ConfigError
from selma_core.plan import build_plan
from selma_core.skills import load_skills

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.37.0"
GPU_PHASES = {"images", "train", "merge-search", "eval"}
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,50}[a-z0-9])?$")


def render(config: Path | str, *, tmp_path: Path, **overrides) -> tuple[list[dict], object]:
    """Every document ``jobs.submit --phase all --dry-run --backend kubernetes`` would print."""
    cfg = load_config(config, overrides or None)
    cfg.executor.kind = "kubernetes"
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    executor = KubernetesExecutor(cfg, tmp_path / "logs")
    jobs = plan.select("all")
    text = executor.dry_run(jobs, lambda job: job_command(job, executor.job_config_path))
    return [d for d in yaml.safe_load_all(text) if d], plan


def jobs_of(documents: list[dict]) -> list[dict]:
    return [d for d in documents if d["kind"] == "Job"]


def container(job: dict) -> dict:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return only


@pytest.mark.parametrize("config", ["demo", "sd2", "sdxl"])
def test_every_manifest_validates_and_carries_the_conventions(config, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-value-that-must-not-leak")
    documents, plan = render(REPO / "configs" / f"{config}.yaml", tmp_path=tmp_path)
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    assert "fake-secret-value-that-must-not-leak" not in yaml.safe_dump_all(documents)

    jobs = jobs_of(documents)
    covered = [jid for job in jobs for jid in job["metadata"]["annotations"]["selma.io/jobs"].split(",")]
    assert sorted(covered) == sorted(plan.jobs), "every job of the pipeline has a Job"
    names = [job["metadata"]["name"] for job in jobs]
    assert len(set(names)) == len(names)
    for job in jobs:
        meta, spec = job["metadata"], job["spec"]
        pod = spec["template"]["spec"]
        phase = meta["labels"]["selma.io/phase"]
        assert DNS_LABEL.fullmatch(meta["name"]), meta["name"]
        for key in ("name", "instance", "component", "part-of", "managed-by"):
            assert meta["labels"][f"app.kubernetes.io/{key}"]
        assert meta["labels"]["selma.io/pipeline"] == plan_name(config)
        assert meta["labels"]["app.kubernetes.io/component"] == phase
        if phase in ("prompts", "images", "train"):
            assert meta["labels"]["selma.io/skill"]
        assert {"selma.io/config-hash", "selma.io/git-commit", "selma.io/mlflow-run-id"} <= set(
            meta["annotations"]
        )
        assert spec["template"]["metadata"]["labels"]["selma.io/phase"] == phase
        assert pod["restartPolicy"] == "Never"
        # A preempted train pod has time to finish its step and upload a checkpoint.
        assert pod.get("terminationGracePeriodSeconds", 30) == (90 if phase == "train" else 30)
        assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
        if spec.get("completionMode") == "Indexed":
            assert spec["backoffLimitPerIndex"] >= 0 and "backoffLimit" not in spec
        else:
            assert spec["backoffLimit"] >= 0
        rules = spec["podFailurePolicy"]["rules"]
        assert {
            "action": "FailJob",
            "onExitCodes": {"containerName": "job", "operator": "In", "values": [2]},
        } in rules
        assert any(
            r["action"] == "Ignore" and r["onPodConditions"][0]["type"] == "DisruptionTarget" for r in rules
        )
        main = container(job)
        assert main["command"][:3] == ["python", "-m", "jobs.run"]
        assert main["command"][main["command"].index("--phase") + 1] == phase
        assert main["command"][-2:] == ["--config", f"{POD_CONFIG_DIR}/config.yaml"]
        # Credentials only as Secret references; plain env values are the job contract's.
        assert main["envFrom"] == [{"secretRef": {"name": "selma-credentials"}}]
        assert {e["name"] for e in main["env"]} <= {"HOME", "HF_HOME", "PYTHONUNBUFFERED", "SELMA_NODE_RANK"}
        gpus = int(main["resources"]["limits"].get(GPU, 0))
        if phase in GPU_PHASES:
            assert gpus >= 1
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ]
        else:  # prompts through an API (or offline), merge: no GPU, not on the GPU pool
            assert gpus == 0 and "tolerations" not in pod
        assert main["resources"]["limits"]["memory"] and main["resources"]["limits"]["cpu"]
        assert main["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
        assert config_volume["configMap"]["name"] == documents[0]["metadata"]["name"]


def plan_name(config: str) -> str:
    return {"demo": "selma-demo", "sd2": "selma-sd2", "sdxl": "selma-sdxl"}[config]


def test_names_are_deterministic_and_change_with_the_work(tmp_path):
    first, _ = render(REPO / "configs" / "sdxl.yaml", tmp_path=tmp_path)
    again, _ = render(REPO / "configs" / "sdxl.yaml", tmp_path=tmp_path)
    assert [d["metadata"]["name"] for d in first] == [d["metadata"]["name"] for d in again]
    changed, _ = render(REPO / "configs" / "sdxl.yaml", tmp_path=tmp_path, merge={"method": "ties"})
    before = {j["metadata"]["labels"]["selma.io/phase"] + j["metadata"]["name"] for j in jobs_of(first)}
    after = {j["metadata"]["labels"]["selma.io/phase"] + j["metadata"]["name"] for j in jobs_of(changed)}
    # A new merge method is new merge and eval work; the per-skill Jobs keep their names.
    assert {n for n in before - after} and all(n.startswith(("merge", "eval")) for n in before - after)


def test_sharded_phase_is_one_indexed_job(tmp_path, model_cache):
    from tests.conftest import write_config

    config = write_config(
        tmp_path, model_cache, merge_search={"enabled": True, "strategy": "random", "samples": 3}
    )
    documents, plan = render(config, tmp_path=tmp_path)
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    (search,) = [
        j for j in jobs_of(documents) if j["metadata"]["annotations"]["selma.io/jobs"].count("#") > 1
    ]
    spec = search["spec"]
    shards = [j for j in plan.jobs.values() if j.shard is not None]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == len(shards)
    assert spec["backoffLimitPerIndex"] == 2 and "backoffLimit" not in spec
    command = container(search)["command"]
    assert command[command.index("--shards") + 1] == ",".join(str(j.shard) for j in shards)
    assert "--shard-index" not in command


def test_kueue_queue_suspends_and_labels(tmp_path):
    documents, _ = render(
        REPO / "configs" / "sdxl.yaml", tmp_path=tmp_path, executor={"kubernetes": {"queue": "selma"}}
    )
    for job in jobs_of(documents):
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "selma"
        assert job["spec"]["suspend"] is True


def test_multi_gpu_training_runs_torchrun(tmp_path):
    documents, _ = render(
        REPO / "configs" / "sdxl.yaml", tmp_path=tmp_path, executor={"kubernetes": {"train_gpus": 4}}
    )
    (train, *_) = [j for j in jobs_of(documents) if j["metadata"]["labels"]["selma.io/phase"] == "train"]
    main = container(train)
    assert main["command"][:3] == ["python", "-m", "jobs.run"] and main["command"][-1] == "--nproc-per-node=4"
    assert main["resources"]["limits"][GPU] == "4"
    assert "completionMode" not in train["spec"]


def test_multi_node_training_is_indexed_with_a_headless_service(tmp_path):
    documents, _ = render(
        REPO / "configs" / "sdxl.yaml",
        tmp_path=tmp_path,
        executor={"kubernetes": {"train_gpus": 8, "train_nodes": 2}},
    )
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    trains = [j for j in jobs_of(documents) if j["metadata"]["labels"]["selma.io/phase"] == "train"]
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    assert len(services) == len(trains) == 2
    for train in trains:
        name = train["metadata"]["name"]
        spec = train["spec"]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
        assert spec["template"]["spec"]["subdomain"] == name
        assert services[name]["spec"]["clusterIP"] == "None"
        assert services[name]["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
        command = container(train)["command"]
        assert (
            "--nproc-per-node=8" in command
            and "--nnodes=2" in command
            and "--node-rank=$(SELMA_NODE_RANK)" in command
        )
        assert f"--master-addr={name}-0.{name}" in command
        # A lost node cannot rejoin the torchrun group: any failure ends the Job (disruptions aside).
        rules = train["spec"]["podFailurePolicy"]["rules"]
        assert rules[-1] == {
            "action": "FailJob",
            "onExitCodes": {"containerName": "job", "operator": "NotIn", "values": [0]},
        }
        assert [r["action"] for r in rules].index("Ignore") < len(rules) - 1


def test_prompts_with_a_local_llm_get_a_gpu(tmp_path):
    documents, _ = render(
        REPO / "configs" / "sdxl.yaml", tmp_path=tmp_path, prompts={"backend": "transformers"}
    )
    prompts = [job for job in jobs_of(documents) if job["metadata"]["labels"]["selma.io/phase"] == "prompts"]
    for job in prompts:
        limits = container(job)["resources"]["limits"]
        # A 7B model's bf16 weights pass through host memory: a GPU phase's pod, not 8Gi.
        assert limits[GPU] == "1" and limits["memory"] == "48Gi" and limits["cpu"] == "8"
    assert prompts


def test_ephemeral_storage_sizes_the_cache_volume_too(tmp_path):
    documents, _ = render(
        REPO / "configs" / "sdxl.yaml",
        tmp_path=tmp_path,
        executor={"kubernetes": {"resources": {"train": {"ephemeral_storage": "200Gi"}}}},
    )
    for job in jobs_of(documents):
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        if job["metadata"]["labels"]["selma.io/phase"] == "train":
            assert container(job)["resources"]["limits"]["ephemeral-storage"] == "200Gi"
            assert volumes["cache"]["emptyDir"]["sizeLimit"] == str(186 * 2**30)  # /tmp's 10Gi, 4Gi for logs
        else:
            assert volumes["cache"]["emptyDir"]["sizeLimit"] == "50Gi"
    for size, message in (
        ("14Gi", "expected at least 1Gi for the model cache"),
        ("200gb", "not a Kubernetes quantity"),
    ):
        with pytest.raises(ConfigError, match=rf"ephemeral_storage {size}: {message}"):
            render(
                REPO / "configs" / "sdxl.yaml",
                tmp_path=tmp_path,
                executor={"kubernetes": {"resources": {"train": {"ephemeral_storage": size}}}},
            )


def test_resources_override_the_template(tmp_path):
    documents, _ = render(
        REPO / "configs" / "sdxl.yaml",
        tmp_path=tmp_path,
        executor={"kubernetes": {"resources": {"merge": {"cpu": "16", "memory": "100Gi", "gpus": 1}}}},
    )
    (merge,) = [j for j in jobs_of(documents) if j["metadata"]["labels"]["selma.io/phase"] == "merge"]
    limits = container(merge)["resources"]["limits"]
    assert limits["cpu"] == "16" and limits["memory"] == "100Gi" and limits[GPU] == "1"


def test_unknown_phase_in_resources_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="resources: unknown phase 'training'"):
        load_config(
            REPO / "configs" / "sdxl.yaml", {"executor": {"kubernetes": {"resources": {"training": {}}}}}
        )


@pytest.mark.parametrize(
    "kubernetes",
    [
        {"train_gpus": 4, "resources": {"train": {"gpus": 1}}},  # would train on 1 GPU, not 4
        {"train_nodes": 2, "resources": {"train": {"gpus": 0}}},  # would train on 1 pod, not 2
    ],
)
def test_train_gpus_set_twice_and_differently_is_a_config_error(kubernetes):
    with pytest.raises(ConfigError, match=r"resources.train.gpus \(\d\) disagrees with train_gpus"):
        load_config(REPO / "configs" / "sdxl.yaml", {"executor": {"kubernetes": kubernetes}})
    # The same number twice, or a CPU pod for one process, is fine.
    load_config(
        REPO / "configs" / "sdxl.yaml",
        {"executor": {"kubernetes": {"train_gpus": 4, "resources": {"train": {"gpus": 4}}}}},
    )
    load_config(
        REPO / "configs" / "sdxl.yaml", {"executor": {"kubernetes": {"resources": {"train": {"gpus": 0}}}}}
    )


def test_pods_compute_the_controllers_keys(tmp_path, model_cache):
    """The pod reads the ConfigMap's files, not this machine's: its plan must give the same keys, or
    it would commit where the controller never looks. Benchmarks travel as their prompts only."""
    from tests.conftest import write_config

    benchmark = REPO.parent / "shared" / "benchmarks" / "geneval" / "evaluation_metadata.jsonl"
    if not benchmark.is_file():
        benchmark = tmp_path / "bench.csv"
        benchmark.write_text('prompt,x\n"a photo, of\ntwo cats",1\nthree dogs,2\n')
    config = write_config(tmp_path, model_cache, prompts={"contamination": {"benchmarks": [str(benchmark)]}})
    cfg = load_config(config)
    controller_plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    pod_root = tmp_path / "pod"
    for path, text in pod_files(cfg).items():
        (pod_root / path).parent.mkdir(parents=True, exist_ok=True)
        (pod_root / path).write_text(text.replace(POD_CONFIG_DIR, str(pod_root)))
    pod_cfg = load_config(pod_root / "config.yaml")
    assert pod_cfg.prompts.contamination.benchmarks[0].startswith(str(pod_root / "benchmarks"))
    pod_plan = build_plan(pod_cfg, load_skills(pod_cfg.skills_path, pod_cfg.skills))
    # The config hash tagged on the pod's MLflow run is the one on the controller's Job annotation.
    assert pod_cfg.config_hash() == cfg.config_hash()
    assert {j.id: j.key for j in pod_plan.jobs.values()} == {
        j.id: j.key for j in controller_plan.jobs.values()
    }


def test_dry_run_cli_prints_yaml_documents_then_the_json_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--phase", "train", "--config", "configs/demo.yaml"]
        + ["--backend", "kubernetes", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert documents[-1] == summary
    assert [j["status"] for j in summary["jobs"]] == ["planned", "planned"]
    assert [d["kind"] for d in documents[:-1]] == ["ConfigMap", "Job", "Job"]
    # The demo keeps its store on this machine: fine to print, but pods could not reach it.
    assert "warning" in result.stderr and "storage.uri" in result.stderr


def test_names_hash_the_job_spec_but_not_the_submission(tmp_path):
    cfg = load_config(REPO / "configs" / "sdxl.yaml")
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    job = plan.job("train", "counting")

    def name(cfg, run_id: str) -> str:
        executor = KubernetesExecutor(cfg, tmp_path / "logs")
        executor.begin(run_id, "abc123")
        command = job_command(job, executor.job_config_path)
        return executor.manifests([job], command, {"SELMA_PARENT_RUN_ID": run_id})[0]["metadata"]["name"]

    first = name(cfg, "run-1")
    assert name(cfg, "run-2") == first  # a resubmission finds the same Job
    cfg.executor.kubernetes.resources["train"] = type(cfg.executor.kubernetes.resources["train"])(
        memory="200Gi"
    )
    assert name(cfg, "run-1") != first  # a changed spec is a new Job, not the stuck old one adopted


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"tracking": {"uri": "https://user:hunter2@mlflow.example"}}, "tracking.uri carries credentials"),
        ({"executor": {"kubernetes": {"env": {"HF_TOKEN": "hf_x"}}}}, "HF_TOKEN looks like a credential"),
    ],
)
def test_credentials_in_the_config_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        render(REPO / "configs" / "sdxl.yaml", tmp_path=tmp_path, **overrides)


def test_images_drawn_by_several_pods_is_one_indexed_job_each(tmp_path):
    documents, plan = render(REPO / "configs" / "sdxl.yaml", tmp_path=tmp_path, images={"num_jobs": 3})
    for document in documents:
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    images = [j for j in jobs_of(documents) if j["metadata"]["labels"]["selma.io/phase"] == "images"]
    assert len(images) == len([j for j in plan.jobs.values() if j.phase == "images"]) == 2  # one per skill
    for job in images:
        spec = job["spec"]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
        assert spec["backoffLimitPerIndex"] == 2 and "backoffLimit" not in spec  # each pod retried alone
        assert job["metadata"]["annotations"]["selma.io/processes"] == "3"
        assert "subdomain" not in spec["template"]["spec"]
        command = container(job)["command"]
        # Each pod draws the shards of its completion index ($JOB_COMPLETION_INDEX, read by jobs.run).
        assert command[-4:] == ["--num-shards", "3", "--config", f"{POD_CONFIG_DIR}/config.yaml"]
        assert "--shard-index" not in command
    # The other phases are as before: one pod each.
    others = [j for j in jobs_of(documents) if j["metadata"]["labels"]["selma.io/phase"] != "images"]
    assert others and not [j for j in others if j["spec"].get("completionMode") == "Indexed"]
    single, _ = render(REPO / "configs" / "sdxl.yaml", tmp_path=tmp_path)
    for job in jobs_of(single):
        assert "completionMode" not in job["spec"] and "--num-shards" not in container(job)["command"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("cpu", "2x"), "containers[job].resources.limits.cpu: '2x' is not a Kubernetes quantity"),
        ((GPU, "1.5"), f"containers[job].resources.limits.{GPU}: '1.5': expected a whole number of GPUs"),
    ],
)
def test_a_bad_quantity_in_a_custom_template_names_the_file_and_key(tmp_path, edit, message):
    """Not a bare ValueError from the sizing code, and exit 2 (a retry cannot help)."""
    import shutil

    from jobs.executors.kubernetes_manifests import default_templates_dir, load_template

    templates = tmp_path / "templates"
    shutil.copytree(default_templates_dir(), templates)
    train = yaml.safe_load((templates / "train.yaml").read_text())
    (container,) = train["spec"]["template"]["spec"]["containers"]
    container.setdefault("resources", {}).setdefault("limits", {})[edit[0]] = edit[1]
    container["resources"]["claims"] = [{"name": "gpu"}]  # a list (dynamic resource allocation): not sized
    (templates / "train.yaml").write_text(yaml.safe_dump(train))
    with pytest.raises(ConfigError, match=re.escape(f"Job template {templates / 'train.yaml'}: {message}")):
        load_template("train", templates)
