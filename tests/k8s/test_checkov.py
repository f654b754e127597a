"""checkov, a security scanner for Kubernetes manifests, passes on the static files of k8s/ (Job
templates included) and on every manifest the controller renders: each phase's Job, single- and
multi-GPU training, multi-node training (Indexed, with its headless Service), the Indexed merge-search
Job, and the ConfigMap. Both sets are scanned in one run, so the NetworkPolicies of k8s/ cover the
rendered Jobs' pods as they do on a cluster.

The checks skipped, each with its reason, are listed in .checkov.yaml and nowhere else. checkov lives
in its own virtualenv (.venv-checkov/, made by scripts/ensure-checkov.sh, which `make test` runs):
its dependencies would downgrade pinned packages of the project's. Without it the test is skipped
with how to install it, except under CI (CI=true), where a silent skip would hide that it never ran.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.jobs.test_kubernetes_manifests import render

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / ".checkov.yaml"
CHECKOV_VENV = REPO / ".venv-checkov"
# A deploy names its image by a release tag (the configs' selma-job:latest is for a local cluster);
# CKV_K8S_14 ("not latest or blank") holds the rendered Jobs to that.
IMAGE = "registry.example.com/selma/selma-job:1.0.0"
# Kinds that checkov has checks for, among those in k8s/.
CHECKED_KINDS = {"Deployment", "Job", "Service", "Role", "RoleBinding", "ServiceAccount", "Secret"}

# Each rendering covers different branches of the renderer; the names become the files' names.
VARIANTS: dict[str, dict] = {
    # Every phase as configs/sdxl.yaml runs it: one GPU for training, prompts from an LLM server.
    "sdxl": {},
    # torchrun over 4 GPUs of one pod; a local LLM for the prompts phase (a GPU prompts Job).
    "multi-gpu": {
        "executor": {"kubernetes": {"train_gpus": 4}},
        "prompts": {"backend": "transformers"},
    },
    # One pod per node (an Indexed Job and its headless Service); Kueue, a PVC cache, a pull Secret.
    "multi-node": {
        "executor": {
            "kubernetes": {
                "train_gpus": 8,
                "train_nodes": 2,
                "queue": "selma",
                "cache_volume_claim": "selma-cache",
                "image_pull_secrets": ["selma-registry"],
            }
        },
    },
    # The merge-search shards as one Indexed Job.
    "merge-search": {"merge_search": {"enabled": True, "strategy": "random", "samples": 3}},
}


def checkov_binary() -> str | None:
    local = CHECKOV_VENV / "bin" / "checkov"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("checkov")


@pytest.fixture(scope="module")
def checkov() -> str:
    binary = checkov_binary()
    if binary is None:
        how = (
            "checkov is not installed: run `bash scripts/ensure-checkov.sh` (it makes .venv-checkov/; "
            "`make test` runs it)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: the checkov scan must run, but {how}")
        pytest.skip(how)
    return binary


@pytest.fixture(scope="module")
def scanned(tmp_path_factory) -> Path:
    """A folder with a copy of k8s/ and the rendered manifests (one YAML file per variant)."""
    root = tmp_path_factory.mktemp("checkov")
    shutil.copytree(REPO / "k8s", root / "k8s")
    rendered = root / "rendered"
    rendered.mkdir()
    for name, variant in VARIANTS.items():
        overrides = copy.deepcopy(variant)
        executor = overrides.setdefault("executor", {}).setdefault("kubernetes", {})
        executor["image"] = IMAGE
        documents, _ = render(
            REPO / "configs" / "sdxl.yaml", tmp_path=tmp_path_factory.mktemp(name), **overrides
        )
        (rendered / f"{name}.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return root


def rendered_documents(root: Path) -> list[dict]:
    return [
        doc
        for path in sorted((root / "rendered").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]


def test_the_rendered_manifests_cover_every_kind_of_job(scanned):
    documents = rendered_documents(scanned)
    kinds = {doc["kind"] for doc in documents}
    assert kinds == {"ConfigMap", "Job", "Service"}, kinds
    jobs = [doc for doc in documents if doc["kind"] == "Job"]
    phases = {job["metadata"]["labels"]["selma.io/phase"] for job in jobs}
    assert phases == {"prompts", "images", "train", "merge-search", "merge", "eval"}, phases
    indexed = {
        job["metadata"]["labels"]["selma.io/phase"]
        for job in jobs
        if job["spec"].get("completionMode") == "Indexed"
    }
    assert indexed == {"train", "merge-search"}, indexed
    gpus = {
        job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for job in jobs
        if job["metadata"]["labels"]["selma.io/phase"] == "train"
    }
    assert {"1", "4", "8"} <= gpus, gpus


def run_checkov(checkov: str, root: Path) -> dict:
    # One run over one folder: checkov reports each -d separately and builds one graph per run, so
    # the NetworkPolicies only match the rendered pods when both are in the same folder.
    result = subprocess.run(
        [checkov, "--config-file", str(CONFIG), "--directory", ".", "--output", "json"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "LOG_LEVEL": "WARNING"},
    )
    # Exit 1 is "failed checks", which the report lists; anything else is checkov itself failing.
    assert result.returncode in (0, 1), f"checkov exited {result.returncode}:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    # One report per framework: the config asks for kubernetes only.
    (kubernetes,) = report if isinstance(report, list) else [report]
    assert kubernetes["check_type"] == "kubernetes", kubernetes["check_type"]
    return kubernetes


def test_checkov_passes_on_k8s_and_the_rendered_manifests(checkov, scanned):
    report = run_checkov(checkov, scanned)
    summary = report["summary"]
    results = report["results"]
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['file_path']} {c['resource']}"
        for c in results.get("failed_checks", [])
    ]
    assert not failed, f"checkov {summary['checkov_version']}: {len(failed)} failed\n" + "\n".join(failed)
    assert summary["parsing_errors"] == 0, results.get("parsing_errors")
    # Skips are .checkov.yaml's (those checks never run): an inline checkov.io/skip annotation
    # in a manifest would show up here, and must be moved there with its reason.
    skipped = [f"{c['check_id']}: {c['file_path']}" for c in results.get("skipped_checks", [])]
    assert not skipped, skipped
    # checkov really read everything: each rendered document, and the static files' objects.
    scanned_files = {c["file_path"].lstrip("/") for c in results["passed_checks"]}
    for name in VARIANTS:
        assert f"rendered/{name}.yaml" in scanned_files, sorted(scanned_files)
    # checkov has no checks for Namespaces, NetworkPolicies and Kueue's objects, so files holding only
    # those report nothing; the phase overlays k8s/jobs/<phase>.yaml are fragments (no metadata) that
    # it does not take for objects: the rendered Jobs are each of them merged onto k8s/jobs/job.yaml.
    static = {
        path.relative_to(scanned).as_posix()
        for path in [*(scanned / "k8s").glob("*.yaml"), scanned / "k8s" / "jobs" / "job.yaml"]
        if any(doc and doc.get("kind") in CHECKED_KINDS for doc in yaml.safe_load_all(path.read_text()))
    }
    assert {"k8s/jobs/job.yaml", "k8s/llm-server.yaml", "k8s/rbac.yaml"} <= static, sorted(static)
    assert static <= scanned_files, sorted(static - scanned_files)
    assert summary["resource_count"] >= len(rendered_documents(scanned)), summary
    assert summary["passed"] > 0
