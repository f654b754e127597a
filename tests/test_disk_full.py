"""Disk full while a job writes: a clear, retryable error naming the folder, nothing committed, and a
rerun that commits once space returns.

The full disk is real: a 1 MiB tmpfs mounted over the store (or the scratch folder, ``cache_dir``)
and filled with a ballast file, so the kernel returns ENOSPC from the job's own write(2) calls,
wherever they are. Mounting needs root (or CAP_SYS_ADMIN), which the test containers and CI have;
elsewhere those tests skip, and ``test_store_write_hitting_enospc_leaves_no_object`` still checks
the store's handling with ENOSPC raised at its write call.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from selma_core.errors import EXIT_RETRYABLE
from selma_core.storage import MANIFEST, LocalArtifactStore
from selma_core.storage.local import TMP_PREFIX, NoSpaceError

PAGE = 4096
SIZE = 1 << 20  # the tmpfs: 1 MiB


@pytest.fixture
def small_disk(tmp_path):
    """Factory: ``small_disk(free)`` mounts a 1 MiB tmpfs, fills it up to ``free`` bytes, and returns
    (its folder, a function that frees the space)."""
    mounted: list[Path] = []

    def make(free: int) -> tuple[Path, callable]:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if mount.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mount.stderr.strip()}")
        mounted.append(where)
        ballast = where / "ballast"
        with open(ballast, "wb") as f:
            f.write(b"\0" * (SIZE - free))
        return where, lambda: ballast.unlink()

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its tables made (3 s of migrations), copied into each test."""
    from selma_core.config import TrackingConfig
    from selma_core.tracking import open_tracker

    path = tmp_path_factory.mktemp("tracking") / "mlflow.db"
    open_tracker(TrackingConfig(uri=f"sqlite:///{path}"))
    return path


def run_job_in_process(config: Path, capsys) -> tuple[int, dict]:
    from jobs.run import main

    capsys.readouterr()
    code = main(["--phase", "prompts", "--skill", "counting", "--config", str(config)])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def run_job(config: Path, *args: str) -> tuple[int, dict, str]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.run",
            "--phase",
            "prompts",
            "--skill",
            "counting",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def assert_nothing_committed(store_root: Path) -> None:
    assert not list(store_root.rglob(MANIFEST)), "a manifest was committed"
    assert not [p for p in store_root.rglob(f"{TMP_PREFIX}*")], "a half-written object was left"
    assert not list(store_root.rglob("_inflight.json")), "the failed job's lease was not released"


def assert_committed_prompts(store_root: Path, key: str) -> None:
    store = LocalArtifactStore(store_root)
    assert store.is_committed(key)
    lines = store.read_output_file(key, "prompts.jsonl").decode().splitlines()  # checked vs the manifest
    assert len(lines) == 20 and all(json.loads(line)["text"] for line in lines)


@pytest.mark.parametrize("full", ["store", "scratch"])
def test_disk_full_fails_clearly_commits_nothing_and_a_rerun_commits(
    full, tiny_config, small_disk, tmp_path, tracking_db, capsys
):
    # The store: room for the job's lease and a few saved waves, not for all of its writes. The
    # scratch folder: no room at all, so the staged output's first write fails.
    disk, free_space = small_disk(2 * PAGE if full == "store" else 0)
    store_root = disk / "store" if full == "store" else tmp_path / "store"
    overrides = {"storage": {"uri": f"file://{store_root}"}, "skills": ["counting"]}
    if full == "scratch":
        overrides["cache_dir"] = str(disk / "cache")
    config = tiny_config(**overrides)
    shutil.copyfile(tracking_db, tmp_path / "mlflow.db")

    code, last, stderr = run_job(config)
    assert code == EXIT_RETRYABLE, stderr[-3000:]
    assert last["status"] == "failed" and last["exit_code"] == EXIT_RETRYABLE
    error = last["error"]
    assert "no space left on device" in error and str(disk) in error, error
    assert "Traceback" not in stderr, stderr[-3000:]
    if full == "store":  # the store names the object: the output's upload, in the commit
        assert f"while writing file://{store_root}/prompts/counting/" in error, error
    assert_nothing_committed(store_root)

    free_space()
    code, last = run_job_in_process(config, capsys)  # the rerun (in this process: 3 s cheaper)
    assert code == 0 and last["status"] == "ran", last
    assert_committed_prompts(store_root, last["output"].split(f"file://{store_root}/", 1)[1])


def test_store_write_hitting_enospc_leaves_no_object(tmp_path, monkeypatch):
    """ENOSPC at the store's write call (any machine, no mount): a NoSpaceError naming the object,
    the folder and the size needed; the temporary file is gone; nothing is committed."""
    store = LocalArtifactStore(tmp_path / "store")
    src = tmp_path / "big.bin"
    src.write_bytes(b"x" * 10_000)

    def full_disk(source, target, length=0):
        target.write(source.read(4096))  # part of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("selma_core.storage.local.shutil.copyfileobj", full_disk)
    staged = tmp_path / "out"
    staged.mkdir()
    (staged / "big.bin").write_bytes(src.read_bytes())
    with pytest.raises(NoSpaceError) as raised:
        store.commit_dir(staged, "out/job")
    message = str(raised.value)
    assert "no space left on device in" in message and str(tmp_path / "store" / "out" / "job") in message
    assert "file://" in message and "9.8 KiB needed" in message
    assert raised.value.exit_code == EXIT_RETRYABLE
    assert not store.is_committed("out/job")
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
