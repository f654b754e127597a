"""The artifact store: one small interface, a local-folder and an S3 implementation.

Outputs are *committed*: a phase writes its files first and its manifest (every file's size and
SHA-256) last, so a reader that finds a manifest finds a complete output, and a job that dies midway
leaves nothing that looks finished. Each attempt writes its files under its own folder
(``<key>/<attempt>/...``) and the manifest names them: two writers racing on one key never mix
their files, and the manifest written last wins whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from selma_core.errors import InputError
from selma_core.faults import fault_point

MANIFEST = "_manifest.json"
# A fetch's partial download untouched this long was left by a killed fetch (a running one writes).
STALE_PARTIAL_S = 3600.0

T = TypeVar("T")
R = TypeVar("R")


def at_once(
    fn: Callable[[T], R], items: Iterable[T], threads: int, on_interrupt: Callable[[], None] | None = None
) -> list[R]:
    """``[fn(item) for item in items]``, up to ``threads`` calls at a time, results in order.

    For store requests: an output of thousands of small files (eval's images) is bound by the
    endpoint's latency per request, not by its bandwidth. The first failure is raised once the calls
    already running end; no new call starts after it. The workers are daemon threads, so an
    interrupt (Ctrl-C, SIGTERM) in the caller is raised at once (after ``on_interrupt``), and the
    process can exit without waiting for a request that hangs, unless that request runs in threads
    of its own that are not daemons (an S3 multipart transfer's). What they leave is what a killed
    job leaves: files no manifest names, or a cache object written whole.
    """
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    results: list[Any] = [None] * len(items)
    failures: list[BaseException] = []
    lock = threading.Lock()
    todo = iter(range(len(items)))

    def work() -> None:
        while True:
            with lock:
                index = None if failures else next(todo, None)
            if index is None:
                return
            try:
                results[index] = fn(items[index])
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                with lock:
                    failures.append(e)
                return

    workers = [
        threading.Thread(target=work, name=f"store-transfer-{i}", daemon=True)
        for i in range(min(threads, len(items)))
    ]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join()
    except BaseException:
        with lock:  # an interrupt: no new call starts; the running ones are left to the exit
            failures.append(KeyboardInterrupt())
        if on_interrupt is not None:
            on_interrupt()
        raise
    if failures:
        raise failures[0]
    return results


def human_size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: sizes as messages and listings show them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def short_name(name: str, limit: int = 64) -> str:
    """``name`` cut to ``limit`` bytes of UTF-8 (whole characters), to name a temporary file after it."""
    return name.encode()[:limit].decode(errors="ignore")


def _drop_stale_partials(folder: Path) -> None:
    """Deletes what fetches killed mid-download left in ``folder``: ``.<name>.*.partial``, and
    ``.<name>.*.partial.<suffix>``, where boto3's download writes before renaming to the first.

    Only files untouched for ``STALE_PARTIAL_S``: one still growing belongs to a fetch running now.
    """
    now = time.time()
    for partial in itertools.chain(folder.glob(".*.partial"), folder.glob(".*.partial.*")):
        with contextlib.suppress(OSError):  # gone already, or taken by another cleaner
            if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                partial.unlink()


def validate_key(key: str) -> str:
    """Keys are '/'-separated names; no empty parts, '.' or '..' (they would escape the root)."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise ValueError(f"invalid store key {key!r}: expected names separated by '/', without '..'")
    return key


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: float  # seconds since the epoch, as the store records it
    etag: str | None = None  # S3's: another one is another write, even within the same second


@dataclass(frozen=True)
class UnfinishedWrite:
    """A write its process never finished (killed mid-write): a local store's temporary file, an S3
    multipart upload never completed. No reader sees it, yet it takes space (S3 bills an upload's
    parts until it is aborted)."""

    key: str  # the temporary file's key; the key the upload was to write
    size: int  # bytes it holds
    modified: float  # when it was last written to (seconds since the epoch)
    upload_id: str | None = None  # S3's multipart upload


class ArtifactStore(ABC):
    """Bytes and files under string keys, plus the commit protocol built on them."""

    #: The root URI, e.g. ``file:///data/store`` or ``s3://bucket/prefix``.
    uri: str
    #: Files a commit uploads, or a fetch downloads, at once (``at_once``).
    transfer_threads: int = 1

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object atomically: readers see the old object or the new one, never a part."""

    @abstractmethod
    def upload_file(self, local_path: Path, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, local_path: Path, size: int | None = None) -> None:
        """``size``: the object's, when known (a manifest's), to choose how to fetch it."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix/`` (recursive), sorted."""

    @abstractmethod
    def list_objects(self, prefix: str) -> list[StoredObject]:
        """``list_keys(prefix)`` with each object's size and when it was last written."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def delete_keys(self, keys: list[str]) -> None:
        """Delete these objects (missing ones are no error), manifests first: a delete cut short must
        not leave a manifest naming deleted files."""

    @abstractmethod
    def list_unfinished_writes(self, prefixes: Iterable[str]) -> list[UnfinishedWrite]:
        """Every write under these prefixes begun and not finished, a live writer's too
        (``jobs.gc`` judges by age). Keys this store cannot have written are left out."""

    @abstractmethod
    def discard_unfinished_write(self, write: UnfinishedWrite) -> bool:
        """Free what ``write`` holds; False when it was written to since it was listed (a writer is
        at work: nothing is discarded). One already gone is no error."""

    @abstractmethod
    def check(self, create: bool = True) -> None:
        """Raise ``EndpointError`` naming the endpoint if the store cannot be reached (``ConfigError``
        if it does not exist). With ``create``, a store that can be made (a local folder) is made;
        without, a reader (``jobs.status``) leaves no trace of a mistyped URI."""

    def transfer_each(self, fn: Callable[[T], R], items: Iterable[T], threads: int | None = None) -> list[R]:
        """``at_once`` with ``transfer_threads`` (or ``threads``); an interrupt abandons the
        requests in flight."""
        threads = self.transfer_threads if threads is None else threads
        return at_once(fn, items, threads, on_interrupt=self.abandon_transfers)

    @property
    def fetch_threads(self) -> int:
        """Files a fetch downloads side by side."""
        return self.transfer_threads

    def abandon_transfers(self) -> None:
        """The caller was interrupted: requests still in flight should retry no more (S3's do)."""
        return None  # a local folder's writes are not retried

    def url(self, key: str) -> str:
        return f"{self.uri.rstrip('/')}/{validate_key(key)}"

    # -- the commit protocol -------------------------------------------------------------------

    def is_committed(self, key: str) -> bool:
        return self.exists(f"{key}/{MANIFEST}")

    def read_manifest(self, key: str) -> dict[str, Any]:
        """The manifest of a committed output, its shape checked.

        A damaged manifest (truncated, garbage, a file entry without size or checksum) is an
        ``InputError`` naming it: a retry cannot repair it, and a reader must never guess a file's
        checksum or size (unchecked, a KeyError or JSON error would surface as a retryable crash).
        """
        if not self.is_committed(key):
            raise InputError(f"no committed output at {self.url(key)}")
        where = self.url(f"{key}/{MANIFEST}")
        try:
            manifest = json.loads(self.read_bytes(f"{key}/{MANIFEST}"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(
                f"{where}: not valid JSON ({e}); the manifest is corrupt: delete it and rerun the phase "
                "that wrote it"
            ) from e
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not all(
            isinstance(info, dict)
            and type(info.get("size")) is int
            and isinstance(info.get("sha256"), str)
            and isinstance(info.get("object"), str)
            for info in files.values()
        ):
            raise InputError(
                f"{where}: expected an object whose 'files' map each file to its size, sha256 and "
                "object; the manifest is corrupt: delete it and rerun the phase that wrote it"
            )
        return manifest

    def commit_dir(self, local_dir: Path, key: str, metadata: dict[str, Any] | None = None) -> dict:
        """Upload every file of ``local_dir`` under ``key/<attempt>/``, then the manifest, last."""
        validate_key(key)
        attempt = uuid.uuid4().hex[:12]
        paths = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        paths = [p for p in paths if p.relative_to(local_dir).as_posix() != MANIFEST]

        def upload(path: Path) -> tuple[str, dict]:
            rel = path.relative_to(local_dir).as_posix()
            self.upload_file(path, f"{key}/{attempt}/{rel}")
            fault_point("store.upload.mid")
            return rel, {
                "size": path.stat().st_size,
                "sha256": sha256_file(path),
                "object": f"{attempt}/{rel}",
            }

        # Whatever order the uploads finish in, the manifest is written after the last one.
        files = dict(self.transfer_each(upload, paths))
        manifest = {
            "key": key,
            "attempt": attempt,
            "committed_at": time.time(),
            "files": files,
            "metadata": metadata or {},
        }
        fault_point("store.commit.before_manifest")
        self.write_bytes(f"{key}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
        fault_point("store.commit.after_manifest")
        return manifest

    @contextlib.contextmanager
    def staged_output(
        self, key: str, scratch_dir: str | Path, metadata: dict[str, Any] | None = None
    ) -> Iterator[Path]:
        """Yield an empty local folder; commit it under ``key`` when the block succeeds.

        An exception inside the block commits nothing: the store keeps its previous state.
        """
        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="stage-", dir=scratch_dir))
        try:
            yield tmp
            self.commit_dir(tmp, key, metadata)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def fetch_dir(self, key: str, cache_dir: str | Path) -> Path:
        """A local copy of a committed output, every file checked against the manifest's SHA-256.

        Files already in the cache with the right checksum are not downloaded again.
        """
        manifest = self.read_manifest(key)
        target = Path(cache_dir) / "fetched" / key
        for rel, info in manifest["files"].items():
            try:  # a tampered manifest must not write (or read) outside the output
                validate_key(rel)
                validate_key(info["object"])
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(
                    f"{self.url(f'{key}/{MANIFEST}')}: file {rel!r}: {e}; the manifest is corrupt"
                ) from e
        # Folders cleared of stale partials before any download starts (once each: a glob reads it all).
        for folder in sorted({(target / rel).parent for rel in manifest["files"]}):
            if folder.is_dir():
                _drop_stale_partials(folder)

        def bring(item: tuple[str, dict]) -> None:
            rel, info = item
            local = target / rel
            if (
                local.is_file()
                and local.stat().st_size == info["size"]
                and sha256_file(local) == info["sha256"]
            ):
                return
            local.parent.mkdir(parents=True, exist_ok=True)
            # A private partial name: two processes may fetch the same output at once.
            fd, partial_name = tempfile.mkstemp(
                prefix=f".{short_name(local.name)}.", suffix=".partial", dir=local.parent
            )
            os.close(fd)
            partial = Path(partial_name)
            obj = f"{key}/{info['object']}"
            try:
                try:
                    self.download_file(obj, partial, info["size"])
                except FileNotFoundError as e:
                    raise self._missing(key, obj) from e
                self._check_object(key, obj, info, partial.stat().st_size, sha256_file(partial))
                partial.replace(local)
            finally:
                partial.unlink(missing_ok=True)

        self.transfer_each(bring, manifest["files"].items(), self.fetch_threads)
        return target

    def read_output_file(self, key: str, rel: str) -> bytes:
        """One file of a committed output, by its path inside the output, checked against the
        manifest's size and SHA-256 as ``fetch_dir`` checks (merge reads search.json this way: a
        damaged one must be refused, never parsed and used)."""
        files = self.read_manifest(key)["files"]
        if rel not in files:
            raise InputError(f"{self.url(key)}: the committed output has no file {rel!r}")
        info = files[rel]
        try:
            validate_key(info["object"])
        except ValueError as e:
            raise InputError(
                f"{self.url(f'{key}/{MANIFEST}')}: file {rel!r}: {e}; the manifest is corrupt"
            ) from e
        obj = f"{key}/{info['object']}"
        try:
            data = self.read_bytes(obj)
        except FileNotFoundError as e:
            raise self._missing(key, obj) from e
        self._check_object(key, obj, info, len(data), hashlib.sha256(data).hexdigest())
        return data

    def _missing(self, key: str, obj: str) -> InputError:
        # The manifest is written last and attempts are never deleted: a file it lists that is gone
        # was deleted behind the store's back. A retry cannot bring it back (exit 2, not 1).
        return InputError(
            f"{self.url(obj)}: missing, though {self.url(f'{key}/{MANIFEST}')} lists it; the output is "
            "corrupt: delete the manifest and rerun the phase that wrote it"
        )

    def _check_object(self, key: str, obj: str, info: dict, size: int, digest: str) -> None:
        """Refuse an object whose bytes are not those its manifest recorded: a truncated or replaced
        file by its size, any other change by its SHA-256."""
        fix = (
            f"the object is corrupt: delete {self.url(f'{key}/{MANIFEST}')} and rerun the phase that wrote it"
        )
        if size != info["size"]:
            raise InputError(
                f"{self.url(obj)}: size mismatch (manifest {info['size']} bytes, got {size}); {fix}"
            )
        if digest != info["sha256"]:
            raise InputError(
                f"{self.url(obj)}: checksum mismatch (manifest {info['sha256'][:12]}, got "
                f"{digest[:12]}); {fix}"
            )

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, data: Any) -> None:
        self.write_bytes(key, json.dumps(data, indent=1, sort_keys=True).encode())
