"""SIGTERM in a job: an interrupt at once, except inside a phase's safe points (training), where the
first one waits for the next safe point, for a bounded time (``selma_core.stopping``)."""

from __future__ import annotations

import json
import os
import signal
import sys
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


def test_a_safe_point_takes_the_stop_and_its_save_is_not_cut_short(sigterm_handler):
    with pytest.raises(KeyboardInterrupt, match="saved"), stopping.safe_points(0.2):
        sigterm()
        for _ in range(3):  # steps
            if stopping.stop_requested():
                stopping.take_stop()
                time.sleep(0.5)  # saving a checkpoint, longer than the wait: not interrupted
                raise KeyboardInterrupt("checkpoint saved")
    assert not stopping.stop_requested()


def test_an_error_in_the_section_is_not_replaced_by_a_waiting_stop(sigterm_handler):
    with pytest.raises(ValueError, match="loss became nan"), stopping.safe_points(30.0):
        sigterm()
        raise ValueError("loss became nan")  # the job's exit 2, not an interrupt's 130


def test_a_sigterm_while_the_main_thread_holds_the_lock_interrupts_rather_than_hangs(sigterm_handler):
    with pytest.raises(KeyboardInterrupt), stopping.safe_points(30.0), stopping._lock:
        sigterm()


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


def test_a_process_stopping_for_anothers_signal_absorbs_its_own_late_copy_once(sigterm_handler):
    """Training on several processes stops all of them at the step where any one was signalled;
    torchrun signals each in turn, so a process's own copy may land during the stop's collectives.
    That copy is the same stop (absorbed, even after the section, while the job cleans up); a
    further signal interrupts at once."""
    with pytest.raises(KeyboardInterrupt, match="checkpoint saved"), stopping.safe_points(30.0):
        assert not stopping.stop_requested()  # this process was not signalled; another one was
        stopping.take_stop()
        sigterm()  # its own copy: absorbed
        raise KeyboardInterrupt("checkpoint saved")
    with pytest.raises(KeyboardInterrupt):
        sigterm()  # a second signal: at once
        pytest.fail("the second SIGTERM did not interrupt")


def test_a_late_copy_absorbed_after_the_section_ends_too(sigterm_handler):
    with pytest.raises(KeyboardInterrupt, match="stopped"), stopping.safe_points(30.0):
        stopping.take_stop()
        raise KeyboardInterrupt("stopped")
    sigterm()  # the job's cleanup, after the section: still the same stop
    with pytest.raises(KeyboardInterrupt):
        sigterm()
        pytest.fail("the second SIGTERM did not interrupt")


def test_sighup_interrupts_unless_nohup_ignores_it():
    """A closed terminal (SIGHUP) stops a job or controller as SIGTERM does, so it cleans up (a
    controller cancels its jobs); under nohup (SIGHUP ignored) it is still ignored."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        terminate_as_interrupt()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        terminate_as_interrupt()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGHUP)  # nohup: nothing happens
        time.sleep(0.05)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


class HungUpTerminal:
    """stderr after SIGHUP: the terminal is gone, every write fails."""

    def write(self, text: str) -> int:
        raise OSError(5, "Input/output error")

    def flush(self) -> None:
        raise OSError(5, "Input/output error")


def test_a_hung_up_terminal_does_not_cut_a_deferred_step_short(monkeypatch):
    """The step a controller must not cut in half (starting a job, whose handle lets it be
    cancelled) finishes though the SIGHUP's message cannot be written."""
    from jobs.signals import interrupts_deferred

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        terminate_as_interrupt()
        monkeypatch.setattr(sys, "stderr", HungUpTerminal())
        finished = []
        with pytest.raises(KeyboardInterrupt), interrupts_deferred("starting a job"):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
            finished.append(True)
        assert finished == [True]
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_a_controller_interrupted_by_sighup_still_ends_with_its_json_line_and_130(monkeypatch, capsys):
    import jobs.submit as submit_module

    def hung_up(args):
        sys.stderr = HungUpTerminal()
        raise KeyboardInterrupt("signal 1")

    monkeypatch.setattr(submit_module, "submit", hung_up)
    monkeypatch.setattr(submit_module, "terminate_as_interrupt", lambda: None)
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # restored after the test
    assert submit_module.main(["--phase", "all", "--config", "configs/demo.yaml"]) == 130
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"] == "interrupted"
