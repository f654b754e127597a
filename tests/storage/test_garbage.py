"""Store garbage (selma_core.storage.garbage, python -m jobs.gc): found by the commit protocol's own
records, deleted exactly, and nothing that a reader or a running job may still need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from selma_core.config import StorageConfig
from selma_core.storage import MANIFEST, open_store
from selma_core.storage.base import ArtifactStore
from selma_core.storage.garbage import WRITTEN, delete_garbage, find_garbage

from .test_stores import BUCKET

DAY = 86400.0
PROMPTS = "prompts/counting/" + "a" * 16
IMAGES = "images/counting/" + "b" * 16
EXPERTS = "experts/counting/" + "c" * 16
EVAL = "eval/" + "d" * 16
CACHED_IMAGE = "cache/eval-images/ab/" + "e" * 64 + ".png"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    if request.param == "local":
        return open_store(StorageConfig(uri=f"file://{tmp_path / 'store'}"))
    endpoint = request.getfixturevalue("moto_s3")
    return open_store(StorageConfig(uri=f"s3://{BUCKET}/gc-{uuid.uuid4().hex}", endpoint_url=endpoint))


def commit(store: ArtifactStore, key: str, tmp_path: Path, **files: str) -> str:
    """Commit ``files`` under ``key``; the attempt."""
    folder = tmp_path / f"stage-{uuid.uuid4().hex}"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return store.commit_dir(folder, key)["attempt"]


def killed_commit(store: ArtifactStore, key: str) -> str:
    """What a commit killed before its manifest leaves: files in an attempt folder nothing names."""
    attempt = uuid.uuid4().hex[:12]
    store.write_bytes(f"{key}/{attempt}/prompts.jsonl", b"{}\n")
    return attempt


def a_store_after_years_of_work(store: ArtifactStore, tmp_path: Path) -> dict[str, str]:
    replaced = commit(store, PROMPTS, tmp_path, **{"prompts.jsonl": "old\n"})
    current = commit(store, PROMPTS, tmp_path, **{"prompts.jsonl": "new\n"})
    killed = killed_commit(store, PROMPTS)
    store.write_json(f"{PROMPTS}/_partial/wave-00000008.json", {"records": []})  # killed after the commit
    store.write_bytes(f"{IMAGES}/_shards/shard-00000.tar", b"tar")  # a job killed mid-way, never rerun
    orphan = killed_commit(store, IMAGES)
    store.write_json(f"{EVAL}/notes.json", {"by": "a user"})  # not the protocol's: never judged
    commit(store, EVAL, tmp_path, **{"results.json": "{}"})
    store.write_bytes(CACHED_IMAGE, b"png")
    return {"replaced": replaced, "current": current, "killed": killed, "orphan": orphan}


def delete_all(store: ArtifactStore, found) -> None:
    assert all(delete_garbage(store, group) for group in found)


def test_garbage_is_what_no_manifest_names_and_the_resume_state_of_committed_outputs(store, tmp_path):
    attempts = a_store_after_years_of_work(store, tmp_path)
    later = time.time() + 2 * DAY  # everything written is now two days old
    found, warnings = find_garbage(store, min_age_s=DAY, now=later)
    assert warnings == []
    assert sorted((g.kind, g.prefix) for g in found) == sorted(
        [
            ("attempt", f"{PROMPTS}/{attempts['replaced']}"),
            ("attempt", f"{PROMPTS}/{attempts['killed']}"),
            ("resume state of a committed output", f"{PROMPTS}/_partial"),
            ("attempt", f"{IMAGES}/{attempts['orphan']}"),
        ]
    )
    with_abandoned, _ = find_garbage(store, min_age_s=DAY, abandoned=True, now=later)
    assert {g.prefix for g in with_abandoned} - {g.prefix for g in found} == {f"{IMAGES}/_shards"}
    # Nothing is that old yet.
    assert find_garbage(store, min_age_s=DAY, abandoned=True) == ([], [])

    delete_all(store, with_abandoned)
    assert store.read_output_file(PROMPTS, "prompts.jsonl") == b"new\n"
    assert sorted(store.list_keys(PROMPTS)) == sorted(
        [f"{PROMPTS}/{attempts['current']}/prompts.jsonl", f"{PROMPTS}/{MANIFEST}"]
    )
    assert store.list_keys(IMAGES) == []
    assert store.exists(f"{EVAL}/notes.json") and store.exists(CACHED_IMAGE)
    assert store.read_output_file(EVAL, "results.json") == b"{}"
    assert find_garbage(store, min_age_s=DAY, abandoned=True, now=later) == ([], [])


def test_only_the_objects_found_are_deleted_not_what_was_written_there_since(store, tmp_path):
    commit(store, PROMPTS, tmp_path, **{"prompts.jsonl": "done\n"})
    store.write_json(f"{PROMPTS}/_partial/wave-00000001.json", {"records": []})
    store.write_json(f"{PROMPTS}/_partial/wave-00000002.json", {"records": []})
    found, _ = find_garbage(store, min_age_s=DAY, now=time.time() + 2 * DAY)
    assert [g.prefix for g in found] == [f"{PROMPTS}/_partial"]
    # A forced rerun began: it wrote its first wave again, under the same name, and a third one.
    time.sleep(0.01)
    store.write_json(f"{PROMPTS}/_partial/wave-00000001.json", {"records": [{"text": "rerun"}]})
    store.write_json(f"{PROMPTS}/_partial/wave-00000003.json", {"records": []})
    assert delete_garbage(store, found[0])
    assert store.list_keys(f"{PROMPTS}/_partial") == [
        f"{PROMPTS}/_partial/wave-00000001.json",
        f"{PROMPTS}/_partial/wave-00000003.json",
    ]
    assert store.read_json(f"{PROMPTS}/_partial/wave-00000001.json") == {"records": [{"text": "rerun"}]}


def lease(store: ArtifactStore, key: str, expires_in: float) -> None:
    """An in-flight marker as selma_core.storage.lease writes it, of a holder on another host."""
    now = time.time()
    holder = {
        "host": "another-node",
        "pid": 7,
        "ttl_s": 60.0,
        "heartbeat_at": now,
        "expires_at": now + expires_in,
    }
    store.write_json(key, holder)


@pytest.mark.parametrize("marker", ["_inflight.json", "_workers/1-of-2/_inflight.json"])
def test_nothing_is_taken_under_a_key_a_live_job_holds_whatever_the_age_asked(store, tmp_path, marker):
    """A job's lease, or an images process's (images.num_jobs > 1), however old its last renewal
    looks next to min_age: judged by the lease's own rules, not by age."""
    commit(store, IMAGES, tmp_path, **{"images.jsonl": "{}"})
    store.write_bytes(f"{IMAGES}/_shards/shard-00000.tar", b"tar")  # a forced rerun's process saved it
    lease(store, f"{IMAGES}/{marker}", expires_in=60)
    later = time.time() + 2 * DAY
    found, _ = find_garbage(store, min_age_s=DAY, now=time.time() + 60)  # its expiry is not a TTL past
    assert found == []
    found, _ = find_garbage(store, min_age_s=DAY, now=later)  # expired 2 days ago: its holder is dead
    assert [g.prefix for g in found] == [f"{IMAGES}/_shards"]
    lease(store, f"{IMAGES}/{marker}", expires_in=3 * DAY)  # ... but a job took the key since the listing
    assert delete_garbage(store, found[0], now=later) is False
    assert store.exists(f"{IMAGES}/_shards/shard-00000.tar")


def aged(store: ArtifactStore, prefix: str, seconds: float) -> None:
    """Make every object under ``prefix`` of a local store look written ``seconds`` ago."""
    then = time.time() - seconds
    for key in store.list_keys(prefix):
        os.utime(store.root / key, (then, then))


def local_store(tmp_path: Path) -> ArtifactStore:
    return open_store(StorageConfig(uri=f"file://{tmp_path / 'store'}"))


def test_a_replaced_attempt_waits_until_the_manifest_that_replaced_it_is_old_too(tmp_path):
    """A reader that read the old manifest just before it was replaced may still be fetching the
    attempt it named: that attempt's age alone does not make it garbage."""
    store = local_store(tmp_path)
    replaced = commit(store, PROMPTS, tmp_path, **{"prompts.jsonl": "old\n"})
    aged(store, PROMPTS, 3 * DAY)
    commit(store, PROMPTS, tmp_path, **{"prompts.jsonl": "new\n"})  # a minute ago: the answer cache's way
    assert find_garbage(store, min_age_s=DAY) == ([], [])
    aged(store, PROMPTS, 2 * DAY)
    found, _ = find_garbage(store, min_age_s=DAY)
    assert [g.prefix for g in found] == [f"{PROMPTS}/{replaced}"]


def test_resume_state_with_nested_manifests_goes_manifests_first_and_leaves_no_empty_folders(tmp_path):
    store = local_store(tmp_path)
    commit(store, EXPERTS, tmp_path, **{"adapter.safetensors": "weights"})
    store.write_json(f"{EXPERTS}/_checkpoints/step-00000500/{MANIFEST}", {"files": {}})
    store.write_bytes(f"{EXPERTS}/_checkpoints/step-00000500/0123456789ab/optimizer.pt", b"state")
    order: list[list[str]] = []
    delete_keys = store.delete_keys
    store.delete_keys = lambda keys: (order.append(list(keys)), delete_keys(keys))
    found, _ = find_garbage(store, min_age_s=DAY, now=time.time() + 2 * DAY)
    assert [g.kind for g in found] == ["resume state of a committed output"]
    assert delete_garbage(store, found[0])
    assert not (store.root / EXPERTS / "_checkpoints").exists()
    assert store.read_output_file(EXPERTS, "adapter.safetensors") == b"weights"
    # delete_keys itself puts manifests first, whatever order it is given
    assert sorted(order[0]) == sorted(o.key for o in found[0].objects)


def test_replaced_attempts_go_once_the_commit_after_each_is_old(tmp_path):
    """The answer cache is committed anew by every evaluation: daily evals must not keep every
    attempt forever (each waits for the one after it, not for the newest manifest)."""
    store = local_store(tmp_path)
    attempts = []
    for days_ago in (4, 3, 2, 1.5, 0.1):
        attempts.append(commit(store, "cache/answers/eval", tmp_path, **{"answers.sqlite": f"{days_ago}"}))
        aged(store, f"cache/answers/eval/{attempts[-1]}", days_ago * DAY)
        os.utime(store.root / "cache/answers/eval" / MANIFEST, (time.time() - days_ago * DAY,) * 2)
    found, _ = find_garbage(store, min_age_s=DAY)
    # Each replaced by the next: at 3, 2 and 1.5 days ago; the one replaced 0.1 days ago waits.
    assert sorted(g.prefix for g in found) == sorted(f"cache/answers/eval/{a}" for a in attempts[:3])


def test_a_key_with_a_damaged_manifest_is_left_alone_with_a_warning(tmp_path):
    store = local_store(tmp_path)
    killed_commit(store, PROMPTS)
    store.write_bytes(f"{PROMPTS}/{MANIFEST}", b"{not json")
    found, warnings = find_garbage(store, min_age_s=DAY, now=time.time() + 2 * DAY)
    assert found == [] and len(warnings) == 1
    assert warnings[0].startswith(f"{store.url(PROMPTS)}: left alone: ") and "not valid JSON" in warnings[0]


# -- python -m jobs.gc ----------------------------------------------------------------------------


def gc(capsys, *args: str) -> tuple[int, dict, str]:
    from jobs.gc import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def test_jobs_gc_lists_then_deletes(tiny_config, tmp_path, capsys):
    config = str(tiny_config())
    store = local_store(tmp_path)
    commit(store, PROMPTS, tmp_path, **{"prompts.jsonl": "done\n"})
    killed = killed_commit(store, PROMPTS)
    store.write_bytes(f"{IMAGES}/_shards/shard-00000.tar", b"tar")
    aged(store, "prompts", 2 * DAY)
    aged(store, "images", 2 * DAY)

    code, listed, err = gc(capsys, "--config", config)
    assert code == 0 and listed["deleted"] is False and listed["min_age_s"] == DAY
    assert "deleted_prefixes" not in listed
    assert [g["prefix"] for g in listed["garbage"]] == [f"{PROMPTS}/{killed}"]
    assert listed["totals"] == {"attempt": {"groups": 1, "objects": 1, "bytes": 3}}
    assert f"| attempt | {store.url(f'{PROMPTS}/{killed}')} | 1 | 3 B | 48.0 h ago |" in err
    assert "garbage found (nothing deleted: add --delete)" in err
    assert store.exists(f"{PROMPTS}/{killed}/prompts.jsonl")  # a listing changes nothing

    code, deleted, _ = gc(capsys, "--config", config, "--delete", "--abandoned", "--min-age", "36h")
    assert code == 0 and deleted["deleted"] is True and deleted["spared_prefixes"] == []
    assert sorted(g["prefix"] for g in deleted["garbage"]) == [f"{IMAGES}/_shards", f"{PROMPTS}/{killed}"]
    assert sorted(deleted["deleted_prefixes"]) == [f"{IMAGES}/_shards", f"{PROMPTS}/{killed}"]
    assert store.list_keys(IMAGES) == [] and not store.exists(f"{PROMPTS}/{killed}/prompts.jsonl")


def test_jobs_gc_reports_what_it_deleted_before_a_failure(tiny_config, tmp_path, capsys, monkeypatch):
    config = str(tiny_config())
    store = local_store(tmp_path)
    for key in (PROMPTS, IMAGES):
        killed_commit(store, key)
    aged(store, "prompts", 2 * DAY)
    aged(store, "images", 2 * DAY)
    from selma_core.storage.local import LocalArtifactStore

    delete_keys = LocalArtifactStore.delete_keys

    def refused(self, keys):
        if keys[0].startswith("images/"):
            raise PermissionError(13, "Permission denied", keys[0])
        delete_keys(self, keys)

    monkeypatch.setattr(LocalArtifactStore, "delete_keys", refused)
    code, said, err = gc(capsys, "--config", config, "--delete")
    assert code == 1 and said["deleted"] is False and "Permission denied" in said["error"]
    assert [p.split("/")[0] for p in said["deleted_prefixes"]] == ["prompts"]  # listed before images
    assert "Traceback" not in err

    code, again, _ = gc(capsys, "--config", config, "--delete", "--min-age", "3d")
    assert code == 0 and again["garbage"] == [] and again["min_age_s"] == 3 * DAY


def test_jobs_gc_refuses_a_bad_age_and_a_missing_store(tiny_config, tmp_path, capsys):
    code, said, err = gc(capsys, "--config", str(tiny_config()), "--min-age", "yesterday")
    assert (
        code == 2 and said["deleted"] is False and "expected a duration such as 3600, 30m, 24h or 7d" in err
    )
    missing = tiny_config(storage={"uri": f"file://{tmp_path / 'no-such-store'}"})
    code, said, _ = gc(capsys, "--config", str(missing))
    assert code == 2 and "no such folder" in said["error"]
    assert not (tmp_path / "no-such-store").exists()


ADAPTER = f"{EXPERTS}/0123456789ab/pytorch_lora_weights.safetensors"


def killed_write(store: ArtifactStore, tmp_path: Path, key: str, size: int) -> None:
    """A process killed in the middle of writing ``key``: locally, SIGKILL between the temporary
    file's fsync and its rename (a real kill, in a child process); on S3, a multipart upload begun
    and never completed (what boto3 leaves when killed between parts)."""
    if store.uri.startswith("file://"):
        script = (
            "import sys; from pathlib import Path; from selma_core.storage.local import LocalArtifactStore; "
            "LocalArtifactStore(sys.argv[1]).write_bytes(sys.argv[2], b'x' * int(sys.argv[3]))"
        )
        env = {**os.environ, "SELMA_FAULT": "store.write.before_rename"}
        killed = subprocess.run(
            [sys.executable, "-c", script, str(store.root), key, str(size)], env=env, capture_output=True
        )
        assert killed.returncode == -9, killed.stderr
        return
    client, full = store.client, store._key(key)
    upload = client.create_multipart_upload(Bucket=store.bucket, Key=full)["UploadId"]
    client.upload_part(Bucket=store.bucket, Key=full, UploadId=upload, PartNumber=1, Body=b"x" * size)


def test_writes_a_killed_process_left_unfinished_are_found_and_discarded(store, tmp_path):
    """A local temporary file, an S3 multipart upload: invisible to readers, yet they take space
    (S3 bills the parts): old ones are garbage, recent ones may be a writer's at work."""
    killed_write(store, tmp_path, ADAPTER, 3000)
    assert store.list_keys(EXPERTS) == []  # no reader sees it
    assert find_garbage(store, min_age_s=DAY) == ([], [])  # written just now: perhaps a live writer
    later = time.time() + 2 * DAY
    [found], _ = find_garbage(store, min_age_s=DAY, now=later)
    assert found.kind == "unfinished write" and found.size == 3000
    assert found.key.startswith(EXPERTS + "/0123456789ab/")
    assert delete_garbage(store, found)
    assert store.list_unfinished_writes(WRITTEN) == []
    assert find_garbage(store, min_age_s=DAY, now=later) == ([], [])


def test_an_unfinished_write_written_to_since_it_was_found_is_spared(store, tmp_path):
    killed_write(store, tmp_path, ADAPTER, 1000)
    [found], _ = find_garbage(store, min_age_s=DAY, now=time.time() + 2 * DAY)
    if store.uri.startswith("file://"):  # the writer was alive after all: it wrote on
        with open(store.root / found.key, "ab") as f:
            f.write(b"more")
    else:
        store.client.upload_part(
            Bucket=store.bucket,
            Key=store._key(ADAPTER),
            UploadId=found.write.upload_id,
            PartNumber=2,
            Body=b"more",
        )
    assert delete_garbage(store, found) is False
    [write] = store.list_unfinished_writes(WRITTEN)
    assert write.size == 1004


def test_no_unfinished_write_is_taken_under_a_key_a_live_job_holds(store, tmp_path):
    killed_write(store, tmp_path, ADAPTER, 1000)
    lease(store, f"{EXPERTS}/_inflight.json", expires_in=3 * DAY)
    assert find_garbage(store, min_age_s=DAY, now=time.time() + 2 * DAY) == ([], [])


def test_jobs_gc_lists_and_deletes_an_unfinished_write(tiny_config, tmp_path, capsys):
    config = str(tiny_config())
    store = local_store(tmp_path)
    killed_write(store, tmp_path, ADAPTER, 2048)
    [write] = store.list_unfinished_writes(WRITTEN)
    then = time.time() - 2 * DAY
    os.utime(store.root / write.key, (then, then))
    code, listed, err = gc(capsys, "--config", config)
    assert code == 0 and listed["totals"] == {"unfinished write": {"groups": 1, "objects": 1, "bytes": 2048}}
    assert f"| unfinished write | {store.url(write.key)} | 1 | 2.0 KiB | 48.0 h ago |" in err
    code, deleted, _ = gc(capsys, "--config", config, "--delete")
    assert code == 0 and deleted["deleted_prefixes"] == [write.key]
    assert store.list_unfinished_writes(WRITTEN) == [] and not (store.root / write.key).exists()


def test_a_store_that_will_not_list_uploads_still_has_its_other_garbage_found(tmp_path, monkeypatch):
    """An S3 role may list and delete objects without s3:ListBucketMultipartUploads: the rest of
    the garbage is still found, with a warning saying what was not looked for."""
    from selma_core.errors import ConfigError

    store = local_store(tmp_path)
    killed = killed_commit(store, PROMPTS)

    def refused(prefixes) -> list:
        raise ConfigError("list uploads s3://bucket refused by S3 endpoint: AccessDenied")

    monkeypatch.setattr(store, "list_unfinished_writes", refused)
    found, warnings = find_garbage(store, min_age_s=DAY, now=time.time() + 2 * DAY)
    assert [g.prefix for g in found] == [f"{PROMPTS}/{killed}"]
    [warning] = warnings
    assert warning.startswith("unfinished writes not looked for: list uploads s3://bucket refused")
    assert "s3:ListBucketMultipartUploads" in warning


def test_only_this_projects_uploads_are_judged_in_a_bucket_shared_with_other_tools(moto_s3):
    """A store at the bucket's root: another tool's upload (a resumable backup) is not ours to abort,
    and a key this store cannot have written ("eval//x", which S3 takes) is passed over, not a crash."""
    store = open_store(StorageConfig(uri=f"s3://{BUCKET}", endpoint_url=moto_s3))
    client = store.client
    for key in ("backups/db.tar", "eval//stray.bin", ADAPTER):
        upload = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 10)
    try:
        found, _ = find_garbage(store, min_age_s=DAY, now=time.time() + 2 * DAY)
        assert [(g.kind, g.key) for g in found] == [("unfinished write", ADAPTER)]
    finally:
        for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=BUCKET):
            for upload in page.get("Uploads", []):
                client.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])


def test_jobs_gc_goes_on_when_an_upload_may_not_be_aborted(tiny_config, tmp_path, capsys, monkeypatch):
    """No s3:AbortMultipartUpload: that upload is spared, named, and the rest is collected."""
    from selma_core.errors import ConfigError
    from selma_core.storage.local import LocalArtifactStore

    config = str(tiny_config())
    store = local_store(tmp_path)
    killed_write(store, tmp_path, ADAPTER, 100)
    [write] = store.list_unfinished_writes(WRITTEN)
    killed = killed_commit(store, PROMPTS)
    then = time.time() - 2 * DAY
    os.utime(store.root / write.key, (then, then))
    aged(store, "prompts", 2 * DAY)

    def refused(self, write) -> bool:
        raise ConfigError("abort upload refused by S3 endpoint: AccessDenied")

    monkeypatch.setattr(LocalArtifactStore, "discard_unfinished_write", refused)
    code, outcome, err = gc(capsys, "--config", config, "--delete")
    assert code == 0 and outcome["deleted_prefixes"] == [f"{PROMPTS}/{killed}"]
    assert outcome["spared_prefixes"] == [write.key]
    assert f"{store.url(write.key)}: spared: abort upload refused by S3 endpoint: AccessDenied" in err
