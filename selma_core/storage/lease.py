"""In-flight markers (leases): at most one live process runs the job of an output key at a time.

Before a job computes anything, ``jobs.run`` claims ``<key>/_inflight.json`` in the store: a small
JSON record of its holder (host, pid, job, the controller's pipeline run, ``started_at``,
``heartbeat_at``, ``expires_at``, ``ttl_s``). The holder renews it every ``ttl_s / 4`` seconds from a
thread and deletes it after the commit (or on failure). A second process claiming the same key
(another controller, a retried pod) finds the live lease and waits: when the output gets committed it
reports the job as skipped; when the lease disappears without a commit (the holder failed) it claims
again and runs the job itself; when the lease is stale (its holder died) it takes it over.

Every change of the marker is a compare-and-swap, so two claimers never both win:

- ``file://`` stores: the marker is created with ``os.link`` of a complete temporary file (fails
  with ``EEXIST`` if one exists: an exclusive create that readers never see half-written); renewals,
  takeovers and releases compare the current bytes and replace them while holding ``flock`` on the
  store's root folder (a lock on the folder itself, so no lock file ever appears in the store). On a
  file system without ``flock`` on folders (NFS) the exclusive create still holds; the compare and
  replace is then not atomic (documented in ``docs/reliability.md``).
- ``s3://`` stores: a conditional PUT, ``If-None-Match: *`` to create and ``If-Match: <ETag>`` to
  renew or take over (AWS S3 since 2024, moto 5, MinIO and Ceph RGW recent releases), and a
  conditional DELETE (``If-Match``) to release (AWS S3 since 2025; a plain DELETE where refused).
  An endpoint that ignores these headers would let a second PUT win silently: every create and
  renewal reads the marker back and gives up when it holds another holder's token, which narrows
  the window but cannot close it there.

A lease is stale (its holder is taken to be dead) when: its holder is on this host and its process is
gone; or its ``expires_at`` is more than one TTL in the past by this machine's clock (a tolerance for
clock skew); or its bytes did not change for a whole TTL as observed here (immune to clock skew).
Settings: ``SELMA_LEASE_TTL_S`` (default 60 s) and ``SELMA_LEASE_POLL_S`` (how often a waiter looks,
default 2 s).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma_core.errors import ConfigError, EndpointError, SelmaError

LEASE = "_inflight.json"
ENV_TTL = "SELMA_LEASE_TTL_S"
ENV_POLL = "SELMA_LEASE_POLL_S"
DEFAULT_TTL_S = 60.0
DEFAULT_POLL_S = 2.0


class LeaseLost(SelmaError):
    """This process's lease was taken over (it was seen as dead): another process runs the job."""


def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def lease_ttl() -> float:
    return _env_seconds(ENV_TTL, DEFAULT_TTL_S)


def lease_poll() -> float:
    return _env_seconds(ENV_POLL, DEFAULT_POLL_S)


def _log(line: str) -> None:
    print(f"lease: {line}", file=sys.stderr, flush=True)


# -- compare-and-swap on one small object, per store ---------------------------------------------


class _Marker:
    """One object that can be read with a version, created exclusively and replaced if unchanged."""

    def read(self) -> tuple[bytes, str] | None:
        raise NotImplementedError

    def create(self, data: bytes) -> str | None:
        """Write ``data`` if there is no object; its version, or None if one exists."""
        raise NotImplementedError

    def replace(self, data: bytes, version: str) -> str | None:
        """Write ``data`` if the object is still at ``version``; the new version, or None."""
        raise NotImplementedError

    def delete(self, version: str) -> bool:
        """Delete the object if it is still at ``version``."""
        raise NotImplementedError


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LocalMarker(_Marker):
    def __init__(self, store: Any, key: str) -> None:
        self.root = Path(store.root)
        self.path = store._path(key)

    @contextlib.contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):  # no flock on folders (NFS): the exclusive create holds
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def _temp(self, data: bytes) -> str:
        from selma_core.storage.local import TMP_PREFIX, no_space_error

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise no_space_error(self.path.parent, len(data), f"writing {self.path}") from e
            raise
        return tmp

    def create(self, data: bytes) -> str | None:
        tmp = self._temp(data)
        try:
            with self._locked():
                try:
                    os.link(tmp, self.path)  # atomic, and fails if the marker exists
                except FileExistsError:
                    return None
                except OSError as e:  # no hard links here: an exclusive open, written under the lock
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
                    try:
                        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    except FileExistsError:
                        return None
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return _digest(data)

    def replace(self, data: bytes, version: str) -> str | None:
        tmp = self._temp(data)
        try:
            with self._locked():
                current = self.read()
                if current is None or current[1] != version:
                    return None
                os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return _digest(data)

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return False
            self.path.unlink(missing_ok=True)
        return True


class _S3Marker(_Marker):
    # Conditional writes refused: 412 (the condition failed), 409 (a concurrent conditional write won).
    REFUSED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404")
    # An If-Match on DELETE that the endpoint does not implement, rather than one that failed.
    NO_CONDITIONAL_DELETE = ("NotImplemented", "501", "InvalidArgument", "InvalidRequest", "400")

    def __init__(self, store: Any, key: str) -> None:
        self.store = store
        self.key = key

    def _put(self, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        client = self.store.client
        try:
            response = self.store._call(
                "put",
                self.key,
                client.put_object,
                Bucket=self.store.bucket,
                Key=self.store._key(self.key),
                Body=data,
                **condition,
            )
        except (EndpointError, FileNotFoundError) as e:
            cause = e.__cause__
            refused = isinstance(e, FileNotFoundError) or (
                isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in self.REFUSED
            )
            if not refused:
                raise
            # A PUT retried after a timeout or reset may have landed the first time: the retry is then
            # refused by its own write. Ours if the marker holds exactly our bytes (token, heartbeat).
            current = self.read()
            return current[1] if current is not None and current[0] == data and current[1] else None
        version = response.get("ETag", "")
        # Read back: an endpoint that ignores conditional headers would have overwritten silently.
        current = self.read()
        if current is None or current[0] != data:
            return None
        return current[1] or version

    def read(self) -> tuple[bytes, str] | None:
        def get() -> tuple[bytes, str]:  # the body read inside the retried call, as the store does
            response = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store._key(self.key))
            return response["Body"].read(), response.get("ETag", "")

        try:
            return self.store._call("get", self.key, get)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def _delete(self, **condition: str) -> None:
        bucket, key = self.store.bucket, self.store._key(self.key)
        self.store._call(
            "delete", self.key, self.store.client.delete_object, Bucket=bucket, Key=key, **condition
        )

    def delete(self, version: str) -> bool:
        from botocore.exceptions import ClientError, ParamValidationError

        current = self.read()
        if current is None or current[1] != version:
            return False
        try:
            # Conditional: a waiter that took the lease over since that read keeps it.
            self._delete(IfMatch=version)
        except (EndpointError, ConfigError, FileNotFoundError) as e:
            cause = e.__cause__
            code = cause.response.get("Error", {}).get("Code") if isinstance(cause, ClientError) else None
            if isinstance(e, FileNotFoundError) or code in self.REFUSED:
                return False  # taken over, or gone (a retried delete that landed the first time)
            # A botocore too old to send the header refuses the parameter before any request.
            if code not in self.NO_CONDITIONAL_DELETE and not isinstance(cause, ParamValidationError):
                raise
            # The endpoint (AWS has had conditional deletes since 2025 only) or the client rejects it:
            # deleted unconditionally, the window since the read open as it was before.
            self._delete()
        return True


class _GenericMarker(_Marker):
    """Any other store: read, compare and write without atomicity (no second writer expected)."""

    def __init__(self, store: Any, key: str) -> None:
        self.store = store
        self.key = key

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = self.store.read_bytes(self.key)
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def create(self, data: bytes) -> str | None:
        if self.store.exists(self.key):
            return None
        self.store.write_bytes(self.key, data)
        current = self.read()
        return current[1] if current and current[0] == data else None

    def replace(self, data: bytes, version: str) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        self.store.write_bytes(self.key, data)
        return _digest(data)

    def delete(self, version: str) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.store.delete_prefix(self.key)
        return True


def marker_for(store: Any, key: str) -> _Marker:
    from selma_core.storage.local import LocalArtifactStore

    if isinstance(store, LocalArtifactStore):
        return _LocalMarker(store, key)
    with contextlib.suppress(ImportError):
        from selma_core.storage.s3 import S3ArtifactStore

        if isinstance(store, S3ArtifactStore):
            return _S3Marker(store, key)
    return _GenericMarker(store, key)


# -- the lease -----------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def process_identity(pid: int) -> str | None:
    """ "BOOT NAMESPACE START" of process ``pid`` where /proc tells them (None elsewhere, or when it
    does not run): this machine's boot, the PID namespace PIDs are read in here, and the process's
    start time, which tell it from a process with the same PID on another machine, in another
    container or after the PID was reused."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{boot} {namespace} {start}"


def holder_is_dead(holder: dict, unchanged_for: float, now: float | None = None) -> bool:
    """Whether a lease's holder is taken to be dead (see the module docstring)."""
    now = time.time() if now is None else now
    try:
        ttl = float(holder.get("ttl_s") or lease_ttl())
    except (TypeError, ValueError):
        ttl = lease_ttl()
    if unchanged_for >= ttl:  # no renewal seen here for a whole TTL, whatever the clocks say
        return True
    pid = holder.get("pid")
    here = holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid()
    if here and not pid_alive(pid):  # a process of this host that is gone
        return True
    expires = holder.get("expires_at")
    return isinstance(expires, (int, float)) and now > expires + ttl


def describe(holder: dict) -> str:
    run = holder.get("pipeline_run") or "-"
    return f"pid {holder.get('pid')} on {holder.get('host')} (pipeline run {run})"


@dataclass
class Lease:
    """A held in-flight marker; ``start_heartbeat`` renews it until ``release``."""

    marker: _Marker
    url: str
    record: dict
    version: str
    ttl_s: float
    took_over: dict | None = None
    lost: bool = False
    lost_to: dict | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost``) if another process replaced it."""
        with self._lock:
            if self.lost:
                return False
            now = time.time()
            record = {**self.record, "heartbeat_at": now, "expires_at": now + self.ttl_s}
            version = self.marker.replace(_encode(record), self.version)
            if version is None:
                self.lost = True
                current = self.marker.read()
                with contextlib.suppress(ValueError, TypeError):
                    self.lost_to = json.loads(current[0]) if current else None
                return False
            self.record, self.version = record, version
            return True

    def start_heartbeat(self, on_lost: Callable[[], None] | None = None) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    if self.renew():
                        continue
                except (OSError, SelmaError) as e:  # the store is unreachable: try again next beat
                    _log(f"could not renew {self.url}: {e}")
                    continue
                _log(f"{self.url}: lost to {describe(self.lost_to or {})}; this job stops")
                if on_lost:
                    on_lost()
                return

        self._thread = threading.Thread(target=beat, name="selma-lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the marker, if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock:
            if self.lost:
                return
            try:
                self.marker.delete(self.version)
            except (OSError, SelmaError) as e:  # it expires by itself: a waiter takes it over then
                _log(f"could not release {self.url}: {e}")


def _encode(record: dict) -> bytes:
    return json.dumps(record, indent=1, sort_keys=True).encode()


@dataclass
class Claim:
    """What ``acquire`` found: a lease held by this process, or the holder that committed meanwhile."""

    lease: Lease | None
    waited_for: dict | None = None
    waited_s: float = 0.0


def acquire(
    store: Any,
    key: str,
    job: str,
    done: Callable[[], bool],
    ttl_s: float | None = None,
    poll_s: float | None = None,
    log: Callable[[str], None] = _log,
) -> Claim:
    """Claim ``key``'s in-flight marker, waiting while another live process holds it.

    Returns a ``Claim`` with the lease, or without one when ``done()`` (the output is committed)
    is true: found while another process held the lease, or right after this one claimed it (the
    holder committed and released between two looks: the lease is released again). A stale lease
    is taken over.
    """
    ttl_s = ttl_s or lease_ttl()
    poll_s = poll_s or lease_poll()
    marker = marker_for(store, f"{key}/{LEASE}")
    url = store.url(f"{key}/{LEASE}")
    started = time.monotonic()
    seen: tuple[str, float] | None = None  # (version, when this process first saw it)
    waited_for: dict | None = None

    def claimed(lease: Lease) -> Claim:
        if done():  # committed just before the claim: nothing to do after all
            lease.release()
            return Claim(None, waited_for, time.monotonic() - started)
        return Claim(lease, waited_for, time.monotonic() - started)

    while True:
        now = time.time()
        record = {
            "job": job,
            "key": key,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": uuid.uuid4().hex,
            "pipeline_run": os.environ.get("SELMA_PARENT_RUN_ID", ""),
            "started_at": now,
            "heartbeat_at": now,
            "expires_at": now + ttl_s,
            "ttl_s": ttl_s,
        }
        version = marker.create(_encode(record))
        if version is not None:
            return claimed(Lease(marker, url, record, version, ttl_s))
        current = marker.read()
        if current is None:  # released between the two calls: claim again
            continue
        data, current_version = current
        try:
            holder = json.loads(data)
            if not isinstance(holder, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            holder = {}  # garbage: dead once unchanged for a TTL
        if seen is None or seen[0] != current_version:
            seen = (current_version, time.monotonic())
        if holder_is_dead(holder, time.monotonic() - seen[1]):
            version = marker.replace(_encode(record), current_version)
            if version is not None:
                log(f"{url}: took over the stale lease of {describe(holder)}")
                return claimed(Lease(marker, url, record, version, ttl_s, took_over=holder))
            continue
        if done():
            return Claim(None, holder, time.monotonic() - started)
        if waited_for is None or waited_for.get("token") != holder.get("token"):
            log(f"{job}: {url} is held by {describe(holder)}; waiting for it")
            waited_for = holder
        time.sleep(poll_s)
