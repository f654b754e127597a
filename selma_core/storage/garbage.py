"""What the commit protocol leaves in a store that nothing reads any more: found, and deleted on request.

A commit uploads its files under ``<key>/<attempt>/`` and writes the manifest last
(``selma_core.storage.base``), and jobs keep resume state beside their output while they run. Both
leave objects behind that no reader ever opens:

- **attempts**: ``<key>/<attempt>/`` folders no manifest names: a commit killed before its manifest,
  or one whose manifest a later commit of the same key replaced (a forced rerun; the answer cache,
  committed anew by every evaluation).
- **resume state of committed outputs**: ``_shards/`` (images), ``_partial/`` (prompts) and
  ``_checkpoints/`` (train) under a key whose output is committed: a job killed between its commit
  and their deletion leaves them, and its rerun is skipped.
- **unfinished writes**: a local store's temporary files and S3's multipart uploads never completed,
  left by a process killed mid-write (S3 bills an upload's parts until it is aborted; a bucket
  lifecycle rule can abort them too).
- **abandoned resume state** (only when asked for): the same folders under a key never committed.
  A killed job's rerun resumes from them, so they are only abandoned when no rerun will come (its
  settings changed, and with them the key): nothing in the store tells which, so only their age
  does.

Nothing is touched under a key whose in-flight marker (its own ``_inflight.json``, or an images
process's under ``_workers/``) is held by a live job, as the lease module judges it (``holder_is_dead``:
its holder's process gone, or its expiry a TTL past); nor any folder with an object written within
``min_age_s``; nor an attempt replaced within ``min_age_s`` (a reader that read the manifest before
may still be fetching it). Deleting, each folder's key is listed again first: a lease taken since
spares it, and only objects unchanged since the listing (same size and time) are deleted, manifests
first. Caches (``cache/eval-images``, ``cache/compile``, ``cache/attention``) are kept: they are
reused, not garbage (a write left unfinished in them is taken). Unfinished writes are looked for
under this project's top-level prefixes only (``WRITTEN``): a bucket may be shared with other tools.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from selma_core.errors import ConfigError, InputError
from selma_core.storage.base import MANIFEST, ArtifactStore, StoredObject, UnfinishedWrite
from selma_core.storage.lease import holder_is_dead

# Keys written with the commit protocol, by who writes them: the plan's outputs
# (selma_core.plan.build_plan: <phase prefix>/[<skill>/]<16 hex>), the latent cache
# (selma_core.latent_cache: cache/latents/<32 hex>), the eval answer cache
# (selma_core.phases.evaluate.ANSWER_CACHE_KEY) and kept tracking buffers
# (jobs.tracking_buffers: _tracking/<MLflow run id>).
COMMITTED_KEY = re.compile(
    r"(?:(?:prompts|images|experts)/[a-z0-9_-]+/[0-9a-f]{16}"
    r"|(?:merged|eval|merge-search/best|merge-search/candidate-\d{3,})/[0-9a-f]{16}"
    r"|cache/latents/[0-9a-f]{32}"
    r"|cache/answers/eval"
    r"|_tracking/[0-9a-f]{32})"
)
# Top-level prefixes holding them: listed one by one, never the whole store (its caches are large).
SCANNED = (
    "prompts",
    "images",
    "experts",
    "merged",
    "merge-search",
    "eval",
    "cache/latents",
    "cache/answers",
    "_tracking",
)
# Where this project's writes go: where a write left unfinished is looked for (the caches included:
# their writes are ours too), never the whole store or bucket, which other tools may share.
WRITTEN = tuple(dict.fromkeys(prefix.split("/")[0] for prefix in SCANNED))
ATTEMPT = re.compile(r"[0-9a-f]{12}")  # commit_dir's attempt folders: uuid4().hex[:12]
RESUME_STATE = ("_shards", "_partial", "_checkpoints")
LEASE = "_inflight.json"  # selma_core.storage.lease.LEASE: a job's, or an images process's
DEFAULT_MIN_AGE_S = 24 * 3600.0


@dataclass
class Garbage:
    """One folder's worth of objects nothing reads."""

    # "attempt" | "resume state of a committed output" | "abandoned resume state" | "unfinished write"
    kind: str
    key: str  # the output's key the folder is under (an unfinished write's own)
    prefix: str
    objects: list[StoredObject] = field(default_factory=list)
    write: UnfinishedWrite | None = None  # an unfinished write's, which is no object

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def newest(self) -> float:
        return max(o.modified for o in self.objects)


def _keys(store: ArtifactStore) -> Iterator[tuple[str, dict[str, list[StoredObject]]]]:
    """Every key the commit protocol writes, with its objects by their first name below the key."""
    for top in SCANNED:
        found: dict[str, dict[str, list[StoredObject]]] = {}
        for obj in store.list_objects(top):
            match = COMMITTED_KEY.match(obj.key)
            if not match or obj.key[match.end() : match.end() + 1] != "/":
                continue  # not under a key the commit protocol writes: not ours to judge
            first = obj.key[match.end() + 1 :].split("/", 1)[0]
            found.setdefault(match.group(0), {}).setdefault(first, []).append(obj)
        yield from found.items()


def _leased(store: ArtifactStore, objects: Iterable[StoredObject], now: float) -> bool:
    """Whether a live job holds a lease among ``objects`` (one it cannot read counts as live)."""
    for obj in objects:
        if obj.key != LEASE and not obj.key.endswith("/" + LEASE):
            continue
        try:
            holder = store.read_json(obj.key)
        except FileNotFoundError:
            continue  # released since the listing
        except ValueError:
            return True
        if not isinstance(holder, dict) or not holder_is_dead(holder, 0.0, now):
            return True
    return False


def find_garbage(
    store: ArtifactStore,
    min_age_s: float = DEFAULT_MIN_AGE_S,
    abandoned: bool = False,
    now: float | None = None,
) -> tuple[list[Garbage], list[str]]:
    """The store's garbage older than ``min_age_s`` (``abandoned``: abandoned resume state too), and
    warnings about keys left alone (a damaged manifest)."""
    now = time.time() if now is None else now
    recent = now - min_age_s
    found: list[Garbage] = []
    warnings: list[str] = []
    leased: list[str] = []
    for key, children in _keys(store):
        if _leased(store, (o for objects in children.values() for o in objects), now):
            leased.append(f"{key}/")
            continue  # a job is at work on this key
        committed_attempt = None
        if MANIFEST in children:
            try:
                committed_attempt = store.read_manifest(key)["attempt"]
            except (InputError, KeyError) as e:
                warnings.append(f"{store.url(key)}: left alone: {e}")
                continue
        manifest_written = max((o.modified for o in children.get(MANIFEST, [])), default=0.0)
        written = {
            name: max(o.modified for o in objects)
            for name, objects in children.items()
            if ATTEMPT.fullmatch(name)
        }
        for first, objects in sorted(children.items()):
            if first in written and first != committed_attempt:
                if committed_attempt is not None and written[first] <= manifest_written:
                    # Once named by a manifest, perhaps: a reader that read that manifest may still
                    # be fetching it, until the commit after it (taken to be the next attempt
                    # written, else the current manifest) is min_age old.
                    replaced = min([t for t in written.values() if t > written[first]] + [manifest_written])
                    if replaced > recent:
                        continue
                kind = "attempt"
            elif first in RESUME_STATE and committed_attempt is not None:
                kind = "resume state of a committed output"
            elif first in RESUME_STATE and abandoned:
                kind = "abandoned resume state"
            else:
                continue
            group = Garbage(kind, key, f"{key}/{first}", objects)
            if group.newest <= recent:
                found.append(group)
    try:
        writes = store.list_unfinished_writes(WRITTEN)
    except ConfigError as e:  # a role that may list and delete objects, not list uploads: the rest stands
        warnings.append(
            f"unfinished writes not looked for: {e} (on S3 that takes s3:ListBucketMultipartUploads, "
            "s3:ListMultipartUploadParts and s3:AbortMultipartUpload)"
        )
        writes = []
    for write in writes:
        # A write in progress is written to as it goes: an old one's writer is dead.
        if write.modified <= recent and not write.key.startswith(tuple(leased)):
            stored = StoredObject(write.key, write.size, write.modified)
            found.append(Garbage("unfinished write", write.key, write.key, [stored], write))
    return found, warnings


def delete_garbage(store: ArtifactStore, group: Garbage, now: float | None = None) -> bool:
    """Delete one folder found by ``find_garbage``; False when spared. Its key is listed again
    first: a job that took a lease on it since spares the folder, and only objects unchanged since
    they were found (size and time) go, so what a rerun wrote there since, even under the same
    name, stays (but for the instant between this listing and the delete)."""
    if group.write is not None:
        return store.discard_unfinished_write(group.write)
    now = time.time() if now is None else now
    current = store.list_objects(group.key)
    if _leased(store, current, now):
        return False
    unchanged = set(current) & set(group.objects)
    store.delete_keys([o.key for o in group.objects if o in unchanged])
    return True
