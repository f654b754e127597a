"""Kubernetes executor: each job a ``batch/v1`` Job, submitted and watched with the official client.

The controller renders (``kubernetes_manifests``), submits, watches and reports; Kubernetes (and
Kueue, when configured) schedules. Job state comes from one list-then-watch of the pipeline's Jobs
(by label), kept in memory: a watch that ends or drops resumes from the last resourceVersion seen,
and a 410 Gone (that version was compacted away) starts over with a fresh list. When a Job ends,
its pod's log is saved beside the local executor's logs and its last JSON line is the job's result
(an images job drawn by several pods, ``images.num_jobs``: every pod's log is saved, and the result
is that of the pod that committed the output).

Resubmitting is safe: Job names are hashes of the work, so a second submission of running work gets
409 and adopts the existing Job; a finished Job of that name (whose output the DAG found missing, or
``--force``) is deleted and created anew.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import urllib3

from jobs.executors.base import Executor, JobHandle, JobState, JobStatus, speaking_process
from jobs.executors.kubernetes_manifests import (
    ANNOTATION_PROCESSES,
    CONTAINER,
    LABEL_PIPELINE,
    POD_CONFIG_PATH,
    SubmissionInfo,
    config_map_items,
    pod_files,
    render_config_map,
    render_job,
)
from jobs.signals import interrupts_ignored
from selma_core.config import PipelineConfig
from selma_core.errors import ConfigError, EndpointError
from selma_core.plan import JobSpec
from selma_core.provenance import git_commit

# What an unreachable or failing connection raises (urllib3's errors, sockets); anything else from
# the client (e.g. its validation of a manifest) is a bug to see, not an endpoint to blame.
UNREACHABLE = (OSError, urllib3.exceptions.HTTPError)
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
WATCH_TIMEOUT_S = 60
# The end of a finished pod's log is kept (the result line is the last one).
LOG_TAIL_LINES = 20000
REQUEST_TIMEOUT_S = 60
API_RETRIES = 6  # about a minute and a half of backoff
FIRST_RETRY_DELAY_S = 0.5  # doubled after each try, up to 30 s
# Answers that say the server is busy or failing now, not that the request is wrong: worth a retry.
RETRYABLE_STATUS = (429, 500, 502, 503, 504)
# Cancelling (with interrupts ignored) tries each Job's delete until this deadline, then leaves what
# is left to python -m jobs.cancel: a controller that cannot be stopped would be worse.
CANCEL_DEADLINE_S = 30.0
# Pod lists and log reads (best effort: diagnosis, saved logs) retry an outage this long, not
# through every API retry: a poll waiting on them holds up every other job's.
POD_READ_DEADLINE_S = 15.0
# A Job the watch has not reported this long after its creation is read directly.
UNSEEN_S = 60.0
# A Job not running after this long is looked at: why are its pods not running?
STALL_S = 120.0
# With --follow-logs, how often a job whose pod is not running yet is looked at again.
FOLLOW_LOOK_S = 3.0
# A pipeline's ConfigMap that no Job uses is deleted once this old (a younger one may be another
# controller's, whose Jobs are about to be created).
CONFIG_MAP_SWEEP_AGE_S = 3600.0
# Waiting reasons of a container that will not start by waiting (until the Job's deadline).
POD_CANNOT_START = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"}
CONFIGURATION_REASONS = {"InvalidImageName", "CreateContainerConfigError"}


def api_client(cfg: PipelineConfig):
    """A ``kubernetes.client.ApiClient`` for the configured cluster: the kubeconfig (``kubeconfig``,
    else $KUBECONFIG or ~/.kube/config) or, inside a pod with no kubeconfig, the in-cluster config."""
    from kubernetes import client, config

    k8s = cfg.executor.kubernetes
    in_cluster = os.environ.get("KUBERNETES_SERVICE_HOST") and not (
        k8s.kubeconfig or os.environ.get("KUBECONFIG")
    )
    try:
        if in_cluster:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        return config.new_client_from_config(config_file=k8s.kubeconfig, context=k8s.context)
    except (config.ConfigException, OSError, TypeError, ValueError) as e:
        where = k8s.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise ConfigError(
            f"executor.kubernetes: cannot load the cluster config ({where}"
            f"{', context ' + k8s.context if k8s.context else ''}): {e}"
        ) from e


def _api_error(action: str, api, e: Exception) -> Exception:
    """A client failure as selma's errors: unreachable API server (retryable) or a refusal (not)."""
    from kubernetes.client.exceptions import ApiException

    host = api.api_client.configuration.host
    if isinstance(e, ApiException):
        detail = e.reason
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            detail = json.loads(e.body).get("message", detail)
        if e.status in (401, 403, 404, 422):
            return ConfigError(f"Kubernetes API {host}: {action}: {e.status} {detail}")
        return EndpointError(f"Kubernetes API {host}: {action}: {e.status} {detail}")
    return EndpointError(f"Kubernetes API {host} unreachable: {action}: {e}")


def _parse_indexes(text: str | None) -> set[int]:
    """The API's compressed index list ("0-2,5") as a set."""
    indexes: set[int] = set()
    for part in (text or "").split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        indexes.update(range(int(low), int(high or low) + 1))
    return indexes


def _condition(job: dict, kind: str) -> dict | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


class JobWatcher:
    """The pipeline's Jobs by name, kept current by list-then-watch in a background thread."""

    def __init__(self, batch_api, namespace: str, label_selector: str, echo: Callable[[str], None]) -> None:
        self.batch = batch_api
        self.namespace = namespace
        self.selector = label_selector
        self.echo = echo
        self.jobs: dict[str, dict] = {}
        # The last state of each deleted Job (a finished Job's TTL may remove it between two polls).
        self.deleted: dict[str, dict] = {}
        # A refusal no retry can cure (401/403: credentials or RBAC), raised to the DAG by poll.
        self.fatal: Exception | None = None
        self.relists = 0  # how often the watch had to start over from a fresh list (410 Gone)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="selma-job-watch", daemon=True)
        self._watch = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def get(self, name: str, uid: str | None = None) -> tuple[dict | None, bool]:
        """The Job (``uid``: that very Job, not an older one of the same name) and whether it is gone."""
        with self._lock:
            job = self.jobs.get(name)
            if job is not None and (uid is None or job["metadata"].get("uid") == uid):
                return job, False
            gone = self.deleted.get(name)
            if gone is not None and (uid is None or gone["metadata"].get("uid") == uid):
                return gone, True
            return None, False

    def _list(self) -> str:
        response = self.batch.list_namespaced_job(
            self.namespace,
            label_selector=self.selector,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT_S,
        )
        listing = json.loads(response.data)
        with self._lock:
            fresh = {item["metadata"]["name"]: item for item in listing.get("items") or []}
            for name in set(self.jobs) - set(fresh):
                self.deleted[name] = self.jobs[name]
            self.jobs = fresh
        return listing["metadata"]["resourceVersion"]

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        version: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                self._watch = watch.Watch()
                stream = self._watch.stream(
                    self.batch.list_namespaced_job,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=WATCH_TIMEOUT_S,
                    _request_timeout=WATCH_TIMEOUT_S + 30,
                )
                for event in stream:
                    if self._stop.is_set():
                        break
                    failures = 0
                    # The plain dict (what a list returns too). An ERROR event (410 Gone among them)
                    # never gets here: with timeout_seconds set, the client raises ApiException.
                    obj = event.get("raw_object") or {}
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    name = obj.get("metadata", {}).get("name")
                    if event.get("type") == "BOOKMARK" or not name:
                        continue
                    with self._lock:
                        if event["type"] == "DELETED":
                            self.jobs.pop(name, None)
                            self.deleted[name] = obj
                        else:
                            self.jobs[name] = obj
                # The server ended the watch (its timeout): resume from the last version seen.
            except ApiException as e:
                if e.status == 410:
                    # Our resourceVersion was compacted away: events were missed, so list again.
                    self.relists += 1
                    version = None
                    continue
                if e.status in (401, 403):
                    self.fatal = ConfigError(
                        f"Kubernetes API: watching Jobs in namespace {self.namespace}: {e.status} {e.reason} "
                        "(check the kubeconfig's credentials and the controller's Role, k8s/rbac.yaml)"
                    )
                    return
                failures += 1
                self.echo(f"watching Jobs: {e.status} {e.reason}; retrying")
                self._stop.wait(min(30, 2**failures))
            except Exception as e:  # a dropped connection: resume the watch from the last version
                if self._stop.is_set():
                    break
                failures += 1
                if failures > 1:
                    self.echo(f"watching Jobs: {type(e).__name__}: {e}; retrying")
                self._stop.wait(min(30, 0.2 * 2**failures))


class KubernetesExecutor(Executor):
    name = "kubernetes"
    job_config_path = POD_CONFIG_PATH

    def __init__(
        self,
        cfg: PipelineConfig,
        log_dir: str | Path,
        follow_logs: bool = False,
        echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
    ) -> None:
        self.cfg = cfg
        self.k8s = cfg.executor.kubernetes
        self.namespace = self.k8s.namespace
        self.log_dir = Path(log_dir)
        self.follow_logs = follow_logs
        self.echo = echo
        self.check_no_credentials()
        self.config_map = render_config_map(cfg, pod_files(cfg))
        self.info = SubmissionInfo(
            pipeline=cfg.name,
            config_hash=cfg.config_hash(),
            git_commit=git_commit(),
            mlflow_run_id="assigned-at-submission",
            config_map=self.config_map["metadata"]["name"],
            config_items=config_map_items(self.config_map),
        )
        self._client = None
        self._batch = None
        self._core = None
        self._watcher: JobWatcher | None = None
        self._config_map_ready = False
        self._followed: set[str] = set()

    # --- what is submitted -------------------------------------------------------------------

    def begin(self, mlflow_run_id: str, git_commit: str) -> None:
        """Stamp the pipeline's MLflow run and commit on every Job from now on."""
        self.info.mlflow_run_id = mlflow_run_id
        self.info.git_commit = git_commit

    def check_reachable(self) -> None:
        """Pods cannot see this machine's files: the store and tracking must be network services.
        (Credentials in the config were refused when the executor was made.)"""
        if self.cfg.storage.uri.startswith("file://"):
            raise ConfigError(
                f"{self.cfg.source_path}: storage.uri {self.cfg.storage.uri} is a folder on this machine, "
                "which Kubernetes pods cannot reach; use s3://BUCKET/PREFIX with the Kubernetes executor"
            )
        if self.cfg.tracking.uri.startswith("sqlite:"):
            raise ConfigError(
                f"{self.cfg.source_path}: tracking.uri {self.cfg.tracking.uri} is a file on this machine, "
                "which Kubernetes pods cannot reach; use an MLflow server (http(s)://HOST:PORT)"
            )

    def check_no_credentials(self) -> None:
        """The config travels to pods in a ConfigMap: a password in one of its URLs would too."""
        from urllib.parse import urlsplit

        cfg = self.cfg
        for key, url in (
            ("tracking.uri", cfg.tracking.uri),
            ("storage.endpoint_url", cfg.storage.endpoint_url),
            ("prompts.openai.base_url", cfg.prompts.openai.base_url),
        ):
            if url and (urlsplit(url).password or urlsplit(url).username):
                raise ConfigError(
                    f"{cfg.source_path}: {key} carries credentials in its URL; put them in a Secret "
                    "(e.g. MLFLOW_TRACKING_USERNAME/PASSWORD) listed in executor.kubernetes.secrets"
                )

    def batch_key(self, job: JobSpec) -> str | None:
        # The shards of a phase run as one Indexed Job, one completion index each.
        return job.phase if job.shard is not None else None

    def shard_command(self, jobs: list[JobSpec], command: list[str]) -> list[str]:
        if len(jobs) == 1:
            return command
        if "--shard-index" in command:
            at = command.index("--shard-index")
            command = command[:at] + command[at + 2 :]
        # Pod i of the Indexed Job runs shard number i of this list.
        return [*command, "--shards", ",".join(str(j.shard) for j in jobs)]

    def manifests(self, jobs: list[JobSpec], command: list[str], env: dict[str, str]) -> list[dict]:
        # The commit a pod records is the one baked into its image (the code that runs), not the
        # controller's checkout; the controller's is on the Job's annotation.
        env = {k: v for k, v in env.items() if k != "SELMA_GIT_COMMIT"}
        return render_job(self.cfg, jobs, self.shard_command(jobs, command), self.info, env)

    def describe(self, job: JobSpec, command: list[str]) -> str:
        import yaml

        return yaml.safe_dump_all(self.manifests([job], command, {}), sort_keys=False)

    def dry_run(self, jobs: list[JobSpec], command_for: Callable[[JobSpec], list[str]]) -> str:
        import yaml

        documents = [self.config_map]
        for group in self.batches(jobs):
            documents += self.manifests(group, command_for(group[0]), {})
        # jobs.submit's JSON summary line follows as one more document, after this separator.
        return yaml.safe_dump_all(documents, sort_keys=False) + "---"

    # --- the cluster ---------------------------------------------------------------------------

    def _connect(self) -> None:
        if self._client is not None:
            return
        from kubernetes import client

        self._client = api_client(self.cfg)
        self._batch = client.BatchV1Api(self._client)
        self._core = client.CoreV1Api(self._client)
        self._watcher = JobWatcher(
            self._batch, self.namespace, f"selma.io/pipeline={self.cfg.name}", self.echo
        )
        self._watcher.start()

    def _ensure_config_map(self) -> None:
        from kubernetes.client.exceptions import ApiException

        if self._config_map_ready:
            return
        try:
            self._call(
                "create ConfigMap",
                self._core,
                self._core.create_namespaced_config_map,
                self.namespace,
                self.config_map,
            )
        except ApiException as e:
            if e.status != 409:  # 409: this exact config (the name is its hash) is there already
                raise _api_error("create ConfigMap", self._core, e) from e
        self._config_map_ready = True
        self._sweep_config_maps()

    def _sweep_config_maps(self) -> None:
        """Delete the pipeline's ConfigMaps that no Job uses any more: Jobs go with their TTL, but
        nothing owns a ConfigMap (it serves every Job of one config), so each config change would
        leave one in etcd for good. Only ones older than ``CONFIG_MAP_SWEEP_AGE_S``: a younger one
        may be another controller's, its Jobs about to be created. Housekeeping: never fails a
        pipeline."""
        from datetime import UTC, datetime

        from kubernetes.client.exceptions import ApiException

        try:
            selector = f"{LABEL_PIPELINE}={self.cfg.name}"
            listing = self._core.list_namespaced_config_map(
                self.namespace, label_selector=selector, _preload_content=False
            )
            maps = json.loads(listing.data).get("items") or []
            used = {self.config_map["metadata"]["name"]}
            for job in pipeline_jobs(self._batch, self.namespace, self.cfg.name):
                for volume in (job["spec"]["template"].get("spec") or {}).get("volumes") or []:
                    used.add((volume.get("configMap") or {}).get("name"))
            now = datetime.now(UTC)
            deleted = []
            for config_map in maps:
                meta = config_map["metadata"]
                created = datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00"))
                if meta["name"] in used or (now - created).total_seconds() < CONFIG_MAP_SWEEP_AGE_S:
                    continue
                try:
                    self._core.delete_namespaced_config_map(
                        meta["name"], self.namespace, _preload_content=False
                    )
                    deleted.append(meta["name"])
                except ApiException as e:
                    if e.status != 404:  # gone already: another controller swept it
                        raise
        except Exception as e:
            self.echo(f"could not clean up the pipeline's unused ConfigMaps: {e}")
            return
        if deleted:
            self.echo(
                f"deleted {len(deleted)} ConfigMap(s) of earlier configs that no Job uses: "
                + ", ".join(deleted)
            )

    def _call(self, action: str, api, fn, *args, deadline: float | None = None, **kwargs):
        """One API call, retried with backoff while the server is unreachable or answers 5xx/429:
        a short outage must not abort a pipeline that has run for hours. With ``deadline`` (a
        ``time.monotonic()``), retried until then instead, each request's timeout and each wait cut
        to the time left: for callers that must not wait through every retry."""
        from kubernetes.client.exceptions import ApiException

        for attempt in itertools.count():
            timeout = REQUEST_TIMEOUT_S
            if deadline is not None:
                timeout = max(1.0, min(REQUEST_TIMEOUT_S, deadline - time.monotonic()))
            try:
                return fn(*args, _request_timeout=timeout, **kwargs)
            except ApiException as e:
                if e.status not in RETRYABLE_STATUS:
                    raise
                error: Exception = e
            except UNREACHABLE as e:
                error = e
            delay = min(30.0, FIRST_RETRY_DELAY_S * 2**attempt)
            if deadline is None:
                gave_up = attempt == API_RETRIES
            else:  # the wait cut to the time left, but none shorter than the first
                delay = min(delay, deadline - time.monotonic())
                gave_up = delay < FIRST_RETRY_DELAY_S
            if gave_up:
                if isinstance(error, ApiException):
                    raise error
                raise _api_error(action, api, error) from error
            self.echo(f"Kubernetes API: {action}: {type(error).__name__}; retrying in {delay:.1f}s")
            time.sleep(delay)
        raise AssertionError("unreachable")  # itertools.count() does not end

    def _create(self, manifest: dict) -> tuple[str, bool]:
        """Create the Job; on 409 adopt a running one, or replace a finished one. Its uid, and
        whether it was adopted (started by another controller) rather than created."""
        from kubernetes.client.exceptions import ApiException

        name = manifest["metadata"]["name"]
        for _ in range(60):
            try:
                created = self._call(
                    f"create Job {name}",
                    self._batch,
                    self._batch.create_namespaced_job,
                    self.namespace,
                    manifest,
                    _preload_content=False,
                )
                return json.loads(created.data)["metadata"]["uid"], False
            except ApiException as e:
                if e.status != 409:
                    raise _api_error(f"create Job {name}", self._batch, e) from e
            job = self._read_job(name)
            if job is None:
                continue  # deleted in between: create again
            finished = _condition(job, "Complete") or _condition(job, "Failed")
            deleting = job.get("metadata", {}).get("deletionTimestamp")
            if not finished and not deleting:
                self.echo(f"Job {name} is already running: following it instead of starting it again")
                return job["metadata"]["uid"], True
            if not deleting:
                # Finished, but the DAG wants this work done (its output is missing, or --force).
                self._delete(name)
            time.sleep(1)  # wait for the old Job to be gone
        raise EndpointError(f"Kubernetes API: Job {name} still exists after deleting it for 60 s")

    def _read_job(self, name: str) -> dict | None:
        """Job ``name`` as the API server has it now; None when there is none."""
        from kubernetes.client.exceptions import ApiException

        try:
            response = self._call(
                f"read Job {name}",
                self._batch,
                self._batch.read_namespaced_job,
                name,
                self.namespace,
                _preload_content=False,
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise _api_error(f"read Job {name}", self._batch, e) from e
        return json.loads(response.data)

    def _create_service(self, service: dict, uid: str) -> None:
        """Create the Service owned by the Job ``uid``. One of the same name owned by another Job (an
        earlier Job of this name, replaced, whose Service the garbage collector has not removed
        yet) is replaced: the collector would remove it later, leaving the new Job's pods unable
        to find each other."""
        from kubernetes.client.exceptions import ApiException

        name = service["metadata"]["name"]
        for _ in range(60):
            try:
                self._call(
                    f"create Service {name}",
                    self._core,
                    self._core.create_namespaced_service,
                    self.namespace,
                    service,
                )
                return
            except ApiException as e:
                if e.status != 409:
                    raise _api_error(f"create Service {name}", self._core, e) from e
            try:
                existing = json.loads(
                    self._call(
                        f"read Service {name}",
                        self._core,
                        self._core.read_namespaced_service,
                        name,
                        self.namespace,
                        _preload_content=False,
                    ).data
                )
            except ApiException as e:
                if e.status == 404:
                    continue  # deleted in between: create again
                raise _api_error(f"read Service {name}", self._core, e) from e
            owners = {ref.get("uid") for ref in existing.get("metadata", {}).get("ownerReferences") or []}
            if uid in owners:
                return  # this Job's already (an adopted Job's, or created by a retried request)
            try:
                self._call(
                    f"delete Service {name}",
                    self._core,
                    self._core.delete_namespaced_service,
                    name,
                    self.namespace,
                    _preload_content=False,  # the API answers with the Service or a Status: unread
                )
            except ApiException as e:
                if e.status != 404:
                    raise _api_error(f"delete Service {name}", self._core, e) from e
            time.sleep(0.5)
        raise EndpointError(f"Kubernetes API: Service {name} still belongs to another Job after 60 tries")

    def _delete(self, name: str, deadline: float | None = None) -> None:
        """Delete Job ``name`` (its pods in the background); gone already is fine. ``deadline``: as
        for ``_call``."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._call(
                f"delete Job {name}",
                self._batch,
                self._batch.delete_namespaced_job,
                name,
                self.namespace,
                propagation_policy="Background",
                _preload_content=False,  # the API answers with the Job or a Status: unread
                deadline=deadline,
            )
        except ApiException as e:
            if e.status != 404:
                raise _api_error(f"delete Job {name}", self._batch, e) from e

    def submit(self, job: JobSpec, command: list[str], env: dict[str, str]) -> JobHandle:
        return self.submit_batch([job], [command], env)[0]

    def submit_batch(
        self, jobs: list[JobSpec], commands: list[list[str]], env: dict[str, str]
    ) -> list[JobHandle]:
        self._connect()
        self._ensure_config_map()
        documents = self.manifests(jobs, commands[0], env)
        # A multi-node group (a Job and its Service) is restarted whole by poll(): kept to create again.
        group = copy.deepcopy(documents) if len(documents) > 1 else None
        name, uid = self._start(documents)
        hint = f"kubectl -n {self.namespace} logs job/{name}"
        indexed = len(jobs) > 1
        return [
            JobHandle(
                job=job,
                ref=name,
                log=hint,
                extra={
                    "index": i if indexed else None,
                    "uid": uid,
                    "since": time.monotonic(),
                    "group": group,
                    "restarts": 0,
                },
            )
            for i, job in enumerate(jobs)
        ]

    def _start(self, documents: list[dict]) -> tuple[str, str]:
        """Create the Job (``documents[0]``) and the Services it owns; its name and uid."""
        job_manifest = documents[0]
        name = job_manifest["metadata"]["name"]
        uid, adopted = self._create(job_manifest)
        try:
            for service in documents[1:]:
                # Owned by its Job: deleted with it (TTL, Ctrl-C, jobs.cancel) by the garbage collector.
                service["metadata"]["ownerReferences"] = [
                    {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid}
                ]
                self._create_service(service, uid)
        except BaseException:
            # The Job's handle never reaches the DAG, so nothing would cancel it: a multi-node
            # training Job holding GPUs, unwatched, until its deadline. One we started goes now,
            # a second Ctrl-C notwithstanding.
            if not adopted:
                with interrupts_ignored():
                    error = self._delete_until(name, time.monotonic() + CANCEL_DEADLINE_S)
                if error is not None:
                    self.echo(f"could not delete Job {name}: {error}")
            raise
        return name, uid

    def poll(self, handle: JobHandle) -> JobStatus:
        if "final" in handle.extra:
            return handle.extra["final"]
        if self._watcher.fatal is not None:
            raise self._watcher.fatal
        name: str = handle.ref
        job, gone = self._watcher.get(name, handle.extra.get("uid"))
        if job is None:
            job, gone = self._read_unseen(handle)
        if job is None and gone:
            return self._finish(
                handle,
                JobState.FAILED,
                None,
                f"Job {name} is gone, and the controller never saw it end (deleted, or removed by its TTL, "
                "while the watch was down): run the pipeline again (a committed output is skipped)",
            )
        if job is None:
            return JobStatus(JobState.PENDING)
        status = job.get("status") or {}
        index = handle.extra.get("index")
        if index is not None:
            if index in _parse_indexes(status.get("completedIndexes")):
                return self._finish(handle, JobState.SUCCEEDED, job, None)
            if index in _parse_indexes(status.get("failedIndexes")):
                return self._finish(handle, JobState.FAILED, job, f"index {index} of Job {name} failed")
        elif _condition(job, "Complete"):
            return self._finish(handle, JobState.SUCCEEDED, job, None)
        failed = _condition(job, "Failed")
        if failed and not gone and self._restart_group(handle, job, failed):
            return JobStatus(JobState.PENDING)
        if failed:
            reason = f"Job {name} failed: {failed.get('reason', '')} {failed.get('message', '')}".strip()
            return self._finish(handle, JobState.FAILED, job, reason)
        if gone:
            return self._finish(handle, JobState.FAILED, None, f"Job {name} was deleted before it finished")
        stuck = self._diagnose(handle, job)
        if stuck:
            why, exit_code = stuck
            self._delete(name)
            return self._finish(handle, JobState.FAILED, job, why, exit_code=exit_code)
        if status.get("ready") or (status.get("active") and not job["spec"].get("suspend")):
            if self.follow_logs:
                self._follow(handle)
            return JobStatus(JobState.RUNNING)
        return JobStatus(JobState.PENDING)

    def _restart_group(self, handle: JobHandle, job: dict, failed: dict) -> bool:
        """Start a failed multi-node training Job again, whole, up to ``backoff_limit`` times; whether
        it was. Its pods cannot be retried one by one (a torchrun group loses its rendezvous with any
        member: a preempted node ends its peers with exit 1), so the Job fails at the first pod that
        fails and the controller restarts the group here; training resumes from its latest
        checkpoint. Not after exit 2 (the configuration's: it would fail again) or a deadline."""
        group, name = handle.extra.get("group"), handle.ref
        if group is None or failed.get("reason") not in ("PodFailurePolicy", "BackoffLimitExceeded"):
            return False
        # The API's word, not the watch's (which may not have delivered a deletion yet): a Job
        # deleted since it failed (jobs.cancel, its TTL) is not to be started again.
        current = self._read_job(name)
        meta = (current or {}).get("metadata") or {}
        if meta.get("uid") != handle.extra.get("uid") or meta.get("deletionTimestamp"):
            return False
        nodes = int(job["spec"].get("completions") or 1)
        codes = {int(c) for c in re.findall(r"failed with exit code (\d+)", failed.get("message") or "")}
        attempt = handle.extra["restarts"] + 1
        for index in range(nodes):
            pod = self._pod(name, index)
            if pod is not None:
                # Each attempt's logs are kept: the last one's is the job's log, as for any job.
                code, _, _ = self._read_pod(
                    pod, self.log_dir / f"{handle.job.name}.attempt-{attempt}.{index}.log"
                )
                codes.add(code)
        if 2 in codes or attempt > self.k8s.backoff_limit:
            return False
        self.echo(
            f"{handle.job.id}: Job {name} failed ({failed.get('reason')}: {failed.get('message', '')}); "
            f"starting its {nodes} nodes again from the latest checkpoint "
            f"(restart {attempt} of {self.k8s.backoff_limit})"
        )
        # jobs.cancel may have deleted the ConfigMap meanwhile: without it the pods never start.
        self._config_map_ready = False
        self._ensure_config_map()
        _, uid = self._start(copy.deepcopy(group))
        handle.extra.update(uid=uid, since=time.monotonic(), restarts=attempt)
        for stale in ("checked", "said", "read_unseen"):
            handle.extra.pop(stale, None)
        self._followed.discard(f"{name}/{handle.extra.get('index')}")  # follow the new pod 0
        return True

    def _read_unseen(self, handle: JobHandle) -> tuple[dict | None, bool]:
        """A Job the watch has no record of ``UNSEEN_S`` after its creation, read directly (every
        ``UNSEEN_S``): the watch misses a Job created, ended and deleted while it was down, if the
        server compacted those events away. The Job and whether it is gone; (None, False): not
        looked at now."""
        now = time.monotonic()
        if now - max(handle.extra["since"], handle.extra.get("read_unseen", 0.0)) < UNSEEN_S:
            return None, False
        handle.extra["read_unseen"] = now
        job = self._read_job(handle.ref)
        if job is None or job.get("metadata", {}).get("uid") != handle.extra.get("uid"):
            return None, True  # gone, or another Job of this name now: ours was replaced
        return job, False

    def _diagnose(self, handle: JobHandle, job: dict) -> tuple[str, int] | None:
        """Why a Job is not running yet, looked at now and then once it has waited ``STALL_S``: a pod
        that cannot start (image, missing Secret) fails the job, since waiting would take until its
        deadline (why, and the exit code to report); unschedulable pods, pods that cannot be created
        and queued Jobs are reported and waited for. Every pod the Job should be running counts: a
        multi-node group with one node scheduled waits for the other (its torchrun does too)."""
        now = time.monotonic()
        if now - handle.extra["since"] < STALL_S or now - handle.extra.get("checked", 0.0) < STALL_S:
            return None
        handle.extra["checked"] = now
        status, spec = job.get("status") or {}, job["spec"]
        index = handle.extra.get("index")
        if index is None:
            # A whole Job's handle: as many ready pods as it should run now. One completion index's
            # (a merge-search candidate): its own pod, looked at below (the Job's counts are every
            # index's).
            completions = spec.get("completions") or 1
            wanted = min(spec.get("parallelism") or 1, completions - (status.get("succeeded") or 0))
            if (status.get("ready") or 0) >= max(wanted, 1):
                return None
        name = job["metadata"]["name"]
        if spec.get("suspend"):
            self._say(handle, f"{handle.job.id}: Job {name} is suspended, waiting for Kueue to admit it")
            return None
        pods = self._pods(name, index)
        if pods is None:
            return None
        if not pods:
            # Not one pod ever (an index waiting its turn behind the Job's parallelism, or a pod
            # being replaced, has had some): the cluster refuses to create them (FailedCreate events).
            if not any(status.get(count) for count in ("active", "ready", "succeeded", "failed")):
                self._say(
                    handle,
                    f"{handle.job.id}: Job {name} has no pod yet: the cluster refuses to create it (a "
                    "ServiceAccount that does not exist, a ResourceQuota or LimitRange, a Pod Security "
                    f"admission): see kubectl -n {self.namespace} describe job {name}",
                )
            return None
        for pod in pods:
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                waiting = (container.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in POD_CANNOT_START:
                    why = (
                        f"Job {name}: pod {pod['metadata']['name']} cannot start: {waiting['reason']}: "
                        f"{waiting.get('message', '')}".strip()
                    )
                    # A bad image name or a missing Secret is the configuration's (exit 2); a pull
                    # that fails may be the registry's (an outage, a rate limit): worth a retry (1).
                    return why, 2 if waiting["reason"] in CONFIGURATION_REASONS else 1
        for pod in pods:
            for condition in (pod.get("status") or {}).get("conditions") or []:
                if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                    self._say(
                        handle,
                        f"{handle.job.id}: pod {pod['metadata']['name']} not scheduled yet: "
                        f"{condition.get('message', '')}",
                    )
                    return None
        return None

    def _say(self, handle: JobHandle, line: str) -> None:
        """Say a waiting reason once per job, not at every look."""
        if handle.extra.get("said") != line:
            handle.extra["said"] = line
            self.echo(line)

    def _pod(self, name: str, index: int | None) -> dict | None:
        """The Job's newest pod (for one completion index, when given)."""
        pods = self._list_pods(name, index)
        return pods[-1] if pods else None

    def _pods(self, name: str, index: int | None) -> list[dict] | None:
        """The Job's newest pod of each completion index (or of the one given); None when the pods
        cannot be listed now."""
        pods = self._list_pods(name, index)
        if pods is None:
            return None
        # Oldest first: the newest of each index wins.
        newest = {(p["metadata"].get("labels") or {}).get(INDEX_LABEL): p for p in pods}
        return list(newest.values())

    def _list_pods(self, name: str, index: int | None) -> list[dict] | None:
        """The Job's pods (for one completion index, when given), oldest first; None when they
        cannot be listed now (said on stderr)."""
        selector = f"{JOB_NAME_LABEL}={name}"
        if index is not None:
            selector += f",{INDEX_LABEL}={index}"
        try:
            response = self._call(
                f"list the pods of Job {name}",
                self._core,
                self._core.list_namespaced_pod,
                self.namespace,
                label_selector=selector,
                _preload_content=False,
                deadline=time.monotonic() + POD_READ_DEADLINE_S,
            )
        except Exception as e:  # an outage past the deadline comes wrapped already; a refusal does not
            error = (
                e if isinstance(e, (EndpointError, ConfigError)) else _api_error("list pods", self._core, e)
            )
            self.echo(f"cannot list the pods of Job {name}: {error}")
            return None
        pods = json.loads(response.data).get("items") or []
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
        return pods

    def _finish(
        self,
        handle: JobHandle,
        state: JobState,
        job: dict | None,
        error: str | None,
        exit_code: int | None = None,
    ) -> JobStatus:
        """Save the pod's log beside the local logs; its last JSON line is the job's result."""
        name: str = handle.ref
        index = handle.extra.get("index")
        processes = int(
            ((job or {}).get("metadata", {}).get("annotations") or {}).get(ANNOTATION_PROCESSES, 1)
        )
        if index is None and processes > 1:
            return self._finish_processes(handle, state, job, error, exit_code, processes)
        # A multi-node training Job reports through pod 0 (rank 0 commits and prints the result).
        if index is None and job and job["spec"].get("completionMode") == "Indexed":
            index = 0
        pod = self._pod(name, index)
        chosen = None
        if pod is not None:
            chosen = self._read_pod(pod, self.log_dir / f"{handle.job.name}.log")
        return self._final_status(handle, state, exit_code, error, chosen)

    @staticmethod
    def _final_status(
        handle: JobHandle,
        state: JobState,
        exit_code: int | None,
        error: str | None,
        pod: tuple[int | None, dict | None, Path | None] | None,
    ) -> JobStatus:
        """The job's final status from the pod that speaks for it (exit code, result, saved log);
        kept on the handle, so it is computed once."""
        result = None
        if pod is not None:
            code, result, path = pod
            if exit_code is None:
                exit_code = code
            if path is not None:
                handle.log = str(path)
            result = result or None
        if state == JobState.SUCCEEDED:
            exit_code = 0
        elif exit_code is None or exit_code == 0:
            exit_code = 1
        if error and (result is None or not result.get("error")):
            result = {**(result or {}), "error": error}
        final = JobStatus(state, exit_code, result)
        handle.extra["final"] = final
        return final

    def _read_pod(self, pod: dict, path: Path) -> tuple[int | None, dict | None, Path | None]:
        """A finished pod's exit code, and its log saved at ``path`` with its last JSON line."""
        from jobs.executors.local import last_json_line

        exit_code = None
        for container in pod.get("status", {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated") or {}
            if container.get("name") == CONTAINER and "exitCode" in terminated:
                exit_code = terminated["exitCode"]
        try:
            text = self._call(
                f"read the log of pod {pod['metadata']['name']}",
                self._core,
                self._core.read_namespaced_pod_log,
                pod["metadata"]["name"],
                self.namespace,
                container=CONTAINER,
                tail_lines=LOG_TAIL_LINES,
                deadline=time.monotonic() + POD_READ_DEADLINE_S,
            )
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(text if isinstance(text, str) else str(text))
            return exit_code, last_json_line(str(path)), path
        except Exception as e:
            self.echo(f"cannot read the log of pod {pod['metadata']['name']}: {e}")
            return exit_code, None, None

    def _finish_processes(
        self,
        handle: JobHandle,
        state: JobState,
        job: dict,
        error: str | None,
        exit_code: int | None,
        processes: int,
    ) -> JobStatus:
        """An images job drawn by ``processes`` pods: every pod's log saved
        (``<job>.I-of-N.log``); its result is the pod's that committed the output (any pod may), or
        the first failed one's. All succeeded but none committed nor found the output committed: failed."""
        name: str = handle.ref
        pods = []
        for i in range(processes):
            pod = self._pod(name, i)
            if pod is not None:
                code, result, path = self._read_pod(
                    pod, self.log_dir / f"{handle.job.name}.{i}-of-{processes}.log"
                )
                pods.append((code, result or {}, path))
        chosen = None
        if state == JobState.SUCCEEDED:
            speaker = speaking_process([result for _, result, _ in pods])
            chosen = pods[speaker] if speaker is not None else None
            unread = processes - sum(1 for _, result, _ in pods if result)
            if chosen is None and unread:
                # The Job completed, but what a pod said is lost (its log unreadable, or the pod
                # removed with the Job by its TTL): the one that committed may be among them. The
                # Job's own verdict stands; the DAG then checks that the output is in the store.
                self.echo(
                    f"Job {name} completed; the logs of {unread} of its {processes} pods could not be "
                    "read, so which one committed is not known: taken as done"
                )
            elif chosen is None:
                state, exit_code = JobState.FAILED, 1
                error = f"none of the {processes} pods of Job {name} committed the output of {handle.job.id}"
        if chosen is None:
            chosen = next((p for p in pods if p[0] not in (0, None)), pods[0] if pods else None)
        return self._final_status(handle, state, exit_code, error, chosen)

    def _follow(self, handle: JobHandle) -> None:
        """Stream the running pod's log to the controller's stderr, prefixed by the job."""
        key = f"{handle.ref}/{handle.extra.get('index')}"
        now = time.monotonic()
        if key in self._followed or now - handle.extra.get("follow_looked", 0.0) < FOLLOW_LOOK_S:
            return
        handle.extra["follow_looked"] = now  # a pod list per job every few seconds, not every poll
        pod = self._pod(handle.ref, handle.extra.get("index"))
        if pod is None or (pod.get("status") or {}).get("phase") not in ("Running", "Succeeded", "Failed"):
            return
        self._followed.add(key)
        pod_name = pod["metadata"]["name"]

        def stream() -> None:
            try:
                response = self._core.read_namespaced_pod_log(
                    pod_name, self.namespace, container=CONTAINER, follow=True, _preload_content=False
                )
                buffer = b""
                for chunk in response.stream(4096):
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        self.echo(f"[{handle.job.id}] {line.decode('utf-8', 'replace')}")
            except Exception as e:  # following is a convenience: the saved log is complete anyway
                self.echo(f"[{handle.job.id}] log stream ended: {e}")

        threading.Thread(target=stream, name=f"log-{pod_name}", daemon=True).start()

    def cancel(self, handle: JobHandle) -> None:
        for job_id, error in self.cancel_all([handle]).items():
            self.echo(f"could not cancel {job_id}: {error}")

    def cancel_all(self, handles: list[JobHandle]) -> dict[str, Exception]:
        """Delete each running Job once (the shards of an Indexed Job share one), each tried until
        ``CANCEL_DEADLINE_S`` in all, not through every API retry: the DAG cancels with interrupts
        ignored, and an unreachable API server must not hold the controller for half an hour."""
        if self._batch is None:
            return {}
        jobs: dict[str, list[str]] = {}  # Job name -> the DAG's job ids in it
        for handle in handles:
            if "final" not in handle.extra:
                jobs.setdefault(handle.ref, []).append(handle.job.id)
        deadline = time.monotonic() + CANCEL_DEADLINE_S
        errors: dict[str, Exception] = {}
        for name, job_ids in jobs.items():
            error = self._delete_until(name, deadline)
            if error is not None:
                errors.update(dict.fromkeys(job_ids, error))
        return errors

    def _delete_until(self, name: str, deadline: float) -> Exception | None:
        """Delete Job ``name``, retrying an outage until ``deadline``; the error if it was not."""
        try:
            self._delete(name, deadline)
        except ConfigError as e:  # refused (no permission): jobs.cancel would be refused too
            return e
        except EndpointError as e:
            return EndpointError(f"{e}; run python -m jobs.cancel to delete Job {name}")
        return None

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()


def pipeline_jobs(batch_api, namespace: str, pipeline: str) -> list[dict]:
    """The Jobs of a pipeline, by its label."""
    response = batch_api.list_namespaced_job(
        namespace, label_selector=f"selma.io/pipeline={pipeline}", _preload_content=False
    )
    return json.loads(response.data).get("items") or []
