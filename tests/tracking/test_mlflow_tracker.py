"""MLflow tracking: embedded (SQLite in tmp_path) and against a real ``mlflow server`` process."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

import pytest
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from selma_core.config import TrackingConfig, load_config
from selma_core.errors import EndpointError
from selma_core.tracking import TAG_CONFIG_HASH, TAG_PHASE, TAG_PIPELINE, TAG_SKILL, open_tracker
from selma_core.tracking.mlflow_tracker import MlflowJobRun, ServerMlflowTracker, SqliteMlflowTracker


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sqlite_tracker(tmp_path_factory) -> SqliteMlflowTracker:
    """One embedded tracker per module (creating the schema takes seconds); tests use own experiments."""
    db = tmp_path_factory.mktemp("tracking") / "sub" / "mlflow.db"
    tracker = open_tracker(TrackingConfig(uri=f"sqlite:///{db}"))
    assert type(tracker) is SqliteMlflowTracker
    return tracker


@pytest.fixture(scope="module")
def server_tracker(mlflow_server) -> ServerMlflowTracker:
    tracker = open_tracker(TrackingConfig(uri=mlflow_server))
    assert type(tracker) is ServerMlflowTracker
    return tracker


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_open_tracker_sqlite_creates_the_db_folder(tmp_path):
    db = tmp_path / "a" / "b" / "mlflow.db"
    tracker = open_tracker(TrackingConfig(uri=f"sqlite:///{db}"), check=False)
    assert isinstance(tracker, SqliteMlflowTracker)
    assert tracker.db_path == db
    assert db.parent.is_dir()


def test_pipeline_run_has_experiment_tags_and_flattened_params(sqlite_tracker, tiny_config):
    cfg = load_config(tiny_config(name=unique("pipe")))
    tags = {TAG_PIPELINE: cfg.name, TAG_CONFIG_HASH: cfg.config_hash()}
    run_id = sqlite_tracker.start_pipeline_run(cfg.name, tags, cfg.to_dict(), name="pipeline-1")

    client = sqlite_tracker.client
    experiment = client.get_experiment_by_name(cfg.name)
    assert experiment is not None
    run = client.get_run(run_id)
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.status == "RUNNING"
    assert run.data.tags[MLFLOW_RUN_NAME] == "pipeline-1"
    assert run.data.tags[TAG_PIPELINE] == cfg.name
    assert run.data.tags[TAG_CONFIG_HASH] == cfg.config_hash()

    params = run.data.params
    # Nested sections are flattened with dotted names; values are their str().
    assert params["name"] == cfg.name
    assert params["train.rank"] == "4"
    assert params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert params["storage.uri"] == cfg.storage.uri
    assert params["skills"] == str(["counting", "spatial"])
    assert params["prompts.openai.model"] == cfg.prompts.openai.model
    assert "train" not in params and "prompts.openai" not in params

    # A second pipeline run reuses the experiment.
    second = sqlite_tracker.start_pipeline_run(cfg.name, {}, {"x": 1})
    assert client.get_run(second).info.experiment_id == experiment.experiment_id


def test_a_tracking_outage_during_a_pipeline_loses_none_of_its_runs_records(tmp_path, monkeypatch, capsys):
    """The pipeline run's params (an outage as it starts) and its summary and end (an outage at the
    end) are buffered like a job run's: sent when the server answers, never an error that would
    make jobs.submit report jobs that ran as failed."""
    from mlflow.exceptions import MlflowException

    tracker = SqliteMlflowTracker(
        f"sqlite:///{tmp_path / 'mlflow.db'}", buffer_dir=tmp_path / "buffer", flush_budget_s=0.2
    )
    client = tracker.client
    outage = {"log_batch": 1, "log_artifact": 0, "log_artifacts": 0}  # log_dict calls log_artifact

    def failing(name):
        real = getattr(client, name)

        def call(*args, **kwargs):
            if outage[name]:
                outage[name] -= 1
                raise MlflowException("the database is restarting", error_code="TEMPORARILY_UNAVAILABLE")
            return real(*args, **kwargs)

        return call

    for name in outage:
        monkeypatch.setattr(client, name, failing(name))
    run_id = tracker.start_pipeline_run("pipe", {}, {"steps": 3})
    assert client.get_run(run_id).data.params == {}  # buffered
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train.log").write_text("trained\n")
    outage["log_artifact"] = outage["log_artifacts"] = 10**6  # down past the end's budget
    tracker.end_pipeline_run(run_id, True, {"jobs": ["train"]}, logs)  # no error
    err = capsys.readouterr().err
    assert "did not answer within tracking.flush_budget_s" in err and "replay" in err
    run = client.get_run(run_id)
    assert run.data.params == {"steps": "3"} and run.info.status == "RUNNING"

    outage["log_artifact"] = outage["log_artifacts"] = 0  # back: a replay brings the rest
    from selma_core.tracking.mlflow_tracker import replay_buffer

    [buffer] = (tmp_path / "buffer").glob("*.jsonl")
    replay_buffer(buffer)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "logs")] == ["logs/train.log"]


def test_many_params_are_logged_in_batches(sqlite_tracker):
    experiment = unique("batch")
    params = {"group": {f"p{i:03d}": i for i in range(250)}, "long": "x" * 7000}
    run_id = sqlite_tracker.start_pipeline_run(experiment, {}, params)
    logged = sqlite_tracker.client.get_run(run_id).data.params
    assert len(logged) == 251
    assert logged["group.p249"] == "249"
    assert logged["long"] == "x" * 6000  # truncated to MLflow's limit


def test_job_run_is_a_child_with_metrics_dict_and_status(sqlite_tracker):
    experiment = unique("jobs")
    parent = sqlite_tracker.start_pipeline_run(experiment, {TAG_PIPELINE: experiment}, {})
    job = sqlite_tracker.start_job_run(
        experiment, parent, "train-counting", {TAG_PHASE: "train", TAG_SKILL: "counting"}
    )
    assert isinstance(job, MlflowJobRun)
    client = sqlite_tracker.client

    run = client.get_run(job.run_id)
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert run.data.tags[TAG_PHASE] == "train"
    assert run.data.tags[TAG_SKILL] == "counting"
    assert run.data.tags[MLFLOW_RUN_NAME] == "train-counting"
    assert run.info.experiment_id == client.get_run(parent).info.experiment_id

    for step, loss in [(0, 1.5), (2, 0.75), (4, 0.25)]:
        job.log_metrics({"loss": loss, "lr": 1e-3}, step=step)
    job.log_metrics({"final_score": 0.5})
    history = client.get_metric_history(job.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 1.5),
        (2, 0.75),
        (4, 0.25),
    ]
    assert len(client.get_metric_history(job.run_id, "lr")) == 3
    assert [(m.step, m.value) for m in client.get_metric_history(job.run_id, "final_score")] == [(0, 0.5)]

    job.log_params({"phase": {"steps": 8}})
    job.set_tags({"selma.output": "file:///x", "number": 3})
    job.log_dict({"accepted": 12, "skill": "counting"}, "stats/summary.json")
    run = client.get_run(job.run_id)
    assert run.data.params["phase.steps"] == "8"
    assert run.data.tags["selma.output"] == "file:///x"
    assert run.data.tags["number"] == "3"
    assert [a.path for a in client.list_artifacts(job.run_id, "stats")] == ["stats/summary.json"]

    sqlite_tracker.end_job_run(job, ok=True)
    assert client.get_run(job.run_id).info.status == "FINISHED"

    failed = sqlite_tracker.start_job_run(experiment, parent, "images-spatial", {})
    sqlite_tracker.end_job_run(failed, ok=False)
    assert client.get_run(failed.run_id).info.status == "FAILED"

    sqlite_tracker.end_pipeline_run(parent, ok=False, summary={"failed": ["images-spatial"]})
    assert client.get_run(parent).info.status == "FAILED"
    assert [a.path for a in client.list_artifacts(parent)] == ["pipeline_summary.json"]


def test_job_run_without_parent_has_no_parent_tag(sqlite_tracker):
    job = sqlite_tracker.start_job_run(unique("solo"), None, "prompts-counting", {TAG_PHASE: "prompts"})
    tags = sqlite_tracker.client.get_run(job.run_id).data.tags
    assert MLFLOW_PARENT_RUN_ID not in tags
    assert tags[TAG_PHASE] == "prompts"


def test_sqlite_artifacts_land_in_mlartifacts_beside_the_db(sqlite_tracker, tmp_path):
    experiment = unique("artifacts")
    parent = sqlite_tracker.start_pipeline_run(experiment, {}, {})
    job = sqlite_tracker.start_job_run(experiment, parent, "merge", {})
    job.log_dict({"weights": [0.5, 0.5]}, "merge.json")
    local = tmp_path / "notes.txt"
    local.write_text("hello")
    job.log_artifact(local, "extra")
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "w.bin").write_bytes(b"\0\1")
    job.log_artifact(folder, "adapter")
    sqlite_tracker.end_pipeline_run(parent, ok=True, summary={"jobs": 1})

    root = sqlite_tracker.db_path.parent / "mlartifacts" / experiment
    experiment_info = sqlite_tracker.client.get_experiment_by_name(experiment)
    assert experiment_info.artifact_location == root.as_uri()
    artifacts = root / job.run_id / "artifacts"
    assert json.loads((artifacts / "merge.json").read_text()) == {"weights": [0.5, 0.5]}
    assert (artifacts / "extra" / "notes.txt").read_text() == "hello"
    assert (artifacts / "adapter" / "sub" / "w.bin").read_bytes() == b"\0\1"
    assert json.loads((root / parent / "artifacts" / "pipeline_summary.json").read_text()) == {"jobs": 1}
    assert sqlite_tracker.client.get_run(parent).info.status == "FINISHED"


def test_experiment_created_meanwhile_is_reused(sqlite_tracker, tmp_path):
    experiment = unique("race")
    other = SqliteMlflowTracker(sqlite_tracker.uri)
    first = other.experiment_id(experiment)
    assert sqlite_tracker.experiment_id(experiment) == first


# -- a real MLflow server ------------------------------------------------------------------------


def test_server_parent_child_round_trip(server_tracker, capsys):
    experiment = unique("server")
    parent = server_tracker.start_pipeline_run(
        experiment, {TAG_PIPELINE: experiment}, {"train": {"rank": 4}}, name="pipeline"
    )
    job = server_tracker.start_job_run(experiment, parent, "train-counting", {TAG_PHASE: "train"})
    job.log_metrics({"loss": 1.0}, step=1)
    job.log_metrics({"loss": 0.5}, step=2)
    job.log_dict({"ok": True}, "result.json")
    server_tracker.end_job_run(job, ok=True)
    server_tracker.end_pipeline_run(parent, ok=True, summary={"jobs": ["train-counting"]})
    assert "View run" not in capsys.readouterr().out  # stdout is jobs.submit's JSON contract

    client = server_tracker.client
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    parent_run = client.get_run(parent)
    child_run = client.get_run(job.run_id)
    assert parent_run.info.experiment_id == child_run.info.experiment_id == experiment_id
    assert parent_run.data.params == {"train.rank": "4"}
    assert parent_run.data.tags[TAG_PIPELINE] == experiment
    assert child_run.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert child_run.data.tags[TAG_PHASE] == "train"
    history = client.get_metric_history(job.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]
    assert parent_run.info.status == child_run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(job.run_id)] == ["result.json"]
    assert [a.path for a in client.list_artifacts(parent)] == ["pipeline_summary.json"]
    downloaded = Path(client.download_artifacts(job.run_id, "result.json"))
    assert json.loads(downloaded.read_text()) == {"ok": True}


@pytest.mark.parametrize("kind", ["sqlite", "server"])
def test_pipeline_and_job_runs_are_found_past_the_first_page_of_runs(kind, request, monkeypatch):
    """``jobs.status`` looks pipelines up among thousands of job runs (an images phase of many
    shards): pipelines are selected in the query, and job runs are read page by page."""
    from selma_core.tracking import mlflow_tracker

    tracker = request.getfixturevalue(f"{kind}_tracker")
    monkeypatch.setattr(mlflow_tracker, "SEARCH_PAGE", 2)
    experiment = unique("paging")
    pipelines, jobs = [], []
    for _ in range(3):
        pipelines.append(
            tracker.start_pipeline_run(experiment, {TAG_PIPELINE: experiment}, {}, "pipeline-all")
        )
        time.sleep(0.01)  # runs are ordered by start time, in milliseconds
        for i in range(3):
            jobs.append(tracker.start_job_run(experiment, pipelines[-1], f"images-{i}", {}).run_id)
            time.sleep(0.01)
    # The newest pipeline has three job runs after it, more than one page of runs.
    assert [r.run_id for r in tracker.pipeline_runs(experiment, 1)] == pipelines[-1:]
    assert [r.run_id for r in tracker.pipeline_runs(experiment, None)] == pipelines[::-1]
    assert [r.run_id for r in tracker.pipeline_runs(experiment, 2)] == pipelines[:0:-1]
    assert [r.run_id for r in tracker.child_runs(experiment, pipelines[0])] == jobs[2::-1]
    assert tracker.pipeline_runs(unique("no-such-experiment"), None) == []


def test_unreachable_server_fails_naming_the_url():
    url = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(EndpointError) as info:
        open_tracker(TrackingConfig(uri=url, connect_retries=1))
    elapsed = time.monotonic() - start
    assert url in str(info.value)
    assert "2 attempts" in str(info.value)
    assert elapsed < 30, f"an unreachable server took {elapsed:.1f}s to report"


def test_server_returning_errors_is_not_healthy(moto_s3):
    # moto answers /health with an error status: reachable, but not an MLflow server.
    with pytest.raises(EndpointError, match="HTTP"):
        open_tracker(TrackingConfig(uri=moto_s3, connect_retries=0))


def test_a_replay_cut_short_goes_on_where_it_stopped_and_bad_files_are_named(
    sqlite_tracker, tmp_path, monkeypatch, capsys
):
    """``python -m selma_core.tracking.mlflow_tracker replay``: a server failing mid-replay leaves the
    rest for the next replay, which sends no metric twice; a missing or foreign file is named."""
    from selma_core.tracking import mlflow_tracker

    job = sqlite_tracker.start_job_run(unique("replay"), None, "train-counting", {})
    buffer = mlflow_tracker.TrackingBuffer(tmp_path / "run.jsonl", sqlite_tracker.uri, job.run_id, 1 << 20)
    buffer.append({"kind": "metrics", "metrics": [["loss", 1.0, 1000, 1]]})
    buffer.append({"kind": "tags", "tags": {"selma.output": "file:///x"}})
    buffer.append({"kind": "metrics", "metrics": [["loss", 0.5, 2000, 2]]})
    buffer.append({"kind": "terminate", "status": "FINISHED", "end_time": 3000})
    apply, calls = mlflow_tracker._apply, []

    def server_fails_at_the_tags(client, run_id, record):
        calls.append(record["kind"])
        if len(calls) == 2:
            raise ConnectionError("server went away")
        apply(client, run_id, record)

    monkeypatch.setattr(mlflow_tracker, "_apply", server_fails_at_the_tags)
    assert mlflow_tracker.main(["replay", str(buffer.path)]) == 1
    assert "server went away; run the replay again: it goes on where it stopped" in capsys.readouterr().err
    assert buffer.path.is_file()
    assert mlflow_tracker.main(["replay", str(buffer.path)]) == 0
    assert calls == ["metrics", "tags", "tags", "metrics", "terminate"]  # the first metric sent once
    history = sqlite_tracker.client.get_metric_history(job.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]
    assert sqlite_tracker.client.get_run(job.run_id).info.status == "FINISHED"
    assert not buffer.path.exists() and list(tmp_path.iterdir()) == []

    # A refused record (a parameter logged before with another value) is skipped, not retried
    # forever; a progress file left by another run's buffer at the same path is not followed.
    other = sqlite_tracker.start_job_run(unique("replay"), None, "train-spatial", {})
    other.log_params({"lr": 0.1})
    buffer = mlflow_tracker.TrackingBuffer(tmp_path / "run.jsonl", sqlite_tracker.uri, other.run_id, 1 << 20)
    buffer.append({"kind": "params", "params": {"lr": 0.2}})
    buffer.append({"kind": "metrics", "metrics": [["loss", 3.0, 1000, 1]]})
    (tmp_path / "run.jsonl.sent").write_text(json.dumps({"run_id": job.run_id, "offset": 10**6}))
    calls.clear()

    def recorded(client, run_id, record):
        calls.append(record["kind"])
        apply(client, run_id, record)

    monkeypatch.setattr(mlflow_tracker, "_apply", recorded)
    assert mlflow_tracker.main(["replay", str(buffer.path)]) == 0
    assert "a params record refused, skipped" in capsys.readouterr().err and calls == ["params", "metrics"]
    assert [m.value for m in sqlite_tracker.client.get_metric_history(other.run_id, "loss")] == [3.0]
    # A buffer whose run is gone is named and kept.
    gone = mlflow_tracker.TrackingBuffer(tmp_path / "gone.jsonl", sqlite_tracker.uri, "0" * 32, 1 << 20)
    gone.append({"kind": "tags", "tags": {"a": "b"}})
    assert mlflow_tracker.main(["replay", str(gone.path)]) == 2
    assert f"its run {'0' * 32} is not at" in capsys.readouterr().err and gone.path.is_file()
    gone.path.unlink()

    (tmp_path / "notes.txt").write_text("not a buffer\n")
    assert mlflow_tracker.main(["replay", str(tmp_path / "nope.jsonl"), str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope.jsonl'}: no such file" in err and "notes.txt: not a tracking buffer" in err


class HalfDownMlflow:
    """An MLflow server whose /health answers while its API fails (its database down behind it):
    ``broken`` answers every API call 500 INTERNAL_ERROR; the API calls are counted and kept."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.broken = True
        self.calls: list[tuple[str, dict]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/health"):
                    code, payload = 200, b"OK"
                else:
                    outer.calls.append((self.path, json.loads(body or b"{}")))
                    code, payload = (
                        (500, b'{"error_code": "INTERNAL_ERROR", "message": "database is down"}')
                        if outer.broken
                        else (200, b"{}")
                    )
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_record_the_server_fails_or_never_answers_costs_one_short_request(tmp_path, capsys):
    """Sent at once (nothing buffered yet), a metric costs one request when the server fails it, not
    MLflow's retries with backoff; and a server that accepts the connection but never answers holds
    training for record_timeout_s, not 4 x 60 s. Then the job buffers."""
    import socket

    server = HalfDownMlflow()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does), never answers
    try:
        run = MlflowJobRun(ServerMlflowTracker(server.url, buffer_dir=tmp_path / "a"), "run-1")
        run.log_metrics({"train.loss": 0.5}, step=1)
        assert [path for path, _ in server.calls] == ["/api/2.0/mlflow/runs/log-batch"]
        assert run.pending == 1

        hung = ServerMlflowTracker(f"http://127.0.0.1:{silent.getsockname()[1]}", buffer_dir=tmp_path / "b")
        hung.record_timeout_s = 1.0
        run = MlflowJobRun(hung, "run-2")
        started = time.monotonic()
        run.log_metrics({"train.loss": 0.5}, step=1)
        assert time.monotonic() - started < 5 and run.pending == 1
        assert "is not answering" in capsys.readouterr().err
    finally:
        server.close()
        silent.close()


def test_a_server_that_answers_its_probe_but_fails_the_flush_costs_one_request_a_try(tmp_path, capsys):
    """Between training steps a failed flush is one request (not MLflow's retries with backoff), the
    wait before the next one doubles, and records the full buffer dropped are named when it works."""
    server = HalfDownMlflow()
    try:
        tracker = ServerMlflowTracker(server.url, retry_interval_s=0.5, buffer_dir=tmp_path)
        run = MlflowJobRun(tracker, "run-1")
        run._buffer().max_bytes = run._buffer().size + 300  # room for a few records only
        for step in range(20):
            run._buffer().append({"kind": "metrics", "metrics": [["train.loss", 0.5, 1000 + step, step]]})
        assert run._buffer().dropped > 0

        waits = []
        for attempt in (1, 2):
            before = len(server.calls)
            assert run._try_flush() is False
            waits.append(run._next_try - time.monotonic())
            assert len(server.calls) - before == 1, f"attempt {attempt}: {server.calls[before:]}"
        assert 0.5 < waits[0] <= 1.0 < waits[1] <= 2.0  # 0.5 s x 2, then x 4

        server.broken = False
        dropped = run._buffer().dropped
        assert run._try_flush() is True
        err = capsys.readouterr().err
        assert "answers again" in err and "dropped while waiting" in err
        path, body = server.calls[-1]
        assert path.endswith("/runs/log-batch")
        assert body["tags"] == [{"key": "selma.tracking.dropped_records", "value": str(dropped)}]
        assert run._failed_flushes == 0
    finally:
        server.close()


def test_the_default_buffer_folder_is_this_users_alone(tmp_path, monkeypatch, capsys):
    """/tmp is everyone's: a folder another user may write in could have a buffer file swapped for
    one that uploads this user's files. The default folder is made 0700; one writable by others is
    not used."""
    import os
    import stat

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    tracker = SqliteMlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = MlflowJobRun(tracker, "run-1")
    folder = run._buffer().path.parent
    assert folder == tmp_path / f"selma-tracking-buffer-{os.getuid()}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700

    folder.chmod(0o777)  # as if another user had made it first, open to all
    other = MlflowJobRun(tracker, "run-2")._buffer().path.parent
    assert other != folder and other.parent == tmp_path and stat.S_IMODE(other.stat().st_mode) == 0o700
    assert f"{folder} is not a folder of this user's alone" in capsys.readouterr().err


def test_a_buffered_artifact_record_uploads_only_its_own_copy(tmp_path, capsys):
    """A buffer file read back (a flush, a replay of a file handed over) that names another file in
    an artifact record does not upload it."""
    from selma_core.tracking.mlflow_tracker import replay_buffer

    tracker = SqliteMlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", buffer_dir=tmp_path / "buffer")
    run = tracker.start_job_run("exp", None, "train", {})
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key=SECRET")
    run._buffer().append({"kind": "artifact", "path": str(secret), "artifact_path": "x"})
    run._buffer().append({"kind": "tags", "tags": {"after": "yes"}})
    replay_buffer(run.buffer.path)
    assert "is not a copy in" in capsys.readouterr().err
    assert tracker.client.list_artifacts(run.run_id, "x") == []
    assert tracker.client.get_run(run.run_id).data.tags["after"] == "yes"  # the rest goes on


def test_a_buffer_written_before_relative_artifact_paths_still_replays(tmp_path, monkeypatch):
    """Older buffers named each artifact copy by its path from the working directory (a relative
    tracking.buffer_dir gave a relative one): replayed from there, the copy is still found."""
    from selma_core.tracking.mlflow_tracker import replay_buffer

    monkeypatch.chdir(tmp_path)
    tracker = SqliteMlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", buffer_dir="rel-buf")
    run = tracker.start_job_run("exp", None, "train", {})
    buffer = run._buffer()
    old_style = Path("rel-buf") / buffer.artifacts_dir.name / "113" / "curve.json"
    old_style.parent.mkdir(parents=True)
    old_style.write_text("[0.5]")
    buffer.append({"kind": "artifact", "path": str(old_style), "artifact_path": "curves"})
    replay_buffer(buffer.path)
    assert [a.path for a in tracker.client.list_artifacts(run.run_id, "curves")] == ["curves/curve.json"]
