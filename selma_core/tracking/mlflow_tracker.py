"""MLflow tracking, embedded (a SQLite file, artifacts in a folder beside it) or on a server.

The two differ only in how they are reached: the embedded store needs its folder, a server needs a
bounded wait for ``/health`` so an unreachable endpoint fails fast with its address instead of
MLflow's default of minutes of retries.

Tracking never fails finished work. Once a job's run is open, a tracking server that stops
answering (a restart, an outage) does not stop the job: ``log_params``, ``log_metrics``,
``set_tags``, ``log_dict``, ``log_artifact`` and the run's end are kept, in call order, in a local
buffer file (``tracking.buffer_dir``, at most ``tracking.buffer_max_mb``; artifacts are copied
beside it), with each metric's own timestamp and step. While records wait, every call appends to
the buffer (order is kept) and, at most every ``tracking.retry_interval_s``, probes the server and
flushes the buffer when it answers; ``end_job_run`` waits up to ``tracking.flush_budget_s`` for it.
If it does not come back in time, the job still ends as its work did (its output is committed:
the store is the source of truth), and stderr names the server, the buffer file and the command
that replays it later (``python -m selma_core.tracking.mlflow_tracker replay FILE``). Replaying is
idempotent: MLflow ignores a metric logged twice with the same step, timestamp and value.
Errors a retry cannot fix (an invalid parameter, a deleted run) are raised as before.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selma_core.errors import ConfigError, EndpointError
from selma_core.tracking.base import (
    TAG_ADAPTER_SHA256,
    TAG_STORE_KEY,
    JobRun,
    ModelVersion,
    RunRecord,
    Tracker,
)

# Bound MLflow's own HTTP retries (default 7 with exponential backoff: minutes) for job processes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
# No usage telemetry from batch jobs (and no outbound calls on clusters without egress).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# No "View run ... at: URL" lines on stdout as runs end (a server URI): jobs.submit's stdout is its
# job lines and the closing JSON line, which scripts read.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


RECORD_TIMEOUT_S = 10.0
# The longest wait between flush attempts to a server that answers its probe but fails the flush
# (its database down behind a live /health): each failure doubles the wait from retry_interval_s.
MAX_FLUSH_INTERVAL_S = 120.0


@contextlib.contextmanager
def _one_attempt(timeout_s: float | None = None) -> Iterator[None]:
    """MLflow's requests inside make one attempt each, without MLflow's own retries (up to ~15 s of
    backoff a call), and wait at most ``timeout_s`` for an answer where given: a record sent between
    training steps must cost one short request when it fails, not hold the job (a server that
    accepts connections but never answers held it 4 x 60 s). MLflow reads both variables at every
    request."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    if timeout_s is not None:
        settings["MLFLOW_HTTP_REQUEST_TIMEOUT"] = f"{max(1, math.ceil(timeout_s))}"
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Runs fetched per search request (MLflow's default page; its server allows up to 50,000).
SEARCH_PAGE = 1000
# MLflow errors of a server that is down, restarting or overloaded; anything else is a refusal.
TRANSIENT_MLFLOW_ERRORS = (
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
)
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100


def is_transient(error: BaseException) -> bool:
    """A tracking failure worth waiting out: no answer, a timeout, a 5xx, a locked database."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_MLFLOW_ERRORS
    return isinstance(error, (requests.RequestException, ConnectionError, TimeoutError))


def _apply(client, run_id: str, record: dict[str, Any]) -> None:
    """Send one tracking record (see ``TrackingBuffer``) to MLflow."""
    from mlflow.entities import Metric, Param, RunTag

    kind = record["kind"]
    if kind == "metrics":
        batch = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=batch[start : start + MAX_METRICS_PER_BATCH])
    elif kind == "params":
        batch = [Param(k, v) for k, v in record["params"].items()]
        for start in range(0, len(batch), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=batch[start : start + MAX_PARAMS_PER_BATCH])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif kind == "dict":
        client.log_dict(run_id, record["data"], record["artifact_file"])
    elif kind == "artifact":
        if Path(record["path"]).is_dir():
            client.log_artifacts(run_id, record["path"], record["artifact_path"])
        else:
            client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif kind == "terminate":
        client.set_terminated(run_id, record["status"], end_time=record.get("end_time"))
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


def _apply_buffered(client, run_id: str, record: dict[str, Any], artifacts_dir: Path) -> None:
    """``_apply`` for a record read back from a buffer file: an artifact record names a copy in
    the buffer's own artifacts folder (relative to it, so a buffer moved elsewhere, e.g. kept in
    the store, still finds its copies; older files name it whole). The file is read again after it
    was written (a flush, a replay of a file someone handed over): one that names another file
    would upload it."""
    if record["kind"] == "artifact":
        copy = (artifacts_dir / record["path"]).resolve()  # an absolute path stays itself
        if not copy.exists():  # an older file's path relative to the working directory
            copy = Path(record["path"]).resolve()
        if not copy.is_relative_to(artifacts_dir.resolve()):
            raise ValueError(f"artifact {record['path']} is not a copy in {artifacts_dir}: not uploaded")
        record = {**record, "path": str(copy)}
    _apply(client, run_id, record)


def private_folder(folder: Path) -> Path:
    """``folder``, made if missing (readable by this user only), when this user owns it and no one
    else may write in it; else a new private folder beside the system's temporary files. Another
    user who can write in a buffer folder could swap a buffer file for one that uploads this
    user's files to MLflow."""
    with contextlib.suppress(OSError):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        info = folder.lstat()
    except OSError:
        info = None
    mine = info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    if mine and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return folder
    fresh = Path(tempfile.mkdtemp(prefix="selma-tracking-buffer-"))
    print(
        f"tracking: {folder} is not a folder of this user's alone: buffering in {fresh} instead",
        file=sys.stderr,
        flush=True,
    )
    return fresh


def artifacts_dir_of(buffer_file: Path) -> Path:
    """Where a buffer file's artifact copies are: one rule for the buffer that writes them and the
    replay that reads them."""
    return buffer_file.with_name(buffer_file.stem + "-artifacts")


class TrackingBuffer:
    """Tracking records that the server has not accepted yet, in order, in a JSON Lines file.

    The first line names the tracking URI and the run; each further line is one record:
    ``{"kind": "metrics", "metrics": [[key, value, timestamp_ms, step], ...]}``, ``params``,
    ``tags``, ``dict`` (a small JSON artifact), ``artifact`` (a copy beside the file) or
    ``terminate`` (the run's end). Memory holds only the read position: the file is the buffer.
    """

    def __init__(self, path: Path, tracking_uri: str, run_id: str, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.pending = 0
        self.dropped = 0
        header = json.dumps({"kind": "run", "tracking_uri": tracking_uri, "run_id": run_id}) + "\n"
        self.path.write_text(header, encoding="utf-8")
        self.offset = len(header.encode())  # where the first record not yet sent starts
        self.size = self.offset

    @property
    def artifacts_dir(self) -> Path:
        return artifacts_dir_of(self.path)

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, allow_nan=True) + "\n").encode()
        # Bounded: past the limit, metrics and params are counted, not kept; tags (the output's
        # location) and the run's end are small and always kept, so a replay still closes the run.
        if self.size + len(line) > self.max_bytes and record.get("kind") not in ("tags", "terminate"):
            self.dropped += 1
            return
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
        self.size += len(line)
        self.pending += 1

    def flush(self, client, run_id: str, on_refused=None) -> None:
        """Send every pending record in order; consecutive metrics go in shared batches. A transient
        error stops the flush (the rest stays buffered); a refusal skips that one record."""
        for end, count, record in _merged_records(self.path, self.offset):
            try:
                _apply_buffered(client, run_id, record, self.artifacts_dir)
            except Exception as e:
                if is_transient(e):
                    raise
                if on_refused is None:
                    raise
                on_refused(record, e)
            self.offset = end
            self.pending -= count
        self.pending = 0

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.artifacts_dir, ignore_errors=True)


def _merged_records(path: Path, offset: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(end offset, records merged, record) from ``offset`` on, consecutive metrics merged into
    batches of at most MAX_METRICS_PER_BATCH (so a replay of thousands of steps is few requests)."""
    batch: list = []
    merged = 0
    end = offset
    with open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                break  # a record cut by a crash mid-write: not a whole record
            record = json.loads(line)
            if record["kind"] == "metrics" and len(batch) + len(record["metrics"]) <= MAX_METRICS_PER_BATCH:
                batch.extend(record["metrics"])
                merged += 1
                end += len(line)
                continue
            if batch:
                yield end, merged, {"kind": "metrics", "metrics": batch}
                batch, merged = [], 0
            end += len(line)
            if record["kind"] == "metrics":
                batch, merged = list(record["metrics"]), 1
                continue
            yield end, 1, record
    if batch:
        yield end, merged, {"kind": "metrics", "metrics": batch}


def replay_buffer(path: str | Path, tracking_uri: str | None = None) -> int:
    """Send a buffer file that a job left behind (the server was down past its flush budget) to
    MLflow, at the URI the file names unless ``tracking_uri`` is given; then delete it. The number
    of records sent.

    How far it got is kept beside the file (``<file>.sent``, with the run's id), so a replay cut
    short by the server failing again goes on where it stopped and sends no metric twice. A record
    the server refuses (not an outage: a parameter logged before with another value, an artifact
    copy gone) is skipped with a warning, as a job's own flush does. A run that no longer exists
    is a ``ValueError``, the file kept."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    progress = path.with_name(path.name + ".sent")
    with open(path, "rb") as f:
        header_line = f.readline()
    try:
        header = json.loads(header_line)
        uri, run_id = tracking_uri or header["tracking_uri"], header["run_id"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not a tracking buffer a job left (its first line is no buffer header: {e})"
        ) from e
    start = len(header_line)
    if progress.is_file():  # a replay cut short: on from there, if it was this run's
        with contextlib.suppress(ValueError, KeyError, TypeError):
            saved = json.loads(progress.read_text())
            start = saved["offset"] if saved["run_id"] == run_id else start
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ValueError(f"{path}: its run {run_id} is not at {uri} (deleted?); nothing sent") from e
    sent = 0
    artifacts = artifacts_dir_of(path)
    for end, count, record in _merged_records(path, start):
        try:
            _apply_buffered(client, run_id, record, artifacts)
            sent += count
        except Exception as e:
            if is_transient(e):
                raise
            print(f"{path}: a {record['kind']} record refused, skipped: {e}", file=sys.stderr, flush=True)
        tmp = progress.with_name(progress.name + ".tmp")
        tmp.write_text(json.dumps({"run_id": run_id, "offset": end}))
        os.replace(tmp, progress)
    path.unlink()
    progress.unlink(missing_ok=True)
    shutil.rmtree(artifacts, ignore_errors=True)
    return sent


class MlflowJobRun(JobRun):
    def __init__(self, tracker: MlflowTracker, run_id: str) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.run_id = run_id
        self.buffer: TrackingBuffer | None = None
        self._next_try = 0.0
        self._failed_flushes = 0  # in a row, by a server that answered its probe

    # -- buffering -----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Records waiting in the buffer for the server."""
        return self.buffer.pending if self.buffer is not None else 0

    def _record(self, record: dict[str, Any]) -> None:
        """Send ``record`` now, or buffer it behind the records already waiting (order is kept)."""
        if self.pending:
            self._buffer().append(record)
            if time.monotonic() >= self._next_try:
                self._try_flush()
            return
        try:
            with _one_attempt(self.tracker.record_timeout_s):
                _apply(self.client, self.run_id, record)
        except Exception as e:
            if not is_transient(e):
                raise
            self._start_buffering(e)
            self._buffer().append(record)

    def _start_buffering(self, error: Exception) -> None:
        self._next_try = time.monotonic() + self.tracker.retry_interval_s
        print(
            f"tracking: MLflow at {self.tracker.uri} is not answering ({_short(error)}); the job goes on, "
            f"buffering run {self.run_id}'s records in {self._buffer().path} (retried every "
            f"{self.tracker.retry_interval_s:g} s)",
            file=sys.stderr,
            flush=True,
        )

    def _buffer(self) -> TrackingBuffer:
        if self.buffer is None:
            if self.tracker.buffer_dir:  # the user's choice (a persistent volume, shared by a group)
                folder = Path(self.tracker.buffer_dir)
                folder.mkdir(parents=True, exist_ok=True)
            else:  # this user's own: /tmp is everyone's (a pod's is its own)
                folder = private_folder(Path(tempfile.gettempdir()) / f"selma-tracking-buffer-{os.getuid()}")
            self.buffer = TrackingBuffer(
                folder / f"{self.run_id}.jsonl", self.tracker.uri, self.run_id, self.tracker.buffer_max_bytes
            )
        return self.buffer

    def _try_flush(self) -> bool:
        """One attempt to send the buffer; True when it is empty."""
        reachable = self.tracker.reachable()
        # Counted from the probe's end: a server that drops packets makes the probe wait its whole
        # timeout, and the job must then go on for retry_interval_s before probing again.
        self._next_try = time.monotonic() + self.tracker.retry_interval_s
        if not reachable:
            return False
        try:
            with _one_attempt():
                self.buffer.flush(self.client, self.run_id, on_refused=self._refused)
        except Exception as e:
            if not is_transient(e):
                raise
            # It answers its probe but not the flush (a database behind it down): wait longer each
            # time, so the job trains rather than knocks.
            self._failed_flushes += 1
            wait = self.tracker.retry_interval_s * 2**self._failed_flushes
            self._next_try = time.monotonic() + min(
                wait, max(MAX_FLUSH_INTERVAL_S, self.tracker.retry_interval_s)
            )
            return False
        self._failed_flushes = 0
        dropped = self.buffer.dropped
        lost = (
            f", except {dropped} metric or param records dropped while waiting (the buffer reached "
            "tracking.buffer_max_mb): the run lacks them"
            if dropped
            else ""
        )
        print(
            f"tracking: MLflow at {self.tracker.uri} answers again; run {self.run_id}'s buffered records "
            f"are sent{lost}",
            file=sys.stderr,
            flush=True,
        )
        self.buffer.remove()
        self.buffer = None
        if dropped:  # on the run too, where whoever reads its curves will look
            self._record({"kind": "tags", "tags": {"selma.tracking.dropped_records": str(dropped)}})
        return True

    def _refused(self, record: dict[str, Any], error: Exception) -> None:
        print(
            f"tracking: MLflow at {self.tracker.uri} refused a buffered {record['kind']} record of run "
            f"{self.run_id}: {_short(error)}",
            file=sys.stderr,
            flush=True,
        )

    def drain(self, budget_s: float) -> bool:
        """Wait up to ``budget_s`` for the server to take every buffered record; True when done.
        When it does not, stderr says where the records are and how to replay them."""
        if not self.pending:
            return True
        deadline = time.monotonic() + budget_s
        delay = 0.5
        while True:
            if self._try_flush():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)
        dropped = f"; {self.buffer.dropped} more were dropped (buffer_max_mb)" if self.buffer.dropped else ""
        print(
            f"tracking: MLflow at {self.tracker.uri} did not answer within tracking.flush_budget_s "
            f"({budget_s:g} s) of the job's end. The job's outcome stands (a committed output is in the "
            f"store, the source of truth); {self.pending} tracking records of run {self.run_id} "
            f"(metrics, params, tags, its end) are kept in {self.buffer.path}{dropped}. Replay them when "
            f"the server is back: python -m selma_core.tracking.mlflow_tracker replay {self.buffer.path}",
            file=sys.stderr,
            flush=True,
        )
        return False

    # -- what phases record --------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        flat = _flatten(params)
        self._record({"kind": "params", "params": {k: str(v)[:6000] for k, v in flat.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)  # the time of the measurement, kept when buffered
        self._record(
            {"kind": "metrics", "metrics": [[k, float(v), now, step or 0] for k, v in metrics.items()]}
        )

    def log_artifact(self, local_path: Path, artifact_path: str | None = None) -> None:
        record = {"kind": "artifact", "path": str(local_path), "artifact_path": artifact_path}
        if not self.pending:
            try:
                _apply(self.client, self.run_id, record)
                return
            except Exception as e:
                if not is_transient(e):
                    raise
                self._start_buffering(e)
        # Buffered: the caller may delete its file once this returns, so the buffer keeps a copy.
        local_path = Path(local_path)
        copy = self._buffer().artifacts_dir / f"{self.buffer.size}" / local_path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if local_path.is_dir():
            shutil.copytree(local_path, copy)
        else:
            shutil.copy2(local_path, copy)
        record["path"] = str(copy.relative_to(self.buffer.artifacts_dir))
        if self.pending:
            self._record(record)
        else:
            self.buffer.append(record)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self._record({"kind": "dict", "data": data, "artifact_file": artifact_file})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._record({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def tag_model_version(
        self,
        name: str,
        version: str,
        tags: dict[str, str],
        replace_prefixes: tuple[str, ...] = (),
        expect: dict[str, str] | None = None,
    ) -> bool:
        return self.tracker.set_model_version_tags(name, version, tags, replace_prefixes, expect)

    def register_lora_adapter(
        self,
        adapter_dir: Path,
        base_model: str,
        model_name: str,
        alias: str,
        tags: dict[str, str],
        base_model_revision: str | None = None,
    ) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.tracker.uri)
        mlflow.set_registry_uri(self.tracker.uri)
        version = self._registered_version(model_name, tags.get(TAG_STORE_KEY), tags.get(TAG_ADAPTER_SHA256))
        if version is None:
            # The flavor logs into the active run. Not `with mlflow.start_run(...)`: leaving that
            # block ends the run FINISHED, and a job killed before its commit would look done. The
            # run is left RUNNING as it was; only end_job_run ends it.
            mlflow.start_run(run_id=self.run_id)
            try:
                info = _log_adapter_model(adapter_dir, base_model, model_name, base_model_revision)
            finally:
                mlflow.end_run(status="RUNNING")
            version = str(info.registered_model_version)
        self.tracker.set_model_version_tags(model_name, version, tags)
        self.tracker.set_model_alias(model_name, alias, version)
        return version

    def _registered_version(self, model_name: str, store_key: str | None, sha256: str | None) -> str | None:
        """The version an earlier attempt of this job registered for the same adapter (a job killed
        after registering but before committing): reused, not registered twice. The same output key
        is not enough: a forced rerun commits other weights under the same key, and must not tag
        its scores onto the version of the old ones; so the adapter's SHA-256 must match too."""
        from mlflow.exceptions import MlflowException

        if not store_key or not sha256:
            return None
        try:
            found = self.client.search_model_versions(
                f"name='{model_name}' and tags.`selma.store_key`='{store_key}' "
                f"and tags.`{TAG_ADAPTER_SHA256}`='{sha256}'"
            )
        except MlflowException:  # no such registered model yet
            return None
        return str(max(int(v.version) for v in found)) if found else None

    def download_registered_adapter(self, name: str, version: str, dst: Path) -> dict[str, str | None]:
        import mlflow.diffusers
        from mlflow.exceptions import MlflowException

        from selma_core.errors import ConfigError

        mlflow.set_tracking_uri(self.tracker.uri)
        mlflow.set_registry_uri(self.tracker.uri)
        try:
            model = mlflow.diffusers.load_model(f"models:/{name}/{version}", dst_path=str(dst))
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                where = f"models:/{name}/{version}"
                raise ConfigError(f"{where}: not in the model registry at {self.tracker.uri}: {e}") from e
            raise
        tags = self.client.get_model_version(name, str(version)).tags
        return {
            "adapter_path": model.adapter_path,
            # The base model as the pipeline config named it (the flavor records a loadable form of
            # it, e.g. the folder a random test model was built in).
            "base_model": tags.get("selma.base_model", model.base_model),
            # The revision the pipeline pinned (the merge's tag; "" when none), else the flavor's.
            "base_model_revision": tags.get("selma.base_model_revision", model.base_model_revision) or None,
        }


def _log_adapter_model(adapter_dir: Path, base_model: str, model_name: str, revision: str | None = None):
    """Log with MLflow's diffusers LoRA flavor (MLflow >= 3.17, pinned in pyproject.toml).

    The flavor stores the adapter's safetensors plus the base model reference, and its pyfunc form
    takes a prompt and returns an image, so ``models:/NAME@ALIAS`` generates directly. The flavor
    records the hub's newest commit of the base model; a revision the pipeline pinned is recorded
    instead, so the registered model loads the base it was trained on.
    """
    import mlflow.diffusers

    resolve = mlflow.diffusers._resolve_base_model_revision
    if revision:
        mlflow.diffusers._resolve_base_model_revision = lambda base: revision
    try:
        return mlflow.diffusers.log_model(
            adapter_path=str(adapter_dir),
            base_model=base_model,
            name="merged_lora",
            registered_model_name=model_name,
            pip_requirements=["diffusers", "transformers", "torch", "peft", "safetensors"],
        )
    finally:
        mlflow.diffusers._resolve_base_model_revision = resolve


def _record(run) -> RunRecord:
    """An MLflow run as status reports see it."""
    info = run.info
    return RunRecord(
        info.run_id, info.run_name or "", info.status, info.start_time, info.end_time, dict(run.data.tags)
    )


def _is_pipeline(record: RunRecord) -> bool:
    """A pipeline's (parent) run: no parent of its own, named pipeline-<phase> by jobs.submit."""
    return "mlflow.parentRunId" not in record.tags and record.name.startswith("pipeline")


class MlflowTracker(Tracker):
    def __init__(
        self,
        uri: str,
        connect_retries: int = 3,
        *,
        flush_budget_s: float = 120.0,
        retry_interval_s: float = 5.0,
        buffer_dir: str | Path | None = None,
        buffer_max_mb: int = 256,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.connect_retries = connect_retries
        self.flush_budget_s = flush_budget_s
        self.retry_interval_s = retry_interval_s
        # How long a metric, param or tag sent at once may wait for its answer before the job goes
        # on and buffers it (a record is small: a server this slow is as good as down).
        self.record_timeout_s = RECORD_TIMEOUT_S
        self.buffer_dir = buffer_dir
        self.buffer_max_bytes = buffer_max_mb << 20
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self._experiments: dict[str, str] = {}
        # Pipeline runs this process opened: their records (params) may wait in a buffer until the end.
        self._pipeline_runs: dict[str, MlflowJobRun] = {}

    def _artifact_location(self, experiment: str) -> str | None:
        return None  # the server decides (its --default-artifact-root or proxied artifacts)

    def experiment_id(self, experiment: str) -> str:
        if experiment not in self._experiments:
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                self._experiments[experiment] = found.experiment_id
            else:
                from mlflow.exceptions import MlflowException

                try:
                    self._experiments[experiment] = self.client.create_experiment(
                        experiment, artifact_location=self._artifact_location(experiment)
                    )
                except MlflowException as e:
                    # Another job of the pipeline may have created it meanwhile; anything else is real.
                    raced = self.client.get_experiment_by_name(experiment)
                    if raced is None:
                        raise EndpointError(
                            f"MLflow at {self.uri}: cannot create experiment {experiment!r}: {e}"
                        ) from e
                    self._experiments[experiment] = raced.experiment_id
            if found is not None and found.lifecycle_stage == "deleted":
                raise ConfigError(
                    f"MLflow experiment {experiment!r} at {self.uri} is deleted; restore it "
                    "(mlflow experiments restore) or rename the pipeline"
                )
        return self._experiments[experiment]

    def start_pipeline_run(
        self, experiment: str, tags: dict[str, str], params: dict[str, Any], name: str = "pipeline"
    ) -> str:
        run = self.client.create_run(self.experiment_id(experiment), tags=tags, run_name=name)
        # Kept, and buffered like a job's run: an outage while the pipeline runs loses nothing.
        pipeline_run = self._pipeline_runs[run.info.run_id] = MlflowJobRun(self, run.info.run_id)
        pipeline_run.log_params(params)
        return run.info.run_id

    def end_pipeline_run(
        self, run_id: str, ok: bool, summary: dict[str, Any], logs_dir: Path | None = None
    ) -> None:
        """As ``end_job_run``: the summary, the logs and the run's end go after anything buffered,
        and a server that is down does not fail a pipeline whose jobs are done (stderr names the
        buffer file to replay)."""
        run = self._pipeline_runs.pop(run_id, None) or MlflowJobRun(self, run_id)
        run.log_dict(summary, "pipeline_summary.json")
        if logs_dir is not None and Path(logs_dir).is_dir():
            run.log_artifact(Path(logs_dir), "logs")
        self.end_job_run(run, ok)

    def start_job_run(
        self, experiment: str, parent_run_id: str | None, name: str, tags: dict[str, str]
    ) -> JobRun:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = dict(tags)
        if parent_run_id:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), tags=tags, run_name=name)
        return MlflowJobRun(self, run.info.run_id)

    def end_job_run(self, run: JobRun, ok: bool) -> None:
        """End the run, after every buffered record; never raises for a server that is down (the
        job's work is done or its own error is on its way): waits up to ``flush_budget_s``, then
        leaves the records in the buffer file and says so on stderr."""
        status = "FINISHED" if ok else "FAILED"
        if not isinstance(run, MlflowJobRun):
            self.client.set_terminated(run.run_id, status)
            return
        run._record({"kind": "terminate", "status": status, "end_time": int(time.time() * 1000)})
        run.drain(self.flush_budget_s)

    def reachable(self) -> bool:
        """Whether tracking answers now (a cheap probe before a buffered flush)."""
        return True

    def _records(self, experiment: str, filter_string: str) -> Iterator[RunRecord]:
        """The experiment's runs that match, newest first, a page at a time: a pipeline of many
        shards has thousands of job runs, and one page would cut them off."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return
        token = None
        while True:
            page = self.client.search_runs(
                [found.experiment_id],
                filter_string,
                max_results=SEARCH_PAGE,
                order_by=["attributes.start_time DESC"],
                page_token=token,
            )
            yield from (_record(r) for r in page)
            token = page.token
            if not token:
                return

    def pipeline_runs(self, experiment: str, max_results: int | None = 20) -> list[RunRecord]:
        # Selected by name in the query, not among the newest runs: those may all be job runs.
        pipelines = (
            r for r in self._records(experiment, "attributes.run_name LIKE 'pipeline%'") if _is_pipeline(r)
        )
        return list(itertools.islice(pipelines, max_results))

    def pipeline_run(self, experiment: str, run_id: str) -> RunRecord | None:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(experiment)
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        record = _record(run)
        in_experiment = found is not None and run.info.experiment_id == found.experiment_id
        return record if in_experiment and _is_pipeline(record) else None

    def child_runs(self, experiment: str, parent_run_id: str) -> list[RunRecord]:
        return list(self._records(experiment, f"tags.mlflow.parentRunId = '{parent_run_id}'"))

    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def model_version(
        self, name: str, version: str | None = None, alias: str | None = None
    ) -> ModelVersion | None:
        from mlflow.exceptions import MlflowException

        try:
            found = (
                self.client.get_model_version_by_alias(name, alias)
                if alias
                else self.client.get_model_version(name, str(version))
            )
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return ModelVersion(
            name, str(found.version), dict(found.tags), list(getattr(found, "aliases", []) or [])
        )

    def newest_model_version_with_tag(self, name: str, tag: str, value: str) -> ModelVersion | None:
        from mlflow.exceptions import MlflowException

        quoted = value.replace("'", "\\'")
        try:
            found = self.client.search_model_versions(f"name='{name}' and tags.`{tag}`='{quoted}'")
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        if not found:
            return None
        return self.model_version(name, version=str(max(int(v.version) for v in found)))

    def set_model_version_tags(
        self,
        name: str,
        version: str,
        tags: dict[str, str],
        replace_prefixes: tuple[str, ...] = (),
        expect: dict[str, str] | None = None,
    ) -> bool:
        if replace_prefixes or expect:
            current = self.client.get_model_version(name, str(version)).tags or {}
            if any(current.get(key) != value for key, value in (expect or {}).items()):
                return False
            for key in current:
                if key.startswith(replace_prefixes) and key not in tags:
                    self.client.delete_model_version_tag(name, str(version), key)
        for key, value in tags.items():
            self.client.set_model_version_tag(name, str(version), key, str(value))
        return True

    def set_model_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def check(self) -> None:
        try:
            self.client.search_experiments(max_results=1)
        except Exception as e:
            raise EndpointError(f"MLflow tracking at {self.uri} is not usable: {e}") from e


class SqliteMlflowTracker(MlflowTracker):
    """Embedded MLflow: runs and registry in one SQLite file, artifacts in ``mlartifacts/`` beside it."""

    def __init__(self, uri: str, connect_retries: int = 3, create: bool = True, **buffering: Any) -> None:
        """``create``: make the database when there is none (else a ``ConfigError``: for commands
        that only read, where a missing database is a mistyped path rather than a first run)."""
        self.db_path = Path(uri[len("sqlite:///") :]).expanduser().resolve()
        if not create and not self.db_path.is_file():
            raise ConfigError(
                f"tracking uri {uri}: no MLflow database at {self.db_path}: no pipeline has run with "
                "this tracking.uri yet (or it has a typo)"
            )
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"tracking uri {uri}: cannot create {self.db_path.parent}: {e}") from e
        super().__init__(uri, connect_retries, **buffering)

    def _artifact_location(self, experiment: str) -> str | None:
        return (self.db_path.parent / "mlartifacts" / experiment).as_uri()


class ServerMlflowTracker(MlflowTracker):
    """An MLflow tracking server; reachability is checked with bounded retries before any work."""

    def reachable(self) -> bool:
        import requests

        try:
            # Short: this probe runs on the job's own thread, between training steps.
            return requests.get(self.uri.rstrip("/") + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def check(self) -> None:
        import requests

        url = self.uri.rstrip("/") + "/health"
        last: Exception | None = None
        for attempt in range(self.connect_retries + 1):
            try:
                response = requests.get(url, timeout=5)
                if response.status_code == 200:
                    return
                last = RuntimeError(f"HTTP {response.status_code}")
            except requests.RequestException as e:
                last = e
            if attempt < self.connect_retries:
                time.sleep(min(2**attempt, 10))
        raise EndpointError(
            f"MLflow tracking server {self.uri} unreachable after {self.connect_retries + 1} attempts: {last}"
        )


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m selma_core.tracking.mlflow_tracker",
        description="Send the tracking records a job buffered while MLflow was down (see stderr of the job).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="replay buffer files, then delete them")
    replay.add_argument("files", nargs="+", type=Path)
    replay.add_argument("--tracking-uri", help="send them there instead of the URI each file names")
    args = parser.parse_args(argv)
    code = 0
    for path in args.files:
        try:
            sent = replay_buffer(path, args.tracking_uri)
        except (FileNotFoundError, ValueError) as e:  # no such file, not a buffer, its run gone
            print(f"error: {e}", file=sys.stderr)
            code = max(code, 2)
        except Exception as e:  # MLflow unreachable or refusing: worth another try later
            print(f"error: {path}: {e}; run the replay again: it goes on where it stopped", file=sys.stderr)
            code = max(code, 1)
        else:
            print(f"{path}: {sent} records sent")
    return code


if __name__ == "__main__":
    sys.exit(main())
