"""A stop asked for from outside (SIGTERM: a preempted pod, a cancelled pipeline) that a phase takes
at its next safe point instead of wherever the signal lands.

Training loses everything since its last checkpoint when it is interrupted mid-step; at the end of a
step it can save a checkpoint first, and the rerun resumes there. So the job's SIGTERM handler
(``jobs.signals``) asks ``defer_stop()`` before it raises: inside ``safe_points(wait_s)`` the first
stop is deferred (``stop_requested()`` turns true, the phase checks it at each safe point and stops
there itself, after ``take_stop()``); outside, or for a second signal, or once ``wait_s`` has passed
without a safe point, the handler raises ``KeyboardInterrupt`` at once, as before.
``interrupt_now()`` interrupts at once whatever the section (a lost lease: another worker owns the
output now, and nothing may be written).
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_section_wait_s: float | None = None  # inside safe_points(): how long a deferred stop may wait
# "idle", "deferred" (a safe point will stop), "immediate" (no deferral), "taking" (stopping for
# another process's signal: this one's own is absorbed)
_state = "idle"
_timer: threading.Timer | None = None


def defer_stop() -> bool:
    """Called by a stop signal's handler: True when a safe point will take the stop (the handler
    returns), False when it must interrupt now."""
    global _state, _timer
    # Not blocking: the handler runs in the main thread, which may hold the lock itself (between
    # two bytecodes of a ``with _lock`` block); then the stop is simply not deferred.
    if not _lock.acquire(blocking=False):
        return False
    try:
        absorbed = _state == "taking"
        if absorbed:
            # This process already stops for another's signal (take_stop): this is the same stop,
            # arriving here later, not a second one. A further signal interrupts at once.
            _state = "immediate"
        elif _section_wait_s is None or _state != "idle":
            return False
        else:
            _state = "deferred"
            # Bounded: a safe point that does not come in time (a step slower than the wait) gives
            # way to the interrupt, as the signal would have without deferral.
            _timer = threading.Timer(_section_wait_s, interrupt_now)
            _timer.daemon = True
            _timer.start()
    finally:
        _lock.release()
    if absorbed:
        print("stop requested: this process is stopping already", file=sys.stderr, flush=True)
        return True
    print(
        f"stop requested: stopping at the next safe point (within {_section_wait_s:g} s)",
        file=sys.stderr,
        flush=True,
    )
    return True


def stop_requested() -> bool:
    """Whether a deferred stop waits for this safe point."""
    return _state == "deferred"


def take_stop() -> None:
    """The safe point takes the deferred stop: the wait's timer no longer runs (what the phase does
    before it stops, a checkpoint's save, is bounded by the signal's sender: a pod's grace period),
    and a further stop interrupts at once. The phase then raises ``KeyboardInterrupt`` itself (the
    job's interrupt path: its run closed as failed, exit 130).

    A process may take a stop it was not sent (yet): training on several processes stops all of
    them at the step where any one was asked to (``distributed.any_process``). torchrun signals each
    process in turn, so this one's own signal may come a moment later, in the middle of the stop's
    collectives; that one signal is absorbed, not taken for a second stop."""
    global _state
    with _lock:
        _state = "immediate" if _state == "deferred" else "taking"
        _cancel_timer()


def refuse_deferral() -> None:
    """The next stop interrupts at once, inside a section or not."""
    global _state
    with _lock:
        _state = "immediate"
        _cancel_timer()


@contextlib.contextmanager
def safe_points(wait_s: float) -> Iterator[None]:
    """Inside, a first stop signal is deferred (up to ``wait_s``) to the code's next check of
    ``stop_requested()``. A stop still waiting when the section ends interrupts then."""
    global _section_wait_s, _state
    with _lock:
        _section_wait_s, _state = wait_s, "idle"
    try:
        yield
    except BaseException:
        _leave()
        raise  # the section's own error (a diverged loss, say) stands, not a stop behind it
    if _leave():
        raise KeyboardInterrupt("stop requested")


def _leave() -> bool:
    """End the section; whether a deferred stop was still waiting."""
    global _section_wait_s, _state
    with _lock:
        _section_wait_s = None
        _cancel_timer()
        pending = _state == "deferred"
        if pending:
            _state = "immediate"
    return pending


def _cancel_timer() -> None:
    global _timer
    if _timer is not None:
        _timer.cancel()
        _timer = None


def interrupt_now() -> None:
    """Interrupt the main thread now, as SIGTERM would, safe points or not (from another thread:
    the wait's timer, a lost lease's heartbeat)."""
    refuse_deferral()
    # The signal's own handler raises (SIGINT may be ignored in a job started in the background).
    handled = callable(signal.getsignal(signal.SIGTERM))
    _thread.interrupt_main(signal.SIGTERM if handled else signal.SIGINT)
