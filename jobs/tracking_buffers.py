"""Tracking records a job could not send (MLflow down past ``tracking.flush_budget_s`` at its end),
kept in the store so that they outlive the job's machine, and sent by the next controller.

A job's buffer file lives on local disk (``tracking.buffer_dir``): in a pod, ``/tmp``, gone with the
pod. So a job ending with records still buffered commits the file, with its artifact copies, under
``_tracking/<run id>`` in the store, and removes its local copy (one place: nothing is sent twice).
``jobs.submit`` replays every such entry once MLflow answers, then deletes it; a replay cut short
keeps its progress in the entry, and the next one goes on from there.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PREFIX = "_tracking"


def keep_unsent_records(store, run) -> str | None:
    """Commit ``run``'s buffer (an ``MlflowJobRun`` whose end could not be sent) to the store; its
    key, or None when nothing waits or the store failed too (the local file then stays)."""
    buffer = getattr(run, "buffer", None)
    if buffer is None or not getattr(run, "pending", 0):
        return None
    key = f"{PREFIX}/{run.run_id}"
    try:
        with tempfile.TemporaryDirectory(prefix="selma-tracking-") as stage:
            shutil.copy2(buffer.path, Path(stage) / buffer.path.name)
            if buffer.artifacts_dir.is_dir():
                shutil.copytree(buffer.artifacts_dir, Path(stage) / buffer.artifacts_dir.name)
            store.commit_dir(Path(stage), key, {"kind": "selma.tracking-buffer", "run_id": run.run_id})
    except Exception as e:  # the job's outcome stands; the local file is still there to replay
        print(
            f"tracking: could not keep the buffer in the store ({e}); it stays in {buffer.path}",
            file=sys.stderr,
        )
        return None
    buffer.remove()
    run.buffer = None
    print(
        f"tracking: those records are kept in the store at {store.url(key)} instead (this machine's "
        "copy is removed): the next python -m jobs.submit of this pipeline sends them",
        file=sys.stderr,
        flush=True,
    )
    return key


def replay_kept_records(store, scratch: Path, echo=print) -> int:
    """Send every buffer kept in the store (``keep_unsent_records``) to MLflow and delete it; the
    number sent whole. One that fails (MLflow down again, a run deleted) stays, with its progress."""
    from selma_core.tracking.mlflow_tracker import replay_buffer

    run_ids = sorted({key.split("/")[1] for key in store.list_keys(PREFIX) if key.count("/") >= 2})
    if run_ids:
        scratch.mkdir(parents=True, exist_ok=True)
    sent = 0
    for run_id in run_ids:
        key = f"{PREFIX}/{run_id}"
        if not store.is_committed(key):
            continue  # a keep cut short: its attempt is garbage
        with tempfile.TemporaryDirectory(prefix="selma-replay-", dir=scratch) as work:
            folder = Path(work) / run_id
            try:  # one entry that cannot be read or sent must not hold back the others
                shutil.copytree(store.fetch_dir(key, Path(work) / "fetched"), folder)
                replay_buffer(folder / f"{run_id}.jsonl")
            except Exception as e:
                progress = folder / f"{run_id}.jsonl.sent"
                if progress.is_file():  # how far it got, for the next replay
                    store.commit_dir(folder, key, {"kind": "selma.tracking-buffer", "run_id": run_id})
                echo(f"warning: tracking records of run {run_id} kept at {store.url(key)} not sent yet: {e}")
                continue
        store.delete_prefix(key)
        sent += 1
        echo(f"tracking: records of run {run_id} kept at {store.url(key)} sent to MLflow")
    return sent
