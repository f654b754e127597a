"""The tracker interface: what phases and the controller record about a run.

A pipeline invocation is a parent run; each job is a child run tagged with its phase and skill.
Phases only see ``JobRun`` (log params, metrics, artifacts); the controller opens the parent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAG_PHASE = "selma.phase"
TAG_SKILL = "selma.skill"
TAG_CONFIG_HASH = "selma.config_hash"
TAG_GIT_COMMIT = "selma.git_commit"
TAG_PIPELINE = "selma.pipeline"
TAG_OUTPUT = "selma.output"
TAG_JOBS = "selma.jobs"
# A pipeline's jobs that --force reran (a pipeline run's tag), and an images process's "I/N".
TAG_FORCED = "selma.forced"
TAG_WORKER = "selma.worker"
# A pipeline run's controller, "HOST:PID": jobs.status tells a controller that was killed (its run
# never ended) from one at work, on the host it ran on.
TAG_CONTROLLER = "selma.controller"
# ... and its process where /proc tells it (selma_core.storage.lease.process_identity): only a
# process of this machine and PID namespace can be told dead from here.
TAG_CONTROLLER_PROCESS = "selma.controller_process"
# ... and, from anywhere, when it last said it was alive: the controller's clock, in epoch seconds,
# renewed every minute while the pipeline runs (jobs/heartbeat.py).
TAG_CONTROLLER_HEARTBEAT = "selma.controller_heartbeat"
# A registered adapter version's weights (pytorch_lora_weights.safetensors), by their SHA-256.
TAG_ADAPTER_SHA256 = "selma.adapter_sha256"
# ... and the merge output it is (its store key): what tells this configuration's version from
# another's under one registered model name (jobs.promote).
TAG_STORE_KEY = "selma.store_key"


class JobRun(ABC):
    """One job's run: everything a phase may record."""

    run_id: str

    @abstractmethod
    def log_params(self, params: dict[str, Any]) -> None: ...

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    @abstractmethod
    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None: ...

    @abstractmethod
    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None: ...

    @abstractmethod
    def set_tags(self, tags: dict[str, str]) -> None: ...

    @abstractmethod
    def tag_model_version(
        self,
        name: str,
        version: str,
        tags: dict[str, str],
        replace_prefixes: tuple[str, ...] = (),
        expect: dict[str, str] | None = None,
    ) -> bool:
        """Tags on a registered model version (evaluation scores, for promotion); its tags that start
        with one of ``replace_prefixes`` and are not in ``tags`` are deleted (an earlier evaluation's).
        ``expect``: tags the version must have, else it is left as it is; whether it was tagged."""

    @abstractmethod
    def register_lora_adapter(
        self,
        adapter_dir: Path,
        base_model: str,
        model_name: str,
        alias: str,
        tags: dict[str, str],
        base_model_revision: str | None = None,
    ) -> str:
        """Log a LoRA adapter as a model of this run, register it, point ``alias`` at it; the version.

        ``base_model_revision`` pins the base model the registered model loads."""

    def download_registered_adapter(self, name: str, version: str, dst: Path) -> dict[str, str | None]:
        """Download registered model ``name`` version ``version`` (a LoRA adapter) under ``dst``:
        ``{"adapter_path", "base_model", "base_model_revision"}`` (``base_model`` as the registering
        pipeline's config named it, where recorded). Trackers without a model registry
        cannot: a ``ConfigError`` says so."""
        from selma_core.errors import ConfigError

        raise ConfigError(f"models:/{name}/{version}: this tracker has no model registry")


@dataclass
class ModelVersion:
    """One version of a registered model, as promotion sees it."""

    name: str
    version: str
    tags: dict[str, str]
    aliases: list[str]


@dataclass
class RunRecord:
    """A tracked run, as status reports see it."""

    run_id: str
    name: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    start_ms: int | None
    end_ms: int | None
    tags: dict[str, str]


class Tracker(ABC):
    """Experiment tracking for one pipeline config (one experiment)."""

    uri: str

    @abstractmethod
    def check(self) -> None:
        """Raise ``EndpointError`` naming the endpoint when tracking cannot be reached."""

    @abstractmethod
    def start_pipeline_run(
        self, experiment: str, tags: dict[str, str], params: dict[str, Any], name: str = "pipeline"
    ) -> str:
        """Open the parent run of one pipeline invocation; its id."""

    @abstractmethod
    def end_pipeline_run(
        self, run_id: str, ok: bool, summary: dict[str, Any], logs_dir: Path | None = None
    ) -> None:
        """Close the parent run with its job summary (and the job logs, when given)."""

    @abstractmethod
    def start_job_run(
        self, experiment: str, parent_run_id: str | None, name: str, tags: dict[str, str]
    ) -> JobRun: ...

    @abstractmethod
    def end_job_run(self, run: JobRun, ok: bool) -> None: ...

    @abstractmethod
    def pipeline_runs(self, experiment: str, max_results: int | None = 20) -> list[RunRecord]:
        """The experiment's pipeline (parent) runs, newest first (all of them for None)."""

    @abstractmethod
    def pipeline_run(self, experiment: str, run_id: str) -> RunRecord | None:
        """The experiment's pipeline run ``run_id``, however old; None when there is none."""

    @abstractmethod
    def child_runs(self, experiment: str, parent_run_id: str) -> list[RunRecord]: ...

    @abstractmethod
    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Set tags on a run now, unbuffered: for the controller's heartbeat, worthless when late."""

    # -- the model registry -------------------------------------------------------------------

    @abstractmethod
    def model_version(
        self, name: str, version: str | None = None, alias: str | None = None
    ) -> ModelVersion | None:
        """A registered model's version by number or alias; None when there is no such version."""

    @abstractmethod
    def newest_model_version_with_tag(self, name: str, tag: str, value: str) -> ModelVersion | None:
        """The registered model's newest version tagged ``tag`` = ``value``; None when none is."""

    @abstractmethod
    def set_model_version_tags(
        self,
        name: str,
        version: str,
        tags: dict[str, str],
        replace_prefixes: tuple[str, ...] = (),
        expect: dict[str, str] | None = None,
    ) -> bool:
        """As ``JobRun.tag_model_version``."""

    @abstractmethod
    def set_model_alias(self, name: str, alias: str, version: str) -> None: ...
