"""Phase 2, images: a text-to-image model draws one image for every training prompt of a skill.

Recipe, one skill per job:
1. Read the skill's committed prompts; only the ``train`` split is drawn (held-out prompts are for
   evaluation). No prompts is an ``InputError``.
2. Load the generator: the pipeline config's ``generator_model`` (weak-to-strong) or the base model,
   any diffusers text-to-image pipeline (SD 1.x/2.x/XL: its own model_index.json decides).
3. Draw in batches of ``batch_size`` with one ``torch.Generator`` per prompt seeded from ``seed``
   and the prompt id, so an image does not depend on its batch and a rerun reproduces it.
4. Write WebDataset-layout tar shards (``<key>.jpg`` + ``<key>.json``) of ``shard_size`` samples
   (``shard-00000.tar``, ``shard-00001.tar``, ...; the prompts' order, whatever the batch size).
   Each shard is saved to the store as soon as it is complete (``<key>/_shards/``: the tar, then
   its size and SHA-256), so a killed job's rerun checks and reuses the saved shards and draws only
   the others (a damaged one is drawn again, with a warning naming it).
5. Commit every shard, ``shards.json`` (the shards in order, with their sample counts) and
   ``images.jsonl`` (the manifest of image, prompt, seed, model); then delete the saved shards.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from selma_core.errors import InputError
from selma_core.faults import fault_point
from selma_core.storage.base import sha256_file
from selma_core.typed_yaml import execution_only

# The first shard; an output of fewer than shard_size images (or one written before shards, without
# shards.json) has only this one.
SHARD_NAME = "shard-00000.tar"
SHARDS_FILE = "shards.json"  # the dataset manifest: every shard, in order, with its sample count
SAVED_SHARDS = "_shards"  # <key>/_shards/: shards saved as they complete, before the commit
_SHARD_PATTERN = re.compile(r"shard-\d{5,}\.tar")
# Images read from datasets: each side within these bounds, checked from the header before any
# pixel is decoded (a few KB of PNG can claim 20,000 x 20,000 px: a decompression bomb).
MAX_IMAGE_SIDE = 8192
MIN_IMAGE_SIDE = 8
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# Denoising steps: schedulers of SD 1.x/2.x/XL have 1,000 training timesteps.
MAX_INFERENCE_STEPS = 1000


@dataclass
class SamplingConfig:
    """How images are drawn; shared by the images phase and by evaluation."""

    # Denoising steps and classifier-free guidance (SELMA: the model's scheduler, 50 steps, 7.5).
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    # None: the model's native resolution.
    height: int | None = None
    width: int | None = None
    # Each prompt has its own seeded generator, so the batch size does not change the images.
    batch_size: int = execution_only(8)
    # "auto": float16 on CUDA, float32 on CPU.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_inference_steps <= MAX_INFERENCE_STEPS:
            raise ValueError(
                f"num_inference_steps: expected >= 1 and at most {MAX_INFERENCE_STEPS}, "
                f"got {self.num_inference_steps}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{side}: expected a multiple of 8, got {value}")
            if value is not None and value > MAX_IMAGE_SIDE:
                raise ValueError(f"{side}: expected at most {MAX_IMAGE_SIDE}, got {value}")


@dataclass
class ImagesConfig(SamplingConfig):
    jpeg_quality: int = 95
    # Samples per WebDataset shard. Each shard is saved to the store as it completes, so a killed job
    # draws again only the shard in flight. The layout of the output (part of its key), unlike
    # batch_size: shard boundaries follow the prompts' order, never the batches.
    shard_size: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: expected 1 to 100, got {self.jpeg_quality}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size: expected >= 1, got {self.shard_size}")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def prompt_seed(base_seed: int, prompt_id: str) -> int:
    """A per-prompt seed, stable across runs, machines and batch layouts."""
    return (base_seed * 1_000_003 + zlib.crc32(prompt_id.encode())) % (2**31)


def draw_images(pipe, prompts: list[str], seeds: list[int], cfg: SamplingConfig, device: str) -> list:
    """PIL images for ``prompts``, one per prompt, each from its own seeded generator."""
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    result = pipe(
        prompts,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        height=cfg.height,
        width=cfg.width,
        generator=generators,
    )
    return result.images


def generate_images(ctx, skill_name: str) -> dict:
    from tqdm import tqdm

    from selma_core.models.loading import load_diffusion_pipeline, resolve_device
    from selma_core.phases.prompts import read_prompts

    cfg: ImagesConfig = ctx.config.images
    prompts_dir = ctx.fetch("prompts", skill_name)
    records = [r for r in read_prompts(prompts_dir / "prompts.jsonl") if r["split"] == "train"]
    if not records:
        raise InputError(f"images for skill {skill_name!r}: no training prompts in {prompts_dir}")

    generator = ctx.config.generator
    device = resolve_device(ctx.config.device)
    # Each sample's metadata; shard boundaries depend on shard_size only, never on batch_size.
    samples = [
        {"id": r["id"], "prompt": r["text"], "seed": prompt_seed(cfg.seed, r["id"]), "model": generator}
        for r in records
    ]
    shards = [samples[first : first + cfg.shard_size] for first in range(0, len(samples), cfg.shard_size)]
    saved = f"{ctx.job.key}/{SAVED_SHARDS}"
    pipe = None  # loaded only when a shard must be drawn
    start = time.monotonic()
    drawn = reused = 0
    with ctx.output() as out:
        saved_keys = set(ctx.store.list_keys(saved)) if ctx.commits else set()
        progress = tqdm(total=len(samples), desc=f"images {skill_name}", unit="image")
        try:
            for index, shard in enumerate(shards):
                name = shard_name(index)
                if _reuse_saved_shard(ctx.store, saved, saved_keys, name, shard, out / name):
                    reused += len(shard)
                    progress.update(len(shard))
                    continue
                if pipe is None:
                    pipe = load_diffusion_pipeline(
                        generator,
                        ctx.config.cache_dir,
                        ctx.config.generator_revision,
                        torch_dtype(cfg.dtype, device),
                        allow_pickle=ctx.config.allow_pickle_checkpoints,
                    ).to(device)
                with tarfile.open(out / name, "w") as tar:
                    for first in range(0, len(shard), cfg.batch_size):
                        batch = shard[first : first + cfg.batch_size]
                        texts, seeds = [m["prompt"] for m in batch], [m["seed"] for m in batch]
                        images = draw_images(pipe, texts, seeds, cfg, device)
                        for meta, image in zip(batch, images, strict=True):
                            buf = io.BytesIO()
                            image.convert("RGB").save(buf, format="JPEG", quality=cfg.jpeg_quality)
                            _add_member(tar, f"{meta['id']}.jpg", buf.getvalue())
                            _add_member(tar, f"{meta['id']}.json", json.dumps(meta).encode())
                        drawn += len(batch)
                        progress.update(len(batch))
                        fault_point("images.after_batch")
                if ctx.commits:
                    _save_shard(ctx.store, saved, out / name, len(shard))
                fault_point("images.after_shard")
        finally:
            progress.close()
        if reused:
            print(
                f"images {skill_name}: {reused} image(s) from saved shards, {drawn} drawn",
                file=sys.stderr,
            )
        index = {
            "samples": len(samples),
            "shard_size": cfg.shard_size,
            "shards": [{"name": shard_name(i), "samples": len(shard)} for i, shard in enumerate(shards)],
        }
        (out / SHARDS_FILE).write_text(json.dumps(index, indent=1) + "\n")
        with open(out / "images.jsonl", "w", encoding="utf-8") as f:
            for i, shard in enumerate(shards):
                for meta in shard:
                    row = {**meta, "image": f"{shard_name(i)}/{meta['id']}.jpg"}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if ctx.commits:
        ctx.store.delete_prefix(saved)  # the committed output supersedes the saved shards
    elapsed = time.monotonic() - start
    ctx.run.log_metrics(
        {"images.count": len(samples), "images.drawn": drawn, "images.per_s": drawn / max(elapsed, 1e-9)}
    )
    return {
        "skill": skill_name,
        "images": len(samples),
        "drawn": drawn,
        "reused": reused,
        "shards": len(shards),
        "generator": generator,
        "wall_s": round(elapsed, 3),
    }


def _save_shard(store, saved: str, path: Path, samples: int) -> None:
    """Save a complete shard: its tar, then (the shard's completion marker) its size and SHA-256.

    Both are written atomically; a kill between the two leaves a tar without a record: drawn again."""
    store.upload_file(path, f"{saved}/{path.name}")
    record = {"name": path.name, "samples": samples, "size": path.stat().st_size, "sha256": sha256_file(path)}
    store.write_json(f"{saved}/{path.name}.json", record)


def _reuse_saved_shard(store, saved: str, saved_keys: set[str], name: str, shard: list, local: Path) -> bool:
    """Download the saved shard ``name`` to ``local`` when it is complete and intact; True if so.

    A shard whose record is missing was in flight when the job died: drawn again, silently. One whose
    record is damaged, or whose tar is missing, or differs from the record (size, SHA-256) or from the
    samples expected (their names, in order), was damaged in the store: drawn again, with a warning.
    """
    record_key, tar_key = f"{saved}/{name}.json", f"{saved}/{name}"
    if record_key not in saved_keys:
        return False
    try:
        record = store.read_json(record_key)
        size, digest = record["size"], record["sha256"]
        if tar_key not in saved_keys:
            raise FileNotFoundError("the tar is missing")
        store.download_file(tar_key, local)
        if local.stat().st_size != size or sha256_file(local) != digest:
            raise ValueError(f"size or SHA-256 differs from {store.url(record_key)}")
        expected = [f"{meta['id']}.{ext}" for meta in shard for ext in ("jpg", "json")]
        with tarfile.open(local) as tar:
            if tar.getnames() != expected:
                raise ValueError(f"expected the samples {expected[0]} to {expected[-1]}, in order")
    except (OSError, ValueError, KeyError, TypeError, tarfile.TarError, EOFError) as e:
        print(
            f"warning: {store.url(tar_key)}: damaged saved shard ({type(e).__name__}: {e}); drawn again",
            file=sys.stderr,
        )
        local.unlink(missing_ok=True)
        return False
    return True


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def read_image_dataset(images_dir: Path) -> list[tuple[dict, bytes]]:
    """(metadata, JPEG bytes) pairs from a committed images output: every shard that ``shards.json``
    lists, in its order (an output without one has only ``shard-00000.tar``).

    A listed shard that is missing, or holds another number of samples than listed, is an
    ``InputError`` naming it. Each sample's JSON must be a UTF-8 object with a string ``prompt``; the
    images stay encoded (``open_image`` checks and decodes them).
    """
    images_dir = Path(images_dir)
    listed = _listed_shards(images_dir)
    dataset = []
    seen: set[str] = set()
    for name, count in listed:
        shard = images_dir / name
        if count is not None and not shard.is_file():
            raise InputError(
                f"{shard}: missing, though {images_dir / SHARDS_FILE} lists it; the image set is incomplete"
            )
        samples = _read_shard(shard)
        if count is not None and len(samples) != count:
            raise InputError(
                f"{shard}: {len(samples)} sample(s), {images_dir / SHARDS_FILE} lists {count}; "
                "the shard is damaged"
            )
        for stem, meta, jpg in samples:
            if stem in seen:
                raise InputError(f"{shard}: sample {stem!r} is also in an earlier shard")
            seen.add(stem)
            dataset.append((meta, jpg))
    if not dataset:
        raise InputError(f"{images_dir}: the image set is empty")
    return dataset


def _listed_shards(images_dir: Path) -> list[tuple[str, int | None]]:
    """(shard name, its sample count) from ``shards.json``; without one, the one shard of an output
    written before shards, its count unknown."""
    index = images_dir / SHARDS_FILE
    if not index.is_file():
        return [(SHARD_NAME, None)]
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{index}: expected JSON: {e}") from e
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and _SHARD_PATTERN.fullmatch(entry["name"])
        and type(entry.get("samples")) is int
        for entry in shards
    ):
        raise InputError(
            f"{index}: expected an object whose 'shards' list each shard's name (shard-NNNNN.tar) and "
            f"its sample count, got {str(data)[:80]!r}"
        )
    return [(entry["name"], entry["samples"]) for entry in shards]


def _read_shard(shard: Path) -> list[tuple[str, dict, bytes]]:
    """(stem, metadata, JPEG bytes) per sample of one WebDataset shard, in the tar's order."""
    pairs: dict[str, dict] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if not member.isfile():  # folders, links: not samples
                    continue
                stem, _, ext = member.name.rpartition(".")
                data = tar.extractfile(member).read()
                entry = pairs.setdefault(stem, {})
                entry[ext] = data
    except FileNotFoundError as e:
        raise InputError(f"{shard}: no such file (expected the images phase's WebDataset shard)") from e
    except (tarfile.TarError, EOFError) as e:
        raise InputError(f"{shard}: expected a tar file (WebDataset shard), cannot read it: {e}") from e
    samples = []
    for stem, entry in pairs.items():
        if "jpg" not in entry or "json" not in entry:
            raise InputError(f"{shard}: sample {stem!r} lacks its .jpg or .json")
        where = f"{shard}/{stem}.json"
        try:
            meta = json.loads(entry["json"].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: expected UTF-8 text: {e}") from e
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: expected JSON: {e}") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
            raise InputError(f"{where}: expected an object with a string 'prompt', got {str(meta)[:80]!r}")
        samples.append((stem, meta, entry["jpg"]))
    return samples


def open_image(data: bytes, key: str, max_side: int = MAX_IMAGE_SIDE, min_side: int = MIN_IMAGE_SIDE):
    """A dataset image, decoded to RGB; its size is checked from the header before any pixel is
    decoded, so a decompression bomb or a degenerate image is an ``InputError`` naming ``key``.

    The one place PIL's own bomb limit (``Image.MAX_IMAGE_PIXELS``) is set, to the same bound.
    """
    import warnings

    from PIL import Image

    Image.MAX_IMAGE_PIXELS = max_side * max_side
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise InputError(
            f"image {key!r}: expected at most {max_side} px per side, a decompression bomb? {e}"
        ) from e
    except Exception as e:
        raise InputError(f"image {key!r} cannot be decoded (expected {', '.join(IMAGE_FORMATS)}): {e}") from e
    width, height = image.size
    if max(width, height) > max_side or min(width, height) < min_side:
        raise InputError(
            f"image {key!r}: {width}x{height} px; expected at least {min_side} px and at most "
            f"{max_side} px per side"
        )
    try:
        return image.convert("RGB")
    except Exception as e:  # a truncated or corrupt body behind a valid header
        raise InputError(f"image {key!r} cannot be decoded: {e}") from e
