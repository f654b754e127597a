"""The artifact store contract, run against both implementations (a local folder, S3 on moto_server)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest

from selma_core.config import StorageConfig
from selma_core.errors import ConfigError, EndpointError, InputError
from selma_core.storage import MANIFEST, LocalArtifactStore, open_store, validate_key
from selma_core.storage.base import STALE_PARTIAL_S, at_once
from selma_core.storage.s3 import S3ArtifactStore

BUCKET = "selma-test"


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_overwrite(store, key: str, data: bytes) -> None:
    """Replace an object's bytes behind the store's back (what a corrupting writer would do)."""
    if isinstance(store, LocalArtifactStore):
        (store.root / key).write_bytes(data)
    else:
        full = f"{store.prefix}/{key}" if store.prefix else key
        store.client.put_object(Bucket=store.bucket, Key=full, Body=data)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(StorageConfig(uri=f"file://{tmp_path / 'store'}"))
    endpoint = request.getfixturevalue("moto_s3")
    prefix = f"t-{uuid.uuid4().hex}/root"
    return open_store(StorageConfig(uri=f"s3://{BUCKET}/{prefix}", endpoint_url=endpoint))


def make_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


FILES = {
    "prompts.jsonl": b'{"text": "three red apples"}\n',
    "stats.json": b'{"n": 1}',
    "images/0001.png": bytes(range(256)) * 4,
    "images/sub/0002.png": b"\x89PNG fake",
}


# -- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "a//b", "../x", "a/./b", "a/..", "/a", "a/", "a\\b"])
def test_validate_key_rejects(key):
    with pytest.raises(ValueError, match="invalid store key"):
        validate_key(key)


@pytest.mark.parametrize("key", ["a", "a/b", "prompts/counting/0123abcd/_manifest.json", "a.b/c-d_e"])
def test_validate_key_accepts(key):
    assert validate_key(key) == key


def test_invalid_keys_are_rejected_by_the_store(store):
    for key in ("../escape", "a//b", "a/./b"):
        with pytest.raises(ValueError):
            store.write_bytes(key, b"x")
        with pytest.raises(ValueError):
            store.exists(key)


# -- bytes, files, listing -----------------------------------------------------------------------


def test_write_read_exists(store):
    assert not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"first")
    assert store.exists("a/b.bin")
    assert store.read_bytes("a/b.bin") == b"first"
    store.write_bytes("a/b.bin", b"second, longer")
    assert store.read_bytes("a/b.bin") == b"second, longer"
    # A "folder" is not an object.
    assert not store.exists("a")
    store.write_bytes("empty", b"")
    assert store.exists("empty")
    assert store.read_bytes("empty") == b""


def test_read_missing_raises_file_not_found(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope/x"):
        store.read_bytes("nope/x")
    with pytest.raises(FileNotFoundError, match="nope/x"):
        store.download_file("nope/x", tmp_path / "dl")


def test_json_round_trip(store):
    store.write_json("meta/info.json", {"b": [1, 2], "a": "x"})
    assert store.read_json("meta/info.json") == {"a": "x", "b": [1, 2]}


def test_url_names_root_and_key(store):
    assert store.url("a/b") == store.uri.rstrip("/") + "/a/b"
    with pytest.raises(ValueError):
        store.url("a/../b")


def test_list_keys_recursive_sorted_and_only_under_prefix(store):
    for key in ["run/z.txt", "run/a.txt", "run/deep/er/m.txt", "runner/x.txt", "other/run/y.txt", "run.txt"]:
        store.write_bytes(key, key.encode())
    assert store.list_keys("run") == ["run/a.txt", "run/deep/er/m.txt", "run/z.txt"]
    assert store.list_keys("run/deep") == ["run/deep/er/m.txt"]
    assert store.list_keys("missing") == []
    assert store.list_keys("run/a.txt") == []  # an object is not a prefix


def test_delete_prefix(store):
    for key in ["job/a", "job/b/c", "jobs/keep", "other/keep"]:
        store.write_bytes(key, b"x")
    store.delete_prefix("job")
    assert store.list_keys("job") == []
    assert not store.exists("job/a")
    assert not store.exists("job/b/c")
    assert store.exists("jobs/keep")
    assert store.exists("other/keep")
    store.delete_prefix("never-written")  # deleting nothing is fine


def test_list_objects_gives_sizes_and_times_and_delete_keys_deletes_just_those(store):
    store.write_bytes("d/a.bin", b"12345")
    store.write_bytes("d/sub/b.bin", b"")
    store.write_bytes("d/keep.bin", b"k")
    objects = store.list_objects("d")
    assert [(o.key, o.size) for o in objects] == [("d/a.bin", 5), ("d/keep.bin", 1), ("d/sub/b.bin", 0)]
    assert all(abs(o.modified - time.time()) < 600 for o in objects)
    store.delete_keys(["d/a.bin", "d/sub/b.bin", "d/never-there.bin"])
    assert store.list_keys("d") == ["d/keep.bin"]
    store.delete_keys([])


def test_delete_prefix_many_objects(store):
    keys = [f"bulk/{i:04d}" for i in range(25)]
    for key in keys:
        store.write_bytes(key, b"x")
    assert store.list_keys("bulk") == keys
    store.delete_prefix("bulk")
    assert store.list_keys("bulk") == []


def test_a_delete_cut_short_leaves_no_manifest_behind(store, monkeypatch):
    """Manifests go first: an interrupted delete leaves files of no committed output, never a
    manifest listing files that are gone (checkpoint pruning deletes committed outputs)."""
    for key in ["ckpt/111111111111/f.bin", "ckpt/222222222222/g.bin", f"ckpt/{MANIFEST}"]:
        store.write_bytes(key, b"x")
    assert store.is_committed("ckpt")
    deleted: list[str] = []
    if isinstance(store, LocalArtifactStore):
        real_unlink = Path.unlink

        def unlink_then_stop(path, missing_ok=False):
            deleted.append(path.name)
            real_unlink(path, missing_ok=missing_ok)
            raise OSError("killed")

        monkeypatch.setattr(Path, "unlink", unlink_then_stop)
    else:
        real_delete = store.client.delete_objects

        def first_object_then_stop(Bucket, Delete):
            deleted.append(Delete["Objects"][0]["Key"].rsplit("/", 1)[-1])
            real_delete(Bucket=Bucket, Delete={"Objects": Delete["Objects"][:1]})
            raise OSError("killed")

        monkeypatch.setattr(store.client, "delete_objects", first_object_then_stop)
    with pytest.raises(OSError, match="killed"):
        store.delete_prefix("ckpt")
    monkeypatch.undo()
    assert deleted == [MANIFEST] and not store.is_committed("ckpt")


def test_s3_folder_markers_are_no_keys_and_refused_deletes_are_errors(tmp_path, moto_s3):
    """Empty "prefix/" objects (the S3 console's "Create folder", rclone) are not listed as keys,
    and are deleted with the rest; a key the batch delete could not delete is an error."""
    store = open_store(StorageConfig(uri=f"s3://{BUCKET}/t-{uuid.uuid4().hex}/root", endpoint_url=moto_s3))
    store.write_bytes("job/_partial/wave-1.json", b"{}")
    store.client.put_object(Bucket=BUCKET, Key=store._key("job/_partial") + "/", Body=b"")
    assert store.list_keys("job/_partial") == ["job/_partial/wave-1.json"]
    store.delete_prefix("job")
    listed = store.client.list_objects_v2(Bucket=BUCKET, Prefix=store._key("job") + "/")
    assert listed.get("KeyCount") == 0
    store.write_bytes("job/a", b"x")
    refused = {"Errors": [{"Key": store._key("job/a"), "Code": "AccessDenied", "Message": "Access Denied"}]}
    store.client.delete_objects = lambda **kwargs: refused
    with pytest.raises(EndpointError, match=r"1 object\(s\) not deleted .*job/a \(AccessDenied"):
        store.delete_prefix("job")


@pytest.mark.parametrize(
    ("code", "status"),
    [("PermanentRedirect", 301), ("301", 301), ("InvalidBucketName", 400), ("KeyTooLongError", 400)],
)
def test_s3_refusals_no_retry_can_cure_are_configuration_errors(moto_s3, code, status):
    """Another region or endpoint, a misnamed bucket, a key too long: exit 2 at once, not
    retried for the whole budget nor by Kubernetes."""
    from botocore.stub import Stubber

    store = open_store(StorageConfig(uri=f"s3://{BUCKET}/t-{uuid.uuid4().hex}/root", endpoint_url=moto_s3))
    with Stubber(store.client) as stub:
        stub.add_client_error("get_object", code, http_status_code=status)
        with pytest.raises(ConfigError, match=f"refused by S3 endpoint .*{code}"):
            store.read_bytes("a/key")


def test_an_s3_download_that_gives_up_after_its_own_retries_is_an_outage_to_wait_out():
    """s3transfer retries a download reset or timed out mid-body, then raises RetriesExceededError
    from inside its handler of the last such error (urllib3's, not an OSError)."""
    import urllib3
    from boto3.exceptions import RetriesExceededError

    try:
        try:
            raise urllib3.exceptions.ReadTimeoutError(None, "/bucket/key", "Read timed out.")
        except urllib3.exceptions.HTTPError as last:
            raise RetriesExceededError(last)  # noqa: B904 (as s3transfer raises it: its context is the error)
    except RetriesExceededError as gave_up:
        assert S3ArtifactStore._transient(gave_up)


def test_upload_and_download_files(store, tmp_path):
    src = tmp_path / "src.bin"
    data = bytes(range(256)) * 100
    src.write_bytes(data)
    store.upload_file(src, "files/src.bin")
    assert store.read_bytes("files/src.bin") == data
    dest = tmp_path / "down" / "nested" / "copy.bin"
    store.download_file("files/src.bin", dest)
    assert dest.read_bytes() == data


# -- requests side by side ---------------------------------------------------------------------


def test_at_once_runs_calls_side_by_side_and_keeps_their_order():
    together = threading.Barrier(4, timeout=30)  # broken unless four calls run at the same time

    def call(i: int) -> int:
        if i < 4:
            together.wait()
        return i * i

    assert at_once(call, range(50), threads=4) == [i * i for i in range(50)]
    assert at_once(call, [5, 6], threads=1) == [25, 36]  # one thread: in the caller, in order


def test_at_once_raises_the_first_failure_and_starts_no_call_after_it():
    started: list[int] = []

    def call(i: int) -> int:
        started.append(i)
        if i == 3:
            raise ValueError("object 3 refused")
        return i

    with pytest.raises(ValueError, match="object 3 refused"):
        at_once(call, range(1000), threads=2)
    assert len(started) < 10


def test_an_interrupt_does_not_wait_for_a_hanging_request():
    """Ctrl-C (or SIGTERM, raised as KeyboardInterrupt) during a commit is raised at once: a request
    hanging on an unanswering endpoint must not hold the job's exit (the workers are daemons)."""
    release = threading.Event()
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt("alarm")))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt, match="alarm"):
            at_once(lambda i: release.wait(60), range(8), threads=4)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
    hanging = [t for t in threading.enumerate() if t.name.startswith("store-transfer-")]
    assert all(t.daemon for t in hanging)


HANGING_COMMIT = """
import os, signal, sys, threading
from pathlib import Path
from selma_core.config import StorageConfig
from selma_core.storage import open_store

store = open_store(StorageConfig(uri="s3://bucket/prefix", endpoint_url=sys.argv[1], connect_retries=0))
threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
try:
    store.commit_dir(Path(sys.argv[2]), "out/hung")
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def test_an_interrupted_s3_commit_exits_without_waiting_for_uploads_that_hang(tmp_path):
    """An endpoint that takes uploads and never answers: Ctrl-C ends the job at once, not after
    botocore's read timeouts and retries (minutes) in threads the interpreter waits for."""
    import subprocess
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()

    class Hanging(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):  # noqa: N802 - head_bucket: the store is there
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_PUT(self):  # noqa: N802 - an upload: never answered
            release.wait(120)

    class Quiet(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            pass  # the interrupted client's connections are gone when the PUTs are released

    server = Quiet(("127.0.0.1", 0), Hanging)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    make_tree(tmp_path / "out", {f"images/{i}.png": b"x" * 1000 for i in range(4)})
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                HANGING_COMMIT,
                f"http://127.0.0.1:{server.server_address[1]}",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=45,  # botocore's read timeout alone is 60 s
            env=env,
        )
    finally:
        release.set()
        server.shutdown()
    assert done.returncode == 130 and done.stdout.strip() == "interrupted", done.stderr[-2000:]


# -- the commit protocol -------------------------------------------------------------------------


def test_staged_output_commits_files_and_manifest(store, tmp_path):
    scratch = tmp_path / "scratch"
    lineage = {"phase": "prompts", "skill": "counting", "inputs": {"a": "x/y"}, "config_hash": "abc"}
    assert not store.is_committed("out/job1")
    with store.staged_output("out/job1", scratch, lineage) as folder:
        assert folder.is_dir() and list(folder.iterdir()) == []
        make_tree(folder, FILES)
        # Nothing is visible before the block ends.
        assert not store.is_committed("out/job1")
        assert store.list_keys("out/job1") == []
    assert store.is_committed("out/job1")
    manifest = store.read_manifest("out/job1")
    attempt = manifest["attempt"]
    # The files sit under the attempt's own folder; the manifest names each object.
    assert store.list_keys("out/job1") == sorted(
        [f"out/job1/{attempt}/{rel}" for rel in FILES] + [f"out/job1/{MANIFEST}"]
    )
    for rel, data in FILES.items():
        assert store.read_bytes(f"out/job1/{attempt}/{rel}") == data
        assert store.read_output_file("out/job1", rel) == data
    assert manifest["key"] == "out/job1"
    assert manifest["metadata"] == lineage
    assert manifest["files"] == {
        rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "object": f"{attempt}/{rel}"}
        for rel, data in FILES.items()
    }
    with pytest.raises(InputError, match="has no file 'nope.txt'"):
        store.read_output_file("out/job1", "nope.txt")
    assert abs(manifest["committed_at"] - time.time()) < 600
    # The scratch folder is cleaned up.
    assert list(scratch.iterdir()) == []


def test_manifest_is_written_last(store, tmp_path, monkeypatch):
    order: list[str] = []
    upload, write = store.upload_file, store.write_bytes
    monkeypatch.setattr(store, "upload_file", lambda p, k: (order.append(k), upload(p, k)))
    monkeypatch.setattr(store, "write_bytes", lambda k, d: (order.append(k), write(k, d)))
    with store.staged_output("ordered", tmp_path / "scratch") as folder:
        make_tree(folder, FILES)
    assert order[-1] == f"ordered/{MANIFEST}"
    attempt = store.read_manifest("ordered")["attempt"]
    assert sorted(order[:-1]) == sorted(f"ordered/{attempt}/{rel}" for rel in FILES)


def test_racing_writers_never_mix_their_files(store, tmp_path):
    """Two attempts commit different bytes to one key: the manifest written last wins whole."""
    with store.staged_output("race", tmp_path / "a") as folder:
        (folder / "x.txt").write_text("first")
        (folder / "y.txt").write_text("first")
    with store.staged_output("race", tmp_path / "b") as folder:
        (folder / "x.txt").write_text("second")
        (folder / "y.txt").write_text("second")
    target = store.fetch_dir("race", tmp_path / "cache")
    assert (target / "x.txt").read_text() == (target / "y.txt").read_text() == "second"


def test_manifest_file_inside_output_is_not_uploaded(store, tmp_path):
    with store.staged_output("own-manifest", tmp_path / "scratch") as folder:
        (folder / MANIFEST).write_text('{"forged": true}')
        (folder / "real.txt").write_text("real")
    manifest = store.read_manifest("own-manifest")
    assert list(manifest["files"]) == ["real.txt"]
    assert "forged" not in manifest


def test_exception_inside_staged_output_commits_nothing(store, tmp_path):
    scratch = tmp_path / "scratch"
    with (
        pytest.raises(RuntimeError, match="phase crashed"),
        store.staged_output("out/failed", scratch, {"phase": "images"}) as folder,
    ):
        make_tree(folder, FILES)
        raise RuntimeError("phase crashed")
    assert not store.is_committed("out/failed")
    assert not store.exists(f"out/failed/{MANIFEST}")
    assert store.list_keys("out/failed") == []
    assert list(scratch.iterdir()) == []
    with pytest.raises(InputError, match="no committed output"):
        store.read_manifest("out/failed")
    with pytest.raises(InputError, match="out/failed"):
        store.fetch_dir("out/failed", tmp_path / "cache")


def test_fetch_dir_returns_verified_copies(store, tmp_path):
    with store.staged_output("out/fetch", tmp_path / "scratch") as folder:
        make_tree(folder, FILES)
    target = store.fetch_dir("out/fetch", tmp_path / "cache")
    assert target == tmp_path / "cache" / "fetched" / "out" / "fetch"
    got = {p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert got == FILES


def test_fetch_dir_detects_corruption_after_commit(store, tmp_path):
    with store.staged_output("out/corrupt", tmp_path / "scratch") as folder:
        make_tree(folder, FILES)
    good = FILES["images/0001.png"]
    bad = bytes(reversed(good))  # same size, different bytes: only the checksum can tell
    assert len(bad) == len(good) and bad != good
    obj = f"out/corrupt/{store.read_manifest('out/corrupt')['attempt']}/images/0001.png"
    raw_overwrite(store, obj, bad)
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match="checksum mismatch") as info:
        store.fetch_dir("out/corrupt", cache)
    assert store.url(obj) in str(info.value)
    assert hashlib.sha256(good).hexdigest()[:12] in str(info.value)
    assert hashlib.sha256(bad).hexdigest()[:12] in str(info.value)
    # Neither the corrupt copy nor its partial download is left to be mistaken for a good file.
    fetched = cache / "fetched" / "out" / "corrupt" / "images"
    assert not (fetched / "0001.png").exists()
    assert [p for p in fetched.iterdir() if p.is_file()] == []  # no partial download either


def test_fetch_dir_reuses_cached_files(store, tmp_path, monkeypatch):
    with store.staged_output("out/cached", tmp_path / "scratch") as folder:
        make_tree(folder, FILES)
    cache = tmp_path / "cache"
    downloads: list[str] = []
    download = store.download_file
    monkeypatch.setattr(
        store, "download_file", lambda k, p, *size: (downloads.append(k), download(k, p, *size))
    )

    target = store.fetch_dir("out/cached", cache)
    attempt = store.read_manifest("out/cached")["attempt"]
    assert sorted(downloads) == sorted(f"out/cached/{attempt}/{rel}" for rel in FILES)

    downloads.clear()
    assert store.fetch_dir("out/cached", cache) == target
    assert downloads == []

    # A damaged cached copy (same size) is detected and downloaded again; the others are kept.
    (target / "stats.json").write_bytes(b'{"n": 9}')
    downloads.clear()
    store.fetch_dir("out/cached", cache)
    assert downloads == [f"out/cached/{attempt}/stats.json"]
    assert (target / "stats.json").read_bytes() == FILES["stats.json"]


def test_long_file_names_are_written_and_fetched(store, tmp_path):
    # 250 bytes is a legal name on every common file system (limit 255); the temporary names the
    # stores write through must not push it over.
    name = "é" * 100 + "x" * 46 + ".png"
    assert len(name.encode()) == 250
    with store.staged_output("out/long", tmp_path / "scratch") as folder:
        (folder / name).write_bytes(b"pixels")
    target = store.fetch_dir("out/long", tmp_path / "cache")
    assert (target / name).read_bytes() == b"pixels"
    assert [p.name for p in target.iterdir()] == [name]


def test_fetch_dir_drops_partials_killed_fetches_left(store, tmp_path):
    with store.staged_output("out/partials", tmp_path / "scratch") as folder:
        make_tree(folder, FILES)
    target = tmp_path / "cache" / "fetched" / "out" / "partials"
    target.mkdir(parents=True)
    dead = target / ".stats.json.k1ll3d.partial"  # a fetch killed mid-download, long ago
    # ... and where boto3 wrote that fetch's bytes: it downloads beside the name it is given.
    dead_boto = target / ".stats.json.k1ll3d.partial.A513Fe12"
    for path in (dead, dead_boto):
        path.write_bytes(b"half")
        os.utime(path, (time.time() - 2 * STALE_PARTIAL_S,) * 2)
    running = target / ".stats.json.runn1n.partial"  # a fetch still writing, in another process
    running.write_bytes(b"growing")
    store.fetch_dir("out/partials", tmp_path / "cache")
    assert not dead.exists() and not dead_boto.exists()
    assert running.exists()


def test_an_upload_failing_mid_commit_commits_nothing(store, tmp_path, monkeypatch):
    """The commit's uploads run side by side (``storage.transfer_threads``): one that fails stops
    the commit before its manifest, whatever the others did."""
    assert store.transfer_threads == StorageConfig().transfer_threads > 1
    upload = store.upload_file

    def failing(path, key):
        if key.endswith("stats.json"):
            raise OSError("disk went away")
        return upload(path, key)

    monkeypatch.setattr(store, "upload_file", failing)
    with (
        pytest.raises(OSError, match="disk went away"),
        store.staged_output("half", tmp_path / "s") as folder,
    ):
        make_tree(folder, {f"images/{i:04d}.png": bytes([i]) * 100 for i in range(40)} | FILES)
    assert not store.is_committed("half")


def test_commit_dir_directly(store, tmp_path):
    src = tmp_path / "ready"
    make_tree(src, {"a.txt": b"a", "b/c.txt": b"bc"})
    manifest = store.commit_dir(src, "direct", {"x": 1})
    assert store.read_manifest("direct") == json.loads(json.dumps(manifest))
    assert set(manifest["files"]) == {"a.txt", "b/c.txt"}
    with pytest.raises(ValueError):
        store.commit_dir(src, "../direct")


# -- open_store ----------------------------------------------------------------------------------


def test_open_store_local(tmp_path):
    root = tmp_path / "new" / "store"
    store = open_store(StorageConfig(uri=f"file://{root}"))
    assert type(store) is LocalArtifactStore
    assert store.root == root
    assert store.uri == f"file://{root}"
    assert root.is_dir()  # check() created it


def test_open_store_local_without_check_creates_nothing(tmp_path):
    root = tmp_path / "lazy"
    store = open_store(StorageConfig(uri=f"file://{root}"), check=False)
    assert isinstance(store, LocalArtifactStore)
    assert not root.exists()


def test_open_store_local_uncreatable_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot create the store folder"):
        open_store(StorageConfig(uri=f"file://{blocker}/store"))


def test_open_store_s3(moto_s3):
    store = open_store(StorageConfig(uri=f"s3://{BUCKET}/some/prefix/", endpoint_url=moto_s3))
    assert type(store) is S3ArtifactStore
    assert store.bucket == BUCKET
    assert store.prefix == "some/prefix"
    assert store.uri == f"s3://{BUCKET}/some/prefix"
    assert store.endpoint_url == moto_s3


# -- S3 specifics ----------------------------------------------------------------------------------


def test_s3_keys_live_under_the_prefix(moto_s3):
    prefix = f"t-{uuid.uuid4().hex}"
    store = open_store(StorageConfig(uri=f"s3://{BUCKET}/{prefix}", endpoint_url=moto_s3))
    store.write_bytes("a/b", b"payload")
    raw = boto3.client("s3", endpoint_url=moto_s3)
    body = raw.get_object(Bucket=BUCKET, Key=f"{prefix}/a/b")["Body"].read()
    assert body == b"payload"


def test_s3_store_at_bucket_root(moto_s3):
    store = open_store(StorageConfig(uri=f"s3://{BUCKET}", endpoint_url=moto_s3))
    assert store.prefix == "" and store.uri == f"s3://{BUCKET}"
    top = f"t-{uuid.uuid4().hex}"
    store.write_bytes(f"{top}/x/y", b"1")
    store.write_bytes(f"{top}/z", b"2")
    assert store.list_keys(top) == [f"{top}/x/y", f"{top}/z"]
    store.delete_prefix(top)
    assert store.list_keys(top) == []


def test_s3_uri_without_bucket_is_a_config_error():
    with pytest.raises(ConfigError, match="expected s3://BUCKET/PREFIX"):
        S3ArtifactStore("s3:///prefix", endpoint_url="http://127.0.0.1:1")


def test_s3_unreachable_endpoint_fails_naming_it():
    endpoint = f"http://127.0.0.1:{closed_port()}"
    cfg = StorageConfig(uri=f"s3://{BUCKET}/x", endpoint_url=endpoint, connect_retries=1)
    start = time.monotonic()
    with pytest.raises(EndpointError) as info:
        open_store(cfg)
    elapsed = time.monotonic() - start
    assert endpoint in str(info.value)
    assert elapsed < 30, f"an unreachable endpoint took {elapsed:.1f}s to report"
    # Without the check, the store opens; the first operation fails the same way.
    store = open_store(cfg, check=False)
    with pytest.raises(EndpointError, match=endpoint):
        store.write_bytes("k", b"x")


def test_s3_missing_bucket_is_a_config_error(moto_s3):
    """Retrying cannot create the bucket: exit code 2, naming the endpoint and the bucket."""
    cfg = StorageConfig(uri=f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", endpoint_url=moto_s3)
    with pytest.raises(ConfigError, match="bucket missing or not accessible") as info:
        open_store(cfg)
    assert moto_s3 in str(info.value)


def test_s3_without_credentials_says_what_to_set(moto_s3, monkeypatch, tmp_path):
    """Missing credentials are said as such, not as 'cannot reach' (still exit 1: a pod's role's
    credentials that came late look the same)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = StorageConfig(uri=f"s3://{BUCKET}/x", endpoint_url=moto_s3)
    with pytest.raises(EndpointError, match="Unable to locate credentials: set AWS_ACCESS_KEY_ID") as info:
        open_store(cfg)
    assert "cannot reach" not in str(info.value)
    with pytest.raises(EndpointError, match="set AWS_ACCESS_KEY_ID"):
        open_store(cfg, check=False).write_bytes("k", b"x")


# -- local specifics -------------------------------------------------------------------------------


def local_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_local_write_leaves_no_temp_files(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    store.write_bytes("a/b.bin", b"one")
    store.write_bytes("a/b.bin", b"two")
    src = tmp_path / "src.txt"
    src.write_text("uploaded")
    store.upload_file(src, "a/c.txt")
    assert local_files(store.root) == ["a/b.bin", "a/c.txt"]
    assert (store.root / "a" / "b.bin").read_bytes() == b"two"


def test_local_failed_write_keeps_old_content(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    store.write_bytes("obj", b"old content")

    def broken_writer(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store._atomic_write("obj", broken_writer)
    assert store.read_bytes("obj") == b"old content"
    assert local_files(store.root) == ["obj"]

    # The same through the public API: the source vanishes while uploading.
    with pytest.raises(FileNotFoundError):
        store.upload_file(tmp_path / "missing-source", "obj")
    assert store.read_bytes("obj") == b"old content"
    assert local_files(store.root) == ["obj"]


def test_local_keys_cannot_escape_the_root(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    with pytest.raises(ValueError):
        store.write_bytes("../outside", b"x")
    assert not (tmp_path / "outside").exists()


def test_local_list_keys_lists_dot_names(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    store.write_bytes("job/.config", b"x")
    assert store.exists("job/.config")
    assert store.list_keys("job") == ["job/.config"]
