"""A stateful fake Kubernetes API server over real HTTP, for tests.

Why: the Kubernetes executor is tested with the real ``kubernetes`` client (``BatchV1Api``,
``CoreV1Api``, ``kubernetes.watch.Watch``), so the fake must speak the wire format that client
expects (JSON bodies, ``Status`` errors, chunked newline-delimited watch streams, 410 Gone) while
letting a test play the cluster: start and finish Jobs, write pod logs, expire watch history,
drop connections. Standard library only; one instance per test is cheap (it starts in
milliseconds).

Served: ``batch/v1`` jobs and ``v1`` pods, configmaps and services (namespaced and all-namespace
lists), ``/status`` subresources, ``pods/{name}/log``, ``/version`` and minimal discovery.

Semantics worth knowing (they follow the real API server unless said otherwise):

- One global resourceVersion; every create/update/delete bumps it and appends an ``ADDED`` /
  ``MODIFIED`` / ``DELETED`` event (with the full object) to the history. A no-op update (PATCH or
  PUT that changes nothing) bumps nothing, as on a real server.
- Watch with ``resourceVersion`` unset, ``""`` or ``"0"``: synthetic ``ADDED`` events for the
  current matching objects first, then the changes. With a resourceVersion: every retained event
  newer than it, then the changes. A resourceVersion older than the history (see
  :meth:`FakeKubeAPI.expire_history`) gets one ``ERROR`` event (``Status`` 410, reason
  ``Expired``) and the stream ends. A watch does not turn label changes into synthetic
  ``ADDED``/``DELETED`` events (the real server does); objects are matched as they are in each
  event.
- Deleting a Job with ``propagationPolicy`` ``Background`` or ``Foreground`` deletes its pods;
  with ``Orphan`` or *no policy at all* the pods are kept (their ownerReferences removed) and a
  ``Warning`` header is sent, as the real batch/v1 API does. Foreground deletion is immediate.
- Job validation is the part of the real one an executor trips over: a name (or generateName),
  names that are DNS-1123 subdomains (Jobs at most 63 characters, since the name becomes a label
  value), ``spec.template.spec.containers`` and ``restartPolicy`` ``Never`` or ``OnFailure``.
  Defaults are filled like the real API (``backoffLimit`` 6, ``completions``/``parallelism`` 1,
  ``completionMode`` NonIndexed, ``selector`` and the controller's template labels).
- Nothing runs by itself: the test (or :meth:`FakeKubeAPI.auto_run`) plays the Job controller
  with :meth:`~FakeKubeAPI.start_job` / :meth:`~FakeKubeAPI.finish_job`. A failed pod is the
  Job's last (the Job fails) unless ``finish_job(..., retry=True)``; then, as on a real cluster,
  the Job fails only once ``status.failed`` exceeds ``spec.backoffLimit``. Indexed Jobs with
  ``backoffLimitPerIndex`` take every failed pod as its index's last.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import copy
import json
import random
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
MAX_INT32 = 2**31 - 1

# (index, exit_code, log) for each completion index to run; index None for a non-indexed Job.
AutoRunPlan = list[tuple[int | None, int, str]]
AutoRunPolicy = Callable[[dict], "AutoRunPlan | None"]


@dataclass(frozen=True)
class _Kind:
    """How one resource type is named on the wire."""

    resource: str
    group: str
    version: str
    kind: str
    namespaced_prefix: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``jobs.batch`` / ``pods``: how the real server names the resource in messages."""
        return f"{self.resource}.{self.group}" if self.group else self.resource


KINDS: dict[str, _Kind] = {
    "jobs": _Kind("jobs", "batch", "v1", "Job", "/apis/batch/v1"),
    "pods": _Kind("pods", "", "v1", "Pod", "/api/v1"),
    "configmaps": _Kind("configmaps", "", "v1", "ConfigMap", "/api/v1"),
    "services": _Kind("services", "", "v1", "Service", "/api/v1"),
}

_NAMESPACED = re.compile(
    r"^(?P<prefix>/api/v1|/apis/batch/v1)/namespaces/(?P<ns>[^/]+)/(?P<res>[a-z]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[a-z]+))?)?/?$"
)
_CLUSTER_WIDE = re.compile(r"^(?P<prefix>/api/v1|/apis/batch/v1)/(?P<res>[a-z]+)/?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the one Kubernetes uses for generated names
_SUBRESOURCES = {"status": set(KINDS), "log": {"pods"}}
_POD_FIELDS = {
    "status.phase",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "status.podIP",
}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _suffix(n: int = 5) -> str:
    return "".join(random.choice(_SUFFIX_ALPHABET) for _ in range(n))


class ApiError(Exception):
    """An error the fake answers with a ``Status`` body, as the real server does."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> dict:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _not_found(kind: _Kind, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{kind.qualified} "{name}" not found',
        {"name": name, "group": kind.group, "kind": kind.resource},
    )


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _invalid(kind: _Kind, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """422 Invalid with field causes ``(reason, field, message)``, as admission validation answers."""
    text = "; ".join(f"{field}: {message}" for _, field, message in causes)
    return ApiError(
        422,
        "Invalid",
        f'{kind.kind}.{kind.group or "core"} "{name}" is invalid: {text}',
        {
            "name": name,
            "group": kind.group,
            "kind": kind.kind,
            "causes": [{"reason": r, "message": m, "field": f} for r, f, m in causes],
        },
    )


# --- selectors ----------------------------------------------------------------------------------


def _split_requirements(selector: str) -> list[str]:
    """Split ``a=b,c in (x,y)`` at the commas that are not inside parentheses."""
    parts, depth, current = [], 0, []
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_SET_REQ = re.compile(rf"^(?P<key>{_KEY})\s+(?P<op>in|notin)\s+\((?P<values>[^)]*)\)$")
_EQ_REQ = re.compile(rf"^(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>[-A-Za-z0-9_.]*)$")
_EXISTS_REQ = re.compile(rf"^(?P<neg>!?)\s*(?P<key>{_KEY})$")


def parse_label_selector(selector: str | None) -> Callable[[dict], bool]:
    """A predicate on a labels dict; equality (``=``, ``==``, ``!=``), set (``in``, ``notin``) and
    existence (``a``, ``!a``) requirements, all of which must hold. Raises ApiError 400."""
    checks: list[Callable[[dict], bool]] = []
    for req in _split_requirements(selector or ""):
        if m := _SET_REQ.match(req):
            key, values = m["key"], {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["op"] == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif m := _EQ_REQ.match(req):
            key, value = m["key"], m["value"]
            if m["op"] == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif m := _EXISTS_REQ.match(req):
            key = m["key"]
            if m["neg"]:
                checks.append(lambda labels, k=key: k not in labels)
            else:
                checks.append(lambda labels, k=key: k in labels)
        else:
            raise _bad_request(f"unable to parse requirement: {req!r}")
    return lambda labels: all(check(labels) for check in checks)


def parse_field_selector(resource: str, selector: str | None) -> Callable[[dict], bool]:
    """A predicate on an object for ``metadata.name=X``-style selectors (``=``, ``==``, ``!=``);
    fields the real server does not index for the resource are a 400, as there."""
    checks: list[Callable[[dict], bool]] = []
    for req in _split_requirements(selector or ""):
        m = re.match(r"^(?P<field>[A-Za-z.]+)\s*(?P<op>==|=|!=)\s*(?P<value>.*)$", req)
        if not m:
            raise _bad_request(f"invalid selector: {req!r}")
        field, value = m["field"], m["value"]
        allowed = {"metadata.name", "metadata.namespace"} | (_POD_FIELDS if resource == "pods" else set())
        if field not in allowed:
            raise _bad_request(f'"{field}" is not a known field selector: only {sorted(allowed)}')

        def lookup(obj: dict, path: str = field) -> str:
            node: Any = obj
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            return "" if node is None else str(node)

        if m["op"] == "!=":
            checks.append(lambda obj, f=lookup, v=value: f(obj) != v)
        else:
            checks.append(lambda obj, f=lookup, v=value: f(obj) == v)
    return lambda obj: all(check(obj) for check in checks)


# --- patches ------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge patches are applied the same way here)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: list) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)

    def parent(path: str) -> tuple[Any, str]:
        parts = _pointer(path)
        if not parts:
            raise ApiError(422, "Invalid", "cannot patch the document root")
        node = doc
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, parts[-1]

    def get(path: str) -> Any:
        node = doc
        for part in _pointer(path):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def add(path: str, value: Any) -> None:
        node, key = parent(path)
        if isinstance(node, list):
            node.insert(len(node) if key == "-" else int(key), copy.deepcopy(value))
        else:
            node[key] = copy.deepcopy(value)

    def remove(path: str) -> Any:
        node, key = parent(path)
        return node.pop(int(key)) if isinstance(node, list) else node.pop(key)

    try:
        for op in ops:
            kind, path = op["op"], op["path"]
            if kind == "add":
                add(path, op["value"])
            elif kind == "remove":
                remove(path)
            elif kind == "replace":
                remove(path)
                add(path, op["value"])
            elif kind == "move":
                add(path, remove(op["from"]))
            elif kind == "copy":
                add(path, get(op["from"]))
            elif kind == "test":
                if get(path) != op["value"]:
                    raise ApiError(422, "Invalid", f"test operation failed at {path}")
            else:
                raise ApiError(422, "Invalid", f"unknown JSON patch operation {kind!r}")
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise ApiError(422, "Invalid", f"the JSON patch could not be applied: {e!r}") from e
    return doc


# --- completion index sets ----------------------------------------------------------------------


def compress_indexes(indexes: Iterable[int]) -> str:
    """``{1, 3, 4, 5, 7}`` -> ``"1,3-5,7"``: three or more consecutive numbers become a range, as
    in ``status.completedIndexes``."""
    values = sorted(set(indexes))
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i >= 2:
            out.append(f"{values[i]}-{values[j]}")
        else:
            out.extend(str(v) for v in values[i : j + 1])
        i = j + 1
    return ",".join(out)


def parse_indexes(text: str | None) -> set[int]:
    """The inverse of :func:`compress_indexes`."""
    result: set[int] = set()
    for part in (text or "").split(","):
        if not part:
            continue
        if "-" in part:
            first, last = part.split("-")
            result.update(range(int(first), int(last) + 1))
        else:
            result.add(int(part))
    return result


# --- the server ---------------------------------------------------------------------------------


@dataclass
class _Event:
    rv: int
    type: str
    resource: str
    namespace: str
    obj: dict


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, like the API server; every response has a length or is chunked."""

    protocol_version = "HTTP/1.1"
    api: FakeKubeAPI  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm holds the
        # body until the client's delayed ACK (40 ms a response).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.api._track_connection(self.connection, True)

    def finish(self) -> None:
        self.api._track_connection(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.api._record(method, path, query)
        try:
            self.api._dispatch(self, method, path, query, body)
        except ApiError as e:
            self.send_json(e.code, e.status(), e.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug in the fake: answer 500 and keep it for the test to see
            self.api.errors.append(e)
            error = ApiError(500, "InternalError", f"fake kube API: {e!r}")
            with contextlib.suppress(OSError):
                self.send_json(500, error.status())

    # response helpers

    def send_json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(code, json.dumps(obj).encode(), "application/json", headers)

    def send_bytes(
        self, code: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def abort(self) -> None:
        """Drop the connection mid-stream, with no terminating chunk (a broken connection)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def peer_closed(self) -> bool:
        """Whether the client hung up (so an idle stream can end instead of lingering)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


class FakeKubeAPI:
    """A stateful in-process Kubernetes API server on 127.0.0.1 plus a test-control API.

    Every public method is thread-safe. Objects returned are copies: change the fake's state
    through :meth:`mutate` (or the HTTP API), not by editing them.
    """

    def __init__(
        self,
        bookmark_interval: float = 1.0,
        auto_run_delay: float = 0.05,
        allowed: dict[str, set[str]] | None = None,
    ) -> None:
        self.bookmark_interval = bookmark_interval  # BOOKMARK cadence for allowWatchBookmarks watches
        self.auto_run_delay = auto_run_delay
        # RBAC as the API server enforces it: {"pods/log": {"get"}, ...} (``role_rules``); a request
        # whose verb the rules do not grant on its resource is refused with 403. None: all allowed.
        self.allowed = allowed
        self.errors: list[BaseException] = []  # exceptions in the fake's own threads (should stay [])
        self._cond = threading.Condition(threading.RLock())
        self._objects: dict[tuple[str, str, str], dict] = {}
        self._logs: dict[tuple[str, str], str] = {}
        self._rv = 1  # an empty cluster is at version 1: no list hands out "0" ("any" to a watch)
        self._history: list[_Event] = []
        self._history_rvs: list[int] = []
        self._history_floor = 1  # watches from a resourceVersion below this get 410
        self._expire_epoch = 0
        self._drop_epoch = 0
        self._drop_graceful = False
        self._stopping = False
        self._open_watches = 0
        self._requests: list[tuple[str, str, dict[str, str]]] = []
        self._delete_requests: list[dict] = []
        self._policy: AutoRunPolicy | None = None
        self._auto_threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeKubeAPI:
        """Bind 127.0.0.1 on a free port and serve in a daemon thread."""
        handler = type("FakeKubeHandler", (_Handler,), {"api": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-kube", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """End every stream, close every connection and stop serving."""
        with self._cond:
            self._stopping = True
            self._policy = None
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakeKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeKubeAPI is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(self, path: str | Path, namespace: str = "selma", context: str = "fake") -> Path:
        """A kubeconfig for ``kubernetes.config.new_client_from_config(config_file=path, context=...)``
        (cluster ``server`` = :attr:`url`, a user with a dummy bearer token)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": context, "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}
            ],
            "users": [{"name": context, "user": {"token": "fake-token"}}],
            "contexts": [
                {"name": context, "context": {"cluster": context, "user": context, "namespace": namespace}}
            ],
            "current-context": context,
            "preferences": {},
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # --- test-control API -----------------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every request seen, as (method, path without the query)."""
        with self._cond:
            return [(method, path) for method, path, _ in self._requests]

    @property
    def request_log(self) -> list[tuple[str, str, dict[str, str]]]:
        """Every request seen, as (method, path, query parameters): tells a watch from a list."""
        with self._cond:
            return copy.deepcopy(self._requests)

    @property
    def delete_requests(self) -> list[dict]:
        """Per DELETE: resource, namespace, name (None for a collection), the propagationPolicy
        from the query and from the DeleteOptions body, and the effective one."""
        with self._cond:
            return copy.deepcopy(self._delete_requests)

    @property
    def open_watches(self) -> int:
        """How many watch streams are open now."""
        with self._cond:
            return self._open_watches

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion."""
        with self._cond:
            return self._rv

    def clear_requests(self) -> None:
        """Forget the requests (and delete requests) seen so far, so a test can count from here."""
        with self._cond:
            self._requests.clear()
            self._delete_requests.clear()

    def get(self, resource: str, namespace: str, name: str) -> dict | None:
        """A copy of a stored object, or None."""
        with self._cond:
            obj = self._objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def objects(self, resource: str, namespace: str | None = "selma", label_selector: str = "") -> list[dict]:
        """Copies of the stored objects of a resource, in creation order."""
        match = parse_label_selector(label_selector)
        with self._cond:
            return [
                copy.deepcopy(obj)
                for (res, ns, _), obj in self._objects.items()
                if res == resource
                and (namespace is None or ns == namespace)
                and match(obj["metadata"].get("labels") or {})
            ]

    def jobs(self, namespace: str = "selma") -> list[dict]:
        """The Jobs in a namespace, in creation order."""
        return self.objects("jobs", namespace)

    def pods(self, namespace: str = "selma", job: str | None = None) -> list[dict]:
        """The pods in a namespace (of one Job if ``job``), in creation order."""
        return self.objects("pods", namespace, f"{JOB_NAME_LABEL}={job}" if job else "")

    def create(self, resource: str, obj: dict, namespace: str = "selma") -> dict:
        """Create an object as a POST would (validation and defaults included), without a request."""
        with self._cond:
            return self._create(resource, namespace, copy.deepcopy(obj))

    def mutate(self, resource: str, namespace: str, name: str, change: Callable[[dict], None]) -> dict:
        """Apply ``change`` to the stored object (status included) and commit it as MODIFIED, e.g. to
        put a Job in a state the helpers here do not produce."""
        with self._cond:
            obj = self._require(resource, namespace, name)
            change(obj)
            return self._commit("MODIFIED", resource, obj)

    def delete_object(
        self, resource: str, namespace: str, name: str, propagation: str = "Background"
    ) -> None:
        """Delete an object as someone else would (``kubectl delete`` cascades in the background)."""
        with self._cond:
            self._delete(resource, namespace, self._require(resource, namespace, name), propagation)

    def start_job(self, name: str, ns: str = "selma", log: str = "", *, index: int | None = None) -> str:
        """Play the Job controller: create a Running pod for the Job and count it active.

        For an Indexed Job ``index`` is the completion index (default: the lowest one neither
        finished nor running). Returns the pod's name.
        """
        with self._cond:
            job = self._require("jobs", ns, name)
            if self._job_finished(job):
                raise RuntimeError(f"job {ns}/{name} has already finished")
            indexed = job["spec"].get("completionMode") == "Indexed"
            if index is not None and not indexed:
                raise ValueError(f"job {ns}/{name} is not Indexed; index must be None")
            if indexed and index is None:
                index = self._next_index(job)
            pod = self._create_pod(job, index)
            self._logs[(ns, pod["metadata"]["name"])] = log
            self._update_job_counts(job)
            job["status"].setdefault("startTime", _now())
            self._commit("MODIFIED", "jobs", job)
            return pod["metadata"]["name"]

    def append_log(self, name_or_pod: str, text: str, ns: str = "selma") -> None:
        """Append to a pod's log: a pod name, or a Job name (its newest pod)."""
        with self._cond:
            pod = self._objects.get(("pods", ns, name_or_pod))
            if pod is None:
                pods = self.pods(ns, job=name_or_pod)
                if not pods:
                    raise KeyError(f"no pod or job {ns}/{name_or_pod} with pods")
                pod = pods[-1]
            key = (ns, pod["metadata"]["name"])
            self._logs[key] = self._logs.get(key, "") + text
            self._cond.notify_all()

    def finish_job(
        self,
        name: str,
        exit_code: int = 0,
        log: str | None = None,
        ns: str = "selma",
        index: int | None = None,
        *,
        retry: bool = False,
    ) -> str:
        """Play the Job controller: terminate a running pod of the Job with ``exit_code`` and update
        the Job's status (counts, completed/failed indexes, conditions) as the real controller does.

        Starts a pod first if none is running (for ``index``). A non-zero exit fails the Job
        (``BackoffLimitExceeded``, or ``PodFailurePolicy`` when a FailJob rule matches the exit code)
        unless ``retry``: then it fails only once ``status.failed`` exceeds ``spec.backoffLimit``.
        In an Indexed Job with ``backoffLimitPerIndex`` a failure is final for its index; the Job
        fails when more than ``maxFailedIndexes`` failed, or when every index has finished and some
        failed. Returns the pod's name.
        """
        with self._cond:
            job = self._require("jobs", ns, name)
            if self._job_finished(job):
                raise RuntimeError(f"job {ns}/{name} has already finished")
            pod = self._running_pod(job, index)
            if pod is None:
                self.start_job(name, ns, index=index)
                job = self._require("jobs", ns, name)
                pod = self._running_pod(job, index)
                assert pod is not None
            pod_name = pod["metadata"]["name"]
            if log is not None:
                self._logs[(ns, pod_name)] = self._logs.get((ns, pod_name), "") + log
            self._terminate_pod(pod, exit_code)
            self._account_pod(job, pod, exit_code, retry)
            return pod_name

    def auto_run(self, policy: AutoRunPolicy | None) -> None:
        """Run every Job created from now on: ``policy(job)`` (called in a background thread after
        :attr:`auto_run_delay`) returns ``[(index, exit_code, log), ...]`` to apply with
        :meth:`start_job` + :meth:`finish_job` in order (index None for non-indexed Jobs), or None
        to leave the Job pending. Exceptions land in :attr:`errors`. ``None`` uninstalls."""
        with self._cond:
            self._policy = policy

    def wait_auto_runs(self, timeout: float = 5.0) -> None:
        """Wait for the auto-run threads started so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            threads = list(self._auto_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def expire_history(self) -> None:
        """Compact the history: a watch from any resourceVersion handed out so far gets 410 Gone, and
        every open watch ends with that 410 ERROR event.

        The global resourceVersion is bumped once (as if an unrelated object changed), so that the
        client's one automatic retry from its last seen version fails too, while a fresh list's
        resourceVersion can be watched from.
        """
        with self._cond:
            self._rv += 1
            self._history.clear()
            self._history_rvs.clear()
            self._history_floor = self._rv
            self._expire_epoch += 1
            self._cond.notify_all()

    def drop_watches(self, graceful: bool = False) -> None:
        """End every open watch stream without an ERROR event. By default the connection is cut
        mid-stream (the client's read fails: urllib3 ``ProtocolError``); with ``graceful`` the
        stream ends cleanly, like the server's own watch timeout (the client just sees the end)."""
        with self._cond:
            self._drop_epoch += 1
            self._drop_graceful = graceful
            self._cond.notify_all()

    # --- internals: store -----------------------------------------------------------------------

    def _record(self, method: str, path: str, query: dict[str, str]) -> None:
        with self._cond:
            self._requests.append((method, path, dict(query)))

    def _track_connection(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _require(self, resource: str, namespace: str, name: str) -> dict:
        obj = self._objects.get((resource, namespace, name))
        if obj is None:
            raise _not_found(KINDS[resource], name)
        return copy.deepcopy(obj)

    def _commit(self, type_: str, resource: str, obj: dict) -> dict:
        """Store (or drop) ``obj``, bump the resourceVersion and record the event. Lock held."""
        meta = obj["metadata"]
        key = (resource, meta["namespace"], meta["name"])
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        if type_ == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        self._history.append(_Event(self._rv, type_, resource, meta["namespace"], copy.deepcopy(obj)))
        self._history_rvs.append(self._rv)
        self._cond.notify_all()
        return copy.deepcopy(obj)

    def _create(self, resource: str, namespace: str, body: Any) -> dict:
        kind = KINDS[resource]
        if not isinstance(body, dict):
            raise _bad_request(f"the body of the request is not a {kind.kind} object")
        if body.get("kind") not in (None, kind.kind):
            raise _bad_request(f"the body is a {body.get('kind')}, not a {kind.kind}")
        meta = body.setdefault("metadata", {})
        if meta.get("namespace") not in (None, "", namespace):
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            name = meta["generateName"] + _suffix()
        self._validate(kind, name, body)
        if (resource, namespace, name) in self._objects:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{kind.qualified} "{name}" already exists',
                {"name": name, "group": kind.group, "kind": kind.resource},
            )
        body["kind"], body["apiVersion"] = kind.kind, kind.api_version
        meta.update(name=name, namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now())
        meta.pop("resourceVersion", None)
        if resource in ("jobs", "pods"):
            meta["generation"] = 1
        getattr(self, f"_default_{resource}")(body)
        created = self._commit("ADDED", resource, body)
        if resource == "jobs" and self._policy is not None and not self._stopping:
            thread = threading.Thread(
                target=self._auto_run_job, args=(self._policy, namespace, name), daemon=True
            )
            self._auto_threads.append(thread)
            thread.start()
        return created

    def _validate(self, kind: _Kind, name: str, obj: dict) -> None:
        causes: list[tuple[str, str, str]] = []
        if not name:
            causes.append(
                ("FieldValueRequired", "metadata.name", "Required value: name or generateName is required")
            )
        elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            causes.append(
                (
                    "FieldValueInvalid",
                    "metadata.name",
                    f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                    "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                    "character",
                )
            )
        elif kind.resource == "jobs" and len(name) > 63:
            causes.append(
                (
                    "FieldValueInvalid",
                    "spec.template.labels",
                    f'Invalid value: "{name}": must be no more than 63 characters',
                )
            )
        if kind.resource == "jobs":
            spec = obj.get("spec") or {}
            pod_spec = (spec.get("template") or {}).get("spec") or {}
            if not pod_spec.get("containers"):
                causes.append(("FieldValueRequired", "spec.template.spec.containers", "Required value"))
            if pod_spec.get("restartPolicy") not in ("Never", "OnFailure"):
                causes.append(
                    (
                        "FieldValueRequired"
                        if not pod_spec.get("restartPolicy")
                        else "FieldValueNotSupported",
                        "spec.template.spec.restartPolicy",
                        'Required value: valid values: "OnFailure", "Never"',
                    )
                )
            if spec.get("completionMode") == "Indexed" and spec.get("completions") is None:
                causes.append(
                    (
                        "FieldValueRequired",
                        "spec.completions",
                        "Required value: when completion mode is Indexed",
                    )
                )
            if spec.get("backoffLimitPerIndex") is not None and spec.get("completionMode") != "Indexed":
                causes.append(
                    (
                        "FieldValueInvalid",
                        "spec.backoffLimitPerIndex",
                        "Invalid value: requires indexed completion mode",
                    )
                )
            if spec.get("podFailurePolicy") and pod_spec.get("restartPolicy") != "Never":
                causes.append(
                    (
                        "FieldValueInvalid",
                        "spec.template.spec.restartPolicy",
                        'Invalid value: only "Never" is supported when podFailurePolicy is specified',
                    )
                )
        if kind.resource == "pods" and not ((obj.get("spec") or {}).get("containers")):
            causes.append(("FieldValueRequired", "spec.containers", "Required value"))
        if causes:
            raise _invalid(kind, name, causes)

    def _default_jobs(self, job: dict) -> None:
        meta, spec = job["metadata"], job.setdefault("spec", {})
        uid, name = meta["uid"], meta["name"]
        if spec.get("completions") is None and spec.get("parallelism") is None:
            spec["completions"] = 1
        spec.setdefault("parallelism", 1)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("backoffLimit", MAX_INT32 if spec.get("backoffLimitPerIndex") is not None else 6)
        spec.setdefault("suspend", False)
        spec.setdefault("manualSelector", None)
        if spec["manualSelector"] is None:
            spec.pop("manualSelector")
        spec.setdefault(
            "podReplacementPolicy", "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed"
        )
        spec.setdefault("selector", {"matchLabels": {CONTROLLER_UID_LABEL: uid}})
        labels = spec["template"].setdefault("metadata", {}).setdefault("labels", {})
        labels.update(
            {CONTROLLER_UID_LABEL: uid, JOB_NAME_LABEL: name, "controller-uid": uid, "job-name": name}
        )
        if not meta.get("labels"):  # the real defaulting: a Job without labels takes its pods'
            meta["labels"] = dict(labels)
        job["status"] = {}

    def _default_pods(self, pod: dict) -> None:
        pod.setdefault("status", {}).setdefault("phase", "Pending")
        pod["spec"].setdefault("restartPolicy", "Always")

    def _default_configmaps(self, cm: dict) -> None:
        pass

    def _default_services(self, svc: dict) -> None:
        spec = svc.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        if spec.get("clusterIP") != "None":
            spec["clusterIP"] = f"10.96.{random.randint(0, 255)}.{random.randint(1, 254)}"
            spec["clusterIPs"] = [spec["clusterIP"]]
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
        svc["status"] = {"loadBalancer": {}}

    def _update(self, resource: str, namespace: str, name: str, new: dict, subresource: str | None) -> dict:
        """Commit ``new`` over the stored object: the main resource keeps the stored status, the
        status subresource changes only the status; a stale resourceVersion is a 409 Conflict."""
        kind = KINDS[resource]
        old = self._require(resource, namespace, name)
        meta = new.get("metadata") or {}
        if meta.get("name") not in (None, name):
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        rv = meta.get("resourceVersion")
        if rv not in (None, "") and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind.qualified} "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
                {"name": name, "group": kind.group, "kind": kind.resource},
            )
        if subresource == "status":
            merged = copy.deepcopy(old)
            merged["status"] = new.get("status") or {}
        else:
            merged = copy.deepcopy(new)
            for key in ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion"):
                if key in old["metadata"]:
                    merged.setdefault("metadata", {})[key] = old["metadata"][key]
            merged["kind"], merged["apiVersion"] = kind.kind, kind.api_version
            if "status" in old:
                merged["status"] = old["status"]
            else:
                merged.pop("status", None)
            if "generation" in old["metadata"] and merged.get("spec") != old.get("spec"):
                merged["metadata"]["generation"] = old["metadata"]["generation"] + 1
        if merged == old:
            return old  # a no-op update: no new resourceVersion, no event
        return self._commit("MODIFIED", resource, merged)

    def _delete(self, resource: str, namespace: str, obj: dict, policy: str | None) -> dict:
        """Delete ``obj``; a Job's pods go too unless the policy orphans them (the default)."""
        if resource == "jobs":
            uid = obj["metadata"]["uid"]
            for pod in self._owned_pods(namespace, uid):
                if policy in ("Background", "Foreground"):
                    self._commit("DELETED", "pods", pod)
                else:
                    pod["metadata"]["ownerReferences"] = [
                        ref for ref in pod["metadata"].get("ownerReferences", []) if ref.get("uid") != uid
                    ]
                    if not pod["metadata"]["ownerReferences"]:
                        del pod["metadata"]["ownerReferences"]
                    self._commit("MODIFIED", "pods", pod)
        obj = copy.deepcopy(obj)
        obj["metadata"]["deletionTimestamp"] = _now()
        obj["metadata"]["deletionGracePeriodSeconds"] = 0
        return self._commit("DELETED", resource, obj)

    def _owned_pods(self, namespace: str, uid: str) -> list[dict]:
        return [
            copy.deepcopy(pod)
            for (res, ns, _), pod in self._objects.items()
            if res == "pods"
            and ns == namespace
            and any(ref.get("uid") == uid for ref in pod["metadata"].get("ownerReferences", []))
        ]

    # --- internals: the Job controller ----------------------------------------------------------

    @staticmethod
    def _job_finished(job: dict) -> bool:
        return any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in job.get("status", {}).get("conditions") or []
        )

    @staticmethod
    def _pod_index(pod: dict) -> int | None:
        value = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
        return int(value) if value is not None else None

    def _running_pods(self, job: dict) -> list[dict]:
        uid = job["metadata"]["uid"]
        return [
            pod
            for pod in self._owned_pods(job["metadata"]["namespace"], uid)
            if pod["status"].get("phase") in ("Pending", "Running")
        ]

    def _running_pod(self, job: dict, index: int | None) -> dict | None:
        for pod in self._running_pods(job):
            if index is None or self._pod_index(pod) == index:
                return pod
        return None

    def _next_index(self, job: dict) -> int:
        status = job["status"]
        busy = parse_indexes(status.get("completedIndexes")) | parse_indexes(status.get("failedIndexes"))
        busy |= {i for i in map(self._pod_index, self._running_pods(job)) if i is not None}
        for i in range(job["spec"]["completions"]):
            if i not in busy:
                return i
        raise RuntimeError(f"job {job['metadata']['name']}: every completion index is taken")

    def _create_pod(self, job: dict, index: int | None) -> dict:
        meta, template = job["metadata"], copy.deepcopy(job["spec"]["template"])
        job_name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
        prefix = f"{job_name}-{index}-" if index is not None else f"{job_name}-"
        name = prefix + _suffix()
        labels = dict(template.get("metadata", {}).get("labels") or {})
        labels.update(
            {CONTROLLER_UID_LABEL: uid, JOB_NAME_LABEL: job_name, "controller-uid": uid, "job-name": job_name}
        )
        annotations = dict(template.get("metadata", {}).get("annotations") or {})
        if index is not None:
            labels[COMPLETION_INDEX] = annotations[COMPLETION_INDEX] = str(index)
        now = _now()
        spec = template["spec"]
        spec.setdefault("nodeName", "fake-node")
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "generateName": prefix,
                "namespace": ns,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now,
                "generation": 1,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job_name,
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
            "status": {
                "phase": "Running",
                "startTime": now,
                "podIP": f"10.244.0.{random.randint(2, 254)}",
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                ],
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "image": c.get("image", ""),
                        "imageID": "",
                        "containerID": f"containerd://{uuid.uuid4().hex}",
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": now}},
                    }
                    for c in spec.get("containers", [])
                ],
            },
        }
        return self._commit("ADDED", "pods", pod)

    def _terminate_pod(self, pod: dict, exit_code: int) -> None:
        now = _now()
        status = pod["status"]
        status["phase"] = "Succeeded" if exit_code == 0 else "Failed"
        for i, cs in enumerate(status.get("containerStatuses") or []):
            code = exit_code if i == 0 else 0
            started = (cs.get("state", {}).get("running") or {}).get("startedAt", now)
            cs.update(ready=False, started=False)
            cs["state"] = {
                "terminated": {
                    "exitCode": code,
                    "reason": "Completed" if code == 0 else "Error",
                    "startedAt": started,
                    "finishedAt": now,
                    "containerID": cs.get("containerID", ""),
                }
            }
        for cond in status.get("conditions") or []:
            if cond["type"] == "Ready":
                cond.update(status="False", reason="PodCompleted", lastTransitionTime=now)
        self._commit("MODIFIED", "pods", pod)

    @staticmethod
    def _failure_action(job: dict, pod: dict, exit_code: int) -> tuple[str | None, str, int]:
        """The podFailurePolicy action for this exit code (first matching rule), the container and
        the rule's index."""
        containers = [c["name"] for c in pod["spec"].get("containers", [])]
        container = containers[0] if containers else ""
        for i, rule in enumerate((job["spec"].get("podFailurePolicy") or {}).get("rules") or []):
            on = rule.get("onExitCodes")
            if not on or on.get("containerName") not in (None, container):
                continue
            values = set(on.get("values") or [])
            hit = exit_code in values if on.get("operator") == "In" else exit_code not in values
            if hit:
                return rule.get("action"), container, i
        return None, container, -1

    def _update_job_counts(self, job: dict) -> None:
        status = job["status"]
        active = len(self._running_pods(job))
        if active:
            status["active"] = active
        else:
            status.pop("active", None)
        status["ready"] = active
        status["terminating"] = 0
        status.setdefault("uncountedTerminatedPods", {})

    def _account_pod(self, job: dict, pod: dict, exit_code: int, retry: bool) -> None:
        spec, status = job["spec"], job["status"]
        ns = job["metadata"]["namespace"]
        indexed = spec.get("completionMode") == "Indexed"
        per_index = indexed and spec.get("backoffLimitPerIndex") is not None
        index = self._pod_index(pod)
        self._update_job_counts(job)
        outcome: tuple[str, str] | None = None  # (reason, message) when the Job fails
        if exit_code == 0:
            if indexed and index is not None:
                done = parse_indexes(status.get("completedIndexes")) | {index}
                status["completedIndexes"] = compress_indexes(done)
                status["succeeded"] = len(done)
            else:
                status["succeeded"] = status.get("succeeded", 0) + 1
        else:
            action, container, rule = self._failure_action(job, pod, exit_code)
            if action != "Ignore":
                status["failed"] = status.get("failed", 0) + 1
            if action == "FailJob":
                outcome = (
                    "PodFailurePolicy",
                    f"Container {container} for pod {ns}/{pod['metadata']['name']} failed with exit code "
                    f"{exit_code} matching FailJob rule at index {rule}",
                )
            elif per_index and action != "Ignore" and index is not None:
                failed = parse_indexes(status.get("failedIndexes")) | {index}
                status["failedIndexes"] = compress_indexes(failed)
            elif action != "Ignore" and (not retry or status["failed"] > spec.get("backoffLimit", 6)):
                outcome = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        if outcome is None and per_index:
            failed = parse_indexes(status.get("failedIndexes"))
            finished = failed | parse_indexes(status.get("completedIndexes"))
            max_failed = spec.get("maxFailedIndexes")
            if max_failed is not None and len(failed) > max_failed:
                outcome = (
                    "MaxFailedIndexesExceeded",
                    "Job has exceeded the specified maximal number of failed indexes",
                )
            elif failed and finished >= set(range(spec["completions"])):
                outcome = ("FailedIndexes", "Job has failed indexes")
        now = _now()
        if outcome is not None:
            for pod_left in self._running_pods(job):
                self._commit("DELETED", "pods", pod_left)
            self._update_job_counts(job)
            reason, message = outcome
            status.setdefault("conditions", []).extend(
                {
                    "type": t,
                    "status": "True",
                    "lastProbeTime": now,
                    "lastTransitionTime": now,
                    "reason": reason,
                    "message": message,
                }
                for t in ("FailureTarget", "Failed")
            )
        elif self._succeeded(job):
            status.setdefault("conditions", []).extend(
                {
                    "type": t,
                    "status": "True",
                    "lastProbeTime": now,
                    "lastTransitionTime": now,
                    "reason": "CompletionsReached",
                    "message": "Reached expected number of succeeded pods",
                }
                for t in ("SuccessCriteriaMet", "Complete")
            )
            status["completionTime"] = now
        self._commit("MODIFIED", "jobs", job)

    @staticmethod
    def _succeeded(job: dict) -> bool:
        spec, status = job["spec"], job["status"]
        completions = spec.get("completions")
        if spec.get("completionMode") == "Indexed":
            return parse_indexes(status.get("completedIndexes")) >= set(range(completions or 0))
        if completions is None:  # a work queue: done when a pod succeeded and none is left
            return status.get("succeeded", 0) > 0 and not status.get("active")
        return status.get("succeeded", 0) >= completions

    def _auto_run_job(self, policy: AutoRunPolicy, ns: str, name: str) -> None:
        try:
            time.sleep(self.auto_run_delay)
            job = self.get("jobs", ns, name)
            if job is None or self._stopping:
                return
            plan = policy(job)
            for index, exit_code, log in plan or []:
                with self._cond:
                    job = self.get("jobs", ns, name)
                    if job is None or self._job_finished(job) or self._stopping:
                        return
                    self.start_job(name, ns, log=log, index=index)
                    self.finish_job(name, exit_code, ns=ns, index=index)
        except Exception as e:
            self.errors.append(e)

    # --- internals: HTTP ------------------------------------------------------------------------

    def _dispatch(self, h: _Handler, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        bare = path.rstrip("/") or "/"
        if method == "GET" and bare == "/version":
            h.send_json(200, _VERSION)
            return
        if method == "GET" and bare in _DISCOVERY:
            h.send_json(200, _DISCOVERY[bare])
            return
        namespace: str | None
        if m := _NAMESPACED.match(path):
            namespace, name, sub = m["ns"], m["name"], m["sub"]
        elif m := _CLUSTER_WIDE.match(path):
            namespace, name, sub = None, None, None
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        resource = m["res"]
        kind = KINDS.get(resource)
        if kind is None or kind.namespaced_prefix != m["prefix"]:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub is not None and resource not in _SUBRESOURCES.get(sub, set()):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if namespace is None and method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on all namespaces")
        self._authorize(method, resource, name, sub, query)

        if name is None:
            if method == "GET":
                if query.get("watch") in ("true", "1", "True"):
                    self._serve_watch(h, resource, namespace, query)
                else:
                    h.send_json(200, self._list(resource, namespace, query))
            elif method == "POST":
                with self._cond:
                    obj = self._create(resource, namespace or "", _json_body(body))
                h.send_json(201, obj)
            elif method == "DELETE":
                h.send_json(200, self._delete_collection(resource, namespace or "", query, body))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on a list")
            return

        assert namespace is not None
        if sub == "log":
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on a log")
            self._serve_log(h, namespace, name, query)
            return
        if method == "GET":
            with self._cond:
                h_obj = self._require(resource, namespace, name)
            h.send_json(200, h_obj)
        elif method == "PUT":
            new = _json_body(body)
            if not isinstance(new, dict):
                raise _bad_request("the body is not an object")
            with self._cond:
                obj = self._update(resource, namespace, name, new, sub)
            h.send_json(200, obj)
        elif method == "PATCH":
            content_type = (h.headers.get("Content-Type") or "").split(";")[0].strip()
            patch = _json_body(body)
            with self._cond:
                old = self._require(resource, namespace, name)
                if content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                    if not isinstance(patch, dict):
                        raise _bad_request("a merge patch must be a JSON object")
                    new = merge_patch(old, patch)
                elif content_type == "application/json-patch+json":
                    if not isinstance(patch, list):
                        raise _bad_request("a JSON patch must be a list of operations")
                    new = json_patch(old, patch)
                else:
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        f"the body of the request was in an unknown format: {content_type}",
                    )
                if (patch if isinstance(patch, dict) else {}).get("metadata", {}).get(
                    "resourceVersion"
                ) is None:
                    new.setdefault("metadata", {}).pop("resourceVersion", None)
                obj = self._update(resource, namespace, name, new, sub)
            h.send_json(200, obj)
        elif method == "DELETE":
            status, headers = self._delete_item(resource, namespace, name, query, body)
            h.send_json(200, status, headers)
        else:
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed")

    def _authorize(self, method: str, resource: str, name: str | None, sub: str | None, query: dict) -> None:
        """Refuse (403) a request that ``allowed`` does not grant, as RBAC would."""
        if self.allowed is None:
            return
        if method == "GET":
            verb = "get" if name else ("watch" if query.get("watch") in ("true", "1", "True") else "list")
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, "delete")
            if method == "DELETE" and name is None:
                verb = "deletecollection"
        target = f"{resource}/{sub}" if sub else resource
        if verb not in self.allowed.get(target, set()):
            kind = KINDS[resource]
            raise ApiError(
                403,
                "Forbidden",
                f"{target}{'.' + kind.group if kind.group else ''} is forbidden: the Role does not grant "
                f'"{verb}" on resource "{target}"',
            )

    def _list(self, resource: str, namespace: str | None, query: dict[str, str]) -> dict:
        kind = KINDS[resource]
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(resource, query.get("fieldSelector"))
        with self._cond:
            rv = self._rv
            items = []
            for (res, ns, _), obj in sorted(self._objects.items(), key=lambda kv: kv[0]):
                if (
                    res == resource
                    and namespace in (None, ns)
                    and labels(obj["metadata"].get("labels") or {})
                    and fields(obj)
                ):
                    item = copy.deepcopy(obj)
                    item.pop("kind", None)  # list items carry no kind/apiVersion on the wire
                    item.pop("apiVersion", None)
                    items.append(item)
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        start = int(base64.b64decode(query["continue"]).decode()) if query.get("continue") else 0
        limit = int(query.get("limit") or 0)
        if limit > 0 and start + limit < len(items):
            meta["continue"] = base64.b64encode(str(start + limit).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
            items = items[start : start + limit]
        else:
            items = items[start:]
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": meta, "items": items}

    def _delete_options(
        self, resource: str, namespace: str, name: str | None, query: dict, body: bytes
    ) -> tuple[str | None, dict]:
        """Parse and record a delete's propagationPolicy (query or DeleteOptions body) and options."""
        options = _json_body(body) if body.strip() else {}
        if not isinstance(options, dict):
            raise _bad_request("DeleteOptions must be an object")
        query_policy = query.get("propagationPolicy")
        body_policy = options.get("propagationPolicy")
        policy = query_policy or body_policy
        if policy is None and (options.get("orphanDependents") or query.get("orphanDependents") == "true"):
            policy = "Orphan"
        if policy not in (None, "Orphan", "Background", "Foreground"):
            raise _bad_request(f"unknown propagationPolicy {policy!r}")
        self._delete_requests.append(
            {
                "resource": resource,
                "namespace": namespace,
                "name": name,
                "query_policy": query_policy,
                "body_policy": body_policy,
                "propagationPolicy": policy,
                "options": options,
            }
        )
        return policy, options

    def _delete_item(
        self, resource: str, namespace: str, name: str, query: dict, body: bytes
    ) -> tuple[dict, dict[str, str]]:
        kind = KINDS[resource]
        with self._cond:
            policy, options = self._delete_options(resource, namespace, name, query, body)
            obj = self._require(resource, namespace, name)
            pre = options.get("preconditions") or {}
            for field in ("uid", "resourceVersion"):
                if pre.get(field) not in (None, obj["metadata"][field]):
                    raise ApiError(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {kind.qualified} "{name}": Precondition failed: '
                        f"{field}: {pre[field]}, {field}: {obj['metadata'][field]}",
                    )
            self._delete(resource, namespace, obj, policy)
        headers = {}
        if resource == "jobs" and policy in (None, "Orphan"):
            headers["Warning"] = (
                '299 - "child pods are preserved by default when jobs are deleted; set '
                "propagationPolicy=Background to remove them or set propagationPolicy=Orphan to suppress "
                'this warning"'
            )
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {
                "name": name,
                "group": kind.group,
                "kind": kind.resource,
                "uid": obj["metadata"]["uid"],
            },
        }
        return status, headers

    def _delete_collection(self, resource: str, namespace: str, query: dict, body: bytes) -> dict:
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(resource, query.get("fieldSelector"))
        with self._cond:
            policy, _ = self._delete_options(resource, namespace, None, query, body)
            victims = [
                copy.deepcopy(obj)
                for (res, ns, _), obj in self._objects.items()
                if res == resource
                and ns == namespace
                and labels(obj["metadata"].get("labels") or {})
                and fields(obj)
            ]
            for obj in victims:
                if (resource, namespace, obj["metadata"]["name"]) in self._objects:
                    self._delete(resource, namespace, obj, policy)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}

    def _serve_watch(self, h: _Handler, resource: str, namespace: str | None, query: dict[str, str]) -> None:
        """Stream newline-delimited watch events over chunked transfer encoding (urllib3 yields each
        chunk as it arrives, which is what ``Watch.stream`` needs)."""
        kind = KINDS[resource]
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(resource, query.get("fieldSelector"))
        try:
            timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        except ValueError as e:
            raise _bad_request(f"invalid timeoutSeconds {query['timeoutSeconds']!r}") from e
        deadline = time.monotonic() + timeout if timeout else None
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1", "True")
        rv_param = query.get("resourceVersion") or ""

        def matches(obj: dict, ns: str) -> bool:
            return namespace in (None, ns) and labels(obj["metadata"].get("labels") or {}) and fields(obj)

        with self._cond:
            expired: str | None = None
            initial: list[dict] = []
            if rv_param in ("", "0"):
                cursor = self._rv
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(obj)}
                    for (res, ns, _), obj in self._objects.items()
                    if res == resource and matches(obj, ns)
                ]
            else:
                try:
                    cursor = int(rv_param)
                except ValueError as e:
                    raise _bad_request(f"invalid resourceVersion {rv_param!r}") from e
                if cursor < self._history_floor:
                    expired = f"too old resource version: {cursor} ({self._history_floor})"
            epochs = (self._expire_epoch, self._drop_epoch)
            self._open_watches += 1
        try:
            h.start_chunked("application/json")
            if expired is not None:
                h.write_chunk(_watch_line("ERROR", _expired_status(expired)))
                h.end_chunked()
                return
            for event in initial:
                h.write_chunk(_watch_line(event["type"], event["object"]))
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                batch: list[_Event] = []
                with self._cond:
                    if self._stopping:
                        action = "end"
                    elif self._drop_epoch != epochs[1]:
                        action = "end" if self._drop_graceful else "drop"
                    elif self._expire_epoch != epochs[0]:
                        action = "expire"
                    else:
                        action = ""
                        start = bisect.bisect_right(self._history_rvs, cursor)
                        batch = [
                            e
                            for e in self._history[start:]
                            if e.resource == resource and matches(e.obj, e.namespace)
                        ]
                        cursor = max(cursor, self._rv)
                        if not batch:
                            self._cond.wait(timeout=0.1)
                if action == "drop":
                    h.abort()
                    return
                if action == "expire":
                    message = f"too old resource version: {cursor} ({self._history_floor})"
                    h.write_chunk(_watch_line("ERROR", _expired_status(message)))
                    h.end_chunked()
                    return
                if action == "end":
                    h.end_chunked()
                    return
                h.write_chunk(b"".join(_watch_line(e.type, e.obj) for e in batch))
                now = time.monotonic()
                if bookmarks and now >= next_bookmark:
                    bookmark = {
                        "kind": kind.kind,
                        "apiVersion": kind.api_version,
                        "metadata": {"resourceVersion": str(cursor)},
                    }
                    h.write_chunk(_watch_line("BOOKMARK", bookmark))
                    next_bookmark = now + self.bookmark_interval
                if deadline is not None and now >= deadline:
                    h.end_chunked()
                    return
                if h.peer_closed():
                    h.close_connection = True
                    return
        except OSError:
            h.close_connection = True
        finally:
            with self._cond:
                self._open_watches -= 1

    def _serve_log(self, h: _Handler, namespace: str, name: str, query: dict[str, str]) -> None:
        """The pod's log as text/plain; with ``follow`` streamed until the pod stops running."""
        with self._cond:
            pod = self._require("pods", namespace, name)
            containers = [c["name"] for c in pod["spec"].get("containers", [])]
            container = query.get("container")
            if container is not None and container not in containers:
                raise _bad_request(f"container {container} is not valid for pod {name}")
            if container is None and len(containers) > 1:
                raise _bad_request(
                    f"a container name must be specified for pod {name}, choose one of: {containers}"
                )
            text = self._logs.get((namespace, name), "")
        offset = len(text)
        if query.get("tailLines"):
            lines = text.splitlines(keepends=True)
            tail = int(query["tailLines"])
            text = "".join(lines[-tail:]) if tail > 0 else ""
        data = text.encode()
        if query.get("limitBytes"):
            data = data[: int(query["limitBytes"])]
        if query.get("follow") not in ("true", "1", "True"):
            h.send_bytes(200, data, "text/plain")
            return
        try:
            h.start_chunked("text/plain")
            h.write_chunk(data)
            while True:
                with self._cond:
                    current = self._objects.get(("pods", namespace, name))
                    full = self._logs.get((namespace, name), "")
                    new, offset = full[offset:], len(full)
                    running = current is not None and current["status"].get("phase") in ("Pending", "Running")
                    if not new and running and not self._stopping:
                        self._cond.wait(timeout=0.1)
                h.write_chunk(new.encode())
                if not new and (not running or self._stopping):
                    h.end_chunked()
                    return
                if h.peer_closed():
                    h.close_connection = True
                    return
        except OSError:
            h.close_connection = True


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError as e:
        raise _bad_request(f"the body is not valid JSON: {e}") from e


def _watch_line(type_: str, obj: dict) -> bytes:
    return json.dumps({"type": type_, "object": obj}).encode() + b"\n"


def _expired_status(message: str) -> dict:
    return ApiError(410, "Expired", message).status()


_VERSION = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.24.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _resource_list(group_version: str, kinds: Iterable[_Kind]) -> dict:
    verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    resources: list[dict] = []
    for k in kinds:
        resources.append(
            {
                "name": k.resource,
                "singularName": k.kind.lower(),
                "namespaced": True,
                "kind": k.kind,
                "verbs": verbs,
            }
        )
        resources.append(
            {
                "name": f"{k.resource}/status",
                "singularName": "",
                "namespaced": True,
                "kind": k.kind,
                "verbs": ["get", "patch", "update"],
            }
        )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


_DISCOVERY: dict[str, dict] = {
    "/api": {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}],
    },
    "/apis": {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": "batch",
                "versions": [{"groupVersion": "batch/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "batch/v1", "version": "v1"},
            }
        ],
    },
    "/api/v1": _resource_list("v1", [k for k in KINDS.values() if not k.group]),
    "/apis/batch/v1": _resource_list("batch/v1", [KINDS["jobs"]]),
}


def role_rules(path: str | Path, role: str) -> dict[str, set[str]]:
    """The verbs a Role in a manifest file grants, by resource (``pods/log`` for a subresource)."""
    allowed: dict[str, set[str]] = {}
    for doc in yaml.safe_load_all(Path(path).read_text()):
        if doc and doc.get("kind") == "Role" and doc["metadata"]["name"] == role:
            for rule in doc.get("rules") or []:
                for resource in rule.get("resources") or []:
                    allowed.setdefault(resource, set()).update(rule.get("verbs") or [])
    if not allowed:
        raise ValueError(f"{path}: no Role {role!r} with rules")
    return allowed
