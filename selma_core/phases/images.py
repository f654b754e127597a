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
from selma_core.faults import fault_point
from selma_core.typed_yaml import execution_only

SHARD_NAME = "shard-00000.tar"
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
        generator,
        ctx.config.cache_dir,
        ctx.config.generator_revision,
        torch_dtype(cfg.dtype, device),
        allow_pickle=ctx.config.allow_pickle_checkpoints,
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
                fault_point("images.after_batch")
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
    """(metadata, JPEG bytes) pairs from a committed images output, in manifest order.

    Each sample's JSON must be a UTF-8 object with a string ``prompt``; the images stay encoded
    (``open_image`` checks and decodes them).
    """
    shard = Path(images_dir) / SHARD_NAME
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
    dataset = []
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
        dataset.append((meta, entry["jpg"]))
    if not dataset:
        raise InputError(f"{images_dir}: the image set is empty")
    return dataset


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
