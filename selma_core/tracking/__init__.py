"""Tracking, chosen by the tracking URI: ``sqlite:///`` (embedded MLflow) or ``http(s)://`` (a server)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from selma_core.tracking.base import (
    TAG_CONFIG_HASH,
    TAG_GIT_COMMIT,
    TAG_OUTPUT,
    TAG_PHASE,
    TAG_PIPELINE,
    TAG_SKILL,
    TAG_WORKER,
    JobRun,
    ModelVersion,
    Tracker,
)

if TYPE_CHECKING:
    from selma_core.config import TrackingConfig

__all__ = [
    "TAG_CONFIG_HASH",
    "TAG_GIT_COMMIT",
    "TAG_OUTPUT",
    "TAG_PHASE",
    "TAG_PIPELINE",
    "TAG_SKILL",
    "TAG_WORKER",
    "JobRun",
    "ModelVersion",
    "Tracker",
    "open_tracker",
]


def open_tracker(cfg: TrackingConfig, check: bool = True, create: bool = True) -> Tracker:
    """The tracker a config names; with ``check``, fail early (naming the endpoint) if unreachable.
    Without ``create``, for commands that only read, a SQLite database that does not exist is a
    ``ConfigError`` rather than made (empty) at what may be a mistyped path."""
    from selma_core.tracking.mlflow_tracker import ServerMlflowTracker, SqliteMlflowTracker

    tracker: Tracker
    buffering = {
        "flush_budget_s": cfg.flush_budget_s,
        "retry_interval_s": cfg.retry_interval_s,
        "buffer_dir": cfg.buffer_dir,
        "buffer_max_mb": cfg.buffer_max_mb,
    }
    if cfg.uri.startswith("sqlite:///"):
        tracker = SqliteMlflowTracker(cfg.uri, cfg.connect_retries, create=create, **buffering)
    else:
        tracker = ServerMlflowTracker(cfg.uri, cfg.connect_retries, **buffering)
    if check:
        tracker.check()
    return tracker
