"""Storage and tracking outages, proven by fault injection (docs/reliability.md, "Storage and
tracking outages").

Each endpoint a job uses (the S3 store on moto_server, an ``mlflow server``) is reached through a
small TCP proxy of this file that a test cuts: the proxy's port stops listening (connections are
refused) and every open connection is reset, while the server behind it keeps its state (moto keeps
buckets in memory only, so stopping moto itself would lose them). A cut is set off by the bytes of
a request (the PUT of an images shard, of the adapter's weights; the first ``train.loss`` sent to
MLflow), so it hits the job exactly where the case says, whatever the machine's speed.

The upstream outputs are made once per module on a local store and copied into each test's S3
prefix, so each case runs only the job it is about, forked by the local executor's fork server (as
that executor starts jobs). Cases (the issue's numbering):

1. S3 unreachable for 30 s while the images job uploads its shard: the job retries with backoff,
   finishes, and commits the output an uninterrupted run commits (same checksums), verified.
2. S3 unreachable for 30 s while the train job uploads its adapter weights: the same.
3. S3 unreachable past ``storage.retry_budget_s`` (5 s): exit 1 naming the endpoint, within a bound,
   no manifest; a rerun later succeeds (it is case 1's run).
4. MLflow down from the job's first ``train.loss`` for 10 s: the job finishes and every loss is in
   the run afterwards, in step order (buffered, flushed when the server answers again). MLflow down
   for good (from case 1's cut on): the job still commits, exits 0, names the server and the buffer
   file on stderr; replaying the file later brings the run complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import BIN, MLFLOW_SERVER_ENV, REPO, S3_BUCKET, free_port, stop, wait_for_http, write_config
from job_helpers import ForkedJobs

pytestmark = pytest.mark.slow  # two 30 s outages, real servers

SKILL = "counting"
# The pipeline every case runs: one skill, few prompts (8 steps of training, loss logged every 2).
TINY = {"skills": [SKILL], "prompts": {"num_prompts": 8}}
OUTAGE_S = 30.0  # the outage, as is
MLFLOW_OUTAGE_S = 10.0
SHORT_BUDGET_S = 5.0
# Case 3's bound past the budget: botocore's own retries before the first failure counts (3 retries,
# standard mode: at most 1 + 2 + 4 s), one last attempt as long, and the job's exit.
BOUND_SLACK_S = 25.0
# Cases 1 and 2: a budget well past the outage; short backoff and one botocore retry, so the job
# notices the endpoint is back within seconds (production: 300 s, 30 s and 3).
RIDE_OUT = {"retry_budget_s": 120, "retry_backoff_max_s": 2, "connect_retries": 1}


class CuttableEndpoint:
    """127.0.0.1:``port`` forwarded to ``target``; ``cut()`` makes it unreachable, ``restore()``
    brings it back on the same port. ``arm(pattern, duration)`` cuts it when a request carries
    ``pattern`` (that request is lost with its connection), for ``duration`` seconds or for good."""

    def __init__(self, target_url: str) -> None:
        host_port = target_url.split("://", 1)[1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._trigger: tuple[re.Pattern, float | None, object] | None = None
        self.cut_at: float | None = None  # time.monotonic() of the last cut
        self.cut_wall: float | None = None  # time.time() of the last cut
        self.restored_at: float | None = None
        self.restored_wall: float | None = None
        self._listen()

    def _listen(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:
                listener.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        listener.listen(128)
        listener.settimeout(0.2)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    _reset(client)
                    _reset(upstream)
                    return
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, outbound: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)  # pass the half-close on, graceful
                    return
                trigger = self._trigger
                if outbound and trigger is not None and trigger[0].search(data):
                    self._fire()
                    return
                dst.sendall(data)
        except OSError:
            with self._lock:
                self._sockets -= {src, dst}
            _reset(src)
            _reset(dst)

    def arm(self, pattern: bytes, duration: float | None, also=None) -> None:
        self._trigger = (re.compile(pattern), duration, also)

    def _fire(self) -> None:
        with self._lock:
            trigger, self._trigger = self._trigger, None
        if trigger is None:
            return
        _, duration, also = trigger
        self.cut(duration)
        if also is not None:
            also()

    def cut(self, duration: float | None = None) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = list(self._sockets), set()
            self.cut_at, self.cut_wall = time.monotonic(), time.time()
        if listener is not None:
            listener.close()  # new connections are refused
        for sock in sockets:  # open ones are reset
            _reset(sock)
        if duration is not None:
            timer = threading.Timer(duration, self.restore)
            timer.daemon = True
            timer.start()

    def restore(self) -> None:
        if self._listener is None:
            self._listen()
            self.restored_at, self.restored_wall = time.monotonic(), time.time()

    def close(self) -> None:
        self._trigger = None
        self.cut()


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


# -- servers and the upstream outputs, once per module ------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A moto_server and a real ``mlflow server`` (SQLite backend, artifacts proxied to a local
    folder), started at once; ``endpoints`` waits for them, so they boot while ``upstream`` works."""
    root = tmp_path_factory.mktemp("outage-servers")
    moto_port, mlflow_port = free_port(), free_port()
    commands = {
        "moto": [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
        "mlflow": [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ],
    }
    processes = {}
    try:
        for name, command in commands.items():
            with open(root / f"{name}.log", "wb") as out:
                processes[name] = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **MLFLOW_SERVER_ENV},
                    start_new_session=True,
                )
        yield SimpleNamespace(
            root=root,
            processes=processes,
            moto=f"http://127.0.0.1:{moto_port}",
            mlflow=f"http://127.0.0.1:{mlflow_port}",
            ready=False,
        )
    finally:
        for process in processes.values():
            stop(process)


class Upstream(SimpleNamespace):
    def start_train(self) -> None:
        """Start the uninterrupted train job (once), in the background: as its own process, as the
        case runs it. The first test starts it when its 30 s outage begins, so it runs while the
        CPU is idle."""
        if self.train is None:
            with open(self.root / "train.log", "wb") as log:
                self.train = subprocess.Popen(
                    [sys.executable, "-m", "jobs.run", "--phase", "train", "--skill", SKILL]
                    + ["--config", str(self.config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                    env=job_environment(),
                    start_new_session=True,
                )

    def manifest(self, phase: str) -> dict:
        """The committed manifest of an uninterrupted run of ``phase`` (train: waits for it)."""
        if phase == "train":
            self.start_train()
            code = self.train.wait(timeout=300)
            assert code == 0, (self.root / "train.log").read_text()[-3000:]
        return json.loads((self.store / self.keys[phase] / "_manifest.json").read_text())


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, model_cache, servers):
    """One skill's prompts and images, run once (in this process) on a local store: the inputs each
    case copies into its S3 prefix, and the outputs of uninterrupted runs (train's on demand)."""
    from jobs.run import run_job
    from selma_core.config import load_config
    from selma_core.plan import build_plan
    from selma_core.skills import load_skills

    root = tmp_path_factory.mktemp("outage-upstream")
    config = write_config(root, model_cache, **TINY)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the cases' jobs run (job_environment): the same sums, the same bytes
    try:
        for phase in ("prompts", "images"):
            assert run_job(phase, SKILL, str(config))["status"] == "ran"
    finally:
        torch.set_num_threads(threads)
    cfg = load_config(config)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    keys = {phase: plan.job(phase, SKILL).key for phase in ("prompts", "images", "train")}
    upstream = Upstream(root=root, config=config, store=root / "store", keys=keys, train=None)
    try:
        yield upstream
    finally:
        if upstream.train is not None and upstream.train.poll() is None:
            stop(upstream.train)


@pytest.fixture
def endpoints(servers, upstream):
    """Cuttable endpoints in front of the module's servers, fresh for each test."""
    if not servers.ready:
        import boto3

        wait_for_http(servers.moto, servers.processes["moto"], servers.root / "moto.log", timeout=60)
        boto3.client("s3", endpoint_url=servers.moto).create_bucket(Bucket=S3_BUCKET)
        wait_for_http(f"{servers.mlflow}/health", servers.processes["mlflow"], servers.root / "mlflow.log")
        servers.ready = True
    s3, mlflow = CuttableEndpoint(servers.moto), CuttableEndpoint(servers.mlflow)
    yield SimpleNamespace(s3=s3, mlflow=mlflow, moto=servers.moto, mlflow_direct=servers.mlflow)
    s3.close()
    mlflow.close()


def seed(moto: str, prefix: str, upstream, phases: tuple[str, ...]) -> None:
    """Copy the upstream outputs of ``phases`` (files, then manifest) into ``s3://bucket/prefix``."""
    import boto3

    client = boto3.client("s3", endpoint_url=moto)
    for phase in phases:
        folder = upstream.store / upstream.keys[phase]
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == "_manifest.json"):
            rel = path.relative_to(upstream.store).as_posix()
            client.put_object(Bucket=S3_BUCKET, Key=f"{prefix}/{rel}", Body=path.read_bytes())


def job_environment() -> dict[str, str]:
    return {
        **os.environ,
        # MLflow's own HTTP retries (3, up to ~15 s a call) would hide a 10 s outage from the
        # buffering under test and slow every call made while the server is down.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def job_server(tmp_path_factory):
    """The local executor's fork server (its default way to start jobs), for the cases' jobs."""
    jobs = ForkedJobs(job_environment(), tmp_path_factory.mktemp("outage-jobs"))
    try:
        yield jobs
    finally:
        jobs.close()


def run_job(job_server, config: Path, phase: str) -> SimpleNamespace:
    """``python -m jobs.run`` as the local executor starts it: its exit code, result line, log
    (stdout and stderr, in one file as the executor keeps it), end."""
    argv = ["-m", "jobs.run", "--phase", phase, "--skill", SKILL, "--config", str(config)]
    started = time.monotonic()
    code, text = job_server.run(argv, phase, job_environment())
    ended = time.monotonic()
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return SimpleNamespace(
        code=code,
        result=json.loads(lines[-1]) if lines else {},
        stderr=text,
        started=started,
        ended=ended,
        wall=ended - started,
    )


def s3_store(moto: str, prefix: str):
    """The test's store, reached directly (not through the cuttable endpoint)."""
    from selma_core.config import StorageConfig
    from selma_core.storage import open_store

    return open_store(StorageConfig(uri=f"s3://{S3_BUCKET}/{prefix}", endpoint_url=moto))


def assert_committed_as_uninterrupted(store, key: str, upstream: Upstream, phase: str, cache: Path) -> None:
    """The output under ``key`` is committed whole (every file the manifest lists is there with its
    size and SHA-256) and holds what an uninterrupted run committed: the same bytes, except
    ``expert.json`` (it records the wall time) and safetensors files, compared by their tensors and
    metadata (safetensors writes its metadata map in an order that varies between processes)."""
    from safetensors import safe_open

    fetched = store.fetch_dir(key, cache)  # checks every file against the manifest
    files = store.read_manifest(key)["files"]
    reference = upstream.manifest(phase)
    assert sorted(files) == sorted(reference["files"])
    for rel, info in files.items():
        assert (fetched / rel).stat().st_size == info["size"]
        if rel == "expert.json":
            continue
        if rel.endswith(".safetensors") and info["sha256"] != reference["files"][rel]["sha256"]:
            mine = safe_open(fetched / rel, "pt")
            theirs = safe_open(upstream.store / key / reference["files"][rel]["object"], "pt")
            assert mine.metadata() == theirs.metadata(), rel
            names = sorted(mine.keys())
            assert names == sorted(theirs.keys()), rel
            for name in names:
                assert mine.get_tensor(name).equal(theirs.get_tensor(name)), f"{rel}: {name} differs"
            continue
        assert info["sha256"] == reference["files"][rel]["sha256"], f"{rel} differs from the reference"


def tracking_settings(endpoints, tmp_path: Path, **overrides) -> dict:
    return {
        "uri": endpoints.mlflow.url,
        "retry_interval_s": 1,
        "buffer_dir": str(tmp_path / "tracking-buffer"),
        **overrides,
    }


# -- the cases ----------------------------------------------------------------------------------------


def test_images_job_s3_outage_past_budget_then_30s_outage_and_mlflow_gone(
    endpoints, upstream, job_server, tiny_config, tmp_path
):
    """Cases 3, 1 and 4 (tracking never returns), on the images job."""
    from mlflow.tracking import MlflowClient

    from jobs.tracking_buffers import PREFIX, replay_kept_records

    prefix = f"outage-{uuid.uuid4().hex[:8]}"
    seed(endpoints.moto, prefix, upstream, ("prompts",))
    key = upstream.keys["images"]
    store = s3_store(endpoints.moto, prefix)
    shard_put = rb"PUT /[^ ]*/shard-00000\.tar"
    storage = {"uri": f"s3://{S3_BUCKET}/{prefix}", "endpoint_url": endpoints.s3.url}

    # Case 3: S3 unreachable from the shard's upload on, for longer than the retry budget.
    config = tiny_config(
        **TINY,
        storage={**storage, "retry_budget_s": SHORT_BUDGET_S, "retry_backoff_max_s": 2},
        tracking=tracking_settings(endpoints, tmp_path),
    )
    endpoints.s3.arm(shard_put, duration=None)
    job = run_job(job_server, config, "images")
    assert endpoints.s3.cut_at is not None, f"the shard upload was never seen:\n{job.stderr[-3000:]}"
    assert job.code == 1, job.stderr[-3000:]
    assert job.result["exit_code"] == 1 and job.result["status"] == "failed"
    assert endpoints.s3.url in job.result["error"], job.result["error"]
    assert "retry_budget_s" in job.result["error"]
    gave_up_after = job.ended - endpoints.s3.cut_at
    assert SHORT_BUDGET_S <= gave_up_after < SHORT_BUDGET_S + BOUND_SLACK_S, gave_up_after
    assert not store.is_committed(key), "an output was committed although its upload failed"
    print(f"case 3: exit 1 {gave_up_after:.1f} s after the cut (budget {SHORT_BUDGET_S:g} s)", end="")
    print(f", job {job.wall:.1f} s")

    # Case 1, the rerun: S3 unreachable for 30 s from the shard's upload on; case 4 (never returns):
    # MLflow goes down at the same moment and stays down past the job's end.
    endpoints.s3.restore()
    config = tiny_config(
        **TINY,
        storage={**storage, **RIDE_OUT},
        tracking=tracking_settings(endpoints, tmp_path, flush_budget_s=3),
    )
    # (The uninterrupted train run that the next test compares with starts then too: CPU is idle.)
    endpoints.s3.arm(
        shard_put, duration=OUTAGE_S, also=lambda: (endpoints.mlflow.cut(), upstream.start_train())
    )
    job = run_job(job_server, config, "images")
    assert job.code == 0, job.stderr[-3000:]
    assert endpoints.s3.restored_at is not None and endpoints.s3.restored_at - endpoints.s3.cut_at >= OUTAGE_S
    assert "retrying in" in job.stderr and endpoints.s3.url in job.stderr
    assert job.ended > endpoints.s3.restored_at, "the job ended before the endpoint came back"
    assert job.ended - endpoints.s3.restored_at < 30, "the job took too long to notice the endpoint is back"
    assert_committed_as_uninterrupted(store, key, upstream, "images", tmp_path / "fetch")
    back = job.ended - endpoints.s3.restored_at
    print(f"case 1: committed {back:.1f} s after S3 came back, job {job.wall:.1f} s")

    # Tracking never came back within flush_budget_s: the output stands (exit 0), stderr says so and
    # names the buffer file; replayed once the server answers, the run is complete.
    assert endpoints.mlflow.restored_at is None
    assert "did not answer within tracking.flush_budget_s" in job.stderr, job.stderr[-3000:]
    assert endpoints.mlflow.url in job.stderr
    run_id = job.result["run_id"]
    # The buffer outlives the job's disk: kept in the store, where the next controller finds it.
    buffer = tmp_path / "tracking-buffer" / f"{run_id}.jsonl"
    assert str(buffer) in job.stderr and not buffer.exists()
    kept = f"{PREFIX}/{run_id}"
    assert store.is_committed(kept) and store.url(kept) in job.stderr
    endpoints.mlflow.restore()
    assert replay_kept_records(store, tmp_path / "scratch") == 1  # images.count, the tag, the end, ...
    assert not store.list_keys(PREFIX)
    run = MlflowClient(endpoints.mlflow.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    images = upstream.store / key / upstream.manifest("images")["files"]["images.jsonl"]["object"]
    assert run.data.metrics["images.count"] == len(images.read_text().splitlines())
    assert run.data.tags["selma.output"] == store.url(key)
    artifacts = [a.path for a in MlflowClient(endpoints.mlflow.url).list_artifacts(run_id)]
    assert "job_result.json" in artifacts


def test_train_job_s3_outage_at_checkpoint_upload_and_mlflow_outage_in_training(
    endpoints, upstream, job_server, tiny_config, tmp_path
):
    """Cases 2 and 4 (the server returns), on the train job."""
    from mlflow.tracking import MlflowClient

    prefix = f"outage-{uuid.uuid4().hex[:8]}"
    seed(endpoints.moto, prefix, upstream, ("prompts", "images"))
    key = upstream.keys["train"]
    store = s3_store(endpoints.moto, prefix)
    config = tiny_config(
        **TINY,
        storage={
            "uri": f"s3://{S3_BUCKET}/{prefix}",
            "endpoint_url": endpoints.s3.url,
            **RIDE_OUT,
        },
        tracking=tracking_settings(endpoints, tmp_path, flush_budget_s=60),
    )
    # The adapter's weights are the train job's checkpoint upload (the last file before the manifest).
    endpoints.s3.arm(rb"PUT /[^ ]*/pytorch_lora_weights\.safetensors", duration=OUTAGE_S)
    endpoints.mlflow.arm(rb"train\.loss", duration=MLFLOW_OUTAGE_S)
    job = run_job(job_server, config, "train")
    assert job.code == 0, job.stderr[-3000:]

    # Case 2: the upload waited the outage out; the output is whole and as an uninterrupted run's.
    s3 = endpoints.s3
    assert s3.cut_at is not None and s3.restored_at - s3.cut_at >= OUTAGE_S, job.stderr[-3000:]
    assert "retrying in" in job.stderr and job.ended > s3.restored_at
    assert_committed_as_uninterrupted(store, key, upstream, "train", tmp_path / "fetch")
    print(f"case 2: committed {job.ended - s3.restored_at:.1f} s after S3 came back, job {job.wall:.1f} s")

    # Case 4: MLflow was down from the first train.loss on; every loss is there, in step order.
    mlflow = endpoints.mlflow
    assert mlflow.cut_at is not None and mlflow.restored_at is not None, job.stderr[-3000:]
    assert "is not answering" in job.stderr and "answers again" in job.stderr, job.stderr[-3000:]
    client = MlflowClient(endpoints.mlflow_direct)
    run_id = job.result["run_id"]
    history = sorted(client.get_metric_history(run_id, "train.loss"), key=lambda m: (m.timestamp, m.step))
    expected = [step for step, _ in json.loads(store.read_output_file(key, "loss.json"))]
    assert [m.step for m in history] == expected == [2, 4, 6, 8]
    losses = dict(json.loads(store.read_output_file(key, "loss.json")))
    assert all(m.value == pytest.approx(losses[m.step]) for m in history)
    # The loss whose request tripped the cut was timestamped just before it (its call was what the
    # proxy cut): a 2 s margin counts it, however slowly a loaded machine trains the later steps.
    cut_ms, restored_ms = mlflow.cut_wall * 1000 - 2000, mlflow.restored_wall * 1000
    during = [m.step for m in history if cut_ms <= m.timestamp <= restored_ms]
    assert during, "no loss was logged while the server was down: the outage missed the training"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["selma.output"] == store.url(key)
    assert "job_result.json" in [a.path for a in client.list_artifacts(run_id)]
    assert not list((tmp_path / "tracking-buffer").glob("*.jsonl")), "a flushed buffer was left behind"
    print(f"case 4: losses at steps {during} logged while MLflow was down, all {len(history)} present")
