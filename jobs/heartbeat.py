"""The controller's heartbeat: how ``jobs.status`` tells, from any machine, a pipeline whose
controller was killed (SIGKILL, the OOM killer, its node lost) from one at work.

A controller killed outright never ends its pipeline run, so the run says RUNNING for good. Its
host and PID tell only on that machine (``jobs.status``'s "controller gone"); a controller in a CI
runner or a pod is seldom where the status is asked. So while the pipeline runs, the controller
renews a tag on its run (``selma.controller_heartbeat``: its clock, in epoch seconds) every
``HEARTBEAT_S``; a run whose tag is older than ``SILENT_AFTER_S`` is "controller silent". The margin
covers a short MLflow outage and clocks that disagree by minutes.
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

from jobs.cli import echo
from selma_core.tracking.base import TAG_CONTROLLER_HEARTBEAT, Tracker

HEARTBEAT_S = 60.0
SILENT_AFTER_S = 10 * 60.0
# Tests set a shorter interval: the thread's beats are then seen within a short pipeline.
ENV_HEARTBEAT_S = "SELMA_CONTROLLER_HEARTBEAT_S"


def heartbeat_interval() -> float:
    """``HEARTBEAT_S``, or ``$SELMA_CONTROLLER_HEARTBEAT_S`` when it is a positive number of seconds."""
    try:
        interval = float(os.environ.get(ENV_HEARTBEAT_S, HEARTBEAT_S))
    except ValueError:
        return HEARTBEAT_S
    return interval if interval > 0 else HEARTBEAT_S


def beat_tag() -> dict[str, str]:
    """The tag a beat sets: now, on this machine's clock."""
    return {TAG_CONTROLLER_HEARTBEAT: f"{time.time():.3f}"}


class ControllerHeartbeat:
    """Renews the pipeline run's heartbeat tag every ``interval_s`` on a daemon thread, from entry
    until exit. A beat that fails (MLflow down) is retried at the next one; the first failure is
    said once, on stderr. The pipeline never waits for a beat: a hung request holds only its thread."""

    def __init__(self, tracker: Tracker, run_id: str, interval_s: float | None = None) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.interval_s = heartbeat_interval() if interval_s is None else interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(self.interval_s):
            try:
                self.tracker.set_run_tags(self.run_id, beat_tag())
            except Exception as e:  # MLflow unreachable or refusing: the next beat tries again
                if not warned:
                    echo(f"warning: could not renew the pipeline's heartbeat in MLflow ({e}); retrying")
                    warned = True

    def __enter__(self) -> ControllerHeartbeat:
        self._thread = threading.Thread(target=self._beat, name="selma-controller-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            # A beat in flight may outlast this (a slow server): the run's end follows it, and a
            # late tag on an ended run is harmless; status reads the tag of running runs only.
            self._thread.join(timeout=2)
