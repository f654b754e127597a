"""The DAG runner: dependency order, the parallel limit, skips, and failures that block dependents."""

from __future__ import annotations

import pytest

from jobs.dag import run_dag
from jobs.executors.base import Executor, JobHandle, JobState, JobStatus
from selma_core.plan import JobSpec


class ScriptedExecutor(Executor):
    """Jobs finish on the poll after they start; ``fail`` lists job ids that exit 1."""

    name = "scripted"

    def __init__(self, fail=()):
        self.fail = set(fail)
        self.started: list[str] = []
        self.running: set[str] = set()
        self.max_running = 0
        self.cancelled: list[str] = []

    def submit(self, job, command, env):
        self.started.append(job.id)
        self.running.add(job.id)
        self.max_running = max(self.max_running, len(self.running))
        return JobHandle(job=job, log=f"/logs/{job.name}.log")

    def poll(self, handle):
        self.running.discard(handle.job.id)
        if handle.job.id in self.fail:
            return JobStatus(JobState.FAILED, 1, {"status": "failed", "error": "boom"})
        return JobStatus(JobState.SUCCEEDED, 0, {"status": "ran", "run_id": "r-" + handle.job.id})

    def cancel(self, handle):
        self.cancelled.append(handle.job.id)

    def describe(self, job, command):
        return job.id


def pipeline(skills=("a", "b")) -> list[JobSpec]:
    jobs = []
    for s in skills:
        jobs += [
            JobSpec("prompts", s, f"p/{s}", ()),
            JobSpec("images", s, f"i/{s}", (f"prompts:{s}",)),
            JobSpec("train", s, f"t/{s}", (f"images:{s}",)),
        ]
    jobs.append(JobSpec("merge", None, "m", tuple(f"train:{s}" for s in skills)))
    jobs.append(JobSpec("eval", None, "e", ("merge",)))
    return jobs


def run(jobs, executor, committed=(), max_parallel=2):
    return run_dag(
        jobs,
        executor,
        lambda j: ["run", j.id],
        {},
        max_parallel,
        lambda j: j.key in committed,
        lambda j: f"store/{j.key}",
        poll_interval=0,
        echo=lambda line: None,
    )


def test_runs_in_dependency_order_within_the_parallel_limit():
    executor = ScriptedExecutor()
    outcomes = run(pipeline(), executor, max_parallel=2)
    assert [o.status for o in outcomes] == ["ran"] * 8
    order = executor.started
    for job in pipeline():
        for dep in job.deps:
            assert order.index(dep) < order.index(job.id)
    assert executor.max_running == 2
    assert outcomes[0].run_id == "r-prompts:a" and outcomes[0].output == "store/p/a"


def test_committed_jobs_are_skipped_without_starting():
    executor = ScriptedExecutor()
    outcomes = run(pipeline(), executor, committed={"p/a", "i/a", "t/a"})
    assert {o.job: o.status for o in outcomes}["train:a"] == "skipped"
    assert "prompts:a" not in executor.started and "merge" in executor.started


def test_a_failure_blocks_its_dependents_and_nothing_else():
    executor = ScriptedExecutor(fail={"images:a"})
    outcomes = {o.job: o for o in run(pipeline(), executor)}
    assert outcomes["images:a"].status == "failed" and outcomes["images:a"].log == "/logs/images-a.log"
    assert outcomes["images:a"].error == "boom"
    assert outcomes["train:a"].status == "blocked" and outcomes["train:a"].blocked_by == "images:a"
    assert outcomes["merge"].status == "blocked" and outcomes["eval"].status == "blocked"
    assert outcomes["train:b"].status == "ran"  # the other skill goes on
    assert "train:a" not in executor.started


def run_checking_outputs(executor, missing: str) -> dict:
    """One skill's pipeline, nothing committed before, where the store has every job's output but
    ``missing``'s; the outcomes by job id."""
    return {
        o.job: o
        for o in run_dag(
            pipeline(skills=("a",)),
            executor,
            lambda j: ["run", j.id],
            {},
            2,
            lambda j: False,
            lambda j: f"store/{j.key}",
            poll_interval=0,
            echo=lambda line: None,
            output_exists=lambda j: j.id != missing,
        )
    }


def test_a_success_without_its_output_in_the_store_is_a_failure_worth_a_retry():
    """An executor that takes a job for done without its word (a Kubernetes pod's log lost with its
    Job): the store says whether its output is there; if not, its dependents do not start."""
    executor = ScriptedExecutor()
    outcomes = run_checking_outputs(executor, missing="images:a")
    lost = outcomes["images:a"]
    assert lost.status == "failed" and lost.exit_code == 1
    assert lost.error == "reported success, but its output store/i/a is not in the store"
    assert outcomes["train:a"].status == "blocked" and "train:a" not in executor.started
    assert outcomes["prompts:a"].status == "ran"


def test_a_job_that_committed_under_another_key_than_planned_fails_with_exit_2_and_says_why():
    """A job plans its own key: when its inputs changed after the controller planned (a dataset
    skill's data edited since submit), it commits elsewhere. Retrying it would skip and report the
    same; a new submit plans from the data as it is now and finds that output."""

    class Elsewhere(ScriptedExecutor):
        def poll(self, handle):
            status = super().poll(handle)
            if handle.job.id == "train:a":
                status.result["output"] = "store/t/a-edited"
            return status

    outcomes = run_checking_outputs(Elsewhere(), missing="train:a")
    moved = outcomes["train:a"]
    assert moved.status == "failed" and moved.exit_code == 2
    assert moved.error.startswith(
        "committed its output at store/t/a-edited, not at store/t/a as this pipeline planned"
    )
    assert "submit the pipeline again" in moved.error
    assert outcomes["merge"].status == "blocked"


def test_interrupt_cancels_running_jobs_and_keeps_the_ended_ones_outcomes():
    class Interrupting(ScriptedExecutor):
        def poll(self, handle):
            if handle.job.phase == "images":
                raise KeyboardInterrupt
            return super().poll(handle)

    executor = Interrupting()
    ended: dict = {}
    with pytest.raises(KeyboardInterrupt):
        run_dag(pipeline(), executor, lambda j: [], {}, 2, lambda j: False, lambda j: "", 0, ended=ended)
    assert executor.cancelled == ["images:a", "images:b"]
    assert {job: outcome.status for job, outcome in ended.items()} == {"prompts:a": "ran", "prompts:b": "ran"}


def test_an_interrupt_while_a_job_starts_waits_for_its_handle_and_then_cancels_it():
    """Ctrl-C between a job's start and its handle would leave it running unwatched."""
    import os
    import signal

    class InterruptedWhileStarting(ScriptedExecutor):
        def submit(self, job, command, env):
            handle = super().submit(job, command, env)  # the job runs from here on
            os.kill(os.getpid(), signal.SIGINT)  # and Ctrl-C comes before its handle is returned
            return handle

    executor = InterruptedWhileStarting()
    with pytest.raises(KeyboardInterrupt):
        run_dag(pipeline(("a",)), executor, lambda j: [], {}, 2, lambda j: False, lambda j: "", 0)
    assert executor.started == ["prompts:a"] and executor.cancelled == ["prompts:a"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back

    # A second Ctrl-C while one is held (a start waiting on a service that does not answer) is
    # raised at once.
    class InterruptedTwice(ScriptedExecutor):
        def submit(self, job, command, env):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            return super().submit(job, command, env)

    executor = InterruptedTwice()
    with pytest.raises(KeyboardInterrupt, match="again"):
        run_dag(pipeline(("a",)), executor, lambda j: [], {}, 2, lambda j: False, lambda j: "", 0)
    assert executor.started == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_every_outcome_names_its_skill_even_without_one():
    outcomes = run(pipeline(), ScriptedExecutor())
    assert outcomes[-1].to_dict() == {
        "phase": "eval",
        "skill": None,
        "status": "ran",
        "job": "eval",
        "output": "store/e",
        "log": "/logs/eval.log",
        "exit_code": 0,
        "run_id": "r-eval",
        "duration_s": outcomes[-1].duration_s,
    }


def test_a_heartbeat_names_the_running_jobs():
    class Slow(ScriptedExecutor):
        def __init__(self):
            super().__init__()
            self.polls = 0

        def poll(self, handle):
            self.polls += 1
            if self.polls < 3:
                return JobStatus(JobState.RUNNING)
            return super().poll(handle)

    lines: list[str] = []
    jobs = [JobSpec("prompts", "a", "p/a", ())]
    run_dag(
        jobs,
        Slow(),
        lambda j: [],
        {},
        1,
        lambda j: False,
        lambda j: "",
        poll_interval=0,
        heartbeat_s=0,
        echo=lines.append,
    )
    assert any(line.startswith("[0/1 done] running: prompts:a (") for line in lines)


def test_force_reaches_everything_downstream():
    from jobs.submit import forced_jobs
    from selma_core.plan import Plan

    plan = Plan(jobs={j.id: j for j in pipeline()})
    everything = set(plan.jobs)
    assert forced_jobs(plan, ["images:a"], everything) == {"images:a", "train:a", "merge", "eval"}
    assert forced_jobs(plan, ["train"], everything) == {"train:a", "train:b", "merge", "eval"}
    assert forced_jobs(plan, ["eval"], {"eval"}) == {"eval"}
    with pytest.raises(Exception, match="would leave eval built from the old outputs"):
        forced_jobs(plan, ["merge"], {"merge"})  # eval, downstream, was not selected
    with pytest.raises(
        Exception, match="--force prompts:a names prompts:a, which this command does not run"
    ) as e:
        forced_jobs(plan, ["prompts:a"], {"train:a", "train:b", "merge", "eval"})
    assert str(e.value).endswith("or force only jobs it runs (e.g. --force train:a)")  # not prompts:a again
    assert forced_jobs(plan, ["train:a"], {"train:a", "train:b", "merge", "eval"})  # which is accepted
    # --phase train alone: forcing any of its jobs would leave merge and eval stale: no example.
    with pytest.raises(Exception, match="names prompts:a") as e:
        forced_jobs(plan, ["prompts:a"], {"train:a", "train:b"})
    assert str(e.value).endswith("select them too (e.g. --phase all)")
    with pytest.raises(Exception, match="--force colour: no such job"):
        forced_jobs(plan, ["colour"], everything)
