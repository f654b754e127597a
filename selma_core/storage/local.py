"""``file://`` store: a folder; every write goes to a temporary file first and is renamed into place."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from selma_core.errors import ConfigError, SelmaError
from selma_core.faults import fault_point
from selma_core.storage.base import (
    MANIFEST,
    ArtifactStore,
    StoredObject,
    UnfinishedWrite,
    human_size,
    short_name,
    validate_key,
)

# Writes in progress; never listed, so a dead writer's leftovers are invisible to readers.
TMP_PREFIX = ".selma-tmp-"
# A full disk (ENOSPC) or an exhausted quota (EDQUOT): freeing space helps, so a retry can.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(SelmaError):
    """A local folder (the store, the scratch/cache folder) ran out of space; retryable (exit 1)."""


def no_space_error(folder: str | Path, needed: int | None = None, doing: str = "") -> NoSpaceError:
    """A ``NoSpaceError`` naming the folder, its free space and what was needed, if known."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{human_size(shutil.disk_usage(probe).free)} free"
    except OSError:
        free = "free space unknown"
    need = f", {human_size(needed)} needed" if needed is not None else ""
    what = f" while {doing}" if doing else ""
    return NoSpaceError(
        f"no space left on device in {folder}{what} ({free}{need}); nothing was committed: free space "
        "there (or point the folder at a larger disk) and rerun the job"
    )


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: str | Path, transfer_threads: int = 1) -> None:
        self.root = Path(root)
        self.uri = f"file://{self.root}"
        self.transfer_threads = transfer_threads

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def check(self, create: bool = True) -> None:
        if not create:
            if not self.root.is_dir():
                raise ConfigError(f"storage uri {self.uri}: no such folder")
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"storage uri {self.uri}: cannot create the store folder: {e}") from e
        if not os.access(self.root, os.W_OK):
            raise ConfigError(f"storage uri {self.uri}: folder is not writable")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.url(key)}: no such object")
        return path.read_bytes()

    def _atomic_write(self, key: str, write, size: int | None = None) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The name is cut short in the temporary name: the prefix and the random part must not
            # push a long (but legal) file name over the file system's 255-byte limit.
            fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{short_name(path.name)}.", dir=path.parent)
        except OSError as e:
            if e.errno in NO_SPACE_ERRNOS:
                raise no_space_error(path.parent, size, f"writing {self.url(key)}") from e
            raise
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            fault_point("store.write.before_rename")
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)  # frees what the partial write took
            if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
                raise no_space_error(path.parent, size, f"writing {self.url(key)}") from e
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data), len(data))

    def upload_file(self, local_path: Path, key: str) -> None:
        def copy(f) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        self._atomic_write(key, copy, Path(local_path).stat().st_size)

    def download_file(self, key: str, local_path: Path, size: int | None = None) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"{self.url(key)}: no such object")
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local_path)

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(TMP_PREFIX)
        )

    @property
    def fetch_threads(self) -> int:
        # A fetch here is a copy and a checksum, bound by this machine's disk and CPU, which threads
        # only share: bench/store_transfers.py --store local measured 0.76x with 8 threads on
        # 2 cores. (A commit's fsyncs do overlap: 1.2x to 1.4x.)
        return 1

    def list_objects(self, prefix: str) -> list[StoredObject]:
        objects = []
        for key in self.list_keys(prefix):
            try:
                stat = self._path(key).stat()
            except FileNotFoundError:  # deleted since it was listed
                continue
            objects.append(StoredObject(key, stat.st_size, stat.st_mtime))
        return objects

    def delete_keys(self, keys: list[str]) -> None:
        for key in sorted(keys, key=lambda k: (not k.endswith("/" + MANIFEST), k)):
            path = self._path(key)
            path.unlink(missing_ok=True)
            # Folders emptied by it go too, up to the store's root (a store keeps no empty folders).
            folder = path.parent
            while folder != self.root:
                try:
                    folder.rmdir()
                except OSError:  # not empty (or gone): the folders above are not empty either
                    break
                folder = folder.parent

    def list_unfinished_writes(self, prefixes: Iterable[str]) -> list[UnfinishedWrite]:
        writes = []
        found = (p for prefix in prefixes for p in self._path(prefix).rglob(f"{TMP_PREFIX}*"))
        for path in sorted(found):
            try:
                stat = path.stat()
            except FileNotFoundError:  # renamed into place (or removed) since
                continue
            writes.append(
                UnfinishedWrite(path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime)
            )
        return writes

    def discard_unfinished_write(self, write: UnfinishedWrite) -> bool:
        path = self._path(write.key)
        if not path.name.startswith(TMP_PREFIX):
            raise ValueError(f"{self.url(write.key)}: not a temporary file")
        try:
            stat = path.stat()
        except FileNotFoundError:
            return True
        if (stat.st_size, stat.st_mtime) != (write.size, write.modified):
            return False
        path.unlink(missing_ok=True)
        return True

    def delete_prefix(self, prefix: str) -> None:
        folder = self._path(prefix)
        # Manifests first: a delete cut short must not leave a manifest listing deleted files.
        for manifest in sorted(folder.rglob(MANIFEST)) if folder.is_dir() else []:
            manifest.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
