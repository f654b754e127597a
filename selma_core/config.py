"""The pipeline config: one YAML file, loaded into typed dataclasses.

```
selma_core.config.load_config("configs/demo.yaml")
```
Every key is checked: an unknown key, a wrong type or a missing file is a ``ConfigError`` naming the
file, the key and what was expected. Relative local paths (store folder, SQLite file, logs, cache)
are resolved against the working directory at load time, so every job of one pipeline sees the
same absolute locations; ``skills_dir`` is resolved against the config file's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from selma_core.errors import ConfigError
from selma_core.phases.evaluate import EvalConfig
from selma_core.phases.images import ImagesConfig
from selma_core.phases.merge import MergeConfig
from selma_core.phases.merge_search import MergeSearchConfig
from selma_core.phases.prompts import PromptsConfig
from selma_core.phases.train import TrainConfig
from selma_core.skills import check_skill_name
from selma_core.typed_yaml import execution_only, from_dict, read_yaml, to_dict

# Names become store keys, MLflow names and Kubernetes names and labels: DNS-1123 labels suit all.
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Environment variable names that hold credentials.
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


@dataclass
class StorageConfig:
    """Where every artifact lives: ``file:///abs/path``, ``file://relative/path`` or ``s3://bucket/prefix``."""

    uri: str = "file://selma-data/store"
    # S3-compatible endpoint (MinIO, moto, Ceph); None means AWS itself.
    endpoint_url: str | None = None
    region: str | None = None
    # How often an unreachable endpoint is retried (with backoff) before the job fails naming it.
    connect_retries: int = 3
    # An endpoint that answered once and then stops answering (an outage, a restart) is retried
    # beyond connect_retries: each operation keeps trying, with exponential backoff capped at
    # retry_backoff_max_s, for retry_budget_s seconds from its first failure; then the job fails
    # (exit 1) naming the endpoint. An endpoint never reached (a wrong URL) fails after connect_retries.
    retry_budget_s: float = 300.0
    retry_backoff_max_s: float = 30.0
    # Files a commit uploads, or a fetch downloads, at once. An output of many small files (eval's
    # images, thousands of PNGs) is bound by the endpoint's time per request, not its bandwidth.
    transfer_threads: int = 8

    def __post_init__(self) -> None:
        if not self.uri.startswith(("file://", "s3://")):
            raise ValueError(f"uri: expected file://PATH or s3://BUCKET/PREFIX, got {self.uri!r}")
        if self.connect_retries < 0:
            raise ValueError(f"connect_retries: expected >= 0, got {self.connect_retries}")
        if self.retry_budget_s < 0:
            raise ValueError(f"retry_budget_s: expected >= 0, got {self.retry_budget_s}")
        if not self.retry_backoff_max_s > 0:
            raise ValueError(f"retry_backoff_max_s: expected > 0, got {self.retry_backoff_max_s}")
        if self.transfer_threads < 1:
            raise ValueError(f"transfer_threads: expected >= 1, got {self.transfer_threads}")


@dataclass
class TrackingConfig:
    """MLflow: ``sqlite:///relative/or/abs.db`` (embedded) or ``http(s)://host:port`` (a server)."""

    uri: str = "sqlite:///selma-data/mlflow.db"
    # Registered model name for merged models; defaults to the pipeline name.
    registered_model_name: str | None = None
    connect_retries: int = 3
    # Tracking never fails finished work: when the server stops answering mid-job, a job's metrics,
    # params, tags and small JSON artifacts are buffered in order in a local file (at most
    # buffer_max_mb) and flushed by the next call that reaches the server (tried at most every
    # retry_interval_s) or at the job's end, which waits up to flush_budget_s for the server; past
    # that the job ends with its output committed and names the buffer file to replay.
    flush_budget_s: float = 120.0
    retry_interval_s: float = 5.0
    # None: selma-tracking-buffer-<uid>/ in the system's temporary folder, this user's alone.
    buffer_dir: str | None = None
    buffer_max_mb: int = 256

    def __post_init__(self) -> None:
        if not self.uri.startswith(("sqlite:///", "http://", "https://")):
            raise ValueError(f"uri: expected sqlite:///PATH or http(s)://HOST:PORT, got {self.uri!r}")
        if self.connect_retries < 0:
            raise ValueError(f"connect_retries: expected >= 0, got {self.connect_retries}")
        for name in ("flush_budget_s", "retry_interval_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.buffer_max_mb < 1:
            raise ValueError(f"buffer_max_mb: expected >= 1, got {self.buffer_max_mb}")


# Where this machine keeps things, as (section, key): left out of the config hash.
MACHINE_LOCAL_PATHS = (("", "cache_dir"), ("", "skills_dir"), ("executor", "log_dir"))


@dataclass
class NodePool:
    """Where a phase's pods are scheduled: a node pool by its labels, and the taints it tolerates."""

    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    # A full Kubernetes affinity (e.g. preferred GPU types); None sets none.
    affinity: dict[str, Any] | None = None


def _default_gpu_pool() -> NodePool:
    # GPU nodes are usually tainted so that only pods asking for GPUs land there.
    return NodePool(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])


@dataclass
class PodResources:
    """A phase's pod size; a field left null keeps the default of the phase's template in k8s/jobs/."""

    cpu: str | None = None
    memory: str | None = None
    gpus: int | None = None
    # The pod's local disk (requests and limits); the model cache's emptyDir gets it less /tmp's 10Gi
    # and 4Gi kept for logs.
    ephemeral_storage: str | None = None
    # The Job fails when it has run this long (all retries together).
    active_deadline_seconds: int | None = None

    def __post_init__(self) -> None:
        if self.gpus is not None and self.gpus < 0:
            raise ValueError(f"gpus: expected >= 0, got {self.gpus}")
        if self.active_deadline_seconds is not None and self.active_deadline_seconds < 1:
            raise ValueError(f"active_deadline_seconds: expected >= 1, got {self.active_deadline_seconds}")


@dataclass
class KubernetesConfig:
    """The Kubernetes executor: every job a ``batch/v1`` Job built from the phase's template."""

    namespace: str = "selma"
    # The job image (see images/README.md); pin a digest or tag per release.
    image: str = "selma-job:latest"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = field(default_factory=list)
    # None: $KUBECONFIG or ~/.kube/config, or the in-cluster config when the controller runs in a pod.
    kubeconfig: str | None = None
    context: str | None = None
    # What job pods run as (k8s/serviceaccount.yaml; annotate it for workload identity).
    service_account: str = "selma-job"
    # Secrets whose keys become the job's environment (S3, MLflow, Hugging Face, LLM API keys).
    # Credentials reach pods only this way, never through the config or a manifest.
    secrets: list[str] = field(default_factory=lambda: ["selma-credentials"])
    # Plain, non-secret environment variables for every job.
    env: dict[str, str] = field(default_factory=dict)
    # A Kueue LocalQueue: Jobs are created suspended with its label and Kueue admits them.
    queue: str | None = None
    gpu_pool: NodePool = field(default_factory=_default_gpu_pool)
    cpu_pool: NodePool = field(default_factory=NodePool)
    # Per phase ("train", "merge-search", ...): pod size over the template's defaults.
    resources: dict[str, PodResources] = field(default_factory=dict)
    # Multi-GPU training: torchrun over this many GPUs in one pod, and over this many pods (nodes)
    # of an Indexed Job that find each other through a headless Service.
    train_gpus: int = 1
    train_nodes: int = 1
    backoff_limit: int = 2
    ttl_seconds_after_finished: int = 86400
    # A PersistentVolumeClaim for /cache (model weights), shared by every pod, so ReadWriteMany (a
    # ReadWriteOnce claim holds a second node's pod in ContainerCreating); None: an emptyDir per pod.
    cache_volume_claim: str | None = None
    # Folder of the per-phase Job templates; None: k8s/jobs/ of this checkout or image.
    templates_dir: str | None = None

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.namespace):
            raise ValueError(f"namespace: expected a DNS-1123 label, got {self.namespace!r}")
        for name in ("train_gpus", "train_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.backoff_limit < 0 or self.ttl_seconds_after_finished < 0:
            raise ValueError("backoff_limit and ttl_seconds_after_finished: expected >= 0")
        secret_like = [k for k in self.env if SECRET_NAME.search(k)]
        if secret_like:
            raise ValueError(
                f"env: {secret_like[0]} looks like a credential; put it in a Secret listed in secrets, "
                "never in the config (it would be written into every manifest)"
            )
        from selma_core.plan import PHASES

        unknown = sorted(set(self.resources) - set(PHASES))
        if unknown:
            raise ValueError(f"resources: unknown phase {unknown[0]!r}; phases: {', '.join(PHASES)}")
        gpus = self.resources["train"].gpus if "train" in self.resources else None
        cpu_pod = gpus == 0 and self.train_gpus == 1 and self.train_nodes == 1  # one process, no GPU
        if gpus is not None and gpus != self.train_gpus and not cpu_pod:
            # The pod's GPUs and torchrun's processes are one number: two that differ would train on
            # fewer GPUs (or pods) than asked, without a word.
            raise ValueError(
                f"resources.train.gpus ({gpus}) disagrees with train_gpus ({self.train_gpus}) and "
                f"train_nodes ({self.train_nodes}): set train_gpus (the GPUs of each training pod) and "
                "leave resources.train.gpus out"
            )


@dataclass
class ExecutorConfig:
    """How jobs run: ``local`` subprocesses, or ``kubernetes`` Jobs."""

    kind: Literal["local", "kubernetes"] = "local"
    # How many jobs run at once (per-skill jobs of one phase run in parallel up to this).
    max_parallel: int = 2
    # One log file per job here (Kubernetes: each pod's log, saved when its Job ends).
    log_dir: str = "selma-data/logs"
    # Local executor: fork each job from a process that imported torch, diffusers, transformers, peft
    # and MLflow once (~13 s a job saved on 2 cores), instead of starting each afresh. Each job is
    # still a process of its own, with its own environment, log and exit status.
    fork_server: bool = True
    # Local executor: the GPUs jobs are placed on. Each process of a GPU phase (images, train,
    # merge-search, eval; prompts with a transformers LLM) sees one of them (CUDA_VISIBLE_DEVICES;
    # a train job, train_gpus of them), the one running the fewest processes, so side-by-side jobs
    # and an images job's processes spread over the GPUs. null: every GPU the controller sees
    # (CUDA_VISIBLE_DEVICES's where it is set, else nvidia-smi's); a list: those of them, by
    # position (0: the first, as nvidia-smi numbers them, or the first of CUDA_VISIBLE_DEVICES);
    # []: none placed, each job sees what the controller sees (so too with device naming one GPU,
    # cuda:1).
    gpus: list[int] | None = None
    # Local executor: GPUs one train job trains its expert on, data parallel (torchrun, one process
    # a GPU; the same global batch as on one). The Kubernetes executor's is kubernetes.train_gpus.
    # Without GPUs, that many CPU processes.
    train_gpus: int = 1
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)

    def __post_init__(self) -> None:
        if self.max_parallel < 1:
            raise ValueError(f"max_parallel: expected >= 1, got {self.max_parallel}")
        if self.train_gpus < 1:
            raise ValueError(f"train_gpus: expected >= 1, got {self.train_gpus}")
        gpus = self.gpus or []
        if any(gpu < 0 for gpu in gpus) or len(set(gpus)) != len(gpus):
            raise ValueError(f"gpus: expected distinct GPU indices (>= 0), got {self.gpus}")


# promote.max_skill_regression's default per metric, in its units (typical scores: CLIPScore 25-35,
# PickScore 19-23, ImageReward -2 to 2, HPS 0.2-0.35, VQAScore 0-1).
MAX_SKILL_REGRESSION = {
    "clip_score": 0.5,
    "pickscore": 0.2,
    "image_reward": 0.05,
    "hps": 0.005,
    "vqascore": 0.01,
}


@dataclass
class PromoteConfig:
    """When ``python -m jobs.promote`` moves the ``champion`` alias to a candidate."""

    # The evaluation score compared (tagged on each version by the eval phase), higher is better.
    metric: Literal["clip_score", "pickscore", "image_reward", "hps", "vqascore"] = "clip_score"
    # Refuse when any skill's score drops by more than this, in the metric's units; null: about 1-2%
    # of the metric's usual range (MAX_SKILL_REGRESSION: CLIPScore 0.5, PickScore 0.2, ImageReward
    # 0.05, HPS 0.005, VQAScore 0.01).
    max_skill_regression: float | None = None

    def __post_init__(self) -> None:
        if self.max_skill_regression is not None and self.max_skill_regression < 0:
            raise ValueError(f"max_skill_regression: expected >= 0, got {self.max_skill_regression}")

    @property
    def skill_regression_limit(self) -> float:
        """``max_skill_regression``, or the metric's default: one number for every metric would
        be 1.5% of CLIPScore's range and more than the whole of HPS's."""
        if self.max_skill_regression is not None:
            return self.max_skill_regression
        return MAX_SKILL_REGRESSION[self.metric]


@dataclass
class PipelineConfig:
    """A whole SELMA pipeline: models, skills, per-phase settings and where things run and live."""

    name: str
    # The model to improve: a hub id ("stabilityai/stable-diffusion-2-1"), a local folder saved with
    # save_pretrained, or a random test model ("random:tiny-sd", "random:tiny-sdxl").
    base_model: str
    skills: list[str]
    base_model_revision: str | None = None
    # The model that draws the training images; None means the base model. A weaker model here is
    # SELMA's weak-to-strong setting.
    generator_model: str | None = None
    generator_model_revision: str | None = None
    # Folder of skills/<name>.yaml files, relative to this config file.
    skills_dir: str = "../skills"
    # Local scratch: materialized random test models and artifacts fetched from the store.
    cache_dir: str = "selma-data/cache"
    # "auto" picks CUDA when available, else CPU; or cpu, cuda, cuda:N, mps. Not part of any output's
    # key (where the work runs, not what it is): outputs made on the CPU are reused on a GPU.
    device: str = "auto"
    # Weights and adapters are read from safetensors only: a pickle checkpoint (.bin, .pt, .ckpt,
    # .pth) can run arbitrary code when read, so it is refused naming the file. true reads them,
    # with torch.load(weights_only=True) (diffusers/transformers do the same). Execution-only: it
    # decides whether a job may read such a file, not what it computes from the weights, so
    # changing it redoes nothing (the config hash on every MLflow run still records it).
    allow_pickle_checkpoints: bool = execution_only(False)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge_search: MergeSearchConfig = field(default_factory=MergeSearchConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    # Not a YAML key: where the config was read from (set by load_config).
    source_path: str = field(default="", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(
                f"name: expected lowercase letters, digits and '-' (at most 63, DNS-1123), got {self.name!r}"
            )
        if not self.skills:
            raise ValueError("skills: expected at least one skill name, got an empty list")
        for skill in self.skills:
            try:
                check_skill_name(skill)
            except ValueError as e:
                raise ValueError(f"skills: {e}") from None
        if len(set(self.skills)) != len(self.skills):
            raise ValueError(f"skills: duplicate names in {self.skills}")
        if self.generator_model_revision is not None and self.generator_model is None:
            raise ValueError(
                "generator_model_revision: pins generator_model, which is not set (the base model draws "
                "the images: pin it with base_model_revision)"
            )
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            # Else torch refuses it inside the first GPU job, an exit 1 retried as an outage.
            raise ValueError(f"device: expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.merge_search.enabled and self.merge.method not in ("linear", "adapters"):
            raise ValueError(
                f"merge_search scores linear combinations of the experts; merge.method {self.merge.method!r} "
                "would apply the weights differently (use linear or adapters, or turn merge_search off)"
            )

    def phase_config(self, phase: str):
        """The settings of a phase by its name ("merge-search" -> ``merge_search``)."""
        return getattr(self, phase.replace("-", "_"))

    @property
    def generator(self) -> str:
        return self.generator_model or self.base_model

    @property
    def generator_revision(self) -> str | None:
        return self.generator_model_revision if self.generator_model else self.base_model_revision

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model_name or self.name

    @property
    def skills_path(self) -> Path:
        return Path(self.skills_dir)

    def to_dict(self) -> dict:
        return to_dict(self)

    def config_hash(self) -> str:
        """A short hash of the whole resolved config (tagged on every MLflow run), without where this
        machine keeps things (cache, skill files, logs, templates, benchmark files: their contents
        are in the output keys): the controller and a Kubernetes pod, which sees other paths, agree."""
        data = self.to_dict()
        for section, key in MACHINE_LOCAL_PATHS:
            (data[section] if section else data).pop(key, None)
        data["executor"]["kubernetes"].pop("templates_dir", None)
        data["prompts"]["contamination"].pop("benchmarks", None)
        return stable_hash(data)


def stable_hash(data: object, length: int = 16) -> str:
    """SHA-256 of canonical JSON: equal data gives an equal hash on every machine and run."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _resolve_paths(cfg: PipelineConfig, config_dir: Path) -> None:
    if cfg.storage.uri.startswith("file://"):
        path = cfg.storage.uri[len("file://") :]
        cfg.storage.uri = "file://" + str(Path(path).expanduser().resolve())
    if cfg.tracking.uri.startswith("sqlite:///"):
        path = cfg.tracking.uri[len("sqlite:///") :]
        # sqlite:///rel.db is relative, sqlite:////abs.db absolute (SQLAlchemy's rule).
        cfg.tracking.uri = "sqlite:///" + str(Path(path).expanduser().resolve())
    cfg.executor.log_dir = str(Path(cfg.executor.log_dir).expanduser().resolve())
    cfg.cache_dir = str(Path(cfg.cache_dir).expanduser().resolve())
    cfg.skills_dir = str((config_dir / cfg.skills_dir).resolve())
    cfg.prompts.contamination.benchmarks = [
        str((config_dir / path).expanduser().resolve()) for path in cfg.prompts.contamination.benchmarks
    ]
    if cfg.eval.clip_model.startswith((".", "~")):
        cfg.eval.clip_model = str(Path(cfg.eval.clip_model).expanduser().resolve())
    for section, attr in (
        (cfg, "base_model"),
        (cfg, "generator_model"),
        (cfg.images, "nsfw_checker"),
        (cfg.train, "vae_model"),
    ):
        value = getattr(section, attr)
        # Local model folders are relative to the working directory, like the store; hub ids stay.
        if value and value.startswith((".", "/", "~")):
            setattr(section, attr, str(Path(value).expanduser().resolve()))


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> PipelineConfig:
    """Load and validate a pipeline config file (plus optional top-level overrides); a path, or a
    ``file://`` URI as the job contract writes it."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise ConfigError(
            f"{text}: a config is read from a local path (or file:// URI), not {text.split(':')[0]}://"
        )
    path = Path(text)
    data = read_yaml(path)
    if overrides:
        data = {**data, **overrides}
    cfg = from_dict(PipelineConfig, data, source=str(path))
    _resolve_paths(cfg, path.resolve().parent)
    cfg.source_path = str(path.resolve())
    return cfg


def config_from_dict(data: dict, source: str = "<config>") -> PipelineConfig:
    """Build a config from already-resolved data (as written by ``PipelineConfig.to_dict``)."""
    cfg = from_dict(PipelineConfig, data, source=source)
    cfg.source_path = source
    return cfg
