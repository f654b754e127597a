"""Executors, chosen by configuration (``executor.kind``) or ``--backend``."""

from __future__ import annotations

from jobs.executors.base import Executor, JobHandle, JobState, JobStatus, job_command
from selma_core.config import PipelineConfig
from selma_core.errors import ConfigError

__all__ = ["Executor", "JobHandle", "JobState", "JobStatus", "job_command", "make_executor"]


def _placed_gpus(cfg: PipelineConfig) -> list[str] | None:
    """The GPUs the local executor places jobs on, as ``CUDA_VISIBLE_DEVICES`` names them (None: all
    of this machine's, found at the first GPU job): ``executor.gpus`` are positions among the GPUs
    this process sees. None placed when ``device`` names one GPU (``cuda:1``): a job so pinned must
    see them all."""
    if cfg.device not in ("auto", "cuda"):
        return []
    if cfg.executor.gpus is None:
        return None
    from jobs.executors.local import visible_gpus

    visible = visible_gpus()
    beyond = [position for position in cfg.executor.gpus if position >= len(visible)]
    if beyond:
        raise ConfigError(
            f"executor.gpus: {beyond[0]} is not a GPU of this machine, which shows {len(visible)}"
            + (f" ({', '.join(f'{i}: {gpu}' for i, gpu in enumerate(visible))})" if visible else "")
        )
    return [visible[position] for position in cfg.executor.gpus]


def _gpus_for_data_parallel_training(cfg: PipelineConfig, placed: list[str] | None) -> list[str] | None:
    """``placed`` (the GPUs jobs are placed on; None: the machine's, found now) checked against
    ``executor.train_gpus`` before any job runs, not when the first train job starts hours later."""
    import sys

    from jobs.executors.local import too_few_gpus, visible_gpus

    count = cfg.executor.train_gpus
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(
            f"executor.train_gpus: {count} processes cannot all train on device {cfg.device}; set "
            "device: auto (or cuda), and executor.gpus to choose the GPUs"
        )
    gpus = visible_gpus() if placed is None else placed
    if not gpus:  # the ranks train on the CPU
        return placed
    if count > len(gpus):
        raise too_few_gpus(count, gpus)
    if cfg.executor.max_parallel * count > len(gpus):
        print(
            f"warning: up to {cfg.executor.max_parallel} train jobs (executor.max_parallel) of "
            f"{count} GPUs each (executor.train_gpus) share {len(gpus)} GPU(s): GPUs run several "
            "ranks at once when they overlap",
            file=sys.stderr,
        )
    return gpus


def require_kubernetes_client() -> None:
    """A clear error, not a traceback, where the optional kubernetes client is not installed."""
    try:
        import kubernetes  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "the Kubernetes executor needs the kubernetes client: pip install 'selma[kubernetes]'"
        ) from e


def make_executor(
    cfg: PipelineConfig, kind: str, log_dir: str, follow_logs: bool = False, echo=None
) -> Executor:
    if kind == "local":
        from jobs.executors.local import GPU_PHASES, LocalExecutor

        llm_here = {"prompts"} if cfg.prompts.needs_gpu else set()
        gpus = _placed_gpus(cfg)
        if cfg.executor.train_gpus > 1:
            gpus = _gpus_for_data_parallel_training(cfg, gpus)
        return LocalExecutor(
            log_dir,
            cfg.executor.max_parallel,
            images_jobs=cfg.images.num_jobs,
            fork_server=cfg.executor.fork_server,
            gpus=gpus,
            gpu_phases=GPU_PHASES | llm_here,
            train_gpus=cfg.executor.train_gpus,
        )
    if kind == "kubernetes":
        require_kubernetes_client()
        from jobs.executors.kubernetes import KubernetesExecutor

        return KubernetesExecutor(cfg, log_dir, follow_logs=follow_logs, **({"echo": echo} if echo else {}))
    raise ConfigError(f"executor {kind!r}: expected local or kubernetes")
