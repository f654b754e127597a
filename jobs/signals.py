"""SIGTERM (Kubernetes, a scheduler, ``kill``) handled like Ctrl-C, so cleanup code runs."""

from __future__ import annotations

import signal


def terminate_as_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` on SIGTERM: ``finally`` blocks close MLflow runs as FAILED and
    remove staging folders; a controller cancels its running jobs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
