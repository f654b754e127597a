"""The fake Kubernetes API (tests/fake_kube.py), driven through the official ``kubernetes`` client.

Why: the executor's tests trust this fake; these tests pin that it speaks the wire format the real
client parses (models, ``Status`` errors, watch streams and their 410/retry behaviour, logs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import urllib3
from fake_kube import FakeKubeAPI, compress_indexes, parse_indexes

pytest.importorskip("kubernetes")
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

NS = "selma"


class Kube(NamedTuple):
    fake: FakeKubeAPI
    batch: client.BatchV1Api
    core: client.CoreV1Api


@pytest.fixture
def kube(tmp_path) -> Iterator[Kube]:
    with FakeKubeAPI() as fake:
        path = fake.write_kubeconfig(tmp_path / "kubeconfig", namespace=NS, context="fake")
        api_client = config.new_client_from_config(config_file=str(path), context="fake")
        try:
            yield Kube(fake, client.BatchV1Api(api_client), client.CoreV1Api(api_client))
        finally:
            api_client.close()
        assert fake.errors == []


def job(
    name: str | None = None, labels: dict | None = None, generate_name: str | None = None, **spec
) -> client.V1Job:
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=client.V1ObjectMeta(name=name, generate_name=generate_name, labels=labels),
        spec=client.V1JobSpec(
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "selma"}),
                spec=client.V1PodSpec(
                    restart_policy="Never",
                    containers=[client.V1Container(name="main", image="selma:test", command=["true"])],
                ),
            ),
            **spec,
        ),
    )


def error_body(e: ApiException) -> dict:
    return json.loads(e.body)


def watch_requests(fake: FakeKubeAPI) -> list[dict[str, str]]:
    """The query of every watch on the jobs in NS."""
    jobs = f"/apis/batch/v1/namespaces/{NS}/jobs"
    return [q for method, path, q in fake.request_log if (method, path) == ("GET", jobs) and q.get("watch")]


def test_create_get_and_list_with_label_selector(kube: Kube) -> None:
    fake, batch, _ = kube
    created = batch.create_namespaced_job(NS, job("a", labels={"phase": "train", "skill": "counting"}))
    batch.create_namespaced_job(NS, job("b", labels={"phase": "train", "skill": "spatial"}))
    generated = batch.create_namespaced_job(NS, job(generate_name="eval-", labels={"phase": "eval"}))

    assert created.metadata.namespace == NS and created.metadata.uid and created.metadata.generation == 1
    assert created.metadata.creation_timestamp is not None
    template_labels = created.spec.template.metadata.labels
    assert template_labels["batch.kubernetes.io/job-name"] == template_labels["job-name"] == "a"
    assert template_labels["app"] == "selma"
    assert created.spec.backoff_limit == 6 and created.spec.completions == 1
    assert generated.metadata.name.startswith("eval-") and len(generated.metadata.name) == len("eval-") + 5

    got = batch.read_namespaced_job("a", NS)
    assert got.metadata.uid == created.metadata.uid

    listing = batch.list_namespaced_job(NS, label_selector="phase=train,skill!=spatial")
    assert [j.metadata.name for j in listing.items] == ["a"]
    assert int(listing.metadata.resource_version) == fake.resource_version == 4
    assert {j.metadata.name for j in batch.list_namespaced_job(NS, label_selector="skill").items} == {
        "a",
        "b",
    }
    assert [
        j.metadata.name for j in batch.list_namespaced_job(NS, field_selector="metadata.name=b").items
    ] == ["b"]
    assert [j["metadata"]["name"] for j in fake.jobs()] == ["a", "b", generated.metadata.name]
    assert [r for r in fake.requests if r[0] == "POST"] == [
        ("POST", f"/apis/batch/v1/namespaces/{NS}/jobs")
    ] * 3

    with pytest.raises(ApiException) as missing:
        batch.read_namespaced_job("nope", NS)
    assert missing.value.status == 404 and error_body(missing.value)["reason"] == "NotFound"


def test_duplicate_is_409_already_exists_and_invalid_is_422(kube: Kube) -> None:
    _, batch, core = kube
    batch.create_namespaced_job(NS, job("a"))
    with pytest.raises(ApiException) as dup:
        batch.create_namespaced_job(NS, job("a"))
    body = error_body(dup.value)
    assert dup.value.status == 409
    assert body["kind"] == "Status" and body["status"] == "Failure" and body["reason"] == "AlreadyExists"
    assert body["code"] == 409 and body["details"] == {"name": "a", "group": "batch", "kind": "jobs"}

    with pytest.raises(ApiException) as nameless:
        batch.create_namespaced_job(NS, job())
    assert nameless.value.status == 422 and error_body(nameless.value)["reason"] == "Invalid"

    always = job("always")
    always.spec.template.spec.restart_policy = None  # the real API rejects a Job whose pods restart
    with pytest.raises(ApiException) as restart:
        batch.create_namespaced_job(NS, always)
    assert restart.value.status == 422

    core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg")))
    with pytest.raises(ApiException) as dup_cm:
        core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg")))
    assert error_body(dup_cm.value)["message"] == 'configmaps "cfg" already exists'


def test_patch_replace_and_conflict(kube: Kube) -> None:
    _, _, core = kube
    cm = core.create_namespaced_config_map(
        NS, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="cfg"), data={"a": "1", "b": "2"})
    )
    patched = core.patch_namespaced_config_map("cfg", NS, {"data": {"a": "9", "b": None}})
    assert patched.data == {"a": "9"}
    assert int(patched.metadata.resource_version) > int(cm.metadata.resource_version)
    same = core.patch_namespaced_config_map("cfg", NS, {"data": {"a": "9"}})
    assert same.metadata.resource_version == patched.metadata.resource_version  # a no-op is no write

    cm.data = {"c": "3"}  # cm still carries the first resourceVersion: stale
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map("cfg", NS, cm)
    assert conflict.value.status == 409 and error_body(conflict.value)["reason"] == "Conflict"
    cm.metadata.resource_version = None
    assert core.replace_namespaced_config_map("cfg", NS, cm).data == {"c": "3"}


def test_delete_records_propagation_policy_and_cascades(kube: Kube) -> None:
    fake, batch, _ = kube
    for name in ("bg", "fg", "orphan"):
        batch.create_namespaced_job(NS, job(name))
        fake.start_job(name)

    batch.delete_namespaced_job("bg", NS, propagation_policy="Background")
    batch.delete_namespaced_job("fg", NS, body=client.V1DeleteOptions(propagation_policy="Foreground"))
    batch.delete_namespaced_job("orphan", NS)

    policies = [(d["name"], d["query_policy"], d["body_policy"]) for d in fake.delete_requests]
    assert policies == [("bg", "Background", None), ("fg", None, "Foreground"), ("orphan", None, None)]
    assert fake.jobs() == []
    # Like the real batch/v1 API, a delete with no policy orphans the pods.
    assert [p["metadata"]["labels"]["job-name"] for p in fake.pods()] == ["orphan"]
    assert "ownerReferences" not in fake.pods()[0]["metadata"]

    batch.create_namespaced_job(NS, job("x", labels={"run": "1"}))
    batch.create_namespaced_job(NS, job("y", labels={"run": "2"}))
    batch.delete_collection_namespaced_job(NS, label_selector="run=1", propagation_policy="Background")
    assert [j["metadata"]["name"] for j in fake.jobs()] == ["y"]
    assert fake.delete_requests[-1]["name"] is None


def test_watch_sees_added_then_modified_after_finish_job(kube: Kube) -> None:
    fake, batch, _ = kube
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    batch.create_namespaced_job(NS, job("a"))

    events = []
    w = watch.Watch()
    for event in w.stream(batch.list_namespaced_job, NS, resource_version=rv, label_selector="job-name=a"):
        events.append(event)
        if event["type"] == "ADDED":
            fake.start_job("a", log="hello\n")
            fake.finish_job("a", exit_code=0)
        conditions = event["object"].status.conditions or []
        if any(c.type == "Complete" and c.status == "True" for c in conditions):
            w.stop()

    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "MODIFIED"]
    assert all(isinstance(e["object"], client.V1Job) for e in events)
    final = events[-1]["object"]
    assert final.status.succeeded == 1 and final.status.active is None
    assert [c.type for c in final.status.conditions] == ["SuccessCriteriaMet", "Complete"]
    assert w.resource_version == final.metadata.resource_version

    pod = fake.pods(job="a")[0]
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert pod["metadata"]["labels"]["controller-uid"] == final.metadata.uid


def test_watch_from_expired_resource_version_raises_410_after_one_retry(kube: Kube) -> None:
    fake, batch, _ = kube
    batch.create_namespaced_job(NS, job("a"))
    old_rv = batch.list_namespaced_job(NS).metadata.resource_version
    batch.create_namespaced_job(NS, job("b"))
    fake.expire_history()

    # Without timeout_seconds Watch.stream retries a 410 once from the same version, then raises.
    with pytest.raises(ApiException) as gone:
        list(watch.Watch().stream(batch.list_namespaced_job, NS, resource_version=old_rv))
    assert gone.value.status == 410 and "Expired" in gone.value.reason
    assert len(watch_requests(fake)) == 2

    # With timeout_seconds it does not retry.
    fake.clear_requests()
    with pytest.raises(ApiException) as gone_now:
        list(watch.Watch().stream(batch.list_namespaced_job, NS, resource_version=old_rv, timeout_seconds=5))
    assert gone_now.value.status == 410 and len(watch_requests(fake)) == 1

    # A fresh list's resourceVersion can be watched from.
    fresh_rv = batch.list_namespaced_job(NS).metadata.resource_version
    batch.create_namespaced_job(NS, job("c"))
    w = watch.Watch()
    for event in w.stream(batch.list_namespaced_job, NS, resource_version=fresh_rv):
        assert (event["type"], event["object"].metadata.name) == ("ADDED", "c")
        w.stop()


def test_expire_history_ends_open_watches_with_410(kube: Kube) -> None:
    fake, batch, _ = kube
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    batch.create_namespaced_job(NS, job("a"))
    seen = []
    with pytest.raises(ApiException) as gone:
        for event in watch.Watch().stream(batch.list_namespaced_job, NS, resource_version=rv):
            seen.append(event["type"])
            fake.expire_history()
    assert seen == ["ADDED"] and gone.value.status == 410
    assert len(watch_requests(fake)) == 2  # the stream's 410, then the retry's
    deadline = time.monotonic() + 2  # the server's side of the stream ends just after the client's
    while fake.open_watches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.open_watches == 0


def test_drop_watches(kube: Kube) -> None:
    fake, batch, _ = kube
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    batch.create_namespaced_job(NS, job("a"))

    # A cut connection surfaces as urllib3's ProtocolError from the stream.
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for _ in watch.Watch().stream(batch.list_namespaced_job, NS, resource_version=rv):
            fake.drop_watches()

    # A graceful end makes Watch.stream reconnect from the last version it saw.
    fake.clear_requests()
    names = []
    w = watch.Watch()
    for event in w.stream(batch.list_namespaced_job, NS, resource_version=rv):
        names.append(event["object"].metadata.name)
        if len(names) == 1:
            fake.drop_watches(graceful=True)
            batch.create_namespaced_job(NS, job("b"))
        else:
            w.stop()
    assert names == ["a", "b"] and len(watch_requests(fake)) == 2


def test_watch_from_zero_lists_current_objects_first(kube: Kube) -> None:
    _, batch, _ = kube
    batch.create_namespaced_job(NS, job("a"))
    w = watch.Watch()
    for event in w.stream(batch.list_namespaced_job, NS, resource_version="0"):
        assert (event["type"], event["object"].metadata.name) == ("ADDED", "a")
        w.stop()


def test_pod_log_with_tail_lines_and_follow(kube: Kube) -> None:
    fake, batch, core = kube
    batch.create_namespaced_job(NS, job("a"))
    pod = fake.start_job("a", log="one\ntwo\nthree\n")
    assert core.read_namespaced_pod_log(pod, NS) == "one\ntwo\nthree\n"
    assert core.read_namespaced_pod_log(pod, NS, tail_lines=2, container="main") == "two\nthree\n"
    with pytest.raises(ApiException) as bad:
        core.read_namespaced_pod_log(pod, NS, container="sidecar")
    assert bad.value.status == 400

    stream = watch.Watch().stream(core.read_namespaced_pod_log, pod, NS, follow=True, tail_lines=1)
    lines = [next(stream)]  # the stream is open from here on
    fake.append_log("a", "four\n")  # a Job name means its newest pod
    lines.append(next(stream))
    fake.finish_job("a", exit_code=0, log="five\n")
    lines.extend(stream)
    assert lines == ["three", "four", "five"]  # the stream ends when the pod does


def test_failed_job_and_pod_failure_policy(kube: Kube) -> None:
    fake, batch, _ = kube
    batch.create_namespaced_job(NS, job("plain"))
    fake.finish_job("plain", exit_code=1)
    status = batch.read_namespaced_job("plain", NS).status
    assert status.failed == 1 and status.succeeded is None
    assert [(c.type, c.reason) for c in status.conditions] == [
        ("FailureTarget", "BackoffLimitExceeded"),
        ("Failed", "BackoffLimitExceeded"),
    ]
    assert fake.pods(job="plain")[0]["status"]["phase"] == "Failed"

    policy = client.V1PodFailurePolicy(
        rules=[
            client.V1PodFailurePolicyRule(
                action="FailJob",
                on_exit_codes=client.V1PodFailurePolicyOnExitCodesRequirement(operator="In", values=[2]),
            )
        ]
    )
    batch.create_namespaced_job(NS, job("pfp", backoff_limit=3, pod_failure_policy=policy))
    fake.finish_job("pfp", exit_code=1, retry=True)  # within backoffLimit: the Job goes on
    assert not batch.read_namespaced_job("pfp", NS).status.conditions
    fake.finish_job("pfp", exit_code=2, retry=True)
    status = batch.read_namespaced_job("pfp", NS).status
    assert status.failed == 2 and status.conditions[-1].type == "Failed"
    assert status.conditions[-1].reason == "PodFailurePolicy"


def test_indexed_job_completed_and_failed_indexes(kube: Kube) -> None:
    fake, batch, _ = kube
    batch.create_namespaced_job(NS, job("idx", completion_mode="Indexed", completions=5, parallelism=5))
    for index in (0, 1, 2, 4):
        pod = fake.finish_job("idx", index=index)
        assert pod.startswith(f"idx-{index}-")
    status = batch.read_namespaced_job("idx", NS).status
    assert status.completed_indexes == "0-2,4" and status.succeeded == 4 and not status.conditions
    pod = fake.pods(job="idx")[-1]["metadata"]
    assert pod["labels"]["batch.kubernetes.io/job-completion-index"] == "4"
    assert pod["annotations"]["batch.kubernetes.io/job-completion-index"] == "4"
    fake.finish_job("idx", index=3)
    status = batch.read_namespaced_job("idx", NS).status
    assert status.completed_indexes == "0-4" and status.conditions[-1].type == "Complete"

    batch.create_namespaced_job(
        NS, job("per", completion_mode="Indexed", completions=3, parallelism=3, backoff_limit_per_index=1)
    )
    fake.finish_job("per", 1, index=1)
    status = batch.read_namespaced_job("per", NS).status
    assert status.failed_indexes == "1" and not status.conditions  # the other indexes go on
    fake.finish_job("per", 0, index=0)
    fake.finish_job("per", 0, index=2)
    status = batch.read_namespaced_job("per", NS).status
    assert status.completed_indexes == "0,2" and status.failed_indexes == "1"
    assert (status.conditions[-1].type, status.conditions[-1].reason) == ("Failed", "FailedIndexes")


def test_auto_run_plays_the_job_controller(kube: Kube) -> None:
    fake, batch, core = kube

    def policy(job: dict) -> list[tuple[int | None, int, str]] | None:
        name = job["metadata"]["name"]
        if name == "manual":
            return None
        if job["spec"]["completionMode"] == "Indexed":
            return [(i, 0, f"index {i}\n") for i in range(job["spec"]["completions"])]
        return [(None, 3 if name == "bad" else 0, f"{name} ran\n")]

    fake.auto_run(policy)
    for name in ("good", "bad", "manual"):
        batch.create_namespaced_job(NS, job(name))
    batch.create_namespaced_job(NS, job("many", completion_mode="Indexed", completions=3, parallelism=3))
    fake.wait_auto_runs()

    def last_condition(name: str) -> str | None:
        conditions = batch.read_namespaced_job(name, NS).status.conditions
        return conditions[-1].type if conditions else None

    assert [last_condition(n) for n in ("good", "bad", "manual", "many")] == [
        "Complete",
        "Failed",
        None,
        "Complete",
    ]
    assert batch.read_namespaced_job("many", NS).status.completed_indexes == "0-2"
    good_pod = fake.pods(job="good")[0]["metadata"]["name"]
    assert core.read_namespaced_pod_log(good_pod, NS) == "good ran\n"
    assert fake.pods(job="manual") == []


def test_compressed_index_ranges() -> None:
    assert compress_indexes([7, 1, 3, 4, 5]) == "1,3-5,7"
    assert compress_indexes([0, 1]) == "0,1"
    assert compress_indexes([]) == ""
    assert parse_indexes("1,3-5,7") == {1, 3, 4, 5, 7}
