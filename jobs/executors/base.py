"""The executor interface: submit a job, poll it, point at its log, cancel it.

The controller's DAG runner speaks only this interface, so the local executor (subprocesses) and
the Kubernetes executor (Jobs) are interchangeable; both run the same ``python -m jobs.run`` command.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from selma_core.plan import JobSpec


class JobState(str, Enum):  # noqa: UP042 - str() of a member stays "JobState.X", as callers saw it
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass
class JobHandle:
    job: JobSpec
    # Executor-specific reference: a Popen for local, a Job name for Kubernetes.
    ref: object = None
    log: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class JobStatus:
    state: JobState
    exit_code: int | None = None
    # The JSON object the job printed last (status ran/skipped, output, run id), when known.
    result: dict | None = None


def job_command(job: JobSpec, config_path: str, force: bool = False) -> list[str]:
    """The command every executor runs for a job (the job contract)."""
    command = ["python", "-m", "jobs.run", "--phase", job.phase]
    if job.skill:
        command += ["--skill", job.skill]
    if job.shard is not None:
        command += ["--shard-index", str(job.shard)]
    if force:
        command.append("--force")
    return command + ["--config", config_path]


def image_process_command(command: list[str], count: int, index: int | None = None) -> list[str]:
    """``command`` as one of the ``count`` processes of an images job: ``--num-shards count`` (and
    ``--shard-index index``; None: jobs.run reads ``$JOB_COMPLETION_INDEX``), before ``--config``."""
    flags = ["--num-shards", str(count)]
    if index is not None:
        flags = ["--shard-index", str(index), *flags]
    at = command.index("--config") if "--config" in command else len(command)
    return [*command[:at], *flags, *command[at:]]


def speaking_process(results: list[dict]) -> int | None:
    """Which of an images job's processes, all ended well, speaks for the job (by the result each
    printed last): the one that committed the output (or found the job skipped), else one that found
    it committed by another; None when none did (the job failed)."""
    for i, result in enumerate(results):
        if result.get("committed") or result.get("status") == "skipped":
            return i
    for i, result in enumerate(results):
        if (result.get("result") or {}).get("committed_by"):
            return i
    return None


class Executor(ABC):
    name: str
    # Where jobs read the pipeline's frozen config (None: the snapshot the controller wrote locally).
    job_config_path: str | None = None

    @abstractmethod
    def submit(self, job: JobSpec, command: list[str], env: dict[str, str]) -> JobHandle: ...

    @abstractmethod
    def poll(self, handle: JobHandle) -> JobStatus: ...

    @abstractmethod
    def cancel(self, handle: JobHandle) -> None: ...

    def cancel_all(self, handles: list[JobHandle]) -> dict[str, Exception]:
        """Cancel every job of ``handles``; the errors of those that could not be, by job id (one
        failed cancel must not leave the others running). Executors whose cancel waits override it
        to stop all jobs at once rather than one after another."""
        errors: dict[str, Exception] = {}
        for handle in handles:
            try:
                self.cancel(handle)
            except Exception as e:
                errors[handle.job.id] = e
        return errors

    @abstractmethod
    def describe(self, job: JobSpec, command: list[str]) -> str:
        """What ``--dry-run`` prints for this job (a command line, a manifest)."""

    def batch_key(self, job: JobSpec) -> str | None:
        """Jobs ready at the same time with the same key are submitted together (None: alone)."""
        return None

    def batches(self, jobs: list[JobSpec]) -> list[list[JobSpec]]:
        """``jobs`` grouped by ``batch_key``, in order of first appearance."""
        groups: dict[object, list[JobSpec]] = {}
        for job in jobs:
            key = self.batch_key(job)
            groups.setdefault(job.id if key is None else ("batch", key), []).append(job)
        return list(groups.values())

    def submit_batch(
        self, jobs: list[JobSpec], commands: list[list[str]], env: dict[str, str]
    ) -> list[JobHandle]:
        return [self.submit(job, command, env) for job, command in zip(jobs, commands, strict=True)]

    def dry_run(self, jobs: list[JobSpec], command_for: Callable[[JobSpec], list[str]]) -> str:
        """Everything ``--dry-run`` prints: what would be submitted, nothing submitted."""
        return "\n".join(self.describe(job, command_for(job)) for job in jobs)

    def prepare(self, jobs: list[JobSpec], env: dict[str, str]) -> None:
        """Called before ``submit_batch(jobs, ...)``, with interrupts still live: slow set-up that
        starts no job (submitting runs with interrupts held until every handle is recorded)."""
        return None

    def begin(self, mlflow_run_id: str, git_commit: str) -> None:
        """Called once the pipeline's MLflow run exists, before the first job is submitted."""
        return None

    def check_reachable(self) -> None:
        """Raise ``ConfigError`` when jobs of this executor could not reach the store or tracking."""
        return None

    def close(self) -> None:
        """Release what the executor holds (watches, connections)."""
        return None
