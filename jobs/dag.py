"""Running the jobs of a pipeline in dependency order, in parallel up to a limit, on any executor."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from jobs.cli import echo as cli_echo
from jobs.executors.base import Executor, JobHandle, JobState
from jobs.signals import interrupts_deferred, interrupts_ignored
from selma_core.errors import EXIT_INVALID
from selma_core.plan import JobSpec


@dataclass
class JobOutcome:
    phase: str
    skill: str | None
    status: str  # ran | skipped | failed | blocked (a dependency failed, so it never started)
    job: str = ""
    output: str | None = None
    log: str | None = None
    exit_code: int | None = None
    run_id: str | None = None
    duration_s: float | None = None
    error: str | None = None
    blocked_by: str | None = None

    def to_dict(self) -> dict:
        """Every job's phase, skill (null for merge and eval), status and id; other fields when set."""
        always = ("phase", "skill", "status", "job")
        return {k: v for k, v in asdict(self).items() if k in always or v is not None}


def run_dag(
    jobs: list[JobSpec],
    executor: Executor,
    command_for: Callable[[JobSpec], list[str]],
    env: dict[str, str],
    max_parallel: int,
    is_committed: Callable[[JobSpec], bool],
    output_url: Callable[[JobSpec], str],
    poll_interval: float = 0.5,
    heartbeat_s: float = 30.0,
    echo: Callable[[str], None] = cli_echo,
    ended: dict[str, JobOutcome] | None = None,
    output_exists: Callable[[JobSpec], bool] | None = None,
) -> list[JobOutcome]:
    """Run ``jobs`` (dependency order) and return one outcome per job, in the same order.

    A job starts when every dependency in ``jobs`` succeeded or was skipped; a job whose output is
    already committed is skipped without starting; a failed job blocks its dependents while
    independent jobs (other skills) go on. Ctrl-C, SIGTERM or any error cancels running jobs and
    re-raises; ``ended``, when given, holds by then the outcome of every job that had ended.
    ``output_exists``, when given, is asked of every job that succeeded: one whose output is not
    there failed (exit 1: its dependents would find their input missing, and a rerun redoes it).
    """
    selected = {j.id for j in jobs}
    checked: set[str] = set()  # jobs whose "already committed?" look-up was done (once each)
    outcomes: dict[str, JobOutcome] = {} if ended is None else ended
    running: dict[str, tuple[JobHandle, float, str]] = {}  # job id -> (handle, start, slot)
    pending = list(jobs)
    total = len(jobs)

    def finish(job: JobSpec, outcome: JobOutcome) -> None:
        outcomes[job.id] = outcome
        took = f" in {outcome.duration_s:.1f}s" if outcome.duration_s is not None else ""
        extra = f" (log: {outcome.log})" if outcome.status == "failed" else ""
        extra += f" (blocked by {outcome.blocked_by})" if outcome.blocked_by else ""
        echo(f"[{len(outcomes)}/{total}] {job.id}: {outcome.status}{took}{extra}")

    last_beat = time.monotonic()
    try:
        while pending or running:
            if running and time.monotonic() - last_beat >= heartbeat_s:
                last_beat = time.monotonic()
                now = time.monotonic()
                busy = ", ".join(
                    f"{job_id} ({now - started:.0f}s)" for job_id, (_, started, _) in running.items()
                )
                echo(f"[{len(outcomes)}/{total} done] running: {busy}")
            ready = []
            for job in list(pending):
                deps = [d for d in job.deps if d in selected]
                bad = [d for d in deps if d in outcomes and outcomes[d].status in ("failed", "blocked")]
                if bad:
                    pending.remove(job)
                    finish(job, JobOutcome(job.phase, job.skill, "blocked", job=job.id, blocked_by=bad[0]))
                    continue
                if not all(d in outcomes for d in deps):
                    continue
                if job.id not in checked:
                    checked.add(job.id)
                    if is_committed(job):
                        pending.remove(job)
                        url = output_url(job)
                        finish(job, JobOutcome(job.phase, job.skill, "skipped", job=job.id, output=url))
                        continue
                ready.append(job)
            # A batch (e.g. a phase's shards as one Indexed Job) takes one of the max_parallel slots.
            for group in executor.batches(ready):
                if len({slot for _, _, slot in running.values()}) >= max_parallel:
                    break
                # An interrupt waits until every job started is in ``running``: one that came
                # between a job's start and its handle would leave that job running unwatched.
                executor.prepare(group, env)
                with interrupts_deferred("the jobs being started are recorded"):
                    handles = executor.submit_batch(group, [command_for(j) for j in group], env)
                    for handle in handles:
                        pending.remove(handle.job)
                        running[handle.job.id] = (handle, time.monotonic(), group[0].id)
                for handle in handles:
                    echo(f"started {handle.job.id} (log: {handle.log})")
            for job_id, (handle, started, _) in list(running.items()):
                status = executor.poll(handle)
                if status.state not in (JobState.SUCCEEDED, JobState.FAILED):
                    continue
                del running[job_id]
                result = status.result or {}
                job = handle.job
                ok = status.state == JobState.SUCCEEDED
                exit_code = status.exit_code
                if ok and output_exists is not None and not output_exists(job):
                    planned, reported = output_url(job), result.get("output")
                    if reported and reported != planned:
                        # It planned its own key, from inputs that changed since this plan (a dataset
                        # skill's data edited since submit; another selma in the job's image). Its
                        # retry would do the same: not worth one. A new plan finds its output.
                        ok, exit_code = False, EXIT_INVALID
                        error = (
                            f"committed its output at {reported}, not at {planned} as this pipeline "
                            "planned: its inputs changed between planning and the job's start (a "
                            "dataset skill's data edited since submit, or a job image that runs other "
                            "selma code than the controller); submit the pipeline again: it plans "
                            "with the inputs as they are now, and finds that output"
                        )
                    else:  # its executor took it for done without its word (a pod log lost with its Job)
                        ok, exit_code = False, 1
                        error = f"reported success, but its output {planned} is not in the store"
                    result = {**result, "error": error}
                # A job may itself find its output committed (a racing controller): then it skipped.
                state = ("skipped" if result.get("status") == "skipped" else "ran") if ok else "failed"
                finish(
                    job,
                    JobOutcome(
                        job.phase,
                        job.skill,
                        state,
                        job=job.id,
                        output=output_url(job) if ok else None,
                        log=handle.log,
                        exit_code=exit_code,
                        run_id=result.get("run_id"),
                        duration_s=round(time.monotonic() - started, 2),
                        error=None if ok else (result.get("error") or f"exit code {exit_code}"),
                    ),
                )
            if running:
                time.sleep(poll_interval)
    except BaseException:
        # Ctrl-C, SIGTERM or an error of the controller itself: no job is left running unwatched,
        # not even when the interrupt comes again while the jobs clean up.
        if running:
            echo(f"cancelling {', '.join(running)} (further interrupts are ignored until they have ended)")
            with interrupts_ignored():
                errors = executor.cancel_all([handle for handle, _, _ in running.values()])
            for job_id, error in errors.items():
                echo(f"could not cancel {job_id}: {error}")
        raise
    return [outcomes[j.id] for j in jobs]
