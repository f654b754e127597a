"""The executor interface: submit a job, poll it, point at its log, cancel it.

The controller's DAG runner speaks only this interface, so the local executor (subprocesses) and
the Kubernetes executor (Jobs) are interchangeable; both run the same ``python -m jobs.run`` command.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum

from selma_core.plan import JobSpec


class JobState(str, Enum):
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


class Executor(ABC):
    name: str

    @abstractmethod
    def submit(self, job: JobSpec, command: list[str], env: dict[str, str]) -> JobHandle: ...

    @abstractmethod
    def poll(self, handle: JobHandle) -> JobStatus: ...

    @abstractmethod
    def cancel(self, handle: JobHandle) -> None: ...

    @abstractmethod
    def describe(self, job: JobSpec, command: list[str]) -> str:
        """What ``--dry-run`` prints for this job (a command line, a manifest)."""
