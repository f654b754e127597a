"""Fault injection: named points where a test can kill the job's process, to prove crash safety.

A job must survive being killed anywhere (a preempted pod, an OOM kill, a lost node): its rerun
completes, redoes no committed unit of work, and commits what an uninterrupted run commits. The
claim is only as good as the places it was tried, so the commit protocol and every phase call
``fault_point(NAME)`` at their unit boundaries, and ``tests/test_kill_anywhere.py`` kills a job at
each (``docs/reliability.md``, "Kill anywhere", lists the points and what each proves).

Inert unless ``SELMA_FAULT`` is set: ``SELMA_FAULT=NAME`` kills the process with SIGKILL (no
cleanup, no ``finally``, no flush: as the kernel's OOM killer would) the first time ``NAME`` is
reached; ``SELMA_FAULT=NAME@N`` the Nth time. Under torchrun every rank reads the same variable.
Never set it outside tests.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ENV = "SELMA_FAULT"

_reached: dict[str, int] = {}
_counting = threading.Lock()  # a store's transfer threads reach the same point at once


def fault_point(name: str) -> None:
    """Kill this process here if ``$SELMA_FAULT`` names this point (and this is its Nth time)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    with _counting:
        _reached[name] = _reached.get(name, 0) + 1
        reached = _reached[name]
    if reached == (int(nth) if nth else 1):
        print(f"{ENV}: SIGKILL at {spec}", file=sys.stderr, flush=True)  # tells the test where it died
        os.kill(os.getpid(), signal.SIGKILL)
