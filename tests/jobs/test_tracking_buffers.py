"""Tracking records a job could not send as it ended: kept in the store (a pod's disk goes with the
pod), and sent by the next controller once MLflow answers."""

from __future__ import annotations

import pytest

from jobs.tracking_buffers import PREFIX, keep_unsent_records, replay_kept_records
from selma_core.storage.local import LocalArtifactStore
from selma_core.tracking.mlflow_tracker import SqliteMlflowTracker


@pytest.fixture
def outage(monkeypatch):
    """``down[0]``: whether every MLflow client (the job's, and the replay's own) fails each write
    as an outage."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    down = [False]

    def failing(name):
        real = getattr(MlflowClient, name)

        def call(self, *args, **kwargs):
            if down[0]:
                raise MlflowException("the database is restarting", error_code="TEMPORARILY_UNAVAILABLE")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, name, call)

    for name in ("log_batch", "log_artifact", "log_artifacts", "set_terminated"):
        failing(name)
    return down


def test_records_mlflow_did_not_take_outlive_the_job_and_the_next_controller_sends_them(
    tmp_path, outage, capsys
):
    tracker = SqliteMlflowTracker(
        f"sqlite:///{tmp_path / 'mlflow.db'}", buffer_dir=tmp_path / "pod-tmp", flush_budget_s=0.1
    )
    down = outage
    store = LocalArtifactStore(tmp_path / "store")
    run = tracker.start_job_run("exp", None, "train-counting", {})
    down[0] = True  # MLflow goes down during the job, and stays down past its end
    run.log_metrics({"train.loss": 0.5}, step=1)
    curve = tmp_path / "loss.json"
    curve.write_text("[0.5]")
    run.log_artifact(curve, "curves")
    curve.unlink()  # the job's own file is gone: the buffer kept a copy
    tracker.end_job_run(run, True)
    assert run.pending

    key = keep_unsent_records(store, run)
    assert key == f"{PREFIX}/{run.run_id}" and store.is_committed(key)
    assert not list((tmp_path / "pod-tmp").iterdir())  # one place only: nothing sent twice
    assert "the next python -m jobs.submit of this pipeline sends them" in capsys.readouterr().err

    # A controller while MLflow is still down: the entry stays for the next one.
    messages: list[str] = []
    assert replay_kept_records(store, tmp_path / "scratch", echo=messages.append) == 0
    assert store.is_committed(key) and "not sent yet" in messages[0]

    down[0] = False
    assert replay_kept_records(store, tmp_path / "scratch", echo=messages.append) == 1
    got = tracker.client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["train.loss"] == 0.5
    assert [a.path for a in tracker.client.list_artifacts(run.run_id, "curves")] == ["curves/loss.json"]
    assert store.list_keys(PREFIX) == []


def test_an_entry_that_cannot_be_read_does_not_hold_back_the_others(tmp_path, outage):
    tracker = SqliteMlflowTracker(
        f"sqlite:///{tmp_path / 'mlflow.db'}", buffer_dir=tmp_path / "pod-tmp", flush_budget_s=0.1
    )
    store = LocalArtifactStore(tmp_path / "store")
    runs = []
    for name in ("a", "b"):
        run = tracker.start_job_run("exp", None, name, {})
        outage[0] = True
        run.log_metrics({"train.loss": 0.5}, step=1)
        tracker.end_job_run(run, True)
        keep_unsent_records(store, run)
        outage[0] = False
        runs.append(run.run_id)
    damaged = sorted(runs)[0]  # replayed first
    [kept] = [p for p in (tmp_path / "store" / PREFIX / damaged).rglob("*.jsonl")]
    kept.write_bytes(kept.read_bytes() + b"x")  # fails its checksum
    messages: list[str] = []
    assert replay_kept_records(store, tmp_path / "scratch", echo=messages.append) == 1
    assert "not sent yet" in messages[0] and damaged in messages[0]
    other = sorted(runs)[1]
    assert tracker.client.get_run(other).info.status == "FINISHED"
    assert store.is_committed(f"{PREFIX}/{damaged}") and not store.is_committed(f"{PREFIX}/{other}")


def test_nothing_is_kept_when_mlflow_took_everything(tmp_path):
    tracker = SqliteMlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", buffer_dir=tmp_path / "buffer")
    store = LocalArtifactStore(tmp_path / "store")
    run = tracker.start_job_run("exp", None, "train-counting", {})
    run.log_metrics({"train.loss": 0.5}, step=1)
    tracker.end_job_run(run, True)
    assert keep_unsent_records(store, run) is None and store.list_keys(PREFIX) == []
    assert replay_kept_records(store, tmp_path / "scratch") == 0
