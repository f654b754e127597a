"""SIGTERM (Kubernetes, a scheduler, ``kill``) and SIGHUP (a closed terminal, a dropped SSH session)
handled like Ctrl-C, so cleanup code runs: a controller cancels its jobs rather than die and leave
them running unwatched. A SIGHUP ignored on purpose (``nohup``) stays ignored."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def _interrupts() -> tuple[int, ...]:
    """The signals that interrupt here: SIGHUP too, unless it is ignored (``nohup``)."""
    return INTERRUPTS if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (*INTERRUPTS, signal.SIGHUP)


def terminate_as_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` on SIGTERM: ``finally`` blocks close MLflow runs as FAILED and
    remove staging folders; a controller cancels its running jobs. Where a phase marked safe points
    (``selma_core.stopping``: training saves a checkpoint at the end of its step) the first SIGTERM
    waits for the next one instead."""
    from selma_core import stopping

    def handler(signum: int, frame: object) -> None:
        if stopping.defer_stop():
            return
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        signal.signal(signal.SIGHUP, handler)


@contextlib.contextmanager
def interrupts_deferred(what: str = "this step") -> Iterator[None]:
    """Ctrl-C and SIGTERM held until the block ends, then raised as ``KeyboardInterrupt``: for a
    step that must not be cut in half (a job started must get the handle that lets it be cancelled,
    or nobody would stop it). A second one while held is raised at once: the step may be waiting on
    a service that does not answer, and the user insists. Only the main thread can set handlers;
    elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if caught:
            raise KeyboardInterrupt(f"signal {signum}, again")
        caught.append(signum)
        from jobs.cli import echo

        echo(f"interrupted: stopping once {what} is done (again to stop at once)")

    saved = {s: signal.signal(s, hold) for s in _interrupts()}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    if caught:
        raise KeyboardInterrupt(f"signal {caught[0]}")


@contextlib.contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Ctrl-C and SIGTERM ignored inside: for cleanup that must finish once begun (cancelling every
    running job after the first interrupt), which a second one would otherwise cut short, leaving
    jobs running unwatched. Only the main thread can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in _interrupts()}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
