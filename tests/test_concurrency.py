"""Two controllers on one pipeline: every job runs once, and two processes never write one key.

``jobs.run`` holds the output key's in-flight lease (``<key>/_inflight.json``,
``selma_core.storage.lease``) while it works; a second process for the same job waits for it and
then skips. The unit tests drive the lease itself (claim, wait, expiry, takeover, loss) on both
stores; the end-to-end test starts two ``jobs.submit --phase all`` at once on the smallest pipeline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from selma_core.config import StorageConfig
from selma_core.storage import MANIFEST, open_store
from selma_core.storage.lease import LEASE, _encode, acquire, marker_for

BUCKET = "selma-test"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(StorageConfig(uri=f"file://{tmp_path / 'store'}"))
    endpoint = request.getfixturevalue("moto_s3")
    return open_store(StorageConfig(uri=f"s3://{BUCKET}/t-{uuid.uuid4().hex}/root", endpoint_url=endpoint))


def plant(store, key: str, **fields) -> None:
    """A lease record written as another holder would have left it."""
    now = time.time()
    record = {
        "job": "prompts:x",
        "host": "elsewhere",
        "pid": 1,
        "token": uuid.uuid4().hex,
        "started_at": now,
        "heartbeat_at": now,
        "expires_at": now + 60,
        "ttl_s": 60,
        **fields,
    }
    store.write_bytes(f"{key}/{LEASE}", _encode(record))


def never() -> bool:
    return False


# -- the lease, unit by unit ------------------------------------------------------------------


def test_two_claimers_at_once_one_runs_the_other_waits_for_the_commit(store):
    """Both claim at the same instant: exactly one holds the lease; the other waits until the
    holder commits, then reports the output as done (it never holds the lease)."""
    key = "out/job"
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def claimer(name: str) -> None:
        barrier.wait()
        claim = acquire(store, key, "job", done=lambda: store.is_committed(key), poll_s=0.05)
        results[name] = claim
        if claim.lease is not None:
            time.sleep(0.5)  # the work
            store.write_json(f"{key}/{MANIFEST}", {"files": {}})  # the commit
            claim.lease.release()

    threads = [threading.Thread(target=claimer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    held = [n for n, c in results.items() if c.lease is not None]
    waited = [n for n, c in results.items() if c.lease is None]
    assert len(held) == 1 and len(waited) == 1, results
    claim = results[waited[0]]
    assert claim.waited_for["pid"] == os.getpid() and claim.waited_s > 0.3
    assert not store.exists(f"{key}/{LEASE}")  # released after the commit


def test_many_processes_claim_one_key_exactly_one_wins(tmp_path):
    """Eight processes race for one local key through the real filesystem: one holder."""
    root = tmp_path / "store"
    script = (
        "import sys, time\n"
        "from selma_core.config import StorageConfig\n"
        "from selma_core.storage import open_store\n"
        "from selma_core.storage.lease import acquire\n"
        f"store = open_store(StorageConfig(uri='file://{root}'))\n"
        "while time.time() < float(sys.argv[1]): time.sleep(0.001)\n"
        # done: the holder marked its work finished (it does at once; the others then stop waiting)
        "claim = acquire(store, 'k/job', 'job', done=lambda: store.exists('k/done'), poll_s=0.05)\n"
        "if claim.lease: store.write_bytes('k/done', b'')\n"
        "print('held' if claim.lease else 'waited')\n"
        "time.sleep(3.0)\n"  # hold it while the others look
    )
    start = f"{time.time() + 2.0}"
    processes = [
        subprocess.Popen([sys.executable, "-c", script, start], stdout=subprocess.PIPE, text=True, cwd=REPO)
        for _ in range(8)
    ]
    outcomes = Counter(p.communicate(timeout=60)[0].strip() for p in processes)
    assert outcomes == {"held": 1, "waited": 7}, outcomes


def test_a_live_lease_is_waited_for_and_a_silent_one_taken_over(store):
    """Another host's lease with a fresh expiry is waited for; once its bytes stop changing for its
    TTL (no heartbeat seen: the holder died), it is taken over, whatever the clocks say."""
    key = "out/silent"
    plant(store, key, ttl_s=1.0, expires_at=time.time() + 3600)  # a clock far ahead: still caught
    started = time.monotonic()
    lines: list[str] = []
    claim = acquire(store, key, "job", done=never, ttl_s=5, poll_s=0.1, log=lines.append)
    assert claim.lease is not None and claim.lease.took_over["host"] == "elsewhere"
    assert 1.0 <= time.monotonic() - started < 10
    assert any("waiting" in line for line in lines) and any("took over" in line for line in lines)
    record = json.loads(store.read_bytes(f"{key}/{LEASE}"))
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert record["expires_at"] > record["heartbeat_at"] >= record["started_at"]
    claim.lease.release()


def test_an_expired_lease_or_a_dead_local_process_is_taken_over_at_once(store):
    key = "out/expired"
    plant(store, key, expires_at=time.time() - 600, ttl_s=60)  # expired longer than a TTL ago
    claim = acquire(store, key, "job", done=never, poll_s=0.1)
    assert claim.lease is not None and claim.waited_s < 2
    claim.lease.release()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid of this host that no longer runs (a SIGKILLed job)
    plant(store, key, host=socket.gethostname(), pid=dead.pid)
    claim = acquire(store, key, "job", done=never, poll_s=0.1)
    assert claim.lease is not None and claim.waited_s < 2
    claim.lease.release()


def test_heartbeat_keeps_a_lease_alive_and_a_taken_over_holder_knows_it_lost(store):
    key = "out/beat"
    claim = acquire(store, key, "job", done=never, ttl_s=0.8)
    lease = claim.lease
    lost = threading.Event()
    lease.start_heartbeat(on_lost=lost.set)
    first = json.loads(store.read_bytes(f"{key}/{LEASE}"))["heartbeat_at"]
    time.sleep(0.7)
    assert json.loads(store.read_bytes(f"{key}/{LEASE}"))["heartbeat_at"] > first  # renewed
    # A second claimer that sees it alive keeps waiting past the TTL (renewals keep it alive).
    deadline = time.monotonic() + 2.0
    waiter = acquire(store, key, "job", done=lambda: time.monotonic() > deadline, poll_s=0.1)
    assert waiter.lease is None and not lost.is_set()
    # Someone takes the lease over (as a waiter would from a holder it saw as dead): the holder's
    # next renewal fails, it says so, and it does not delete the new holder's marker.
    # The thief reads and replaces conditionally, as a real claimer does: a renewal landing between
    # its read and its write wins that round, so it reads again (the holder renews every ttl/4).
    marker = marker_for(store, f"{key}/{LEASE}")
    for _ in range(50):
        _, version = marker.read()
        if marker.replace(_encode({"host": "thief", "pid": 7, "token": "t"}), version) is not None:
            break
    else:
        pytest.fail("50 takeovers in a row lost to the holder's renewals")
    assert lost.wait(5) and lease.lost and lease.lost_to["host"] == "thief"
    lease.release()
    assert json.loads(store.read_bytes(f"{key}/{LEASE}"))["host"] == "thief"


def test_a_release_that_read_its_lease_before_a_takeover_leaves_the_new_holder_s3(moto_s3):
    """The holder reads its lease, a waiter takes it over, the holder deletes: S3's conditional
    delete refuses, so the new holder keeps its lease (a plain delete would remove it)."""
    store = open_store(StorageConfig(uri=f"s3://{BUCKET}/t-{uuid.uuid4().hex}/root", endpoint_url=moto_s3))
    key = f"out/release/{LEASE}"
    marker = marker_for(store, key)
    mine = _encode({"host": "holder", "pid": 1, "token": "h"})
    version = marker.create(mine)
    assert version is not None
    assert marker.replace(_encode({"host": "thief", "pid": 7, "token": "t"}), version) is not None
    read = marker.read
    marker.read = lambda: (mine, version)  # the holder's read, made before the takeover
    assert marker.delete(version) is False
    marker.read = read
    assert json.loads(store.read_bytes(key))["host"] == "thief"
    # Without the race the holder's own lease goes.
    assert marker.delete(marker.read()[1]) is True and marker.read() is None


def test_an_endpoint_without_conditional_deletes_gets_a_plain_one_at_once(moto_s3):
    """501 NotImplemented for ``If-Match`` on DELETE: not an outage to wait out, and the release
    still happens, unconditionally (as it did before S3 had conditional deletes)."""
    from botocore.stub import Stubber

    store = open_store(StorageConfig(uri=f"s3://{BUCKET}/t-{uuid.uuid4().hex}/root", endpoint_url=moto_s3))
    key = f"out/old-endpoint/{LEASE}"
    marker = marker_for(store, key)
    marker.read = lambda: (b"mine", '"etag"')
    where = {"Bucket": BUCKET, "Key": store._key(key)}
    with Stubber(store.client) as stub:
        stub.add_client_error(
            "delete_object",
            "NotImplemented",
            http_status_code=501,
            expected_params={**where, "IfMatch": '"etag"'},
        )
        stub.add_response("delete_object", {}, expected_params=where)
        started = time.monotonic()
        assert marker.delete('"etag"') is True
        stub.assert_no_pending_responses()
    assert time.monotonic() - started < 5  # no retries with backoff
    # A botocore too old to know IfMatch on DeleteObject refuses the parameter itself.
    from botocore.exceptions import ParamValidationError

    deletes = []

    def old_client_delete(**params):
        deletes.append(params)
        if "IfMatch" in params:
            raise ParamValidationError(report='Unknown parameter in input: "IfMatch"')
        return {}

    store.client.delete_object = old_client_delete
    assert marker.delete('"etag"') is True and [sorted(d) for d in deletes] == [
        ["Bucket", "IfMatch", "Key"],
        ["Bucket", "Key"],
    ]


# -- two controllers, one pipeline ------------------------------------------------------------


def attempt_folders(store_root: Path) -> dict[str, list[str]]:
    """Committed key -> its attempt folders (every folder beside the manifest but ``_partial``)."""
    return {
        manifest.parent.relative_to(store_root).as_posix(): sorted(
            p.name for p in manifest.parent.iterdir() if p.is_dir() and p.name != "_partial"
        )
        for manifest in store_root.rglob(MANIFEST)
    }


@pytest.mark.slow
def test_two_controllers_at_once_run_every_job_once(tiny_config, tmp_path):
    config = tiny_config(
        skills=["counting"],
        prompts={"num_prompts": 8, "prompts_per_request": 8},
        train={"steps": 2, "log_every": 1},
        eval={"compare_experts": False},
    )
    # Same pipeline, its own log folder: started in the same second, two controllers would
    # otherwise share logs/<name>-<time>/ and clobber each other's job logs.
    configs = [config, tmp_path / "pipeline-b.yaml"]
    data = yaml.safe_load(config.read_text())
    data["executor"]["log_dir"] = str(tmp_path / "logs-b")
    configs[1].write_text(yaml.safe_dump(data, sort_keys=False))
    # The tracking database exists before the race: two processes creating a fresh MLflow SQLite
    # database at once race in its schema migrations (an MLflow limit; a shared server has none).
    from selma_core.config import load_config
    from selma_core.tracking import open_tracker

    open_tracker(load_config(config).tracking)
    env = {**os.environ, "SELMA_LEASE_POLL_S": "0.3"}
    controllers = [
        subprocess.Popen(
            [sys.executable, "-m", "jobs.submit", "--phase", "all", "--config", str(c)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for c in configs
    ]
    summaries = []
    for process in controllers:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-5000:]
        summaries.append(json.loads(out.strip().splitlines()[-1])["jobs"])

    jobs = {j["job"] for j in summaries[0]}
    assert jobs == {"prompts:counting", "images:counting", "train:counting", "merge", "eval"}
    for job in jobs:
        statuses = sorted(j["status"] for s in summaries for j in s if j["job"] == job)
        assert statuses == ["ran", "skipped"], (job, summaries)

    # Every key was written by one attempt: no second writer, not even an uncommitted one.
    store_root = tmp_path / "store"
    attempts = attempt_folders(store_root)  # job outputs, and eval's answer cache beside them
    outputs = {j["output"].split("/store/", 1)[1] for s in summaries for j in s}
    assert len(outputs) == len(jobs) and outputs <= set(attempts)
    assert all(len(folders) == 1 for folders in attempts.values()), attempts
    assert not list(store_root.rglob(LEASE))  # every lease released
    # The race was real: at least one job process found the other's lease and waited for it.
    logs = [p.read_text() for d in ("logs", "logs-b") for p in (tmp_path / d).rglob("*.log")]
    assert any("waiting for it" in log for log in logs), "no job ever met the other's lease"
