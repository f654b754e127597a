"""Shared fixtures: tiny pipeline configs, and real services on 127.0.0.1 (moto S3, MLflow server)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
S3_BUCKET = "selma-test"
# Benchmark data with published figures, beside the project (read from there, never copied).
BENCHMARKS = REPO.parent / "shared" / "benchmarks"
needs_benchmarks = pytest.mark.skipif(
    not BENCHMARKS.is_dir(), reason="../shared/benchmarks is not beside the project"
)

# No test may reach a model hub; credentials for the local moto endpoint only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "selma-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "selma-test-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: server exited early:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}: server did not come up in {timeout}s:\n{log.read_text()[-3000:]}")


# MLflow 3's server starts its job runner (seven huey consumer processes, about 3 s of CPU each to
# import MLflow) unless told not to; selma uses none of its jobs, and CI has two cores.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def stop(process: subprocess.Popen) -> None:
    """Stop a server and its workers (each fixture starts its server in a new process group)."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Requests to 127.0.0.1 (fake LLM, moto, MLflow) must not go through a proxy the environment names."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    tiny models gain nothing from two, and lose much when the cores are shared (about 1 s of training
    against up to 40 s with two threads on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One cache of materialized random test models for the whole session."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A real S3 HTTP endpoint (moto_server) on 127.0.0.1 with bucket ``selma-test``."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(endpoint, process, log, timeout=60)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
        yield endpoint
    finally:
        stop(process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, moto_s3):
    """A real ``mlflow server`` process: SQLite backend, artifacts proxied to the moto S3 bucket."""
    port = free_port()
    root = tmp_path_factory.mktemp("mlflow-server")
    log = root / "server.log"
    env = {**os.environ, **MLFLOW_SERVER_ENV, "MLFLOW_S3_ENDPOINT_URL": moto_s3}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root}/mlflow.db",
                "--artifacts-destination",
                f"s3://{S3_BUCKET}/mlartifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, log)
        yield url
    finally:
        stop(process)


_EMPTY_MLFLOW_DB: list[Path] = []  # made once per worker process, on first use


def empty_mlflow_db(path: Path) -> None:
    """Put an empty MLflow database (its tables made, no experiment but MLflow's default) at ``path``.

    MLflow makes a new database by running its 60-odd schema migrations, about 3 s of CPU; pipeline
    tests each had a new one, so a worker makes one once and copies it. Opening an existing database
    is what every run after a user's first does; making one is still tested (tests/tracking, and
    every test that opens a tracker on a path of its own)."""
    import atexit
    import shutil
    import tempfile

    if not _EMPTY_MLFLOW_DB:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        folder = Path(tempfile.mkdtemp(prefix="selma-test-empty-mlflow-"))
        atexit.register(shutil.rmtree, folder, True)
        store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", (folder / "mlartifacts").as_uri())
        store.engine.dispose()  # closed: the copies are of a file nobody writes
        _EMPTY_MLFLOW_DB.append(folder / "mlflow.db")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_MLFLOW_DB[0], path)


def untouched_mlflow_db(path: Path) -> bool:
    """Whether nothing was written to an MLflow database at ``path``: none is there, or the empty one
    ``write_config`` put there is unchanged."""
    if not path.exists():
        return True
    return bool(_EMPTY_MLFLOW_DB) and path.read_bytes() == _EMPTY_MLFLOW_DB[0].read_bytes()


def write_config(tmp_path: Path, model_cache: Path, **overrides) -> Path:
    """A copy of configs/demo.yaml with every output under ``tmp_path``; ``overrides`` merge in."""
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data.update(
        name="selma-test",
        skills_dir=str(REPO / "skills"),
        cache_dir=str(model_cache),
        storage={"uri": f"file://{tmp_path}/store"},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        executor={"kind": "local", "max_parallel": 2, "log_dir": str(tmp_path / "logs")},
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    database = Path(data["tracking"]["uri"].removeprefix("sqlite:///"))
    if data["tracking"]["uri"].startswith("sqlite:///") and not database.exists():
        empty_mlflow_db(database)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_config(tmp_path, model_cache):
    """Factory: ``tiny_config(**overrides)`` writes a demo-like config under tmp_path; its path."""
    return lambda **overrides: write_config(tmp_path, model_cache, **overrides)


def submit_all(config, *extra: str) -> tuple[dict, str]:
    """``jobs.submit --phase all`` as a user runs it; asserts success; (last JSON line, stderr)."""
    import json

    result = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--phase", "all", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def skills_with_a_starved_one(root: Path) -> Path:
    """A skills folder: the real ``counting`` and ``tiny``, whose vocabulary yields one prompt only."""
    skills = root / "skills"
    skills.mkdir()
    (skills / "counting.yaml").write_text((REPO / "skills" / "counting.yaml").read_text())
    tiny = {
        "name": "tiny",
        "description": "too small a vocabulary",
        "seeds": ["one red ball"],
        "offline": {"templates": ["{n} balls"], "slots": {"n": ["two"]}},
    }
    (skills / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    return skills


def pytest_collection_modifyitems(config, items):
    """Files holding slow tests first (each file's own order kept): ``make test`` spreads files over
    workers in this order (pytest-xdist ``--dist loadfile --no-loadscope-reorder``), and a long file
    started last would end the run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
