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
- **abandoned resume state** (only when asked for): the same folders under a key never committed.
  A killed job's rerun resumes from them, so they are only abandoned when no rerun will come (its
  settings changed, and with them the key): nothing in the store tells which, so only their age
  does.

Nothing is touched under a key whose in-flight marker (``_inflight.json``) was written within
``min_age_s`` (a job, or a forced rerun, may be writing there), nor any group with an object that
recent, nor an attempt that a manifest this recent replaced (a reader may still be fetching it);
what is deleted is exactly the objects listed, manifests first. Caches (``cache/eval-images``,
``cache/compile``, ``cache/attention``) are kept: they are reused, not garbage.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from selma_core.errors import InputError
from selma_core.storage.base import MANIFEST, ArtifactStore, StoredObject

# Keys written with the commit protocol, by who writes them: the plan's outputs
# (selma_core.plan.build_plan: <phase prefix>/[<skill>/]<16 hex>), the latent cache
# (selma_core.latent_cache: cache/latents/<32 hex>) and the eval answer cache
# (selma_core.phases.evaluate.ANSWER_CACHE_KEY).
COMMITTED_KEY = re.compile(
    r"(?:(?:prompts|images|experts)/[a-z0-9_-]+/[0-9a-f]{16}"
    r"|(?:merged|eval|merge-search/best|merge-search/candidate-\d{3,})/[0-9a-f]{16}"
    r"|cache/latents/[0-9a-f]{32}"
    r"|cache/answers/eval)"
)
# Top-level prefixes holding them: listed one by one, never the whole store (its caches are large).
SCANNED = ("prompts", "images", "experts", "merged", "merge-search", "eval", "cache/latents", "cache/answers")
ATTEMPT = re.compile(r"[0-9a-f]{12}")  # commit_dir's attempt folders: uuid4().hex[:12]
RESUME_STATE = ("_shards", "_partial", "_checkpoints")
LEASE = "_inflight.json"
DEFAULT_MIN_AGE_S = 24 * 3600.0


@dataclass
class Garbage:
    """One folder's worth of objects nothing reads."""

    kind: str  # "attempt" | "resume state of a committed output" | "abandoned resume state"
    prefix: str
    objects: list[StoredObject] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def newest(self) -> float:
        return max(o.modified for o in self.objects)


@dataclass
class _Key:
    """What one committed-protocol key holds: objects by their first name below the key."""

    key: str
    children: dict[str, list[StoredObject]] = field(default_factory=dict)


def _keys(store: ArtifactStore) -> Iterator[_Key]:
    for top in SCANNED:
        found: dict[str, _Key] = {}
        for obj in store.list_objects(top):
            match = COMMITTED_KEY.match(obj.key)
            if not match or obj.key[match.end() : match.end() + 1] != "/":
                continue  # not under a key the commit protocol writes: not ours to judge
            key = match.group(0)
            first = obj.key[match.end() + 1 :].split("/", 1)[0]
            found.setdefault(key, _Key(key)).children.setdefault(first, []).append(obj)
        yield from found.values()


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
    for entry in _keys(store):
        lease = entry.children.get(LEASE)
        if lease and max(o.modified for o in lease) > recent:
            continue  # a job is (or was lately) at work on this key
        committed_attempt = None
        if MANIFEST in entry.children:
            try:
                committed_attempt = store.read_manifest(entry.key)["attempt"]
            except (InputError, KeyError) as e:
                warnings.append(f"{store.url(entry.key)}: left alone: {e}")
                continue
        # A reader that read the manifest before the current one replaced it may still be
        # fetching the attempt it named: a replaced attempt waits until the manifest is as old.
        manifest_written = max((o.modified for o in entry.children.get(MANIFEST, [])), default=0.0)
        for first, objects in sorted(entry.children.items()):
            if ATTEMPT.fullmatch(first) and first != committed_attempt:
                if manifest_written > recent:
                    continue
                kind = "attempt"
            elif first in RESUME_STATE and committed_attempt is not None:
                kind = "resume state of a committed output"
            elif first in RESUME_STATE and abandoned:
                kind = "abandoned resume state"
            else:
                continue
            group = Garbage(kind, f"{entry.key}/{first}", objects)
            if group.newest <= recent:
                found.append(group)
    return found, warnings


def delete_garbage(store: ArtifactStore, garbage: list[Garbage]) -> None:
    """Delete exactly the objects found (never a whole prefix: what was written there since stays)."""
    for group in garbage:
        store.delete_keys([o.key for o in group.objects])
