"""Kubernetes manifests for a pipeline's jobs: the phase templates of ``k8s/jobs/`` filled in from the config.

Pure functions from (config, job specs) to plain manifest dicts, so ``--dry-run``, the executor and the
schema tests all see exactly the same documents. What a Job gets:

- the phase's template (``k8s/jobs/job.yaml`` with ``k8s/jobs/<phase>.yaml`` merged on top);
- an Indexed Job for a phase's shards (merge-search candidates), for a multi-node training group,
  and for an images job drawn by ``images.num_jobs`` pods (``--num-shards N``; each pod draws the
  shards of its ``$JOB_COMPLETION_INDEX``, all at once, each retried alone);
- a deterministic name from a hash of what the Job does (its outputs' content-addressed keys, its
  command, its image): resubmitting finds the existing Job (409) instead of starting a duplicate;
- the ``app.kubernetes.io/*`` and ``selma.io/*`` labels, and annotations with the config hash, the
  git commit and the pipeline's MLflow run id;
- the GPU node pool when the phase asks for GPUs, the CPU pool otherwise; the Kueue queue label (and
  ``suspend: true``, Kueue admits it) when a queue is configured;
- the pipeline's frozen config, skill files and benchmark prompts from one ConfigMap, mounted read-only;
- credentials only as ``envFrom`` Secrets: nothing secret is ever written into a manifest.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobs.executors.base import image_process_command
from selma_core.config import KubernetesConfig, PipelineConfig, PodResources, stable_hash
from selma_core.errors import ConfigError
from selma_core.plan import JobSpec

POD_CONFIG_DIR = "/etc/selma"
POD_CONFIG_PATH = f"{POD_CONFIG_DIR}/config.yaml"
POD_CACHE_DIR = "/cache/selma"
CONTAINER = "job"
GPU = "nvidia.com/gpu"
TORCH_PORT = 29500
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
LABEL_PIPELINE = "selma.io/pipeline"
LABEL_PHASE = "selma.io/phase"
LABEL_SKILL = "selma.io/skill"
ANNOTATION_JOB_IDS = "selma.io/jobs"
ANNOTATION_MLFLOW_RUN = "selma.io/mlflow-run-id"
# An images job drawn by several pods (images.num_jobs): their number, one completion index each.
ANNOTATION_PROCESSES = "selma.io/processes"
# A ConfigMap holds at most 1 MiB; leave room for its metadata.
CONFIG_MAP_LIMIT = 1_000_000
# Job names stay short enough for Indexed pods' hostnames (<name>-<index>, at most 63 characters).
MAX_JOB_NAME = 52
# Stands for the Job's name until the name (a hash of everything else) is known.
NAME_PLACEHOLDER = "selma-job-name-placeholder"
# Environment that differs per submission, not per work: left out of the name's hash.
PER_SUBMISSION_ENV = {"SELMA_PARENT_RUN_ID", "SELMA_GIT_COMMIT"}


def default_templates_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "k8s" / "jobs"


def merge_manifest(base: Any, overlay: Any) -> Any:
    """``overlay`` on top of ``base``: maps merge key by key, lists of named maps merge by name
    (like a strategic merge patch of containers and volumes), anything else is replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            merged[key] = merge_manifest(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if (
        isinstance(base, list)
        and isinstance(overlay, list)
        and all(isinstance(i, dict) for i in base + overlay)
    ) and all("name" in i for i in base + overlay):
        merged_list = [copy.deepcopy(i) for i in base]
        names = [i["name"] for i in merged_list]
        for item in overlay:
            if item["name"] in names:
                at = names.index(item["name"])
                merged_list[at] = merge_manifest(merged_list[at], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(overlay)


def load_template(phase: str, templates_dir: str | Path | None = None) -> dict:
    """The phase's Job template: ``job.yaml`` with ``<phase>.yaml`` merged on top."""
    folder = Path(templates_dir) if templates_dir else default_templates_dir()
    documents = []
    for name in ("job.yaml", f"{phase}.yaml"):
        path = folder / name
        if not path.is_file():
            raise ConfigError(
                f"executor.kubernetes.templates_dir: Job template {path} not found "
                f"(expected job.yaml and one <phase>.yaml per phase in {folder})"
            )
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"Job template {path}: invalid YAML: {e}") from e
        if not isinstance(document, dict) or document.get("kind") != "Job":
            raise ConfigError(f"Job template {path}: expected a batch/v1 Job document")
        _check_quantities(document, path)
        documents.append(document)
    return merge_manifest(documents[0], documents[1])


def _check_quantities(document: dict, path: Path) -> None:
    """Every resource quantity and volume size in a template is one Kubernetes parses (the sizing
    code compares them): a bad one is a ConfigError naming the file and the key, not a bare
    ValueError from deep in the sizing."""
    from kubernetes.utils.quantity import parse_quantity

    pod = (((document.get("spec") or {}).get("template") or {}).get("spec")) or {}
    found = []
    for container in pod.get("containers") or []:
        resources = container.get("resources") or {}
        for kind in ("limits", "requests"):  # (claims, for dynamic resource allocation, is a list)
            for key, value in (resources.get(kind) or {}).items():
                found.append(
                    (f"containers[{container.get('name')}].resources.{kind}.{key}", value, key == GPU)
                )
    for volume in pod.get("volumes") or []:
        limit = (volume.get("emptyDir") or {}).get("sizeLimit")
        if limit is not None:
            found.append((f"volumes[{volume.get('name')}].emptyDir.sizeLimit", limit, False))
    for where, value, whole in found:
        try:
            quantity = parse_quantity(value)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"Job template {path}: {where}: {value!r} is not a Kubernetes quantity ({e})"
            ) from e
        if whole and quantity != int(quantity):
            raise ConfigError(f"Job template {path}: {where}: {value!r}: expected a whole number of GPUs")


def dns_label(text: str) -> str:
    """Lowercase letters, digits and '-' (skill names may have '_', Kubernetes names may not)."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def job_name(pipeline: str, first: JobSpec, manifest: dict) -> str:
    """Deterministic: a hash of the Job as it would run, so the same work gets the same name on
    every submission (409: found, not duplicated), and a changed spec (image, resources, node
    pool, command) a new one. What changes per submission and not the work is left out: the
    pipeline's MLflow run and commit, and which ConfigMap (the output keys in the command cover
    what the config determines)."""
    spec = copy.deepcopy(manifest)
    spec["metadata"]["annotations"] = {
        k: v
        for k, v in spec["metadata"].get("annotations", {}).items()
        if k in (ANNOTATION_JOB_IDS, "selma.io/outputs")
    }
    pod = spec["spec"]["template"]
    pod["metadata"].pop("annotations", None)
    for container in pod["spec"]["containers"]:
        container["env"] = [e for e in container.get("env", []) if e["name"] not in PER_SUBMISSION_ENV]
    for volume in pod["spec"].get("volumes", []):
        volume.pop("configMap", None)
    digest = stable_hash(spec, 10)
    readable = "-".join(dns_label(p) for p in (pipeline, first.phase, first.skill or "") if p)
    if not readable[:1].isalpha():
        readable = f"selma-{readable}"  # Service names (multi-node) must start with a letter
    room = MAX_JOB_NAME - len(digest) - 1
    return f"{readable[:room].rstrip('-')}-{digest}"


@dataclass
class SubmissionInfo:
    """What every Job of one ``jobs.submit`` invocation carries."""

    pipeline: str
    config_hash: str
    git_commit: str
    mlflow_run_id: str
    config_map: str
    # The ConfigMap's keys and the paths they are mounted at (see ``config_map_items``).
    config_items: list[dict]


def pipeline_labels(pipeline: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "selma",
        "app.kubernetes.io/instance": pipeline,
        "app.kubernetes.io/part-of": "selma",
        "app.kubernetes.io/managed-by": "selma-controller",
        LABEL_PIPELINE: pipeline,
    }


def job_labels(pipeline: str, job: JobSpec) -> dict[str, str]:
    labels = {**pipeline_labels(pipeline), "app.kubernetes.io/component": job.phase, LABEL_PHASE: job.phase}
    if job.skill:
        labels[LABEL_SKILL] = job.skill
    return labels


# A prompts job that runs its LLM in the pod (prompts.backend transformers) is sized like a GPU phase:
# the default 7B model's ~15 GB of bf16 weights pass through host memory on their way to the GPU.
LLM_IN_POD = {"cpu": "8", "memory": "48Gi"}


def larger(quantity: str | int | None, floor: str) -> str:
    """The larger of two Kubernetes quantities ("8", "48Gi"); ``floor`` when the first is unset."""
    from kubernetes.utils.quantity import parse_quantity

    if quantity is None or parse_quantity(floor) > parse_quantity(quantity):
        return floor
    return str(quantity)


def phase_resources(cfg: PipelineConfig, phase: str, template: dict) -> tuple[dict, int]:
    """The container's resources and its GPU count: the template's, then the config's overrides
    (cpu, memory, ephemeral storage set requests and limits alike; GPUs go in limits)."""
    container = _container(template)
    limits = dict(container.get("resources", {}).get("limits", {}))
    requests = dict(container.get("resources", {}).get("requests", limits))
    override = cfg.executor.kubernetes.resources.get(phase, PodResources())
    gpus = int(limits.get(GPU, 0))
    if phase == "prompts" and cfg.prompts.needs_gpu:
        gpus = max(gpus, 1)
        for sizes in (requests, limits):  # at least that; a custom template's larger size stays
            for key, floor in LLM_IN_POD.items():
                sizes[key] = larger(sizes.get(key), floor)
    if phase == "train":
        gpus = max(gpus, cfg.executor.kubernetes.train_gpus) if gpus else gpus
    if override.gpus is not None:
        gpus = override.gpus
    for key, value in (("cpu", override.cpu), ("memory", override.memory)):
        if value is not None:
            requests[key] = limits[key] = value
    if override.ephemeral_storage is not None:
        # The pod's local disk: the model cache and /tmp (emptyDirs) count against it.
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = override.ephemeral_storage
    requests.pop(GPU, None)
    limits.pop(GPU, None)
    if gpus:
        # Extended resources are set in limits (requests default to them); quantities are strings.
        limits[GPU] = str(gpus)
    return {"requests": requests, "limits": limits}, gpus


def size_the_cache(pod_spec: dict, ephemeral_storage: str | None, phase: str) -> None:
    """With ``resources.<phase>.ephemeral_storage``, the cache emptyDir gets what the pod's local
    disk has beyond /tmp's: the template's 50Gi would otherwise still evict a larger model cache, or
    a smaller disk would be evicted before the volumes' own limits apply."""
    from kubernetes.utils.quantity import parse_quantity

    if ephemeral_storage is None:
        return
    volumes = {volume["name"]: volume for volume in pod_spec.get("volumes", [])}
    cache, tmp = volumes.get("cache", {}).get("emptyDir"), volumes.get("tmp", {}).get("emptyDir")
    if cache is None:  # a cache volume claim: not on the pod's disk
        return
    where = f"executor.kubernetes.resources.{phase}.ephemeral_storage {ephemeral_storage}"
    try:
        total = parse_quantity(ephemeral_storage)
    except ValueError as e:
        raise ConfigError(f"{where}: not a Kubernetes quantity (e.g. 200Gi): {e}") from e
    # /tmp's emptyDir, and room for the container's logs and writable layer (4Gi, as the templates keep).
    reserved = (parse_quantity(tmp.get("sizeLimit", "0")) if tmp else 0) + 4 * 2**30
    if total - reserved < 2**30:
        raise ConfigError(
            f"{where}: expected at least 1Gi for the model cache beyond /tmp's "
            f"{tmp.get('sizeLimit') if tmp else 0} and 4Gi for logs"
        )
    cache["sizeLimit"] = str(int(total - reserved))


def _container(manifest: dict) -> dict:
    containers = manifest["spec"]["template"]["spec"]["containers"]
    for container in containers:
        if container.get("name") == CONTAINER:
            return container
    raise ConfigError(f"Job template: no container named {CONTAINER!r} (the controller fills in that one)")


def _torchrun(command: list[str], gpus: int, nodes: int, name: str) -> list[str]:
    """``python -m jobs.run ...`` under torchrun over ``gpus`` GPUs on each of ``nodes`` pods.

    jobs.run starts torchrun itself (``--nproc-per-node``), so the pod exits with rank 0's exit code:
    torchrun alone reports every worker failure as 1, and the podFailurePolicy's "exit 2 is a
    configuration error" would never fire."""
    launch = [f"--nproc-per-node={gpus}"]
    if nodes > 1:
        # Pod 0 of the Indexed Job is the rendezvous host, reached through the headless Service.
        launch += [
            f"--nnodes={nodes}",
            "--node-rank=$(SELMA_NODE_RANK)",
            f"--master-addr={name}-0.{name}",
            f"--master-port={TORCH_PORT}",
        ]
    return [*command, *launch]


def image_processes(cfg: PipelineConfig, jobs: list[JobSpec]) -> int:
    """How many pods draw one images job (``images.num_jobs``); 1 for any other job."""
    return cfg.images.num_jobs if len(jobs) == 1 and jobs[0].phase == "images" else 1


def render_job(
    cfg: PipelineConfig,
    jobs: list[JobSpec],
    command: list[str],
    info: SubmissionInfo,
    env: dict[str, str],
) -> list[dict]:
    """The manifests for one job, or for several shards of a phase as one Indexed Job; a
    multi-node training Job comes with its headless Service; an images job drawn by several pods
    (``images.num_jobs``) is an Indexed Job of that many pods, all at once."""
    k8s: KubernetesConfig = cfg.executor.kubernetes
    first = jobs[0]
    phase = first.phase
    template = load_template(phase, k8s.templates_dir)
    resources, gpus = phase_resources(cfg, phase, template)
    nodes = k8s.train_nodes if phase == "train" and gpus else 1
    processes = image_processes(cfg, jobs)
    name = NAME_PLACEHOLDER
    if phase == "train" and (gpus > 1 or nodes > 1):
        command = _torchrun(command, gpus, nodes, name)
    if processes > 1:
        # Each pod draws the shards of its completion index ($JOB_COMPLETION_INDEX, read by jobs.run).
        command = image_process_command(command, processes)
    labels = job_labels(info.pipeline, first)
    if k8s.queue:
        labels[KUEUE_QUEUE_LABEL] = k8s.queue
    annotations = {
        "selma.io/config-hash": info.config_hash,
        "selma.io/git-commit": info.git_commit,
        ANNOTATION_MLFLOW_RUN: info.mlflow_run_id,
        ANNOTATION_JOB_IDS: ",".join(j.id for j in jobs),
        "selma.io/outputs": ",".join(j.key for j in jobs),
    }
    if processes > 1:
        annotations[ANNOTATION_PROCESSES] = str(processes)
    manifest = template
    manifest["metadata"] = {
        **manifest.get("metadata", {}),
        "name": name,
        "namespace": k8s.namespace,
        "labels": {**manifest.get("metadata", {}).get("labels", {}), **labels},
        "annotations": annotations,
    }
    spec = manifest["spec"]
    spec["ttlSecondsAfterFinished"] = k8s.ttl_seconds_after_finished
    override = k8s.resources.get(phase, PodResources())
    if override.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = override.active_deadline_seconds
    if k8s.queue:
        spec["suspend"] = True  # Kueue unsuspends the Job when the queue admits it
    indexed = len(jobs) > 1 or nodes > 1 or processes > 1
    if indexed:
        completions = len(jobs) if len(jobs) > 1 else max(nodes, processes)
        spec["completionMode"] = "Indexed"
        spec["completions"] = completions
        # A torchrun group's nodes, and an images job's pods, all run at once; a phase's shards (the
        # merge-search candidates) up to executor.max_parallel at a time.
        together = nodes > 1 or processes > 1
        spec["parallelism"] = completions if together else min(completions, cfg.executor.max_parallel)
        if nodes > 1:
            # The nodes of one torchrun group succeed or fail together: no per-index retries.
            spec["backoffLimit"] = k8s.backoff_limit
        else:
            spec.pop("backoffLimit", None)
            spec["backoffLimitPerIndex"] = k8s.backoff_limit
    else:
        spec["backoffLimit"] = k8s.backoff_limit

    pod = spec["template"]
    pod["metadata"] = {
        **pod.get("metadata", {}),
        "labels": {**pod.get("metadata", {}).get("labels", {}), **job_labels(info.pipeline, first)},
        "annotations": {"selma.io/config-hash": info.config_hash},
    }
    pod_spec = pod["spec"]
    pod_spec["serviceAccountName"] = k8s.service_account
    if k8s.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in k8s.image_pull_secrets]
    pool = k8s.gpu_pool if gpus else k8s.cpu_pool
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        pod_spec["tolerations"] = copy.deepcopy(pool.tolerations)
    if pool.affinity:
        pod_spec["affinity"] = copy.deepcopy(pool.affinity)
    if nodes > 1:
        pod_spec["subdomain"] = name  # pods resolve as <name>-<index>.<name>

    container = _container(manifest)
    container["image"] = k8s.image
    container["imagePullPolicy"] = k8s.image_pull_policy
    container["command"] = command
    container["resources"] = resources
    job_env = {**k8s.env, **env}
    container["env"] = [e for e in container.get("env", []) if e["name"] not in job_env] + [
        {"name": key, "value": value} for key, value in sorted(job_env.items())
    ]
    if indexed:
        container["env"].append(
            {
                "name": "SELMA_NODE_RANK",
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                    }
                },
            }
        )
    if k8s.secrets:
        container["envFrom"] = [{"secretRef": {"name": secret}} for secret in k8s.secrets]
    for volume in pod_spec.get("volumes", []):
        if volume["name"] == "config":
            volume["configMap"] = {"name": info.config_map, "items": info.config_items}
        elif volume["name"] == "cache" and k8s.cache_volume_claim:
            volume.pop("emptyDir", None)
            volume["persistentVolumeClaim"] = {"claimName": k8s.cache_volume_claim}
    size_the_cache(pod_spec, k8s.resources.get(phase, PodResources()).ephemeral_storage, phase)
    if nodes > 1:
        # The nodes of one torchrun group cannot continue without a peer: any failure ends the Job
        # (after the disruption rule above, so preemption still doesn't count), and the controller
        # starts the group again, whole (KubernetesExecutor._restart_group).
        spec["podFailurePolicy"]["rules"].append(
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn", "values": [0]},
            }
        )
    documents = [manifest]
    if nodes > 1:
        documents.append(headless_service(name, k8s.namespace, labels))
    final_name = job_name(info.pipeline, first, manifest)
    return json.loads(json.dumps(documents).replace(NAME_PLACEHOLDER, final_name))


def headless_service(name: str, namespace: str, labels: dict[str, str]) -> dict:
    """DNS names for the pods of a multi-node training Job (torchrun's rendezvous)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "clusterIP": "None",
            "selector": {"batch.kubernetes.io/job-name": name},
            "ports": [{"name": "torch", "port": TORCH_PORT, "targetPort": TORCH_PORT}],
            # torchrun's pods must find each other before they are ready.
            "publishNotReadyAddresses": True,
        },
    }


def pod_files(cfg: PipelineConfig) -> dict[str, str]:
    """What a pod needs besides the image, by path under ``POD_CONFIG_DIR``: the frozen config (with
    the pod's own paths), the skill files, and the contamination benchmarks' prompts."""
    from selma_core.prompting.contamination import read_benchmark_prompts

    files: dict[str, str] = {}
    data = cfg.to_dict()
    data["cache_dir"] = POD_CACHE_DIR
    data["skills_dir"] = f"{POD_CONFIG_DIR}/skills"
    data["executor"]["log_dir"] = "/tmp/selma-logs"
    data["executor"]["kubernetes"]["templates_dir"] = None
    for name in cfg.skills:
        files[f"skills/{name}.yaml"] = (cfg.skills_path / f"{name}.yaml").read_text(encoding="utf-8")
    benchmarks = []
    for i, path in enumerate(cfg.prompts.contamination.benchmarks):
        # Only the prompts matter (the job's key hashes them), and they fit a ConfigMap where the
        # original files (DSG-1k's CSV: 1.9 MB) may not.
        target = f"benchmarks/{i:02d}-{dns_label(Path(path).stem)}.jsonl"
        files[target] = "".join(json.dumps({"prompt": p}) + "\n" for p in read_benchmark_prompts(path))
        benchmarks.append(f"{POD_CONFIG_DIR}/{target}")
    data["prompts"]["contamination"]["benchmarks"] = benchmarks
    files["config.yaml"] = yaml.safe_dump(data, sort_keys=False)
    return files


def render_config_map(cfg: PipelineConfig, files: dict[str, str]) -> dict:
    """One ConfigMap with the pod files; its name is a hash of their contents, so a changed config
    gets a new ConfigMap and Jobs already running keep reading the one they started with."""
    name = f"{dns_label(cfg.name)[:40]}-config-{stable_hash(files, 10)}"
    size = sum(len(text.encode()) for text in files.values())
    if size > CONFIG_MAP_LIMIT:
        raise ConfigError(
            f"the pipeline's config, skills and benchmark prompts take {size} bytes, more than a "
            f"ConfigMap holds ({CONFIG_MAP_LIMIT}); use fewer prompts.contamination.benchmarks"
        )
    keys = {path: path.replace("/", ".") for path in files}  # ConfigMap keys may not contain '/'
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": cfg.executor.kubernetes.namespace,
            "labels": {**pipeline_labels(cfg.name), "app.kubernetes.io/component": "config"},
        },
        "data": {keys[path]: text for path, text in sorted(files.items())},
        "immutable": True,
    }


def config_map_items(config_map: dict) -> list[dict]:
    """The ConfigMap's keys back at their paths (``skills.counting.yaml`` -> ``skills/counting.yaml``)."""
    items = []
    for key in config_map["data"]:
        folder, _, rest = key.partition(".")
        path = f"{folder}/{rest}" if folder in ("skills", "benchmarks") else key
        items.append({"key": key, "path": path})
    return items
