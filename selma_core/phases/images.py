"""Phase 2, images: a text-to-image model draws one image for every training prompt of a skill.

Recipe, one skill per job:
1. Read the skill's committed prompts; only the ``train`` split is drawn (held-out prompts are for
   evaluation). No prompts is an ``InputError``.
2. Load the generator: the pipeline config's ``generator_model`` (weak-to-strong) or the base model,
   any diffusers text-to-image pipeline (SD 1.x/2.x/XL: its own model_index.json decides).
3. Draw in batches of ``batch_size`` with one ``torch.Generator`` per prompt seeded from ``seed``
   and the prompt id, so an image does not depend on its batch and a rerun reproduces it.
4. Commit a WebDataset-layout tar (``<key>.jpg`` + ``<key>.json``) and ``images.jsonl`` (the
   manifest of image, prompt, seed, model).
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from selma_core.errors import InputError
from selma_core.typed_yaml import execution_only

SHARD_NAME = "shard-00000.tar"


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
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected >= 1, got {self.num_inference_steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{side}: expected a multiple of 8, got {value}")


@dataclass
class ImagesConfig(SamplingConfig):
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: expected 1 to 100, got {self.jpeg_quality}")


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

    device = resolve_device(ctx.config.device)
    generator = ctx.config.generator
    pipe = load_diffusion_pipeline(
        generator, ctx.config.cache_dir, ctx.config.generator_revision, torch_dtype(cfg.dtype, device)
    ).to(device)
    start = time.monotonic()
    manifest = []
    with ctx.output() as out:
        with tarfile.open(out / SHARD_NAME, "w") as tar:
            for first in tqdm(
                range(0, len(records), cfg.batch_size), desc=f"images {skill_name}", unit="batch"
            ):
                batch = records[first : first + cfg.batch_size]
                seeds = [prompt_seed(cfg.seed, r["id"]) for r in batch]
                images = draw_images(pipe, [r["text"] for r in batch], seeds, cfg, device)
                for record, seed, image in zip(batch, seeds, images, strict=True):
                    meta = {"id": record["id"], "prompt": record["text"], "seed": seed, "model": generator}
                    buf = io.BytesIO()
                    image.convert("RGB").save(buf, format="JPEG", quality=cfg.jpeg_quality)
                    _add_member(tar, f"{record['id']}.jpg", buf.getvalue())
                    _add_member(tar, f"{record['id']}.json", json.dumps(meta).encode())
                    manifest.append({**meta, "image": f"{SHARD_NAME}/{record['id']}.jpg"})
        with open(out / "images.jsonl", "w", encoding="utf-8") as f:
            for row in manifest:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elapsed = time.monotonic() - start
    ctx.run.log_metrics({"images.count": len(manifest), "images.per_s": len(manifest) / max(elapsed, 1e-9)})
    return {"skill": skill_name, "images": len(manifest), "generator": generator, "wall_s": round(elapsed, 3)}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def read_image_dataset(images_dir: Path) -> list[tuple[dict, bytes]]:
    """(metadata, JPEG bytes) pairs from a committed images output, in manifest order."""
    pairs: dict[str, dict] = {}
    with tarfile.open(images_dir / SHARD_NAME) as tar:
        for member in tar.getmembers():
            stem, _, ext = member.name.rpartition(".")
            data = tar.extractfile(member).read()
            entry = pairs.setdefault(stem, {})
            entry[ext] = data
    dataset = []
    for stem, entry in pairs.items():
        if "jpg" not in entry or "json" not in entry:
            raise InputError(f"{images_dir / SHARD_NAME}: sample {stem!r} lacks its .jpg or .json")
        dataset.append((json.loads(entry["json"]), entry["jpg"]))
    if not dataset:
        raise InputError(f"{images_dir}: the image set is empty")
    return dataset
