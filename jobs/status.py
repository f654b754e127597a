"""Where a pipeline stands: every job's state, times, output and MLflow run.

    python -m jobs.status --config configs/demo.yaml [--pipeline RUN_ID]

Reads only MLflow (the pipeline's parent run and its job runs) and the store, so it works for any
executor and from any machine that reaches them. Without ``--pipeline``, the newest pipeline run of
the config's experiment. States: pending, running, done, skipped (its output was already
committed), failed, not run (a dependency failed, or the pipeline stopped first), and "done (run
not closed)" (its output committed, its MLflow run never ended). Times are ISO 8601, in UTC. An
images job of several processes (``images.num_jobs``) is running while any of them is, failed if
any failed, done when its output is committed. The pipeline itself is running, finished or
failed, or, when its run never ended: "controller gone" (its controller's process ended: told on
its own machine only) or "controller silent" (no heartbeat for 10 minutes: told from anywhere).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from jobs.cli import parse_args
from jobs.heartbeat import SILENT_AFTER_S
from selma_core.errors import ConfigError, SelmaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.status",
        description=__doc__.split("\n\n")[0],
        epilog="Exit code: 0 reported, 2 invalid configuration or no such pipeline, 1 a service failed. The "
        "last line printed is one JSON object.",
    )
    parser.add_argument("--config", required=True, help="pipeline config YAML")
    parser.add_argument(
        "--pipeline",
        metavar="RUN_ID",
        help="the pipeline's MLflow run id, or the name of its log folder (<name>-<time>-<pid>) "
        "(default: the newest)",
    )
    return parser


def _when(ms: int | None) -> str | None:
    """ISO 8601 in UTC: the same instant reads the same on a laptop, in a pod and in CI."""
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def job_state(runs: list, finished: bool, committed: bool, forced: bool = False) -> str:
    """A job's state from its runs (one per process that got as far as opening one, the newest
    attempt of each), whether its output is ``committed``, in a pipeline that has ``finished`` or not.
    Done only with its output committed: an images process opens its run once it has claimed work,
    so one still pending (a pod waiting for a GPU) or dead before that has none."""
    states = {run.status for run in runs}
    if "RUNNING" in states and not finished:
        return "running"
    # Not for a forced job: the output committed may be the one it was rerun to replace.
    if "RUNNING" in states and states <= {"FINISHED", "RUNNING"} and committed and not forced:
        # Its work is in the store; its run's end never reached MLflow (a tracking outage: the end
        # waits in a buffer file to replay, or the job was killed after committing).
        return "done (run not closed)"
    if states != {"FINISHED"}:
        return "failed"  # a process failed, or the pipeline ended without it closing its run (killed)
    if committed:
        return "done"
    return "failed" if finished else "running"  # the other processes: not (yet) started, or dead


def _controller_gone(controller: str | None, process: str | None) -> bool:
    """Whether a pipeline's controller ("HOST:PID", its ``process_identity``) is known to be gone: a
    process of this machine and PID namespace that no longer runs (or whose PID another process has
    taken since). One of another machine or container cannot be told from here: not gone."""
    import socket

    from selma_core.storage.lease import pid_alive, process_identity

    host, _, pid = (controller or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or len((process or "").split(" ")) != 3:
        return False
    boot, namespace, started = process.split(" ")
    here = process_identity(os.getpid())
    if here is None or here.split(" ")[:2] != [boot, namespace]:
        return False
    now = process_identity(int(pid))
    return now is None or now.split(" ")[2] != started or not pid_alive(int(pid))


def _epoch_s(value: str | None) -> float | None:
    """A heartbeat tag's time, in epoch seconds; None for none (a pipeline of an older selma)."""
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _failed_before_its_run(log_dir: str | None, job) -> bool:
    """Whether the job's log, where it is on this machine, ends with its failure."""
    from jobs.executors.local import last_json_line

    log = Path(log_dir or "") / f"{job.name}.log"
    said = last_json_line(str(log)) if log_dir and log.is_file() else None
    return bool(said) and said.get("status") == "failed"


def pipeline_status(config_path: str, pipeline: str | None = None) -> dict:
    from selma_core.config import load_config
    from selma_core.plan import build_plan
    from selma_core.skills import load_skills
    from selma_core.storage import open_store
    from selma_core.tracking import open_tracker
    from selma_core.tracking.base import (
        TAG_CONTROLLER,
        TAG_CONTROLLER_HEARTBEAT,
        TAG_CONTROLLER_PROCESS,
        TAG_FORCED,
        TAG_JOBS,
        TAG_WORKER,
        RunRecord,
    )

    cfg = load_config(config_path)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    tracker = open_tracker(cfg.tracking, create=False)
    # Only reads, and checks the store is there: a mistyped one would show every job as not committed.
    store = open_store(cfg.storage, create=False)
    if pipeline:
        parent = tracker.pipeline_run(cfg.name, pipeline) or next(
            (
                r
                for r in tracker.pipeline_runs(cfg.name, max_results=None)
                if Path(r.tags.get("selma.log_dir", "")).name == pipeline
            ),
            None,
        )
    else:
        parent = next(iter(tracker.pipeline_runs(cfg.name, max_results=1)), None)
    if parent is None:
        raise ConfigError(
            f"no pipeline run {pipeline + ' ' if pipeline else ''}in experiment {cfg.name!r} "
            f"at {cfg.tracking.uri}"
        )
    job_ids = [j for j in parent.tags.get(TAG_JOBS, "").split(",") if j]
    snapshot = Path(parent.tags.get("selma.log_dir", "")) / "config.yaml"
    if snapshot.is_file():  # the config as that run saw it: the config file may have changed since
        cfg = load_config(snapshot)
        plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    forced = set(parent.tags.get(TAG_FORCED, "").split(","))
    # Per job, per process (an images job's are tagged "I/N"): its newest run, a retry's over the
    # failed attempt before it.
    newest: dict[str, dict[str, RunRecord]] = {}
    for run in reversed(tracker.child_runs(cfg.name, parent.run_id)):  # oldest first
        newest.setdefault(run.name, {})[run.tags.get(TAG_WORKER, "")] = run
    finished = parent.status != "RUNNING"
    # Killed (SIGKILL, a crash of its machine): its run never ended, and its pending jobs never start.
    gone = not finished and _controller_gone(
        parent.tags.get(TAG_CONTROLLER), parent.tags.get(TAG_CONTROLLER_PROCESS)
    )
    # From anywhere: no heartbeat for long. Killed, or cut off from MLflow: it cannot be told which.
    heartbeat = _epoch_s(parent.tags.get(TAG_CONTROLLER_HEARTBEAT))
    silent = not finished and not gone and heartbeat is not None and time.time() - heartbeat > SILENT_AFTER_S
    rows = []
    for job_id in job_ids:
        job = plan.jobs.get(job_id)
        if job is None:  # the config changed since: this job no longer exists in it
            skill = job_id.partition(":")[2]
            why = "skill now uses an external dataset" if skill in plan.datasets else "config changed"
            rows.append({"job": job_id, "state": f"unknown ({why})"})
            continue
        runs = [newest[job.name][worker] for worker in sorted(newest.get(job.name, {}))]
        committed = store.is_committed(job.key)
        if runs:
            state = job_state(runs, finished, committed, job.id in forced)
        elif committed and job.id not in forced:
            state = "skipped"
        elif _failed_before_its_run(parent.tags.get("selma.log_dir"), job):
            state = "failed"  # before it opened its run (the store or MLflow unreachable, a lease)
        else:  # a forced job never started (blocked) is not skipped, though an old output exists
            state = "not run" if finished or gone else "pending"
        # A run still running has no end (MLflow keeps an end time on a run resumed to log into it).
        ends = [run.end_ms if run.status != "RUNNING" else None for run in runs]
        row = {
            "job": job.id,
            "phase": job.phase,
            "skill": job.skill,
            "state": state,
            # null in the JSON where there is none yet ("-" in the table), as run_id
            "start": _when(min(run.start_ms for run in runs)) if runs else None,
            "end": _when(max(ends)) if runs and all(ends) else None,
            "output": store.url(job.key) if committed else None,
            "run_id": runs[0].run_id if runs else None,
        }
        if len(runs) > 1:
            row["run_ids"] = [run.run_id for run in runs]
        rows.append(row)
    return {
        "pipeline": parent.run_id,
        "status": "controller gone" if gone else "controller silent" if silent else parent.status.lower(),
        "controller": parent.tags.get(TAG_CONTROLLER),
        "heartbeat": _when(int(heartbeat * 1000)) if heartbeat is not None else None,
        "started": _when(parent.start_ms),
        "logs": parent.tags.get("selma.log_dir"),
        "jobs": rows,
    }


def format_status(status: dict) -> str:
    lines = [
        f"pipeline {status['pipeline']} ({status['status']}, started {status['started']}); "
        f"logs: {status['logs']}",
    ]
    if status["status"] == "controller gone":
        lines.append(
            f"its controller ({status['controller']}) is gone, killed before it could end the pipeline: "
            "jobs it started may still run, pending ones will not start; run jobs.submit again to finish"
        )
    elif status["status"] == "controller silent":
        lines.append(
            f"its controller ({status['controller']}) has not renewed its heartbeat since "
            f"{status['heartbeat']}: it was killed, or it cannot reach MLflow. Pending jobs start only "
            "while it runs: if it is gone, run jobs.submit again to finish"
        )
    lines += [
        "| job | state | start | end | output | MLflow run |",
        "|---|---|---|---|---|---|",
    ]
    for row in status["jobs"]:
        lines.append(
            f"| {row['job']} | {row['state']} | {row.get('start') or '-'} | {row.get('end') or '-'} | "
            f"{row.get('output') or '-'} | {row.get('run_id') or '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv, {})
    if isinstance(args, int):
        return args
    try:
        status = pipeline_status(args.config, args.pipeline)
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({"error": str(e)}))
        return e.exit_code
    print(format_status(status))
    print(json.dumps(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
