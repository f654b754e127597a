"""Bring your own data: read an existing image-text dataset that a skill names (``dataset:``).

A skill with a ``dataset`` has no prompts or images job: its expert trains on the dataset's
ground-truth pairs, so human captions can be compared with auto-generated data, as the SELMA paper
does (docs/datasets.md). Two layouts, local or in S3:

- **imagefolder** (Hugging Face): a folder with ``metadata.jsonl`` at its top, one JSON object per
  line with ``file_name`` (the image's path inside the folder) and a caption (``text`` by default;
  ``caption`` or ``prompt`` also; ``caption_column`` names another);
- **webdataset**: ``.tar`` shards (a folder of them, one shard, or a brace pattern such as
  ``shards/train-{0000..0099}.tar``); a sample is the members sharing a key (the path up to the
  first dot of the file name): an image (``.jpg``, ``.jpeg``, ``.png`` or ``.webp``) and a caption
  (``.txt``, or ``.json`` with ``text``, ``caption`` or ``prompt``).

``read_external_dataset`` returns what ``read_image_dataset`` returns for generated data, (metadata
with a string ``prompt`` and an ``id``, encoded image bytes) in a fixed order, so the trainer takes
either; images are not decoded here (the trainer's ``open_image`` checks and decodes them). Bad
input is an ``InputError`` naming the file and the row or sample.

Held out for evaluation: ``split_dataset`` keeps a deterministic share (or count) of the distinct
captions out of training; eval's heldout benchmark and merge-search read exactly those captions
(``heldout_prompts``), and ``load_training_pairs`` returns the rest to the train phase.

Keys. The train job's output key hashes the dataset's *listing fingerprint*: every file the layout
reads (metadata.jsonl and images, or the shards) with its size and a content identity: the file's
SHA-256 for a local dataset (computed once, then remembered by size, mtime and inode under
``cache_dir``), the object's ETag for S3 (content-derived, and listed at 1,000 objects a request: the
controller and every job plan the pipeline, so downloading an S3 dataset to hash it would cost each
of them the whole dataset). Changed, added or removed data gives a new key, hence a new expert;
where the data lives (the path, the bucket) is not part of it, though the same files in a local
folder and in S3 have different identities (SHA-256 vs ETag), hence different keys. Every byte a
job reads is checked
against that listing (SHA-256 locally, ``If-Match`` on the ETag in S3), and a job whose dataset
changed after its plan was made stops with an ``InputError`` rather than commit an expert under a
key that names other data.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from selma_core.errors import ConfigError, InputError

if TYPE_CHECKING:
    from selma_core.config import PipelineConfig, StorageConfig
    from selma_core.skills import DatasetSpec, Skill

METADATA_FILE = "metadata.jsonl"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Caption columns tried in order when caption_column is not set.
CAPTION_COLUMNS = ("text", "caption", "prompt")
Layout = Literal["auto", "imagefolder", "webdataset"]
Pair = tuple[dict, bytes]
# A tar file ends with zero-filled 512-byte blocks (POSIX: two); a shard cut short has none.
TAR_BLOCK = 512
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# Bound on one brace pattern's expansion: a typo must not list a billion shards.
MAX_SHARDS = 100_000


# -- where the data is ---------------------------------------------------------------------------


def resolve_uri(uri: str, base_dir: str | Path | None = None) -> str:
    """``s3://bucket/prefix`` as it is; a local path (``file://`` optional, ``~`` expanded) made
    absolute against ``base_dir`` (a skill's dataset: the skill file's folder)."""
    if uri.startswith("s3://"):
        return uri.rstrip("/") if uri.count("/") > 2 else uri
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    resolved = Path(path).expanduser()
    if not resolved.is_absolute():
        resolved = Path(base_dir or ".") / resolved
    return str(Path(os.path.normpath(resolved.absolute())))


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: ``{a,b}`` alternatives and ``{000..099}`` ranges (zero padding
    kept), several per pattern; a pattern without braces is itself."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numbers = _RANGE.match(body)
    if numbers:
        first, last = int(numbers.group(1)), int(numbers.group(2))
        # Zero-padded, as bash and braceexpand pad, to the wider bound when either has a leading zero.
        bounds = [b.lstrip("-") for b in numbers.groups()]
        padded = any(len(b) > 1 and b.startswith("0") for b in bounds)
        width = max(len(b) for b in bounds) if padded else 0
        step = 1 if last >= first else -1
        if abs(last - first) >= MAX_SHARDS:
            raise InputError(f"{pattern}: {{{body}}} names more than {MAX_SHARDS:,} shards")
        options = [str(i).zfill(width) for i in range(first, last + step, step)]
    else:
        options = body.split(",")
    expanded = [f"{head}{option}{rest}" for option in options for rest in expand_braces(tail)]
    if len(expanded) > MAX_SHARDS:
        raise InputError(f"{pattern}: names more than {MAX_SHARDS:,} shards")
    return expanded


@dataclass(frozen=True)
class DatasetFile:
    """One file a dataset's layout reads."""

    path: str  # relative to the dataset's root, '/'-separated
    size: int
    version: str  # local: the file's SHA-256; S3: the object's ETag


@dataclass(frozen=True)
class DatasetListing:
    """The files of a dataset, as found now: what its fingerprint (and the expert's key) is made of."""

    root: str  # an absolute folder, or s3://bucket/prefix
    layout: Literal["imagefolder", "webdataset"]
    files: tuple[DatasetFile, ...]
    # The S3 endpoint of an s3:// root (None: AWS's default); not part of the fingerprint.
    endpoint_url: str | None = None

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the layout and every file's relative path, size and content identity."""
        entries = [self.layout, *([f.path, f.size, f.version] for f in self.files)]
        blob = json.dumps(entries, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def where(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def file(self, rel: str) -> DatasetFile | None:
        return self._by_path.get(rel)

    @property
    def _by_path(self) -> dict[str, DatasetFile]:
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = {f.path: f for f in self.files}
            object.__setattr__(self, "_index", cached)
        return cached


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _extension(rel: str) -> str:
    name = rel.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _pick_layout(
    uri: str, names: list[str], layout: Layout, shards_only: bool
) -> tuple[Literal["imagefolder", "webdataset"], list[str]]:
    """The layout and the files it reads, from every file name under the root."""
    has_metadata = METADATA_FILE in names
    asked = layout
    if layout == "auto":
        layout = "imagefolder" if has_metadata and not shards_only else "webdataset"
    if layout == "imagefolder":
        if shards_only:
            raise InputError(
                f"dataset {uri}: layout imagefolder needs a folder with {METADATA_FILE}, not shards"
            )
        if not has_metadata:
            raise InputError(
                f"dataset {uri}: no {METADATA_FILE} at its top (layout imagefolder: one JSON object per "
                "line with file_name and a caption)"
            )
        return "imagefolder", [n for n in names if n == METADATA_FILE or _extension(n) in IMAGE_EXTENSIONS]
    shards = [n for n in names if _extension(n) == "tar"]
    if not shards:
        if asked == "auto":
            raise InputError(
                f"dataset {uri}: neither a {METADATA_FILE} at its top (imagefolder) nor .tar shards "
                "(webdataset) found"
            )
        raise InputError(f"dataset {uri}: no .tar shards found (layout webdataset)")
    return "webdataset", shards


def file_name_of(name: str) -> str:
    """A metadata row's ``file_name`` as a path inside the dataset, as Hugging Face's imagefolder
    reads it: ``\\`` taken for ``/``, a leading ``./`` dropped."""
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _named_in(metadata: bytes, used: list[str]) -> list[str]:
    """Of an imagefolder's files, ``metadata.jsonl`` and the images its rows name: the images under
    the folder that no row names (a full COCO folder beside a subset's metadata) are neither hashed
    nor part of the fingerprint. Rows the reader refuses are left to it: it names them by line."""
    named: set[str] = set()
    try:
        text = metadata.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = ""
    for line in text.split("\n"):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("file_name"), str):
            named.add(file_name_of(row["file_name"]))
    return [n for n in used if n == METADATA_FILE or n in named]


def _more(missing: list[str]) -> str:
    return f" (and {len(missing) - 1} more of the pattern's shards)" if len(missing) > 1 else ""


def _split_pattern(path: str) -> tuple[str, str]:
    """(root folder, pattern relative to it) of a shard pattern: the root ends before the first
    brace's folder."""
    brace = path.find("{")
    cut = path.rfind("/", 0, brace if brace >= 0 else len(path))
    if cut < 0:  # shards at the top of an S3 bucket
        return "", path
    return path[:cut], path[cut + 1 :]


def list_dataset(
    uri: str,
    storage: StorageConfig | None = None,
    *,
    layout: Layout = "auto",
    base_dir: str | Path | None = None,
    endpoint_url: str | None = None,
    scratch_dir: str | Path | None = None,
) -> DatasetListing:
    """The files a dataset's layout reads, with their sizes and content identities.

    ``storage``: the pipeline's store settings, whose endpoint, region and retries an ``s3://``
    dataset shares (``endpoint_url`` overrides the endpoint). ``scratch_dir``: where a local
    dataset's file hashes are remembered (None: hashed every time).
    """
    resolved = resolve_uri(uri, base_dir)
    if resolved.startswith("s3://"):
        return _list_s3(resolved, storage, layout, endpoint_url, scratch_dir)
    return _list_local(resolved, layout, scratch_dir)


def _list_local(path: str, layout: Layout, scratch_dir: str | Path | None) -> DatasetListing:
    shards_only = "{" in path or path.endswith(".tar")
    if shards_only:
        root, pattern = _split_pattern(path)
        names = expand_braces(pattern)
        missing = [name for name in names if not (Path(root) / name).is_file()]
        if missing:
            raise InputError(f"dataset {path}: shard {Path(root) / missing[0]} not found{_more(missing)}")
    else:
        root = path
        if not Path(root).is_dir():
            raise InputError(
                f"dataset {path}: no such folder (expected a folder with {METADATA_FILE} or .tar shards, "
                "a shard pattern, or s3://bucket/prefix)"
            )
        names = []
        # Subfolders that are links (a mounted volume: images -> /mnt/coco/train2017) are read
        # too, except a link to a folder the walk is inside: that one would walk for ever.
        for folder, dirs, files in os.walk(root, followlinks=True):
            inside = _walked_into(root, folder)
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".") and os.path.realpath(os.path.join(folder, d)) not in inside
            )
            rel_folder = Path(folder).relative_to(root).as_posix()
            for name in files:
                rel = name if rel_folder == "." else f"{rel_folder}/{name}"
                if not _is_hidden(rel):
                    names.append(rel)
        names.sort()
    chosen, used = _pick_layout(path, names, layout, shards_only)
    if chosen == "imagefolder":
        where = Path(root) / METADATA_FILE
        try:
            metadata = where.read_bytes()
        except OSError as e:
            raise InputError(f"{where}: cannot read it: {e}") from e
        used = _named_in(metadata, used)
    hashes = _HashCache(root, scratch_dir)
    files = tuple(DatasetFile(rel, *hashes.size_and_sha256(Path(root) / rel)) for rel in used)
    hashes.save()
    return DatasetListing(root=root, layout=chosen, files=files)


def _walked_into(root: str, folder: str) -> set[str]:
    """The real paths of ``folder`` and of every folder between it and ``root``."""
    parts = Path(folder).relative_to(root).parts
    return {os.path.realpath(Path(root, *parts[:n])) for n in range(len(parts) + 1)}


class _HashCache:
    """A local dataset's file hashes by (size, mtime, inode): a dataset is hashed once per machine,
    not by every job that plans the pipeline."""

    def __init__(self, root: str, scratch_dir: str | Path | None) -> None:
        self.path = None
        self.entries: dict[str, list] = {}
        self.changed = False
        if scratch_dir is None:
            return
        name = hashlib.sha256(root.encode()).hexdigest()[:16]
        self.path = Path(scratch_dir) / "datasets" / f"hashes-{name}.json"
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                self.entries = data
        except (OSError, ValueError):
            pass  # none yet, or damaged: hashed again

    def size_and_sha256(self, path: Path) -> tuple[int, str]:
        try:
            st = path.stat()
        except OSError as e:
            raise InputError(f"{path}: cannot read it: {e}") from e
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self.entries.get(str(path))
        if isinstance(entry, list) and len(entry) == 4 and entry[:3] == stamp:
            return st.st_size, entry[3]
        from selma_core.storage.base import sha256_file

        sha = sha256_file(path)
        self.entries[str(path)] = [*stamp, sha]
        self.changed = True
        return st.st_size, sha

    def forget(self, path: Path) -> None:
        if self.entries.pop(str(path), None) is not None:
            self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        try:  # atomic: concurrent jobs may lose each other's entries (hashed again), never corrupt them
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(self.path, json.dumps(self.entries).encode(), prefix=".hashes-")
        except OSError:
            pass  # a cache: the next listing hashes again


def _write_atomically(path: Path, data: bytes, prefix: str) -> None:
    """``data`` into ``path`` through a temporary file beside it (``prefix``...``.partial``): a reader
    sees the old file or the whole new one, and a failure leaves no temporary file behind."""
    fd, partial = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


_S3_STORES: dict[tuple, object] = {}


def _s3_store(root: str, storage: StorageConfig | None, endpoint_url: str | None):
    """The project's S3 client for a dataset's bucket: the store's endpoint, region and retries
    (one per bucket and settings in a process: a boto3 client takes a while to make)."""
    from selma_core.config import StorageConfig
    from selma_core.storage.s3 import S3ArtifactStore

    cfg = storage or StorageConfig()
    bucket = root[len("s3://") :].split("/", 1)[0]
    settings = (
        bucket,
        endpoint_url or cfg.endpoint_url,
        cfg.region,
        cfg.connect_retries,
        cfg.retry_budget_s,
        cfg.retry_backoff_max_s,
    )
    if settings not in _S3_STORES:
        _S3_STORES[settings] = S3ArtifactStore(
            f"s3://{bucket}",
            settings[1],
            cfg.region,
            cfg.connect_retries,
            retry_budget_s=cfg.retry_budget_s,
            retry_backoff_max_s=cfg.retry_backoff_max_s,
        )
    return _S3_STORES[settings]


def _shown(key: str) -> str:
    """A key the store's messages can show (it checks keys as its own)."""
    from selma_core.storage.base import validate_key

    try:
        return validate_key(key)
    except ValueError:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "_"


def _list_s3(
    root: str,
    storage: StorageConfig | None,
    layout: Layout,
    endpoint_url: str | None,
    scratch_dir: str | Path | None = None,
) -> DatasetListing:
    store = _s3_store(root, storage, endpoint_url)
    bucket, _, path = root[len("s3://") :].partition("/")
    shards_only = "{" in path or path.endswith(".tar")
    if shards_only:
        folder, pattern = _split_pattern(path)
        wanted = expand_braces(pattern)
    else:
        folder, wanted = path, None
    prefix = f"{folder}/" if folder else ""
    paginator = store.client.get_paginator("list_objects_v2")
    # The store's retries and error mapping (an unreachable endpoint: EndpointError, no permission:
    # ConfigError), on this bucket's listing.
    pages = store._call(
        "list", _shown(folder or "*"), lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix))
    )
    found: dict[str, DatasetFile] = {}
    for page in pages:
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if rel and not rel.endswith("/") and not _is_hidden(rel):
                found[rel] = DatasetFile(rel, int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))
    base = f"s3://{bucket}/{folder}" if folder else f"s3://{bucket}"
    if wanted is not None:
        missing = [w for w in wanted if w not in found]
        if missing:
            raise InputError(f"dataset {root}: shard {base}/{missing[0]} not found{_more(missing)}")
        names = wanted
    else:
        if not found:
            raise InputError(f"dataset {root}: no objects under it (expected {METADATA_FILE} or .tar shards)")
        names = sorted(found)
    chosen, used = _pick_layout(root, names, layout, shards_only)
    if chosen == "imagefolder":  # read as the reader will: If-Match its ETag, kept in scratch
        only_metadata = DatasetListing(base, chosen, (found[METADATA_FILE],), store.endpoint_url)
        used = _named_in(_Files(only_metadata, scratch_dir, storage).read(METADATA_FILE), used)
    return DatasetListing(
        root=base, layout=chosen, files=tuple(found[n] for n in used), endpoint_url=store.endpoint_url
    )


# -- reading --------------------------------------------------------------------------------------


class _Files:
    """A listing's files as verified bytes: a local file read and checked against its SHA-256, an
    S3 object downloaded to scratch (``If-Match`` its listed ETag) and reused while the ETag holds."""

    def __init__(
        self, listing: DatasetListing, scratch_dir: str | Path | None, storage: StorageConfig | None
    ) -> None:
        self.listing = listing
        self.s3 = listing.root.startswith("s3://")
        # None: S3 objects are downloaded for each read, kept nowhere
        self.scratch = Path(scratch_dir) / "datasets" if scratch_dir is not None else None
        self.store = _s3_store(listing.root, storage, listing.endpoint_url) if self.s3 else None
        self.hashes = None if self.s3 else _HashCache(listing.root, scratch_dir)

    def exists(self, rel: str) -> bool:
        return self.listing.file(rel) is not None

    def read(self, rel: str) -> bytes:
        entry = self.listing.file(rel)
        if entry is None:
            raise InputError(f"{self.listing.where(rel)}: not in the dataset")
        return self._read_s3(entry) if self.s3 else self._read_local(entry)

    def _changed(self, entry: DatasetFile) -> InputError:
        return InputError(
            f"{self.listing.where(entry.path)}: changed since the dataset was listed (the pipeline's plan "
            "keys the expert by the dataset's contents); resubmit once the dataset stops changing"
        )

    def _read_local(self, entry: DatasetFile) -> bytes:
        path = Path(self.listing.root) / entry.path
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise self._changed(entry) from e
        except OSError as e:
            raise InputError(f"{path}: cannot read it: {e}") from e
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.version:
            self.hashes.forget(path)  # a stale remembered hash must not outlive this error
            self.hashes.save()
            raise self._changed(entry)
        return data

    def _read_s3(self, entry: DatasetFile) -> bytes:
        bucket, _, folder = self.listing.root[len("s3://") :].partition("/")
        key = f"{folder}/{entry.path}" if folder else entry.path
        name = hashlib.sha256(f"{bucket}/{key}@{entry.version}".encode()).hexdigest()[:32]
        local = self.scratch / "s3" / f"{name}.{_extension(entry.path) or 'bin'}" if self.scratch else None
        if local is not None and local.is_file() and local.stat().st_size == entry.size:
            return local.read_bytes()  # downloaded before, for this very ETag (renamed in whole)
        client = self.store.client

        def get() -> bytes:  # the whole body inside the retried call: a reset mid-read is retried too
            from botocore.exceptions import ClientError

            try:
                body = client.get_object(Bucket=bucket, Key=key, IfMatch=entry.version)["Body"].read()
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                    raise self._changed(entry) from e
                raise
            return body

        try:
            data = self.store._call("get", _shown(key), get)
        except FileNotFoundError as e:
            raise self._changed(entry) from e
        if len(data) != entry.size:
            raise self._changed(entry)
        if local is not None:
            # The kept copy saves a download next time, no more: a scratch folder that cannot be
            # written (a controller's on Kubernetes, where the cache is the pods') fails nothing.
            with contextlib.suppress(OSError):
                local.parent.mkdir(parents=True, exist_ok=True)
                _write_atomically(local, data, prefix=f".{local.name}.")
        return data


def _caption(row: dict, column: str | None, where: str) -> str:
    """The caption of a metadata row or a sample's JSON: ``column``, else the first of text, caption,
    prompt that is present."""
    if column is not None:
        if column not in row:
            raise InputError(f"{where}: no caption column {column!r} (dataset.caption_column)")
        chosen = column
    else:
        chosen = next((c for c in CAPTION_COLUMNS if c in row), None)
        if chosen is None:
            raise InputError(
                f"{where}: no caption: expected a string {', '.join(repr(c) for c in CAPTION_COLUMNS)} "
                "(or set dataset.caption_column)"
            )
    value = row[chosen]
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: caption {chosen!r}: expected non-empty text, got {str(value)[:80]!r}")
    return value.strip()


def _safe_rel(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _read_imagefolder(
    files: _Files, caption_column: str | None, max_samples: int | None, images: bool
) -> list[Pair]:
    where_meta = files.listing.where(METADATA_FILE)
    raw = files.read(METADATA_FILE)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{where_meta}: expected UTF-8 text: {e}") from e
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    # Lines end at "\n" only (as JSON Lines and Hugging Face read them): str.splitlines() would also
    # split at U+2028, U+2029 and U+0085, which JSON allows raw inside a caption.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if max_samples is not None and len(pairs) >= max_samples:
            break
        if not line.strip():
            continue
        where = f"{where_meta}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: expected a JSON object: {e}") from e
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {line.strip()[:80]!r}")
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: no 'file_name' (the image's path inside {files.listing.root})")
        name = file_name_of(name)
        if not _safe_rel(name):
            raise InputError(f"{where}: file_name {name!r}: expected a path inside the dataset's folder")
        where = f"{where} ({name})"
        caption = _caption(row, caption_column, where)
        if _extension(name) not in IMAGE_EXTENSIONS:
            raise InputError(
                f"{where}: expected an image file ({', '.join('.' + e for e in IMAGE_EXTENSIONS)})"
            )
        if not files.exists(name):
            if _is_hidden(name):  # the listing skips them: "not found" would contradict `ls`
                raise InputError(
                    f"{where}: image {files.listing.where(name)}: a hidden path (a part starts with "
                    "'.'), which the dataset's listing skips: move or rename it"
                )
            raise InputError(f"{where}: image {files.listing.where(name)} not found")
        seen[name] = seen.get(name, 0) + 1  # several captions of one image: one sample each
        sample_id = name if seen[name] == 1 else f"{name}#{seen[name]}"
        image = files.read(name) if images else b""
        pairs.append(({"id": sample_id, "prompt": caption, "file": name, "source": "dataset"}, image))
    if not pairs:
        raise InputError(f"{where_meta}: no rows: the dataset is empty")
    return pairs


def _sample_key(member: str) -> tuple[str, str]:
    """WebDataset's key and extension: the path up to the first dot of the file name, and the rest."""
    folder, _, name = member.rpartition("/")
    stem, dot, ext = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _read_webdataset(
    files: _Files, caption_column: str | None, max_samples: int | None, images: bool
) -> list[Pair]:
    pairs: list[Pair] = []
    seen: dict[str, str] = {}
    for entry in files.listing.files:
        if max_samples is not None and len(pairs) >= max_samples:
            break
        shard = files.listing.where(entry.path)
        samples: dict[str, dict[str, bytes]] = {}
        raw = files.read(entry.path)
        try:
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _sample_key(member.name)
                    if not ext or key.rsplit("/", 1)[-1].startswith((".", "_")):
                        continue  # no extension, hidden or metadata members (e.g. __key__): not sample data
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
                end = tar.offset
        except (tarfile.TarError, EOFError) as e:
            raise InputError(f"{shard}: expected a tar file (WebDataset shard), cannot read it: {e}") from e
        if raw[end : end + TAR_BLOCK] != bytes(TAR_BLOCK):
            # tarfile takes a missing or cut header for the end of the archive: a shard cut short (a
            # writer that died, a copy interrupted) would read as fewer samples, silently.
            raise InputError(
                f"{shard}: the tar file ends without its end-of-archive blocks after {len(samples)} "
                f"sample(s) ({len(raw):,} bytes): cut short? Write or copy the shard again"
            )
        for key, members in samples.items():
            if max_samples is not None and len(pairs) >= max_samples:
                break
            where = f"{shard}: sample {key!r}"
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if image_ext is None:
                raise InputError(
                    f"{where}: no image (.{', .'.join(IMAGE_EXTENSIONS)}); "
                    f"it has {', '.join(sorted(members))}"
                )
            caption = _webdataset_caption(members, caption_column, where)
            if key in seen:
                raise InputError(f"{where}: the key is also in {seen[key]}; sample keys must be unique")
            seen[key] = shard
            image = members[image_ext]
            # The split's identity of the image (``_image_of``): read with the captions alone too.
            digest = hashlib.sha256(image).hexdigest()
            meta = {
                "id": key,
                "prompt": caption,
                "shard": entry.path,
                "source": "dataset",
                "image_sha256": digest,
            }
            pairs.append((meta, image if images else b""))
    if not pairs:
        raise InputError(f"dataset {files.listing.root}: no samples in its shards: the dataset is empty")
    return pairs


def _webdataset_caption(members: dict[str, bytes], column: str | None, where: str) -> str:
    def text_of(ext: str) -> str:
        try:
            return members[ext].decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: .{ext}: expected UTF-8 text: {e}") from e

    if column is not None and column in members and column != "json":
        caption = text_of(column).strip()
        if not caption:
            raise InputError(f"{where}: .{column}: the caption is empty")
        return caption
    if column is None and "txt" in members:
        caption = text_of("txt").strip()
        if not caption:
            raise InputError(f"{where}: .txt: the caption is empty")
        return caption
    if "json" not in members:
        if column is None:
            wanted = f"a .txt or a .json with {', '.join(repr(c) for c in CAPTION_COLUMNS)}"
        else:
            wanted = f"a .{column} member or a .json with {column!r} (caption_column)"
            if "txt" in members:
                wanted += "; its .txt is not read while caption_column is set: unset it to caption with .txt"
        raise InputError(
            f"{where}: no caption: expected {wanted}; the sample has {', '.join(sorted(members))}"
        )
    try:
        row = json.loads(text_of("json"))
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: .json: expected JSON: {e}") from e
    if not isinstance(row, dict):
        raise InputError(f"{where}: .json: expected an object, got {str(row)[:80]!r}")
    return _caption(row, column, f"{where}: .json")


def read_external_dataset(
    uri: str,
    scratch_dir: str | Path,
    storage: StorageConfig | None = None,
    *,
    layout: Layout = "auto",
    caption_column: str | None = None,
    max_samples: int | None = None,
    base_dir: str | Path | None = None,
    endpoint_url: str | None = None,
    images: bool = True,
    listing: DatasetListing | None = None,
) -> list[Pair]:
    """(metadata, encoded image) pairs of an image-text dataset, in its order (metadata.jsonl's rows;
    the shards by name, then each shard's samples), at most ``max_samples`` of them.

    Metadata: ``id`` (imagefolder: the file name, ``#2``... for further captions of one image;
    webdataset: the sample's key), ``prompt`` (the caption), ``file`` or ``shard`` (webdataset also
    ``image_sha256``: what tells its image from another's for the split), ``source``.
    ``uri``: a local path (relative to ``base_dir``), a shard pattern, or ``s3://bucket/prefix``
    (downloaded to ``scratch_dir``; ``storage``'s endpoint, region and retries). ``images`` False:
    captions only, the image bytes empty and (imagefolder) not read. ``listing``: the files as
    already listed (``list_dataset``); every file read must still match it.
    """
    if listing is None:
        listing = list_dataset(
            uri, storage, layout=layout, base_dir=base_dir, endpoint_url=endpoint_url, scratch_dir=scratch_dir
        )
    files = _Files(listing, scratch_dir, storage)
    read = _read_imagefolder if listing.layout == "imagefolder" else _read_webdataset
    return read(files, caption_column, max_samples, images)


# -- the held-out split ---------------------------------------------------------------------------


def normalize_caption(text: str) -> str:
    """Captions compared for the split: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


def _caption_rank(normalized: str) -> str:
    return hashlib.sha256(normalized.encode()).hexdigest()


def heldout_count(distinct: int, heldout: int | float) -> int:
    """How many of ``distinct`` captions are held out: a count as it is, a share rounded (at least
    one); always leaving one to train on."""
    count = (
        heldout
        if isinstance(heldout, int) and not isinstance(heldout, bool)
        else max(1, round(heldout * distinct))
    )
    if count and count >= distinct:
        raise InputError(
            f"the dataset has {distinct} distinct caption(s); holding out {count} leaves none to train on "
            "(lower dataset.heldout)"
        )
    return count


def _image_of(meta: dict) -> str:
    """What tells one image from another for the split: its file (imagefolder), the SHA-256 of its
    bytes (webdataset: a captioned dataset often repeats an image in one sample per caption), else
    the sample."""
    return str(meta.get("file") or meta.get("image_sha256") or meta.get("id"))


def split_dataset(pairs: list[Pair], heldout: int | float) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs), each in the dataset's order.

    The unit is a group of distinct captions (lower case, whitespace collapsed) joined by the images
    they share: COCO's five captions of one image are one group. A held-out caption is never trained
    on, whichever images carry it, and neither is an image of one: otherwise its other captions,
    paraphrases of the held-out one, would teach the expert the answer. Groups are taken by their
    captions' smallest SHA-256 while they fit in the ``heldout`` captions wanted, then the one group
    that comes nearest it if it comes nearer (a group is never split, nor one taken that would leave
    nothing to train on): a large group is not held out whole for its rank. The split depends on
    the pairs of caption and image only (not on their order, the layout or where the data is), so
    the train and eval jobs, each reading the dataset, agree.
    """
    captions = [normalize_caption(meta["prompt"]) for meta, _ in pairs]
    distinct = sorted(set(captions), key=_caption_rank)
    count = heldout_count(len(distinct), heldout)
    if not count:
        return list(pairs), []
    group = {caption: caption for caption in distinct}  # union-find: caption -> a caption of its group

    def root(caption: str) -> str:
        while group[caption] != caption:
            group[caption] = group[group[caption]]
            caption = group[caption]
        return caption

    first_caption: dict[str, str] = {}
    for (meta, _), caption in zip(pairs, captions, strict=True):
        a, b = root(caption), root(first_caption.setdefault(_image_of(meta), caption))
        if a != b:
            group[max(a, b, key=_caption_rank)] = min(a, b, key=_caption_rank)
    groups: dict[str, list[str]] = {}
    for caption in distinct:  # rank order: each group comes at its smallest caption's place
        groups.setdefault(root(caption), []).append(caption)
    held: set[str] = set()
    left = []
    for members in groups.values():  # the groups that fit in what is still wanted
        if len(held) + len(members) <= count:
            held.update(members)
        else:
            left.append(members)
    # Then the one group that comes nearest the count, where it comes nearer than none (or none is
    # held yet) and leaves captions to train on: a large group (one caption on many images) is not
    # taken past the count for its rank.
    fits = [m for m in left if len(held) + len(m) < len(distinct)]
    if len(held) < count and fits:
        nearest = min(fits, key=lambda m: abs(len(held) + len(m) - count))
        if not held or abs(len(held) + len(nearest) - count) < count - len(held):
            held.update(nearest)
    if not held:
        raise InputError(
            f"the dataset's {len(distinct)} distinct caption(s) are one group, joined by the images "
            "they share: holding any out would hold out every image (set dataset.heldout: 0 and "
            "evaluate on a benchmark: eval.benchmark dsg1k or tifa)"
        )
    train = [p for p, caption in zip(pairs, captions, strict=True) if caption not in held]
    kept = [p for p, caption in zip(pairs, captions, strict=True) if caption in held]
    return train, kept


def heldout_records(skill_name: str, heldout_pairs: list[Pair]) -> list[dict]:
    """Prompt records (as ``prompts.jsonl`` has them) of the held-out captions, one per distinct
    caption, in the dataset's order; ids ``<skill>-<caption hash>``, stable and file-name safe."""
    records, seen = [], set()
    for meta, _ in heldout_pairs:
        normalized = normalize_caption(meta["prompt"])
        if normalized in seen:
            continue
        seen.add(normalized)
        records.append(
            {
                "id": f"{skill_name}-{_caption_rank(normalized)[:12]}",
                "skill": skill_name,
                "text": meta["prompt"],
                "source": "dataset",
                "sample": meta.get("id"),
                "split": "heldout",
            }
        )
    return records


# -- a skill's dataset, for the plan and the phases ------------------------------------------------


def skill_dataset_listing(cfg: PipelineConfig, skill: Skill) -> DatasetListing:
    """The listing of a dataset skill's data, as the plan keys it. A local path is relative to the
    skill files' folder (``skills_dir``: absolute once the config is loaded, the same for every job
    of a local pipeline, unlike the config file a job reads, which is a snapshot in the log folder)."""
    spec: DatasetSpec = _spec(skill)
    return list_dataset(
        spec.uri,
        cfg.storage,
        layout=spec.layout,
        base_dir=cfg.skills_dir,
        endpoint_url=spec.endpoint_url,
        scratch_dir=cfg.cache_dir,
    )


def _spec(skill: Skill) -> DatasetSpec:
    if skill.dataset is None:
        raise ConfigError(
            f"skill {skill.name!r} has no dataset: its data comes from its prompts and images jobs"
        )
    return skill.dataset


def read_skill_dataset(ctx, skill_name: str, images: bool = True) -> list[Pair]:
    """A dataset skill's pairs (``max_samples`` applied), after checking that the data is still what
    the job's plan keyed: otherwise an ``InputError`` (an output must not be committed under a key
    that names other data)."""
    skill = ctx.skills[skill_name]
    spec = _spec(skill)
    listing = skill_dataset_listing(ctx.config, skill)
    planned = getattr(ctx.plan, "datasets", {}).get(skill_name)
    if planned is not None and planned.fingerprint != listing.fingerprint:
        raise InputError(
            f"{ctx.job.id}: the dataset of skill {skill_name!r} ({listing.root}) changed since this "
            "pipeline was planned; resubmit it (the changed data gives a new expert)"
        )
    return read_external_dataset(
        spec.uri,
        ctx.scratch_dir,
        ctx.config.storage,
        caption_column=spec.caption_column,
        max_samples=spec.max_samples,
        images=images,
        listing=listing,
    )


def load_training_pairs(ctx, skill_name: str) -> list[Pair]:
    """What a skill's expert trains on, (metadata with ``id`` and ``prompt``, encoded image) pairs:
    a dataset skill's training split (its held-out captions left out), or a generated skill's
    committed images."""
    if not ctx.skills[skill_name].is_dataset:
        from selma_core.phases.images import read_image_dataset

        return read_image_dataset(ctx.fetch("images", skill_name))
    pairs = read_skill_dataset(ctx, skill_name)
    train, held = split_dataset(pairs, ctx.skills[skill_name].dataset.heldout)
    captions = len({normalize_caption(meta["prompt"]) for meta, _ in held})
    print(
        f"skill {skill_name}: training on {len(train)} of the dataset's {len(pairs)} pairs; {len(held)} "
        f"held out ({captions} caption(s) and every image that carries one)",
        file=sys.stderr,
    )
    return train


def heldout_prompts(ctx, skill_name: str) -> list[dict]:
    """A dataset skill's held-out captions as prompt records (``id``, ``text``, ``split``), in the
    dataset's order; the images are not read (a WebDataset's shards are, for their captions)."""
    spec = _spec(ctx.skills[skill_name])
    _, held = split_dataset(read_skill_dataset(ctx, skill_name, images=False), spec.heldout)
    return heldout_records(skill_name, held)


def prompt_records(ctx, skill_name: str, read_prompts: Callable[[Path], list[dict]]) -> list[dict]:
    """A skill's prompt records: a generated skill's committed ``prompts.jsonl`` (both splits), a
    dataset skill's held-out captions."""
    skill = ctx.skills.get(skill_name) if hasattr(ctx, "skills") else None
    if skill is not None and skill.is_dataset:
        return heldout_prompts(ctx, skill_name)
    return read_prompts(ctx.fetch("prompts", skill_name) / "prompts.jsonl")
