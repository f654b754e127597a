"""Executors, chosen by configuration (``executor.kind``) or ``--backend``."""

from __future__ import annotations

from jobs.executors.base import Executor, JobHandle, JobState, JobStatus, job_command
from selma_core.config import PipelineConfig
from selma_core.errors import ConfigError

__all__ = ["Executor", "JobHandle", "JobState", "JobStatus", "job_command", "make_executor"]


def make_executor(
    cfg: PipelineConfig, kind: str, log_dir: str, follow_logs: bool = False, echo=None
) -> Executor:
    if kind == "local":
        from jobs.executors.local import GPU_PHASES, LocalExecutor

        gpus = cfg.executor.gpus
        # An LLM in the prompts job itself wants a GPU; an API or a server elsewhere does not.
        llm_here = {"prompts"} if cfg.prompts.backend == "transformers" else set()
        return LocalExecutor(
            log_dir,
            cfg.executor.max_parallel,
            images_jobs=cfg.images.num_jobs,
            fork_server=cfg.executor.fork_server,
            gpus=None if gpus is None else [str(gpu) for gpu in gpus],
            gpu_phases=GPU_PHASES | llm_here,
        )
    if kind == "kubernetes":
        try:
            import kubernetes  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                "the Kubernetes executor needs the kubernetes client: pip install 'selma[kubernetes]'"
            ) from e
        from jobs.executors.kubernetes import KubernetesExecutor

        return KubernetesExecutor(cfg, log_dir, follow_logs=follow_logs, **({"echo": echo} if echo else {}))
    raise ConfigError(f"executor {kind!r}: expected local or kubernetes")
