"""Executors, chosen by configuration (``executor.kind``) or ``--backend``."""

from __future__ import annotations

from jobs.executors.base import Executor, JobHandle, JobState, JobStatus, job_command
from selma_core.config import PipelineConfig
from selma_core.errors import ConfigError

__all__ = ["Executor", "JobHandle", "JobState", "JobStatus", "job_command", "make_executor"]


def make_executor(cfg: PipelineConfig, kind: str, log_dir: str) -> Executor:
    if kind == "local":
        from jobs.executors.local import LocalExecutor

        return LocalExecutor(log_dir, cfg.executor.max_parallel)
    raise ConfigError(
        f"executor {kind!r} is not available in this version of selma (the Kubernetes executor is being "
        "built; use --backend local)"
    )
