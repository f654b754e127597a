"""The Kubernetes executor end to end against a stateful fake API server over HTTP (tests/fake_kube.py),
driven through the official ``kubernetes`` client: the fake plays the cluster, marking Jobs running,
succeeded or failed; the controller's DAG, watch, reconciliation and cancellation are the real code.
The store (moto S3) and tracking (an MLflow server) are real services."""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from fake_kube import FakeKubeAPI, role_rules

from jobs.dag import run_dag
from jobs.executors import job_command
from jobs.executors.kubernetes import KubernetesExecutor
from jobs.submit import submit
from selma_core.config import load_config
from selma_core.errors import ConfigError
from selma_core.plan import build_plan
from selma_core.skills import load_skills
from tests.conftest import REPO, S3_BUCKET, write_config


@pytest.fixture
def cluster():
    # The controller's Role as k8s/rbac.yaml grants it: a call it needs and the Role lacks is a 403.
    with FakeKubeAPI(allowed=role_rules(REPO / "k8s" / "rbac.yaml", "selma-controller")) as api:
        yield api
        assert not api.errors, api.errors


@pytest.fixture
def k8s_config(tmp_path, model_cache, moto_s3, mlflow_server, cluster):
    """Factory: a demo-like pipeline on the fake cluster, real S3 and a real MLflow server."""

    def make(name: str = "selma-k8s", **overrides) -> Path:
        kubeconfig = cluster.write_kubeconfig(tmp_path / "kubeconfig")
        return write_config(
            tmp_path,
            model_cache,
            name=name,
            storage={"uri": f"s3://{S3_BUCKET}/{name}-{time.time_ns()}", "endpoint_url": moto_s3},
            tracking={"uri": mlflow_server},
            executor={
                "kind": "kubernetes",
                "max_parallel": 4,
                "log_dir": str(tmp_path / "logs"),
                "kubernetes": {"kubeconfig": str(kubeconfig), "context": "fake"},
            },
            **overrides,
        )

    return make


def result_log(job: dict, index: int | None) -> str:
    """What ``jobs.run`` prints in the pod: progress, then its JSON result as the last line."""
    ids = job["metadata"]["annotations"]["selma.io/jobs"].split(",")
    job_id = ids[index or 0]
    return (
        f"working on {job_id}\n"
        + json.dumps({"job": job_id, "status": "ran", "run_id": f"run-{job_id}"})
        + "\n"
    )


def run_everything(config: Path, fail: set[str] = frozenset()):
    """A fake scheduler: every Job runs at once; jobs named in ``fail`` exit 1, the others commit
    a stand-in output at their key, as jobs.run would (the controller checks it is there)."""
    import tempfile

    from selma_core.storage import open_store

    store = open_store(load_config(config).storage)

    def policy(job: dict):
        ids = job["metadata"]["annotations"]["selma.io/jobs"].split(",")
        keys = job["metadata"]["annotations"]["selma.io/outputs"].split(",")
        indexed = job["spec"].get("completionMode") == "Indexed"
        for job_id, key in zip(ids, keys, strict=True):
            if job_id not in fail:
                with tempfile.TemporaryDirectory() as folder:
                    (Path(folder) / "result.txt").write_text(job_id)
                    store.commit_dir(Path(folder), key)
        return [
            (i if indexed else None, 1 if job_id in fail else 0, result_log(job, i))
            for i, job_id in enumerate(ids)
        ]

    return policy


def submit_args(config: Path, *extra: str) -> argparse.Namespace:
    from jobs.submit import build_parser

    return build_parser().parse_args(["--phase", "all", "--config", str(config), *extra])


def test_pipeline_runs_as_jobs_in_dependency_order(cluster, k8s_config, tmp_path):
    config = k8s_config(merge_search={"enabled": True, "strategy": "random", "samples": 2})
    cluster.auto_run(run_everything(config))
    code, outcomes = submit(submit_args(config))
    assert code == 0, [o.to_dict() for o in outcomes]
    assert {o.status for o in outcomes} == {"ran"}
    by_job = {o.job: o for o in outcomes}
    assert by_job["train:counting"].run_id == "run-train:counting"  # read from the pod's log
    log = Path(by_job["train:counting"].log)
    assert log.is_file() and "working on train:counting" in log.read_text()

    # One POST per Job, no duplicates; the merge-weight candidates are one Indexed Job.
    posts = [path for method, path in cluster.requests if method == "POST" and path.endswith("/jobs")]
    jobs = cluster.jobs()
    assert len(posts) == len(jobs)
    candidates = [j for j in jobs if j["spec"].get("completionMode") == "Indexed"]
    assert len(candidates) == 1 and candidates[0]["spec"]["completions"] == 3
    assert [o.status for o in outcomes if o.job.startswith("merge-search#")] == ["ran"] * 3

    # Dependency order: a Job is created only after every Job it reads from has finished.
    cfg = load_config(config)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    created = {}
    finished = {}
    for job in jobs:
        for job_id in job["metadata"]["annotations"]["selma.io/jobs"].split(","):
            created[job_id] = job["metadata"]["creationTimestamp"]
            finished[job_id] = job["status"]["completionTime"]
    for spec in plan.jobs.values():
        for dep in spec.deps:
            assert finished[dep] <= created[spec.id], f"{spec.id} started before {dep} finished"
    # Every Job carries the pipeline's MLflow run.
    runs = {j["metadata"]["annotations"]["selma.io/mlflow-run-id"] for j in jobs}
    assert len(runs) == 1 and "assigned" not in runs.pop()
    config_maps = cluster.objects("configmaps")
    assert len(config_maps) == 1 and "config.yaml" in config_maps[0]["data"]


def test_a_failed_job_stops_its_dependents_and_is_named(cluster, k8s_config, capsys):
    config = k8s_config()
    cluster.auto_run(run_everything(config, fail={"train:counting"}))
    code, outcomes = submit(submit_args(config))
    assert code == 1
    by_job = {o.job: o for o in outcomes}
    assert by_job["train:counting"].status == "failed"
    assert by_job["train:spatial"].status == "ran"  # the other skill goes on
    assert by_job["merge"].status == "blocked" and by_job["merge"].blocked_by == "train:counting"
    assert by_job["eval"].status == "blocked"
    failed_job = next(
        j for j in cluster.jobs() if j["metadata"]["annotations"]["selma.io/jobs"] == "train:counting"
    )
    assert failed_job["metadata"]["name"] in by_job["train:counting"].error
    assert "FAILED train:counting" in capsys.readouterr().err
    assert not [j for j in cluster.jobs() if j["metadata"]["labels"]["selma.io/phase"] in ("merge", "eval")]


def drive(cluster: FakeKubeAPI, stop: threading.Event, before_finishing=None) -> threading.Thread:
    """Run each new Job by hand (start, then finish), calling ``before_finishing(n)`` for the n-th."""

    def loop() -> None:
        done: set[str] = set()
        while not stop.is_set():
            for job in cluster.jobs():
                name = job["metadata"]["name"]
                if name in done:
                    continue
                done.add(name)
                cluster.start_job(name, log="")
                if before_finishing:
                    before_finishing(len(done))
                cluster.finish_job(name, 0, log=result_log(job, None))
            time.sleep(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def executor_and_plan(config: Path, tmp_path: Path):
    cfg = load_config(config)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    return KubernetesExecutor(cfg, tmp_path / "logs"), plan


def run(executor: KubernetesExecutor, jobs) -> list:
    return run_dag(
        jobs,
        executor,
        lambda job: job_command(job, executor.job_config_path),
        {},
        max_parallel=4,
        is_committed=lambda job: False,
        output_url=lambda job: job.key,
        poll_interval=0.05,
    )


def test_the_watch_survives_410_gone_and_dropped_connections(cluster, k8s_config, tmp_path):
    executor, plan = executor_and_plan(k8s_config(), tmp_path)

    def faults(n: int) -> None:
        if n == 2:
            cluster.expire_history()  # the watch's resourceVersion is compacted away: 410 Gone
        if n == 4:
            cluster.drop_watches()  # the connection drops mid-stream
        if n == 6:
            cluster.expire_history()

    stop = threading.Event()
    thread = drive(cluster, stop, faults)
    try:
        outcomes = run(executor, list(plan.jobs.values()))
    finally:
        stop.set()
        thread.join()
        executor.close()
    assert [o.status for o in outcomes] == ["ran"] * len(plan.jobs)
    assert executor._watcher.relists >= 1  # it listed again instead of missing events


def test_resubmission_adopts_the_running_job(cluster, k8s_config, tmp_path):
    config = k8s_config()
    first, plan = executor_and_plan(config, tmp_path)
    second, _ = executor_and_plan(config, tmp_path)
    job = plan.job("prompts", "counting")
    command = job_command(job, first.job_config_path)
    try:
        first.submit(job, command, {})
        handle = second.submit(job, command, {})  # a second controller, same work: 409, adopted
        assert len(cluster.jobs()) == 1
        name = cluster.jobs()[0]["metadata"]["name"]
        assert handle.ref == name
        cluster.start_job(name)
        cluster.finish_job(name, 0, log=result_log(cluster.jobs()[0], None))
        deadline = time.monotonic() + 10
        while second.poll(handle).state.value != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Finished, but wanted again (its output went missing, or --force): replaced, still one Job.
        uid = cluster.jobs()[0]["metadata"]["uid"]
        third, _ = executor_and_plan(config, tmp_path)
        replaced = third.submit(job, command, {})
        assert len(cluster.jobs()) == 1 and cluster.jobs()[0]["metadata"]["uid"] != uid
        # The old Job's end (and its deletion) is not the new one's: it stays pending until it runs.
        time.sleep(0.3)
        assert third.poll(replaced).state.value == "pending"
        cluster.start_job(name)
        cluster.finish_job(name, 0, log=result_log(cluster.jobs()[0], None))
        while third.poll(replaced).state.value != "succeeded":
            assert time.monotonic() < deadline + 10
            time.sleep(0.05)
        third.close()
    finally:
        first.close()
        second.close()


def test_interrupt_and_jobs_cancel_delete_the_pipelines_jobs(cluster, k8s_config, tmp_path):
    from jobs.cancel import main as cancel_main
    from jobs.dag import run_dag as dag

    config = k8s_config()
    executor, plan = executor_and_plan(config, tmp_path)

    def interrupt(line: str) -> None:
        if line.startswith("started"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dag(
            list(plan.jobs.values()),
            executor,
            lambda job: job_command(job, executor.job_config_path),
            {},
            max_parallel=4,
            is_committed=lambda job: False,
            output_url=lambda job: job.key,
            echo=interrupt,
        )
    executor.close()
    assert cluster.jobs() == []
    assert {d["propagationPolicy"] for d in cluster.delete_requests} == {"Background"}

    # A Job left by a controller that died: jobs.cancel removes it.
    other, _ = executor_and_plan(config, tmp_path)
    other.submit(plan.job("prompts", "spatial"), job_command(plan.job("prompts", "spatial"), "/x"), {})
    other.close()
    assert len(cluster.jobs()) == 1
    assert cancel_main(["--config", str(config)]) == 0
    assert cluster.jobs() == []


def test_ctrl_c_as_the_api_creates_a_job_still_cancels_it(cluster, k8s_config, tmp_path):
    """The Job exists once the create call returns: a Ctrl-C then waits for its handle, and the
    cancel that follows deletes it (else it ran, unwatched, until its deadline)."""
    import signal

    executor, plan = executor_and_plan(k8s_config(), tmp_path)
    executor._connect()
    real = executor._batch.create_namespaced_job

    def create(*args, **kwargs):
        created = real(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the API's answer is read
        return created

    executor._batch.create_namespaced_job = create
    with pytest.raises(KeyboardInterrupt):
        run(executor, [plan.job("prompts", "counting")])
    executor.close()
    assert cluster.jobs() == []


def multi_node_training(config: Path) -> Path:
    """``config`` with train jobs on two nodes (an Indexed Job and a headless Service each)."""
    data = yaml.safe_load(config.read_text())
    data["executor"]["kubernetes"].update(train_gpus=1, train_nodes=2)
    config.write_text(yaml.safe_dump(data))
    return config


def test_a_multi_node_train_jobs_service_replaces_a_stale_one_and_a_refused_one_ends_the_job(
    cluster, k8s_config, tmp_path, monkeypatch
):
    from kubernetes.client.exceptions import ApiException

    from jobs.cancel import main as cancel_main

    config = multi_node_training(k8s_config())
    executor, plan = executor_and_plan(config, tmp_path)
    job = plan.job("train", "counting")
    command = job_command(job, executor.job_config_path)
    name = executor.manifests([job], command, {})[0]["metadata"]["name"]
    try:
        # The Service of an earlier Job of this name, not yet garbage-collected: replaced by one
        # that the new Job owns (else the collector would remove it under the new Job's pods).
        stale = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": "an-earlier-job"}
        cluster.create(
            "services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "ownerReferences": [stale]},
                "spec": {"clusterIP": "None", "selector": {"batch.kubernetes.io/job-name": name}},
            },
        )
        handle = executor.submit(job, command, {})
        [service] = cluster.objects("services", "selma")
        assert service["metadata"]["ownerReferences"][0]["uid"] == handle.extra["uid"]
        assert cancel_main(["--config", str(config)]) == 0  # the Job and its Service go
        assert cluster.jobs() == [] and cluster.objects("services", "selma") == []

        # Creating the Service refused (RBAC without services): the Job just created is deleted,
        # not left holding its GPUs with no controller watching it.
        def refused(*args, **kwargs):
            raise ApiException(status=403, reason="Forbidden")

        monkeypatch.setattr(executor._core, "create_namespaced_service", refused)
        with pytest.raises(ConfigError, match=f"create Service {name}"):
            executor.submit(job, command, {})
        assert cluster.jobs() == []
    finally:
        executor.close()


def test_cancelling_while_the_api_is_down_gives_up_at_a_deadline_deleting_each_job_once(
    cluster, k8s_config, tmp_path, monkeypatch
):
    """The DAG cancels with interrupts ignored: an unreachable API server must not hold the controller
    through every retry of every handle (an Indexed Job's shards share one Job)."""
    import urllib3

    from jobs.executors import kubernetes as k8s_executor
    from jobs.executors.base import JobHandle

    executor, plan = executor_and_plan(k8s_config(), tmp_path)
    try:
        executor._connect()
        asked: list[str] = []

        def unreachable(name, namespace, **kwargs):
            asked.append(name)
            raise urllib3.exceptions.MaxRetryError(None, "/apis/batch/v1", "connection refused")

        monkeypatch.setattr(executor._batch, "delete_namespaced_job", unreachable)
        monkeypatch.setattr(k8s_executor, "CANCEL_DEADLINE_S", 2.5)
        shards = [
            JobHandle(job=plan.job("images", s), ref="images-batch", extra={})
            for s in ("counting", "spatial")
        ]
        errors = executor.cancel_all(shards)
        assert set(errors) == {"images:counting", "images:spatial"}
        assert all("run python -m jobs.cancel to delete Job images-batch" in str(e) for e in errors.values())
        assert set(asked) == {"images-batch"} and len(asked) <= 4  # tried until the deadline, not 2 x 7 times
    finally:
        executor.close()


class FakeClock:
    """``time`` for the executor's module: sleeping moves the clock, and takes no time."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_an_api_call_retries_an_outage_through_its_retries_or_until_its_deadline(monkeypatch):
    """One retry loop for every call: ``API_RETRIES`` with backoff, or, for cancelling, until a
    deadline, each request's timeout and each wait cut to the time left."""
    from types import SimpleNamespace

    import urllib3
    from kubernetes.client.exceptions import ApiException

    from jobs.executors import kubernetes as k8s_executor
    from selma_core.errors import EndpointError

    clock = FakeClock()
    monkeypatch.setattr(k8s_executor, "time", clock)
    said: list[str] = []
    executor = SimpleNamespace(echo=said.append)
    api = SimpleNamespace(api_client=SimpleNamespace(configuration=SimpleNamespace(host="https://k8s:6443")))
    timeouts: list[float] = []

    def failing(error: Exception):
        def call(*args, _request_timeout: float, **kwargs):
            timeouts.append(_request_timeout)
            raise error

        return call

    busy = ApiException(status=503, reason="Service Unavailable")
    with pytest.raises(ApiException) as raised:
        KubernetesExecutor._call(executor, "read Job x", api, failing(busy))
    assert raised.value is busy and len(timeouts) == k8s_executor.API_RETRIES + 1
    assert clock.slept == [0.5, 1, 2, 4, 8, 16] and len(said) == 6 and "retrying in 0.5s" in said[0]

    timeouts.clear()
    clock.slept.clear()
    down = urllib3.exceptions.MaxRetryError(None, "/apis/batch/v1", "connection refused")
    with pytest.raises(EndpointError, match="Kubernetes API https://k8s:6443 unreachable: delete Job x"):
        KubernetesExecutor._call(executor, "delete Job x", api, failing(down), deadline=clock.now + 10)
    assert clock.slept == [0.5, 1, 2, 4, 2.5]  # the last wait cut to the deadline
    assert timeouts == [10, 9.5, 8.5, 6.5, 2.5, 1.0]  # the last request still gets a second

    timeouts.clear()
    refused = ApiException(status=403, reason="Forbidden")
    with pytest.raises(ApiException):
        KubernetesExecutor._call(executor, "delete Job x", api, failing(refused), deadline=clock.now + 10)
    assert len(timeouts) == 1  # a refusal is not retried


def test_local_store_is_refused_before_anything_is_submitted(cluster, tmp_path, model_cache):
    kubeconfig = cluster.write_kubeconfig(tmp_path / "kubeconfig")
    config = write_config(
        tmp_path,
        model_cache,
        executor={"kind": "kubernetes", "kubernetes": {"kubeconfig": str(kubeconfig), "context": "fake"}},
    )
    from jobs.submit import main

    assert main(["--phase", "all", "--config", str(config)]) == 2
    assert not [r for r in cluster.requests if r[0] == "POST"]


def test_follow_logs_streams_the_running_pods_log(cluster, k8s_config, tmp_path):
    cfg = load_config(k8s_config())
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    lines: list[str] = []
    executor = KubernetesExecutor(cfg, tmp_path / "logs", follow_logs=True, echo=lines.append)
    job = plan.job("prompts", "counting")
    try:
        handle = executor.submit(job, job_command(job, executor.job_config_path), {})
        cluster.start_job(handle.ref, log="wave 1: 8 prompts\n")
        deadline = time.monotonic() + 10
        while executor.poll(handle).state.value != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cluster.append_log(handle.ref, "wave 2: 16 prompts\n")
        while not any("wave 2" in line for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        cluster.finish_job(handle.ref, 0, log=result_log(cluster.jobs()[0], None))
        while executor.poll(handle).state.value != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        executor.close()
    assert "[prompts:counting] wave 1: 8 prompts" in lines
    assert "[prompts:counting] wave 2: 16 prompts" in lines


def test_a_configuration_error_fails_at_once_and_a_pod_that_cannot_start_fails(
    cluster, k8s_config, tmp_path, monkeypatch
):
    import jobs.executors.kubernetes as kubernetes_executor

    monkeypatch.setattr(kubernetes_executor, "STALL_S", 0.0)
    executor, plan = executor_and_plan(k8s_config(), tmp_path)
    counting, spatial = plan.job("prompts", "counting"), plan.job("prompts", "spatial")
    try:
        bad_config = executor.submit(counting, job_command(counting, executor.job_config_path), {})
        no_image = executor.submit(spatial, job_command(spatial, executor.job_config_path), {})
        # Exit 2 (invalid configuration): the podFailurePolicy fails the Job without retries.
        cluster.finish_job(
            bad_config.ref, 2, log='{"status": "failed", "error": "bad key", "exit_code": 2}\n'
        )
        # The image cannot be pulled: waiting would last until the Job's deadline.
        cluster.start_job(no_image.ref)
        pod = cluster.pods(job=no_image.ref)[0]["metadata"]["name"]

        def image_pull_backoff(pod: dict) -> None:
            pod["status"]["phase"] = "Pending"
            pod["status"]["containerStatuses"][0]["state"] = {
                "waiting": {"reason": "ImagePullBackOff", "message": "pull access denied for selma-job"}
            }

        cluster.mutate("pods", "selma", pod, image_pull_backoff)
        cluster.mutate("jobs", "selma", no_image.ref, lambda job: job["status"].pop("ready", None))
        deadline = time.monotonic() + 10
        states = {}
        while len(states) < 2:
            assert time.monotonic() < deadline, states
            for handle in (bad_config, no_image):
                status = executor.poll(handle)
                if status.state.value == "failed":
                    states[handle.job.id] = status
            time.sleep(0.05)
    finally:
        executor.close()
    assert states["prompts:counting"].exit_code == 2
    assert (
        "PodFailurePolicy" in states["prompts:counting"].result["error"]
        or "bad key" in states["prompts:counting"].result["error"]
    )
    assert "ImagePullBackOff" in states["prompts:spatial"].result["error"]
    assert states["prompts:spatial"].exit_code == 1  # a pull may fail on the registry's side: retryable
    assert no_image.ref not in [j["metadata"]["name"] for j in cluster.jobs()]  # deleted, not left waiting


def test_a_job_without_pods_and_a_group_with_one_node_unscheduled_are_reported(
    cluster, k8s_config, tmp_path, monkeypatch
):
    """Waiting, not failing: a Job whose pods the cluster refuses to create (a missing
    ServiceAccount, a quota: only its events say FailedCreate), and a two-node train Job whose second
    pod cannot be scheduled while the first runs (its torchrun waits for it: before, one ready pod
    passed for the whole group, and nothing was said)."""
    import jobs.executors.kubernetes as kubernetes_executor

    monkeypatch.setattr(kubernetes_executor, "STALL_S", 0.0)
    config = multi_node_training(k8s_config())
    lines: list[str] = []
    cfg = load_config(config)
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    executor = KubernetesExecutor(cfg, tmp_path / "logs", echo=lines.append)
    prompts, train = plan.job("prompts", "counting"), plan.job("train", "counting")
    try:
        no_pods = executor.submit(prompts, job_command(prompts, executor.job_config_path), {})
        group = executor.submit(train, job_command(train, executor.job_config_path), {})
        cluster.start_job(group.ref, index=0)
        waiting = cluster.start_job(group.ref, index=1)

        def unschedulable(pod: dict) -> None:
            pod["status"]["phase"] = "Pending"
            pod["status"]["containerStatuses"] = []
            pod["status"]["conditions"] = [
                {"type": "PodScheduled", "status": "False", "message": "0/3 nodes have 4 free nvidia.com/gpu"}
            ]

        cluster.mutate("pods", "selma", waiting, unschedulable)
        cluster.mutate("jobs", "selma", group.ref, lambda job: job["status"].update(ready=1, active=2))
        deadline = time.monotonic() + 10
        said = ("has no pod yet", f"pod {waiting} not scheduled yet: 0/3 nodes have 4 free nvidia.com/gpu")
        while not all(any(part in line for line in lines) for part in said):
            assert time.monotonic() < deadline, lines
            for handle in (no_pods, group):
                assert executor.poll(handle).state.value in ("pending", "running")
            time.sleep(0.05)
    finally:
        executor.close()
    [refused] = [line for line in lines if "has no pod yet" in line]
    assert refused.startswith(f"prompts:counting: Job {no_pods.ref} has no pod yet")
    assert f"kubectl -n selma describe job {no_pods.ref}" in refused and "ServiceAccount" in refused


def test_candidates_waiting_their_turn_in_an_indexed_job_are_not_called_refused(
    cluster, k8s_config, tmp_path, monkeypatch
):
    """Merge-weight candidates run as one Indexed Job of parallelism 2: while the first two pods are
    being created, the others have no pod yet because it is not their turn, not because the cluster
    refuses them; nothing is said for them, and nothing is said twice."""
    import jobs.executors.kubernetes as kubernetes_executor

    monkeypatch.setattr(kubernetes_executor, "STALL_S", 0.0)
    config = k8s_config(merge_search={"enabled": True, "strategy": "random", "samples": 3})
    lines: list[str] = []
    cfg = load_config(config)
    cfg.executor.max_parallel = 2
    plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
    executor = KubernetesExecutor(cfg, tmp_path / "logs", echo=lines.append)
    candidates = [j for j in plan.jobs.values() if j.phase == "merge-search" and j.shard is not None]
    try:
        handles = executor.submit_batch(
            candidates, [job_command(j, executor.job_config_path) for j in candidates], {}
        )
        name = handles[0].ref
        assert cluster.get("jobs", "selma", name)["spec"]["parallelism"] == 2
        for index in (0, 1):
            pod = cluster.start_job(name, index=index)
            cluster.mutate("pods", "selma", pod, lambda p: p["status"].update(phase="Pending"))
        cluster.mutate("jobs", "selma", name, lambda job: job["status"].update(ready=0, active=2))
        for _ in range(5):
            for handle in handles:
                assert executor.poll(handle).state.value in ("pending", "running")
    finally:
        executor.close()
    assert not [line for line in lines if "has no pod" in line], lines


def test_an_images_job_on_several_pods_reports_the_committing_pod(cluster, k8s_config, tmp_path):
    executor, plan = executor_and_plan(k8s_config(images={"num_jobs": 3}), tmp_path)
    job = plan.job("images", "counting")

    def pods(committer: int | None, failed: int | None = None):
        def policy(manifest: dict):
            assert manifest["spec"]["completions"] == 3
            return [
                (
                    i,
                    1 if i == failed else 0,
                    f"process {i}\n"
                    + json.dumps(
                        {"job": job.id, "status": "ran", "run_id": f"run-{i}", "committed": i == committer}
                    )
                    + "\n",
                )
                for i in range(3)
            ]

        return policy

    try:
        cluster.auto_run(pods(committer=1))
        (outcome,) = run(executor, [job])
        assert outcome.status == "ran" and outcome.run_id == "run-1"
        assert Path(outcome.log).name == "images-counting.1-of-3.log"
        assert sorted(p.name for p in (tmp_path / "logs").iterdir() if p.name.startswith("images")) == [
            f"images-counting.{i}-of-3.log" for i in range(3)
        ]
        (created,) = [j for j in cluster.jobs() if j["metadata"]["labels"]["selma.io/phase"] == "images"]
        assert created["spec"]["completionMode"] == "Indexed" and created["spec"]["parallelism"] == 3

        for name in [j["metadata"]["name"] for j in cluster.jobs()]:  # the next run creates it again
            cluster.delete_object("jobs", "selma", name)
        cluster.auto_run(pods(committer=None))  # every pod succeeded, none committed: not done
        (outcome,) = run(executor, [job])
        assert outcome.status == "failed" and "none of the 3 pods" in outcome.error
    finally:
        executor.close()


def completed_images_job(cluster: FakeKubeAPI, executor: KubernetesExecutor, job):
    """Submit ``job`` on 3 pods, every pod exiting 0 and pod 2 committing; its handle once the watch
    has seen the Job complete."""
    for name in [j["metadata"]["name"] for j in cluster.jobs()]:  # a new submission makes it anew
        cluster.delete_object("jobs", "selma", name)
    handle = executor.submit(job, job_command(job, executor.job_config_path), {})
    for i in range(3):
        result = {"job": job.id, "status": "ran", "run_id": f"run-{i}", "committed": i == 2}
        cluster.finish_job(handle.ref, 0, log=json.dumps(result) + "\n", index=i)
    deadline = time.monotonic() + 10
    while True:
        seen, _ = executor._watcher.get(handle.ref, handle.extra["uid"])
        if seen and any(c["type"] == "Complete" for c in (seen.get("status") or {}).get("conditions") or []):
            return handle
        assert time.monotonic() < deadline, "the watch did not see the Job complete"
        time.sleep(0.05)


class FailingLogReads:
    """``read_namespaced_pod_log`` that fails ``times`` times with ``status`` for pod 2."""

    def __init__(self, read_log, status: int, times: int) -> None:
        self.read_log, self.status, self.left = read_log, status, times

    def __call__(self, pod: str, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException

        if "-2-" in pod and self.left > 0:
            self.left -= 1
            raise ApiException(status=self.status, reason="failing on purpose")
        return self.read_log(pod, *args, **kwargs)


def test_a_completed_images_job_is_done_though_its_committing_pods_log_is_lost(cluster, k8s_config, tmp_path):
    """The Job completed; a busy API server's 503 on a log read is retried, and a pod whose log is
    gone (the Job's TTL removed it) leaves the Job's own verdict standing, not a failure."""
    executor, plan = executor_and_plan(k8s_config(images={"num_jobs": 3}), tmp_path)
    job = plan.job("images", "counting")
    said: list[str] = []
    executor.echo = said.append
    executor._connect()
    read_log = executor._core.read_namespaced_pod_log
    try:
        busy = completed_images_job(cluster, executor, job)
        executor._core.read_namespaced_pod_log = FailingLogReads(read_log, 503, times=1)
        status = executor.poll(busy)
        assert status.state.value == "succeeded" and status.result["run_id"] == "run-2"  # pod 2 speaks
        assert any("read the log of pod" in line and "retrying" in line for line in said)

        lost = completed_images_job(cluster, executor, job)
        executor._core.read_namespaced_pod_log = FailingLogReads(read_log, 404, times=100)
        status = executor.poll(lost)
        assert status.state.value == "succeeded" and status.exit_code == 0
        assert "the logs of 1 of its 3 pods could not be read" in said[-1]
    finally:
        executor._core.read_namespaced_pod_log = read_log
        executor.close()


def test_a_job_the_watch_never_saw_end_is_read_directly_not_waited_for_forever(
    cluster, k8s_config, tmp_path, monkeypatch
):
    """The watch is down while a Job is created, ends and is deleted, and the server compacts its
    history: the relisted watch has no record of it. Polling reads it directly instead of waiting."""
    from jobs.executors import kubernetes as k8s_executor

    monkeypatch.setattr(k8s_executor, "UNSEEN_S", 0.5)
    executor, plan = executor_and_plan(k8s_config(), tmp_path)
    job = plan.job("merge")
    try:
        executor._connect()
        deadline = time.monotonic() + 10
        while cluster.open_watches < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cluster.drop_watches()
        handle = executor.submit(job, job_command(job, executor.job_config_path), {})
        cluster.finish_job(handle.ref, 0, log=json.dumps({"job": "merge", "status": "ran"}) + "\n")
        cluster.delete_object("jobs", "selma", handle.ref)
        cluster.expire_history()
        deadline = time.monotonic() + 10
        while (status := executor.poll(handle)).state.value == "pending":
            assert time.monotonic() < deadline, "still pending"
            time.sleep(0.1)
        assert status.state.value == "failed"
        assert "is gone, and the controller never saw it end" in status.result["error"]
    finally:
        executor.close()


def test_a_failed_multi_node_train_job_is_restarted_whole_but_not_after_exit_2_or_its_limit(
    cluster, k8s_config, tmp_path
):
    """A preempted node ends its peers (exit 1): the Job fails at once (its pods cannot be retried
    one by one), and the controller starts the whole group again, up to backoff_limit times. Exit 2
    (the configuration's) is not retried."""
    config = multi_node_training(k8s_config())
    data = yaml.safe_load(config.read_text())
    data["executor"]["kubernetes"]["backoff_limit"] = 1
    config.write_text(yaml.safe_dump(data))
    executor, plan = executor_and_plan(config, tmp_path)
    job = plan.job("train", "counting")
    command = job_command(job, executor.job_config_path)

    def settle(handle):
        deadline = time.monotonic() + 30  # a loaded machine's watch may lag
        while (status := executor.poll(handle)).state.value in ("pending", "running"):
            assert time.monotonic() < deadline, "no verdict"
            time.sleep(0.05)
        return status

    def fail_a_node(handle, exit_code):
        uid = handle.extra["uid"]
        cluster.start_job(handle.ref, index=0)
        cluster.finish_job(handle.ref, exit_code, index=1, log="lost my peer\n")
        deadline = time.monotonic() + 30
        while (status := executor.poll(handle)).state.value == "running" or (
            status.state.value == "pending" and handle.extra["uid"] == uid
        ):
            assert time.monotonic() < deadline, "the failure was not seen"
            time.sleep(0.05)
        return status

    try:
        handle = executor.submit(job, command, {})
        first_uid = handle.extra["uid"]
        # Node 1 is lost: the group starts again (a new Job, with its Service), and then succeeds.
        assert fail_a_node(handle, 1).state.value == "pending"
        assert handle.extra["uid"] != first_uid and handle.extra["restarts"] == 1
        [again] = cluster.jobs()
        assert again["metadata"]["uid"] == handle.extra["uid"]
        [service] = cluster.objects("services", "selma")
        assert service["metadata"]["ownerReferences"][0]["uid"] == handle.extra["uid"]
        assert (tmp_path / "logs" / f"{job.name}.attempt-1.1.log").read_text() == "lost my peer\n"
        cluster.finish_job(handle.ref, 0, index=1)
        cluster.finish_job(handle.ref, 0, index=0, log=result_log(again, None))
        status = settle(handle)
        assert status.state.value == "succeeded", status

        # Past backoff_limit (1 restart), a second failure is the job's.
        handle = executor.submit(job, command, {})
        assert fail_a_node(handle, 1).state.value == "pending"
        status = fail_a_node(handle, 1)
        assert status.state.value == "failed" and status.exit_code == 1
        assert "PodFailurePolicy" in status.result["error"]

        # Exit 2 on any node: not restarted.
        handle = executor.submit(job, command, {})
        status = fail_a_node(handle, 2)
        assert status.state.value == "failed" and handle.extra["restarts"] == 0

        # Failed, then deleted (jobs.cancel) before the controller looked: not started again.
        handle = executor.submit(job, command, {})
        cluster.start_job(handle.ref, index=0)
        cluster.finish_job(handle.ref, 1, index=1)
        cluster.delete_object("jobs", "selma", handle.ref)
        status = settle(handle)
        assert status.state.value == "failed" and handle.extra["restarts"] == 0
        assert cluster.jobs() == []
    finally:
        executor.close()


def test_configmaps_of_earlier_configs_that_no_job_uses_are_deleted_once_old(cluster, k8s_config, tmp_path):
    """Nothing owns a pipeline's ConfigMap (it serves all the Jobs of one config), so the controller
    deletes the ones no Job uses; a young one may be another controller's about to be used: kept."""
    from datetime import UTC, datetime, timedelta

    from jobs.executors.kubernetes_manifests import pipeline_labels

    executor, plan = executor_and_plan(k8s_config(), tmp_path)

    def config_map(name: str, age_s: float) -> None:
        cluster.create(
            "configmaps",
            {"metadata": {"name": name, "labels": pipeline_labels("selma-k8s")}, "data": {"a": "b"}},
        )
        then = (datetime.now(UTC) - timedelta(seconds=age_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
        cluster.mutate("configmaps", "selma", name, lambda cm: cm["metadata"].update(creationTimestamp=then))

    config_map("selma-k8s-config-old", 7200)
    config_map("selma-k8s-config-young", 60)
    config_map("selma-k8s-config-in-use", 7200)
    train = plan.job("train", "counting")
    [running] = executor.manifests([train], job_command(train, executor.job_config_path), {})[:1]
    for volume in running["spec"]["template"]["spec"]["volumes"]:
        if volume["name"] == "config":
            volume["configMap"]["name"] = "selma-k8s-config-in-use"  # a Job of an earlier config
    cluster.create("jobs", running)
    merge = plan.job("merge")
    try:
        executor.submit(merge, job_command(merge, executor.job_config_path), {})
    finally:
        executor.close()
    assert {cm["metadata"]["name"] for cm in cluster.objects("configmaps", "selma")} == {
        "selma-k8s-config-young",
        "selma-k8s-config-in-use",
        executor.config_map["metadata"]["name"],
    }
