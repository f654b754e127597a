"""``file://`` store: a folder; every write goes to a temporary file first and is renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from selma_core.errors import ConfigError
from selma_core.storage.base import ArtifactStore, validate_key

# Writes in progress; never listed, so a dead writer's leftovers are invisible to readers.
TMP_PREFIX = ".selma-tmp-"


class LocalArtifactStore(ArtifactStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def check(self) -> None:
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

    def _atomic_write(self, key: str, write) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def upload_file(self, local_path: Path, key: str) -> None:
        def copy(f) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        self._atomic_write(key, copy)

    def download_file(self, key: str, local_path: Path) -> None:
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

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)
