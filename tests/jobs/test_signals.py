"""SIGTERM in a job: an interrupt at once, except inside a phase's safe points (training), where the
first one waits for the next safe point, for a bounded time (``selma_core.stopping``)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from jobs.signals import terminate_as_interrupt
from selma_core import stopping


@pytest.fixture
def sigterm_handler():
    saved = signal.getsignal(signal.SIGTERM)
    terminate_as_interrupt()
    yield
    signal.signal(signal.SIGTERM, saved)


def sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs in the main thread at its next bytecode


def test_sigterm_outside_safe_points_interrupts_at_once(sigterm_handler):
    with pytest.raises(KeyboardInterrupt):
        sigterm()


def test_the_first_sigterm_waits_for_a_safe_point_a_second_does_not(sigterm_handler):
    with pytest.raises(KeyboardInterrupt), stopping.safe_points(30.0):
        sigterm()  # deferred: no exception here
        assert stopping.stop_requested()
        sigterm()  # a second one: now
        pytest.fail("the second SIGTERM did not interrupt")


def test_a_safe_point_takes_the_stop(sigterm_handler):
    with pytest.raises(KeyboardInterrupt, match="saved"), stopping.safe_points(30.0):
        sigterm()
        for _ in range(3):  # steps
            if stopping.stop_requested():
                stopping.stop_now("checkpoint saved")
    assert not stopping.stop_requested()


def test_a_safe_point_that_does_not_come_in_time_gives_way_to_the_interrupt(sigterm_handler):
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), stopping.safe_points(0.3):
        sigterm()
        while time.monotonic() - started < 10:  # a step that never ends
            time.sleep(0.01)
    assert time.monotonic() - started < 10


def test_a_lost_lease_interrupts_at_once_even_inside_safe_points(sigterm_handler):
    from jobs.run import _interrupt_main

    with pytest.raises(KeyboardInterrupt), stopping.safe_points(30.0):
        _interrupt_main()
        time.sleep(0.05)
        pytest.fail("not interrupted")
    assert not stopping.stop_requested()
