"""The frozen encoders' outputs for one dataset, computed once and cached in the store.

Training an expert runs the frozen VAE on every image and the frozen text encoder(s) on every prompt.
Their outputs depend on the images, the base model, the resolution and the compute dtype, not on the
expert's settings, so the train phase (``train.cache_latents``, on by default) computes them once and
commits them, with the store's protocol (files under an attempt folder, the manifest last: a
half-written entry is never visible), as::

    cache/latents/<digest>/_manifest.json
                          /<attempt>/latents.safetensors          per sample id: the VAE posterior's
                                                                  parameters (diffusers'
                                                                  ``latent_dist.parameters``: mean and
                                                                  log-variance) of the image
                          /<attempt>/latents-flipped.safetensors  the same, of the image flipped
                                                                  left-right (once a run with
                                                                  ``random_flip`` needed them)
                          /<attempt>/text.safetensors             ``<id>/prompt_embeds`` per sample
                                                                  (SDXL: both encoders' hidden states,
                                                                  concatenated) and, for SDXL,
                                                                  ``<id>/pooled_prompt_embeds``
                          /<attempt>/cache.json                   format, what the digest hashed, the
                                                                  usable samples' ids in order and
                                                                  where each one's crop came from;
                                                                  the skipped images and why; SDXL's
                                                                  time ids

Safetensors and JSON only, no pickle. The posterior's parameters, not a sampled latent, are cached:
training still draws ``mean + std * randn`` with its own generator at every step (diffusers'
``latent_dist.sample``), so a cached run trains exactly as an uncached one. Every image and prompt
is encoded alone (a batch of one), with the cache and without it (``ExpertTrainer``), so the tensors
do not depend on which images share a batch: the adapter is the same, bit for bit on CPU.

The digest hashes a format version, the dataset's content (every sample's id, prompt and JPEG
SHA-256, in order, undecodable images included: equal to hashing the images output's key and more,
since images drawn again under the same key with other bytes get another entry), the base model id
and revision (the VAE and text encoders), the training resolution and the compute dtype. Reruns,
resumed jobs and every expert trained on the same images with the same model find the same entry.
The entry also says which images could not be used and why, and where each usable image's crop came
from, so a job that finds it decodes no image at all: the tensors, the skipped images and SDXL's
crop conditioning are all in it.

Reading fetches the entry with ``fetch_dir`` (every file's size and SHA-256 checked against the
manifest); a damaged entry (a file missing, truncated or altered; a corrupt manifest; tensors that
are not this dataset's) is reported with a warning naming the object and computed again and
recommitted: damaged tensors are never trained on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma_core.errors import InputError

# 2: the digest hashes every sample, undecodable ones too; the entry lists the skipped ones and the crops.
# 3: images are decoded upright (EXIF orientation), 16-bit greyscale scaled to 8 bits (not clipped).
FORMAT_VERSION = 3
CACHE_PREFIX = "cache/latents"
LATENT_FILES = {False: "latents.safetensors", True: "latents-flipped.safetensors"}
TEXT_FILE = "text.safetensors"
INDEX_FILE = "cache.json"
TEXT_NAMES = ("prompt_embeds", "pooled_prompt_embeds")


def sample_ids(dataset: list[tuple[dict, bytes]]) -> list[str]:
    """The samples' ids (``meta["id"]``); their positions when ids are missing or repeated (the
    digest fixes the dataset's order, so a position names one sample too)."""
    ids = [str(meta.get("id")) if meta.get("id") is not None else "" for meta, _ in dataset]
    if "" in ids or len(set(ids)) != len(ids):
        return [f"#{i}" for i in range(len(dataset))]
    return ids


def dataset_digest(dataset: list[tuple[dict, bytes]]) -> str:
    """SHA-256 of what the encoders read: every sample's id, prompt and image bytes, in order."""
    digest = hashlib.sha256()
    for sample_id, (meta, jpeg) in zip(sample_ids(dataset), dataset, strict=True):
        entry = [sample_id, meta.get("prompt"), hashlib.sha256(jpeg).hexdigest()]
        digest.update(json.dumps(entry).encode() + b"\n")
    return digest.hexdigest()


@dataclass
class Encoded:
    """One dataset's encoder outputs, stacked in dataset order (on CPU): its usable samples'."""

    ids: list[str]  # the usable samples' ids, in dataset order
    # Per usable sample: where its crop came from (the trainer's ImageCrop, as integers).
    crops: list[tuple[int, ...]] = field(default_factory=list)
    # The samples that could not be used: id -> why.
    skipped: dict[str, str] = field(default_factory=dict)
    # flipped (False / True) -> (N, 2 * latent channels, h, w): the VAE posterior's parameters
    latents: dict[bool, Any] = field(default_factory=dict)
    # "prompt_embeds" (N, L, D) and, for SDXL, "pooled_prompt_embeds" (N, P)
    text: dict[str, Any] = field(default_factory=dict)


class LatentCache:
    """The latent cache of one base model in one store; ``commit`` False: read it, never write it
    (torchrun's helper ranks: rank 0 commits)."""

    def __init__(
        self,
        store,
        scratch_dir,
        base_model: str,
        base_model_revision: str | None,
        commit: bool = True,
        vae_model: str | None = None,
        vae_dtype: str | None = None,
        vae_model_revision: str | None = None,
    ) -> None:
        self.store, self.scratch_dir = store, Path(scratch_dir)
        self.base_model, self.base_model_revision, self.commit = base_model, base_model_revision, commit
        # Another VAE (train.vae_model) or one run in another dtype than the rest gives other latents.
        self.vae_model, self.vae_dtype = vae_model, vae_dtype
        self.vae_model_revision = vae_model_revision

    def spec(self, dataset, resolution: int, dtype: str) -> dict:
        """What determines the cached tensors (the digest hashes exactly this)."""
        return {
            "format": FORMAT_VERSION,
            "dataset": dataset_digest(dataset),
            "base_model": self.base_model,
            "base_model_revision": self.base_model_revision,
            "resolution": resolution,
            "dtype": dtype,
            # Only when set: entries written before these existed keep their keys.
            **({"vae_model": self.vae_model} if self.vae_model else {}),
            **({"vae_model_revision": self.vae_model_revision} if self.vae_model_revision else {}),
            **({"vae_dtype": self.vae_dtype} if self.vae_dtype else {}),
        }

    @staticmethod
    def key(spec: dict) -> str:
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        return f"{CACHE_PREFIX}/{digest[:32]}"

    def load(self, spec: dict, ids: list[str]) -> Encoded | None:
        """The committed entry of the dataset whose samples' ids are ``ids``, every file verified;
        None when there is none or it is unusable (a warning names what is wrong: the damaged
        object's URL, for a file that fails its check)."""
        key = self.key(spec)
        if not self.store.is_committed(key):
            return None
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        # A private copy (ranks on one node share the scratch folder), deleted once read.
        local = Path(tempfile.mkdtemp(prefix="latents-", dir=self.scratch_dir))
        try:
            return read_entry(self.store.fetch_dir(key, local), spec, ids)
        except (InputError, ValueError, TypeError, KeyError) as e:  # damaged, or not this dataset's
            self.warn(key, str(e))
            return None
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def warn(self, key: str, problem: str) -> None:
        print(
            f"warning: latent cache {self.store.url(key)} is unusable ({problem}); computing it again",
            file=sys.stderr,
        )

    def save(self, spec: dict, encoded: Encoded, extra: dict | None = None) -> None:
        """Commit ``encoded`` under the spec's key (files first, the manifest last)."""
        if not self.commit:
            return
        with self.store.staged_output(self.key(spec), self.scratch_dir, {"latent_cache": spec}) as folder:
            write_entry(folder, spec, encoded, extra or {})


def write_entry(folder: Path, spec: dict, encoded: Encoded, extra: dict) -> None:
    from safetensors.torch import save_file

    def rows(tensor) -> list:  # one tensor per sample, each with its own storage (safetensors asks)
        return [row.detach().cpu().contiguous().clone() for row in tensor]

    for flipped, tensor in sorted(encoded.latents.items()):
        save_file(dict(zip(encoded.ids, rows(tensor), strict=True)), str(folder / LATENT_FILES[flipped]))
    text = {}
    for name, tensor in encoded.text.items():
        text.update({f"{i}/{name}": row for i, row in zip(encoded.ids, rows(tensor), strict=True)})
    save_file(text, str(folder / TEXT_FILE))
    index = {
        **extra,
        "spec": spec,
        "ids": encoded.ids,
        "crops": [list(crop) for crop in encoded.crops],
        "skipped": encoded.skipped,
        "flipped": sorted(encoded.latents),
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True))


def read_entry(folder: Path, spec: dict, ids: list[str]) -> Encoded:
    """An entry's files read back and stacked in dataset order; ``ValueError`` when they are not
    the dataset's whose samples' ids are ``ids`` (another spec, other ids, a tensor missing or of
    another shape or dtype)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise ValueError(f"no {INDEX_FILE}")
    index = json.loads(index_path.read_text())
    if not isinstance(index, dict) or index.get("spec") != spec:
        raise ValueError(f"{INDEX_FILE} was written for another dataset, model or format")
    skipped, crops = index.get("skipped"), index.get("crops")
    if not isinstance(skipped, dict) or not all(isinstance(v, str) for v in skipped.values()):
        raise ValueError(f"{INDEX_FILE}: expected the skipped images, id -> why")
    usable = [i for i in ids if i not in skipped]
    if index.get("ids") != usable or len(usable) + len(skipped) != len(ids) or not usable:
        raise ValueError(f"{INDEX_FILE} lists other sample ids than the dataset's")
    if (
        not isinstance(crops, list)
        or len(crops) != len(usable)
        or not all(isinstance(c, list) and len(c) == 5 and all(isinstance(v, int) for v in c) for c in crops)
    ):
        raise ValueError(f"{INDEX_FILE}: expected a crop (5 integers) per usable sample")
    ids = usable

    def load(name: str) -> dict:
        try:
            return load_file(str(folder / name))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{name}: {e}") from e

    def stack(tensors: dict, names: list[str], what: str):
        if sorted(tensors) != sorted(names):
            raise ValueError(f"{what}: its tensors are not one per sample of the dataset")
        first = tensors[names[0]]
        if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors.values()):
            raise ValueError(f"{what}: its tensors differ in shape or dtype")
        return torch.stack([tensors[n] for n in names])

    encoded = Encoded(ids, [tuple(c) for c in crops], dict(skipped))
    for flipped in index.get("flipped", []):
        if flipped not in LATENT_FILES:
            raise ValueError(f"{INDEX_FILE}: unknown orientation {flipped!r}")
        encoded.latents[flipped] = stack(load(LATENT_FILES[flipped]), ids, LATENT_FILES[flipped])
    if False not in encoded.latents:
        raise ValueError(f"no {LATENT_FILES[False]}")
    text = load(TEXT_FILE)
    names = sorted({k.rsplit("/", 1)[-1] for k in text})
    if not names or not set(names) <= set(TEXT_NAMES):
        raise ValueError(f"{TEXT_FILE}: expected {' and '.join(TEXT_NAMES)} per sample")
    for name in names:
        encoded.text[name] = stack(
            {k: v for k, v in text.items() if k.endswith(f"/{name}")}, [f"{i}/{name}" for i in ids], TEXT_FILE
        )
    return encoded
