"""A cache of VQA answers and image-text scores, so re-running an evaluation recomputes nothing.

Why: TIFA and DSG ask a VQA model tens of questions per image, and CLIPScore runs a CLIP model per
image; an eval that is rerun (a retry, a new aggregation rule, one more variant, a bootstrap
instead of a mean) would otherwise pay for every model call again. An answer depends only on the
model, the image and the question, so it is cached under exactly those:

    key = (backend name, backend version, SHA-256 of the image bytes, question or text, template)

``backend version`` is whatever identifies the model's behaviour (a weights revision, a prompt
format version): bump it and every answer is a miss. ``template`` is the prompt template the
question was put in, if any. The image is keyed by the SHA-256 of the *bytes* given (use the
committed PNG files, not a re-encoding, so the key does not depend on the encoder). A row holds
an ``answer`` (text), a ``score`` (float) or both.

Storage is one SQLite file (``AnswerCache``), safe for several writers on one machine: WAL
journal (readers never block writers), a busy timeout, and ``BEGIN IMMEDIATE`` writes. The first
value stored for a key wins: a later write never replaces it, it only fills a field that was
empty (``INSERT ... ON CONFLICT DO UPDATE SET f = COALESCE(f, excluded.f)``: ``INSERT OR IGNORE``
per field). SQLite's locking needs a local disk, so the file is not shared through the store
directly: ``StoreBackedAnswerCache`` fetches the committed cache (one ``answers.sqlite`` under a
key such as ``cache/answers/<backend>``) into a private working copy at start and, at the end,
merges in whatever another job committed meanwhile and commits the union back. The store has no
compare-and-swap, so two jobs committing in the same instant can still lose one job's new rows:
for a cache that only means recomputing them later, never a wrong answer.

``cached(fn, cache, backend, version)`` wraps a batched model call
``fn(images: list[bytes], questions: list[str]) -> list[answer]`` so that only the misses are
computed, in one batch (each distinct key once), and the results come back in input order.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from selma_core.errors import InputError
from selma_core.storage.base import ArtifactStore, validate_key

__all__ = [
    "CACHE_FILE",
    "AnswerCache",
    "CacheKey",
    "CachedValue",
    "StoreBackedAnswerCache",
    "cached",
    "image_sha256",
]

log = logging.getLogger(__name__)

#: The file name of the cache inside its committed store output.
CACHE_FILE = "answers.sqlite"
#: ``PRAGMA user_version`` of the schema below; a file with another (non-zero) version is refused.
SCHEMA_VERSION = 1
DAMAGED = "damaged"  # the committed cache's manifest could not be read: as if there were none
Field = Literal["answer", "score"]

_COLUMNS = "backend, version, image_sha256, text, template, answer, score, created_at"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    backend TEXT NOT NULL,
    version TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    text TEXT NOT NULL,
    template TEXT NOT NULL,
    answer TEXT,
    score REAL,
    created_at REAL NOT NULL,
    PRIMARY KEY (backend, version, image_sha256, text, template)
) WITHOUT ROWID
"""
# First value wins, per field: a conflicting row only fills fields that are still NULL. The WHERE
# makes a write that fills nothing a no-op, so ``total_changes`` counts only new information.
_ON_CONFLICT = """
ON CONFLICT (backend, version, image_sha256, text, template) DO UPDATE SET
    answer = COALESCE(answers.answer, excluded.answer),
    score = COALESCE(answers.score, excluded.score)
WHERE (answers.answer IS NULL AND excluded.answer IS NOT NULL)
   OR (answers.score IS NULL AND excluded.score IS NOT NULL)
"""
_INSERT = f"INSERT INTO answers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) {_ON_CONFLICT}"
# ``WHERE true``: SQLite's parser needs it between INSERT ... SELECT and an ON CONFLICT clause.
_MERGE = (
    f"INSERT INTO main.answers ({_COLUMNS}) SELECT {_COLUMNS} FROM other.answers WHERE true {_ON_CONFLICT}"
)
_SELECT = (
    "SELECT answer, score FROM answers "
    "WHERE backend = ? AND version = ? AND image_sha256 = ? AND text = ? AND template = ?"
)


def image_sha256(image: bytes) -> str:
    """The image part of a cache key: SHA-256 (hex) of the image file's bytes."""
    return hashlib.sha256(image).hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What an answer depends on: the model (``backend``, ``version``), the image, the question."""

    backend: str
    version: str
    image_sha256: str
    text: str  # the question (VQA) or the text an image is scored against
    template: str = ""  # the prompt template the question was put in, if any

    @classmethod
    def for_image(cls, backend: str, version: str, image: bytes, text: str, template: str = "") -> CacheKey:
        return cls(backend, version, image_sha256(image), text, template)

    def row(self) -> tuple[str, str, str, str, str]:
        return (self.backend, self.version, self.image_sha256, self.text, self.template)


@dataclass(frozen=True)
class CachedValue:
    """A cached answer (text), score (float), or both; at least one is set."""

    answer: str | None = None
    score: float | None = None

    def __post_init__(self) -> None:
        if self.answer is None and self.score is None:
            raise ValueError("a cached value needs an answer or a score")
        if self.answer is not None and not isinstance(self.answer, str):
            raise TypeError(f"answer: expected text, got {type(self.answer).__name__} {self.answer!r:.80}")
        if self.score is not None and math.isnan(self.score):
            raise ValueError("score: NaN cannot be cached (SQLite stores it as NULL)")

    def get(self, field: Field) -> str | float | None:
        return self.answer if field == "answer" else self.score


class AnswerCache:
    """One SQLite cache file; thread-safe, and several processes may open the same file.

    ``hits`` and ``misses`` count the distinct keys ``get_many`` found and did not find;
    ``written`` counts the rows this object added or filled (``put_many`` and ``merge_from``).
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.written = 0
        self._lock = threading.Lock()
        # Autocommit mode (isolation_level=None): transactions are the explicit BEGIN ... COMMIT below.
        self._conn = sqlite3.connect(
            str(self.path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")  # WAL-safe; a cache may lose its last write
            with self._write():
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, SCHEMA_VERSION):
                    raise InputError(
                        f"answer cache {self.path}: schema version {version}, this code reads "
                        f"{SCHEMA_VERSION}; use another cache file (or delete this one)"
                    )
                self._conn.execute(_SCHEMA)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise InputError(f"answer cache {self.path}: not a usable SQLite cache: {e}") from e
        except BaseException:
            self._conn.close()
            raise

    # -- transactions ----------------------------------------------------------------------------

    class _Transaction:
        def __init__(self, conn: sqlite3.Connection, begin: str) -> None:
            self.conn, self.begin = conn, begin

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute(self.begin)
            return self.conn

        def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
            self.conn.execute("COMMIT" if kind is None else "ROLLBACK")

    def _write(self) -> AnswerCache._Transaction:
        # IMMEDIATE takes the write lock up front (waiting up to the busy timeout), so a
        # transaction never has to upgrade a read lock, which SQLite may refuse without waiting.
        return AnswerCache._Transaction(self._conn, "BEGIN IMMEDIATE")

    # -- the API ---------------------------------------------------------------------------------

    def get_many(self, keys: Iterable[CacheKey], field: Field | None = None) -> dict[CacheKey, CachedValue]:
        """The cached values of ``keys`` that are present (with ``field``: that have that field)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[CacheKey, CachedValue] = {}
        with self._lock, AnswerCache._Transaction(self._conn, "BEGIN"):  # one consistent snapshot
            for key in wanted:
                row = self._conn.execute(_SELECT, key.row()).fetchone()
                if row is None:
                    continue
                value = CachedValue(answer=row[0], score=row[1])
                if field is None or value.get(field) is not None:
                    found[key] = value
            self.hits += len(found)
            self.misses += len(wanted) - len(found)
        return found

    def put_many(self, items: Mapping[CacheKey, CachedValue] | Iterable[tuple[CacheKey, CachedValue]]) -> int:
        """Store values, in one transaction; a key already stored keeps its value (fields that were
        empty are filled). Returns how many rows were added or filled."""
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        now = time.time()
        rows = [(*key.row(), value.answer, value.score, now) for key, value in pairs]
        if not rows:
            return 0
        with self._lock:
            before = self._conn.total_changes
            with self._write():
                self._conn.executemany(_INSERT, rows)
            added = self._conn.total_changes - before
            self.written += added
        return added

    def merge_from(self, other: str | Path) -> int:
        """Copy in every row of another cache file that this one lacks (first value still wins).

        Returns how many rows were added or filled."""
        other = Path(other)
        if not other.is_file():
            raise InputError(f"answer cache {other}: no such file to merge")
        with self._lock:
            self._conn.execute("ATTACH DATABASE ? AS other", (str(other),))
            try:
                version = self._conn.execute("PRAGMA other.user_version").fetchone()[0]
                if version != SCHEMA_VERSION:
                    raise InputError(
                        f"answer cache {other}: schema version {version}, expected {SCHEMA_VERSION}"
                    )
                before = self._conn.total_changes
                with self._write():
                    self._conn.execute(_MERGE)
                added = self._conn.total_changes - before
            except sqlite3.DatabaseError as e:
                raise InputError(f"answer cache {other}: cannot merge: {e}") from e
            finally:
                self._conn.execute("DETACH DATABASE other")
            self.written += added
        return added

    def snapshot(self, target: str | Path) -> Path:
        """A consistent single-file copy (no WAL beside it) of the cache, e.g. for upload."""
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        with self._lock:
            self._conn.execute("VACUUM INTO ?", (str(target),))
        return target

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "written": self.written}

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class StoreBackedAnswerCache:
    """An ``AnswerCache`` that lives in the artifact store as the committed output ``prefix``.

    ``open()`` (or ``with``) fetches the committed ``answers.sqlite`` under ``prefix`` (if any) into
    a private working copy under ``scratch_dir`` and returns the cache; ``commit()`` (also run by
    ``close()``) merges in any version another job committed since, then commits the union under
    ``prefix``, only when this job wrote something. ``with`` also commits when its block raises an
    ``Exception`` (answers already computed are still right; a retry reuses them) unless
    ``commit_on_error`` is False; a commit that fails then is logged, and the block's error raised.

    ``prefix`` is a store key such as ``cache/answers/<backend>``. Every commit writes a full copy
    under a new attempt folder (the store's protocol); older attempts are not deleted.
    """

    def __init__(
        self,
        store: ArtifactStore,
        prefix: str,
        scratch_dir: str | Path,
        busy_timeout_s: float = 30.0,
        commit_on_error: bool = True,
    ) -> None:
        self.store = store
        self.prefix = validate_key(prefix)
        self.scratch_dir = Path(scratch_dir)
        self.busy_timeout_s = busy_timeout_s
        self.commit_on_error = commit_on_error
        self.cache: AnswerCache | None = None
        self._workdir: Path | None = None
        self._base_attempt: str | None = None  # the committed version this copy includes
        self._committed_written = 0

    def _committed_attempt(self) -> str | None:
        """The committed version's attempt id; None when there is none, ``DAMAGED`` when its manifest
        cannot be read (logged: a cache is an optimisation, and the next commit replaces it)."""
        if not self.store.is_committed(self.prefix):
            return None
        try:
            return str(self.store.read_manifest(self.prefix)["attempt"])
        except (InputError, KeyError, TypeError) as e:
            log.warning("%s: manifest unreadable (%s); ignored", self.store.url(self.prefix), e)
            return DAMAGED

    def _fetch_private_copy(self, name: str) -> Path | None:
        """The committed cache file, copied into the work folder (the fetched file stays pristine).

        None when there is none or it fails its checksum (logged: a cache is an optimisation, and
        the next commit replaces it); an unreachable store still raises."""
        assert self._workdir is not None
        try:
            fetched = self.store.fetch_dir(self.prefix, self.scratch_dir) / CACHE_FILE
        except InputError as e:
            log.warning("%s: %s; ignored", self.store.url(self.prefix), e)
            return None
        if not fetched.is_file():
            log.warning("%s: committed cache has no %s; ignored", self.store.url(self.prefix), CACHE_FILE)
            return None
        copy = self._workdir / name
        shutil.copyfile(fetched, copy)
        return copy

    def open(self) -> AnswerCache:
        if self.cache is not None:
            return self.cache
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self._workdir = Path(tempfile.mkdtemp(prefix="answer-cache-", dir=self.scratch_dir))
        working = self._workdir / CACHE_FILE
        self._base_attempt = self._committed_attempt()
        if self._base_attempt not in (None, DAMAGED):
            copy = self._fetch_private_copy(CACHE_FILE)
            if copy is not None:
                try:
                    AnswerCache(copy, self.busy_timeout_s).close()
                except InputError as e:  # a cache is an optimisation: start empty rather than fail
                    log.warning("%s: %s; starting an empty cache", self.store.url(self.prefix), e)
                    for leftover in self._workdir.iterdir():
                        leftover.unlink()
        self.cache = AnswerCache(working, self.busy_timeout_s)
        self._committed_written = self.cache.written
        return self.cache

    def commit(self) -> dict[str, Any] | None:
        """Commit the cache under ``prefix`` if this job wrote to it; returns the manifest (or None)."""
        if self.cache is None or self._workdir is None:
            raise RuntimeError("StoreBackedAnswerCache.commit: the cache is not open")
        if self.cache.written == self._committed_written:
            return None
        latest = self._committed_attempt()
        if latest not in (None, DAMAGED, self._base_attempt):
            newer = self._fetch_private_copy("newer.sqlite")
            if newer is not None:
                try:
                    merged = self.cache.merge_from(newer)
                    log.info("%s: merged %d row(s) committed by another job", self.prefix, merged)
                except InputError as e:
                    log.warning("%s: %s; its rows are dropped", self.store.url(self.prefix), e)
                finally:
                    newer.unlink(missing_ok=True)
        stage = self._workdir / "stage"
        snapshot = self.cache.snapshot(stage / CACHE_FILE)
        try:
            manifest = self.store.commit_dir(
                stage,
                self.prefix,
                {"kind": "selma.answer-cache", "schema": SCHEMA_VERSION, "rows": len(self.cache)},
            )
        finally:
            snapshot.unlink(missing_ok=True)
        self._base_attempt = manifest["attempt"]
        self._committed_written = self.cache.written
        return manifest

    def close(self, commit: bool = True) -> dict[str, Any] | None:
        """Commit (unless ``commit`` is False), close the cache and remove the working copy."""
        if self.cache is None:
            return None
        try:
            return self.commit() if commit else None
        finally:
            self.cache.close()
            self.cache = None
            if self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def __enter__(self) -> AnswerCache:
        return self.open()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
            return
        commit = self.commit_on_error and isinstance(error, Exception)
        try:
            self.close(commit=commit)
        except Exception:  # never hide the block's own error behind the cache's
            log.exception("%s: committing the answer cache failed", self.store.url(self.prefix))


class NotAResult(ValueError):
    """A model's result that cannot be cached (not text, not a number, NaN); ``position``: the
    position of its input in the call, so that the caller can name what it was asked."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


def _normalise(value: Any, field: Field, position: int) -> CachedValue:
    shown = f"{type(value).__name__} {value!r:.80}"
    if field == "answer":
        if not isinstance(value, str):
            raise NotAResult(f"the result for input {position} is {shown}, expected text", position)
        return CachedValue(answer=value)
    try:
        score = float(value)
    except (TypeError, ValueError) as e:
        raise NotAResult(f"the result for input {position} is {shown}, not a score", position) from e
    if math.isnan(score):
        raise NotAResult(
            f"the score for input {position} is NaN (not cached: SQLite keeps NaN as NULL)", position
        )
    return CachedValue(score=score)


def cached(
    fn: Callable[[list[bytes], list[str]], Sequence[Any]],
    cache: AnswerCache,
    backend: str,
    version: str,
    template: str = "",
    field: Field = "answer",
) -> Callable[[list[bytes], list[str]], list[Any]]:
    """``fn`` with its results cached: only the missing (image, question) pairs reach ``fn``.

    ``fn(images, questions)`` is called at most once per call of the wrapper, with each distinct
    missing pair once, in first-seen order; results come back in input order. ``field``: what
    ``fn`` returns, ``"answer"`` (text) or ``"score"`` (a number, returned as float). Returned
    values are this call's (a concurrent writer that stored another value for a key first keeps
    its value in the cache).
    """

    @functools.wraps(fn)
    def wrapper(images: list[bytes], questions: list[str]) -> list[Any]:
        if len(images) != len(questions):
            raise ValueError(f"cached: {len(images)} images but {len(questions)} questions")
        hashes: dict[int, str] = {}  # one hash per image object, even if it is asked many questions
        keys = []
        for image, question in zip(images, questions, strict=True):
            if id(image) not in hashes:
                hashes[id(image)] = image_sha256(image)
            keys.append(CacheKey(backend, version, hashes[id(image)], question, template))
        found = cache.get_many(keys, field=field)
        missing: dict[CacheKey, int] = {}  # each missing key, at its first position
        for i, key in enumerate(keys):
            if key not in found and key not in missing:
                missing[key] = i
        computed: dict[CacheKey, CachedValue] = {}
        if missing:
            positions = list(missing.values())
            results = list(fn([images[i] for i in positions], [questions[i] for i in positions]))
            if len(results) != len(positions):
                raise ValueError(
                    f"cached: {fn!r} returned {len(results)} results for {len(positions)} inputs"
                )
            computed = {
                key: _normalise(r, field, position)
                for key, r, position in zip(missing, results, positions, strict=True)
            }
            cache.put_many(computed)
        return [(found.get(key) or computed[key]).get(field) for key in keys]

    return wrapper
