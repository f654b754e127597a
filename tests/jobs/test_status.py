"""jobs.status on runs recorded in a real MLflow (SQLite) and outputs in a real local store: the
states of jobs of several processes, of forced jobs that never started, and an old pipeline by id."""

from __future__ import annotations

import os
import time
from datetime import datetime

import pytest

from jobs.status import pipeline_status
from selma_core.config import load_config
from selma_core.plan import build_plan
from selma_core.skills import load_skills
from selma_core.storage import open_store
from selma_core.tracking import open_tracker
from selma_core.tracking.base import TAG_FORCED, TAG_JOBS, TAG_WORKER


def commit(store, key: str, tmp_path) -> None:
    folder = tmp_path / "out" / key.replace("/", "_")
    folder.mkdir(parents=True)
    (folder / "done.txt").write_text("done")
    store.commit_dir(folder, key)


def job_run(tracker, cfg, parent: str, name: str, status: str, worker: str | None = None) -> None:
    run = tracker.start_job_run(cfg.name, parent, name, {TAG_WORKER: worker} if worker else {})
    if status != "RUNNING":
        tracker.client.set_terminated(run.run_id, status)
    time.sleep(0.01)  # runs are ordered by their start, in milliseconds


def test_states_of_processes_retries_and_forced_jobs(tiny_config, tmp_path):
    config = tiny_config(skills=["counting", "spatial"])
    cfg = load_config(config)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    store, tracker = open_store(cfg.storage), open_tracker(cfg.tracking)
    for job in ("prompts:counting", "prompts:spatial", "images:counting", "images:spatial"):
        commit(store, plan.jobs[job].key, tmp_path)
    old_tags = {
        TAG_JOBS: "prompts:counting",
        "selma.log_dir": str(tmp_path / "logs" / "selma-test-20261127-1-2"),
    }
    old = tracker.start_pipeline_run(cfg.name, old_tags, {}, name="pipeline-prompts")
    tracker.end_pipeline_run(old, True, {"jobs": []})
    for _ in range(3):  # newer pipelines push the old one out of any "newest N" search
        newer = tracker.start_pipeline_run(
            cfg.name, {TAG_JOBS: "prompts:counting"}, {}, name="pipeline-prompts"
        )
        tracker.end_pipeline_run(newer, True, {"jobs": []})

    jobs = ["images:counting", "images:spatial", "train:counting", "train:spatial", "merge"]
    tags = {TAG_JOBS: ",".join(jobs), TAG_FORCED: "images:spatial,train:spatial,merge"}
    parent = tracker.start_pipeline_run(cfg.name, tags, {}, name="pipeline-all")
    name = {job: plan.jobs[job].name for job in jobs}
    # images:counting: two processes; process 1's first attempt failed, its retry finished; process
    # 0 is still running.
    job_run(tracker, cfg, parent, name["images:counting"], "FINISHED", "0/2")  # an earlier attempt
    job_run(tracker, cfg, parent, name["images:counting"], "FAILED", "1/2")
    job_run(tracker, cfg, parent, name["images:counting"], "RUNNING", "0/2")
    job_run(tracker, cfg, parent, name["images:counting"], "FINISHED", "1/2")
    # images:spatial (forced): one process failed, the other finished after it.
    job_run(tracker, cfg, parent, name["images:spatial"], "FAILED", "0/2")
    job_run(tracker, cfg, parent, name["images:spatial"], "FINISHED", "1/2")

    running = {row["job"]: row for row in pipeline_status(str(config))["jobs"]}
    assert running["images:counting"]["state"] == "running"
    assert len(running["images:counting"]["run_ids"]) == 2 and running["images:counting"]["end"] is None
    assert running["images:spatial"]["state"] == "failed"
    assert running["train:counting"]["state"] == "pending"
    assert running["train:spatial"]["state"] == "pending"

    # train:counting: one process finished, its output not committed (the other's pod still pending).
    job_run(tracker, cfg, parent, name["train:counting"], "FINISHED", "0/2")
    assert {row["job"]: row["state"] for row in pipeline_status(str(config))["jobs"]}[
        "train:counting"
    ] == "running"

    job_run(tracker, cfg, parent, name["merge"], "RUNNING")  # killed before it committed anything
    tracker.end_pipeline_run(parent, False, {"jobs": []})
    commit(store, plan.jobs["train:spatial"].key, tmp_path)  # an old output of a job forced to rerun
    ended = {row["job"]: row["state"] for row in pipeline_status(str(config))["jobs"]}
    assert ended == {
        # The pipeline ended with process 0's run open, but the output is committed: the work is
        # done, its run's end lost (killed after the commit, or waiting in a tracking buffer).
        "images:counting": "done (run not closed)",
        "images:spatial": "failed",
        "train:counting": "failed",  # its run finished, but nothing committed the output
        "train:spatial": "not run",  # forced, blocked: its old output is not this pipeline's doing
        "merge": "failed",  # its run open, its output not committed: killed
    }

    # An old pipeline, by its id (whatever came after it) or by the name of its log folder.
    status = pipeline_status(str(config), old)
    assert status["pipeline"] == old
    assert datetime.fromisoformat(status["started"]).utcoffset() is not None  # an unambiguous instant
    assert pipeline_status(str(config), "selma-test-20261127-1-2")["pipeline"] == old
    assert [row["job"] for row in pipeline_status(str(config), old)["jobs"]] == ["prompts:counting"]


def test_a_job_that_failed_before_opening_its_run_is_failed_not_not_run(tiny_config, tmp_path):
    """The store or MLflow unreachable as it started: no run, but its log's last line says it failed."""
    import json

    config = tiny_config(skills=["counting"])
    cfg = load_config(config)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    open_store(cfg.storage)  # there, and empty
    tracker = open_tracker(cfg.tracking)
    logs = tmp_path / "logs" / "selma-test-20261128-1-2"
    logs.mkdir(parents=True)
    merge, evaluate = plan.jobs["merge"], plan.jobs["eval"]
    failure = {"job": "merge", "status": "failed", "error": "cannot reach S3", "exit_code": 1}
    (logs / f"{merge.name}.log").write_text("error: cannot reach S3\n" + json.dumps(failure) + "\n")
    tags = {TAG_JOBS: "merge,eval", "selma.log_dir": str(logs)}
    parent = tracker.start_pipeline_run(cfg.name, tags, {}, name="pipeline-all")
    tracker.end_pipeline_run(parent, False, {"jobs": []})
    states = {row["job"]: row["state"] for row in pipeline_status(str(config))["jobs"]}
    assert states == {"merge": "failed", evaluate.id: "not run"}  # eval: blocked, no log


def test_reading_commands_make_no_database_or_store_at_a_mistyped_path(tiny_config, tmp_path, capsys):
    """jobs.status and jobs.promote only read: a tracking.uri naming no database is an error (exit
    2), not an empty database made there, and no store folder is made either."""
    import json
    import shutil

    from jobs import promote, status

    db = tmp_path / "typo" / "mlfow.db"
    store = tmp_path / "typo" / "store"
    config = str(tiny_config(tracking={"uri": f"sqlite:///{db}"}, storage={"uri": f"file://{store}"}))
    shutil.rmtree(tmp_path / "typo")  # the test config comes with an empty database: the typo has none
    for main in (status.main, promote.main):
        assert main(["--config", config]) == 2
        error = json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
        assert f"no MLflow database at {db}: no pipeline has run with this tracking.uri yet" in error
    assert not (tmp_path / "typo").exists()


def test_status_names_a_missing_store_folder_rather_than_showing_nothing_committed(
    tiny_config, tmp_path, capsys
):
    import json

    from jobs import status

    store = tmp_path / "typo" / "store"
    assert status.main(["--config", str(tiny_config(storage={"uri": f"file://{store}"}))]) == 2
    assert (
        f"storage uri file://{store}: no such folder"
        in json.loads(capsys.readouterr().out.splitlines()[-1])["error"]
    )
    assert not (tmp_path / "typo").exists()


def test_status_names_a_missing_bucket_rather_than_showing_nothing_committed(tiny_config, moto_s3, capsys):
    import json

    from jobs import status

    storage = {"uri": "s3://no-such-bucket-for-selma/store", "endpoint_url": moto_s3, "retry_budget_s": 0}
    assert status.main(["--config", str(tiny_config(storage=storage))]) == 2
    assert "bucket missing or not accessible" in json.loads(capsys.readouterr().out.splitlines()[-1])["error"]


def test_a_forced_job_killed_before_its_commit_is_failed_though_an_old_output_exists():
    from types import SimpleNamespace

    from jobs.status import job_state

    open_run = [SimpleNamespace(status="RUNNING")]
    assert job_state(open_run, finished=True, committed=True) == "done (run not closed)"
    assert job_state(open_run, finished=True, committed=True, forced=True) == "failed"


def test_a_pipeline_whose_controller_was_killed_says_so_and_its_pending_jobs_will_not_run(
    tiny_config, tmp_path
):
    """A controller killed outright (SIGKILL, the OOM killer) never ends its pipeline run: on the host
    and in the PID namespace it ran in, status tells it from one at work, rather than show it running
    for ever. Elsewhere (another machine, a container with the same host name) it cannot tell."""
    import socket
    import subprocess
    import sys

    from jobs.status import format_status
    from selma_core.storage.lease import process_identity
    from selma_core.tracking.base import TAG_CONTROLLER, TAG_CONTROLLER_PROCESS

    config = tiny_config(skills=["counting"])
    cfg = load_config(config)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    tracker = open_tracker(cfg.tracking)
    open_store(cfg.storage)  # made, nothing committed
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host, dead, me = socket.gethostname(), ended.stdout.strip(), process_identity(os.getpid())
    boot, namespace, started = me.split(" ")
    cases = [
        (f"{host}:{os.getpid()}", me, "running"),  # at work
        (f"{host}:{os.getpid()}", f"{boot} {namespace} 1", "controller gone"),  # its PID taken since
        (f"{host}:{dead}", f"{boot} {namespace} {started}", "controller gone"),  # ended
        (f"{host}:{dead}", f"{boot} pid:[1] {started}", "running"),  # another container's PID
        (f"another-host:{dead}", me, "running"),  # another machine's
        (f"{host}:{dead}", None, "running"),  # nothing to tell it by
    ]
    jobs = ["prompts:counting", "images:counting"]
    for controller, process, expected in cases:
        tags = {TAG_JOBS: ",".join(jobs), TAG_CONTROLLER: controller}
        if process is not None:
            tags[TAG_CONTROLLER_PROCESS] = process
        parent = tracker.start_pipeline_run(cfg.name, tags, {}, name="pipeline-all")
        job_run(tracker, cfg, parent, plan.jobs["prompts:counting"].name, "RUNNING")
        status = pipeline_status(str(config))
        assert status["status"] == expected, (controller, process)
        states = {row["job"]: row["state"] for row in status["jobs"]}
        # A job it started may still run (its process outlives the controller); one never started never will.
        assert states == {
            "prompts:counting": "running",
            "images:counting": "not run" if expected == "controller gone" else "pending",
        }
        if expected == "controller gone":
            assert f"its controller ({controller}) is gone" in format_status(status)


def test_a_pipeline_whose_controller_stopped_beating_is_controller_silent_from_any_machine(
    tiny_config, tmp_path
):
    """A controller on another machine (a CI runner, a pod) cannot be told dead by its PID; its
    heartbeat, renewed every minute in MLflow, tells from anywhere that it stopped: "controller
    silent" after 10 minutes without one. A pipeline of an older selma, without the tag, is running."""
    from jobs.heartbeat import SILENT_AFTER_S
    from jobs.status import format_status
    from selma_core.tracking.base import TAG_CONTROLLER, TAG_CONTROLLER_HEARTBEAT

    config = tiny_config(skills=["counting"])
    cfg = load_config(config)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    tracker = open_tracker(cfg.tracking)
    open_store(cfg.storage)
    jobs = ["prompts:counting", "images:counting"]
    now = time.time()
    for heartbeat, expected in [
        (now - 30, "running"),
        (now - SILENT_AFTER_S - 60, "controller silent"),
        (None, "running"),
    ]:
        tags = {TAG_JOBS: ",".join(jobs), TAG_CONTROLLER: "ci-runner-7:4242"}
        if heartbeat is not None:
            tags[TAG_CONTROLLER_HEARTBEAT] = f"{heartbeat:.3f}"
        parent = tracker.start_pipeline_run(cfg.name, tags, {}, name="pipeline-all")
        job_run(tracker, cfg, parent, plan.jobs["prompts:counting"].name, "RUNNING")
        status = pipeline_status(str(config))
        assert status["status"] == expected, heartbeat
        # It may be cut off from MLflow only: its jobs are not called dead.
        assert {row["job"]: row["state"] for row in status["jobs"]} == {
            "prompts:counting": "running",
            "images:counting": "pending",
        }
        if heartbeat is not None:
            assert datetime.fromisoformat(status["heartbeat"]).timestamp() == pytest.approx(heartbeat, abs=1)
        if expected == "controller silent":
            text = format_status(status)
            assert "its controller (ci-runner-7:4242) has not renewed its heartbeat since" in text
            assert "run jobs.submit again" in text
    # An ended pipeline is what its run says, however old its last heartbeat.
    tracker.client.set_terminated(parent, "FINISHED")
    tracker.set_run_tags(parent, {TAG_CONTROLLER_HEARTBEAT: f"{now - 86400:.3f}"})
    assert pipeline_status(str(config), parent)["status"] == "finished"
