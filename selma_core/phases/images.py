"""Phase 2, images: a text-to-image model draws one image for every training prompt of a skill.

Recipe, one skill per job (``docs/images.md`` tells the whole story):
1. Read the skill's committed prompts; only the ``train`` split is drawn (held-out prompts are for
   evaluation). No prompts is an ``InputError``.
2. Load the generator: the pipeline config's ``generator_model`` (weak-to-strong) or the base model,
   any diffusers text-to-image pipeline (SD 1.x/2.x/XL: its own model_index.json decides).
3. Draw in batches of ``batch_size`` with one ``torch.Generator`` per prompt seeded from ``seed``
   and the prompt id, so an image does not depend on its batch and a rerun reproduces it.
4. Optional filters drop an image from its shard, counted by reason: ``filter_uniform`` (blank or
   near-uniform: every channel's pixel standard deviation below ``uniform_threshold``) and
   ``nsfw_checker`` (flagged by a ``StableDiffusionSafetyChecker``). The counts go into the shard's
   record, ``shards.json`` and the MLflow metrics ``images.filtered.<reason>``.
5. Write WebDataset-layout tar shards (``<key>.jpg`` + ``<key>.json``) of ``shard_size`` images
   (``shard-00000.tar``, ``shard-00001.tar``, ...; the prompts' order, whatever the batch size).
   Each shard is saved to the store as soon as it is complete (``<key>/_shards/``: the tar, then
   its record: size, SHA-256, dropped images), so a killed job's rerun checks and reuses the saved
   shards and draws only the others (a damaged one is drawn again, with a warning naming it).
6. Commit every shard, ``shards.json`` (the shards in order, with their sample counts) and
   ``images.jsonl`` (the manifest of image, prompt, seed, model); then delete the saved shards.

``num_jobs`` processes may draw one skill's images side by side (``jobs.run --shard-index I
--num-shards N``; a Kubernetes Indexed Job): process ``I`` draws and saves the shards ``s`` with
``s % N == I``; the one that then finds every shard saved commits the output (under the output's
in-flight lease, so two that finish at once commit once); the others exit without committing.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from selma_core.errors import ConfigError, InputError
from selma_core.faults import fault_point
from selma_core.storage.base import sha256_file
from selma_core.typed_yaml import execution_only, hashed_unless_default

# The first shard; an output of fewer than shard_size images (or one written before shards, without
# shards.json) has only this one.
SHARD_NAME = "shard-00000.tar"
SHARDS_FILE = "shards.json"  # the dataset manifest: every shard, in order, with its sample count
EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a stored image is turned
SAVED_SHARDS = "_shards"  # <key>/_shards/: shards saved as they complete, before the commit
# Why a filter drops an image (images.filter_uniform, images.nsfw_checker), in the order checked.
FILTER_REASONS = ("uniform", "nsfw")
_SHARD_PATTERN = re.compile(r"shard-\d{5,}\.tar")
# Images read from datasets: each side within these bounds, checked from the header before any
# pixel is decoded (a few KB of PNG can claim 20,000 x 20,000 px: a decompression bomb).
MAX_IMAGE_SIDE = 8192
MIN_IMAGE_SIDE = 8
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# Denoising steps: schedulers of SD 1.x/2.x/XL have 1,000 training timesteps.
MAX_INFERENCE_STEPS = 1000
# Classifier-free guidance when the config leaves it null: SELMA's (SD 1.x/2.x) and SDXL's usual.
DEFAULT_GUIDANCE, SDXL_GUIDANCE = 7.5, 5.0
MAX_GUIDANCE = 50.0
MAX_IMAGES_PER_PROMPT = 64


@dataclass
class SamplingConfig:
    """How images are drawn; shared by the images phase and by evaluation."""

    # Denoising steps and classifier-free guidance (SELMA: the model's scheduler, 50 steps, 7.5).
    num_inference_steps: int = 50
    # None: the model's usual guidance, 7.5 (SDXL: 5.0).
    guidance_scale: float | None = None
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
        if self.guidance_scale is not None and not 0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise ValueError(
                f"guidance_scale: expected 0 to {MAX_GUIDANCE} or null (the model's usual), "
                f"got {self.guidance_scale}"
            )
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
    # draws again only the shard in flight, and num_jobs processes share a skill's shards. The layout
    # of the output (part of its key), unlike batch_size: shard boundaries follow the prompts' order,
    # never the batches. 100: a skill's 900 training images (1,000 prompts, 10% held out) in 9
    # shards, about 20 s of drawing each for SD 1.x on one H200, 5 to 10 MB at 512 px.
    shard_size: int = 100
    # Processes drawing one skill's images side by side: process I of N draws the shards s with
    # s % N == I (jobs.run --shard-index I --num-shards N), the last to finish commits. The local
    # executor starts N processes, the Kubernetes executor an Indexed Job of N pods. Execution only:
    # the output is the same whatever N.
    num_jobs: int = execution_only(1)
    # Drop blank or near-uniform images (a collapsed sample, a safety checker's black square): those
    # whose every colour channel has a pixel standard deviation (0-255 scale) below uniform_threshold.
    filter_uniform: bool = hashed_unless_default(False)
    uniform_threshold: float = hashed_unless_default(2.0)
    # Drop the images a StableDiffusionSafetyChecker flags: a hub id or a folder holding the checker
    # and its CLIP image processor (preprocessor_config.json), e.g.
    # CompVis/stable-diffusion-safety-checker. None: no NSFW check.
    nsfw_checker: str | None = hashed_unless_default(None)
    # Images drawn per prompt (SELMA: one), each its own sample with its own seed: the prompt's id,
    # then <id>-1, <id>-2, ...
    images_per_prompt: int = hashed_unless_default(1)
    # Speed (selma_core.models.speed), on CUDA: channels_last UNet and VAE and fused QKV projections;
    # torch.compile of the UNet ("blocks": each repeated block; "full": the whole UNet, one graph:
    # for SD 1.x about a minute on an H100, then the fastest; "auto": full for SD 1.x/2.x and blocks
    # for SDXL on CUDA, off on the CPU, see speed.resolve_compile). Same images up to rounding.
    # Compiled kernels are kept under cache_dir and, with compile_cache, in the store
    # (cache/compile/): every later images job drawing with the same generator and shapes, on any
    # node, loads them.
    channels_last: bool = execution_only(True)
    compile: Literal["auto", "off", "blocks", "full"] = execution_only("auto")
    compile_cache: bool = execution_only(True)
    # The compiled UNet replayed as a CUDA graph (inductor's "reduce-overhead" mode): one launch a
    # denoising step instead of hundreds, where the GPU otherwise waits for Python (8% of each
    # SD 1.x batch on an H200, bench/RESULTS.md). The same images. CUDA only, with the whole UNet
    # compiled (compile: full, or auto where that means full) and classifier-free guidance; else
    # the job warns and draws without. Off until a GPU run has measured it
    # (bench/generate_throughput.py --cuda-graph).
    cuda_graph: bool = execution_only(False)
    # With compile on, the VAE's decoder compiled too: eager, its group norms cost layout copies on
    # channels_last tensors (122 ms of each 259 ms SD 1.x decode of 16 images on an H200). Off
    # until a GPU run has measured it (bench/generate_throughput.py --compile-vae).
    compile_vae: bool = execution_only(False)
    # The attention kernel (selma_core.models.attention), as train.attention: "auto" measures the
    # candidates on this generator's shapes on CUDA once per GPU type and keeps the fastest.
    attention: Literal["auto", "default", "flash", "efficient", "cudnn", "math"] = execution_only("auto")

    def keyed(self) -> ImagesConfig:
        """This config as the output's key hashes it: ``uniform_threshold`` at its default while
        ``filter_uniform`` is off (nothing reads it then)."""
        if self.filter_uniform:
            return self
        return replace(self, uniform_threshold=type(self)().uniform_threshold)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: expected 1 to 100, got {self.jpeg_quality}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size: expected >= 1, got {self.shard_size}")
        if not 1 <= self.images_per_prompt <= MAX_IMAGES_PER_PROMPT:
            raise ValueError(
                f"images_per_prompt: expected 1 to {MAX_IMAGES_PER_PROMPT}, got {self.images_per_prompt}"
            )
        if self.num_jobs < 1:
            raise ValueError(f"num_jobs: expected >= 1, got {self.num_jobs}")
        if not 0 <= self.uniform_threshold <= 255:
            raise ValueError(f"uniform_threshold: expected 0 to 255, got {self.uniform_threshold}")
        if self.cuda_graph and self.compile in ("off", "blocks"):
            raise ValueError(
                f"cuda_graph: the whole UNet is replayed as a CUDA graph once compiled; got compile: "
                f"{self.compile} (set compile to full or auto, or cuda_graph to false)"
            )
        if self.compile_vae and self.compile == "off":
            raise ValueError("compile_vae: the decoder is compiled with the UNet; got compile: off")
        if self.nsfw_checker is not None and not self.nsfw_checker.strip():
            raise ValueError("nsfw_checker: expected a model id or folder, or null (no NSFW check)")

    def filters(self) -> tuple[str, ...]:
        """The reasons an image may be dropped for, in the order they are checked."""
        configured = {"uniform": self.filter_uniform, "nsfw": self.nsfw_checker is not None}
        return tuple(reason for reason in FILTER_REASONS if configured[reason])


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def image_ids(prompt_id: str, count: int) -> list[str]:
    """The samples of one prompt: its id (so one image per prompt keeps the ids it always had), then
    ``<id>-1``, ``<id>-2``, ..."""
    return [prompt_id] + [f"{prompt_id}-{k}" for k in range(1, count)]


def prompt_seed(base_seed: int, prompt_id: str) -> int:
    """A per-prompt seed, stable across runs, machines and batch layouts."""
    return (base_seed * 1_000_003 + zlib.crc32(prompt_id.encode())) % (2**31)


def guidance_scale(cfg: SamplingConfig, pipe) -> float:
    """The configured guidance, or the model's usual one (SDXL: 5.0, else SELMA's 7.5)."""
    if cfg.guidance_scale is not None:
        return cfg.guidance_scale
    return SDXL_GUIDANCE if hasattr(pipe, "text_encoder_2") else DEFAULT_GUIDANCE


def classifier_free_guidance(cfg: SamplingConfig, pipe) -> bool:
    """Whether the pipeline guides (draws each batch twice, with and without the prompts): a
    guidance above 1 and a UNet not distilled to take the guidance as an input (LCM's
    ``time_cond_proj_dim``), as diffusers' SD and SDXL pipelines decide."""
    unet_config = getattr(getattr(pipe, "unet", None), "config", None)
    return guidance_scale(cfg, pipe) > 1 and getattr(unet_config, "time_cond_proj_dim", None) is None


def cuda_graph_refusal(cfg: ImagesConfig, pipe, compile_mode: str) -> str | None:
    """Why ``pipe``'s UNet, compiled as ``compile_mode`` says, cannot be replayed as a CUDA graph;
    None when it can."""
    if compile_mode != "full":
        # By blocks, each block's call starts a new generation of CUDA graph trees, which frees the
        # previous block's outputs while the UNet still holds them (speed's docstring).
        return f"the whole UNet must be compiled, and compile resolved to {compile_mode}"
    if not classifier_free_guidance(cfg, pipe):
        # The pipeline then hands the UNet's output itself to the scheduler, and a multistep one
        # (PNDM, DPM-Solver) keeps it for later steps, where the next replay overwrites it.
        return "there is no classifier-free guidance (guidance_scale <= 1, or a guidance-distilled UNet)"
    return None


def replays_cuda_graph(cfg: ImagesConfig, pipe, compile_mode: str, device: str) -> bool:
    """Whether the images phase replays ``pipe``'s compiled UNet as a CUDA graph: ``cfg.cuda_graph``
    on CUDA, unless ``cuda_graph_refusal`` says why not."""
    wanted = cfg.cuda_graph and device.startswith("cuda")
    return wanted and cuda_graph_refusal(cfg, pipe, compile_mode) is None


def draw_images(
    pipe, prompts: list[str], seeds: list[int], cfg: SamplingConfig, device: str, pad_to: int | None = None
) -> list:
    """PIL images for ``prompts``, one per prompt, each from its own seeded generator.

    ``pad_to``: a shorter batch is padded to that many prompts (repeating the last one; the extra
    images are dropped), so a UNet compiled for one batch shape never compiles again for a job's
    last, smaller batch (minutes, for the whole UNet). Each image has its own generator, so the
    padding does not change the others."""
    import torch

    count = len(prompts)
    if pad_to is not None and 0 < count < pad_to:
        prompts = list(prompts) + [prompts[-1]] * (pad_to - count)
        seeds = list(seeds) + [seeds[-1]] * (pad_to - count)
    from PIL import Image

    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    result = pipe(
        prompts,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=guidance_scale(cfg, pipe),
        height=cfg.height,
        width=cfg.width,
        generator=generators,
        output_type="pt",
    )
    # To 8-bit pixels where the images are (the GPU), as diffusers' "pil" output computes them
    # (float32, x 255, rounded): the same bytes, but a quarter of them to copy and no float work on
    # the CPU while the GPU waits for the next batch.
    pixels = (result.images[:count].float() * 255).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(image) for image in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def choose_attention(pipe, cfg: ImagesConfig, device: str, store=None):
    """``cfg.attention`` resolved for the batches ``draw_images`` draws with ``pipe`` (a
    ``selma_core.models.attention.AttentionChoice``): with "auto" on CUDA measured once per GPU type
    and model, the measurement kept in ``store``."""
    from selma_core.models.attention import resolve_attention

    scale = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * scale
    return resolve_attention(
        cfg.attention,
        pipe.unet,
        device,
        batch=cfg.batch_size * (2 if classifier_free_guidance(cfg, pipe) else 1),  # guidance doubles it
        size=((cfg.height or native) // scale, (cfg.width or native) // scale),
        text_len=getattr(pipe.tokenizer, "model_max_length", 77),
        backward=False,
        store=store,
    )


# -- filters --------------------------------------------------------------------------------------


def is_uniform(image, threshold: float) -> bool:
    """Whether every colour channel's pixel standard deviation (0-255 scale) is below ``threshold``:
    a blank image (a safety checker's black square), a flat colour, a collapsed sample."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    return bool(pixels.std(axis=0).max() < threshold)


class NsfwChecker:
    """diffusers' ``StableDiffusionSafetyChecker`` with its CLIP image processor: which images it flags."""

    def __init__(self, model, processor, device: str, dtype) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self.dtype = dtype

    def flags(self, images: list) -> list[bool]:
        import numpy as np

        pixel_values = self.processor(images=images, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(self.device, dtype=self.dtype)
        # The checker also blanks the flagged images it is given: it gets copies, never used.
        arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
        _, flagged = self.model(images=arrays, clip_input=pixel_values)
        return [bool(f) for f in flagged]


def compile_cache_digest(
    cfg: ImagesConfig, pipe, compile_mode: str, device: str, dtype, attention_kernel: str, cuda_graph: bool
) -> str:
    """The store compile cache's key for a generator prepared by ``speed.prepare_for_inference``:
    what its compiled graphs depend on beyond the UNet's config and dtype (the images job's and
    its benchmark's)."""
    from selma_core.models import speed

    signature = {
        "phase": "images",
        "batch": cfg.batch_size,
        "guidance": classifier_free_guidance(cfg, pipe),  # it doubles the batch
        "height": cfg.height,
        "width": cfg.width,
        "channels_last": cfg.channels_last,
        # Fused QKV projections or not: their attention processors say.
        "attention": sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}),
        "attention_kernel": attention_kernel,
    }
    # Keys only when on, so that the entries saved before they existed keep their digests.
    if cuda_graph:
        signature["cuda_graph"] = True  # inductor's config differs, so do its graphs
    if speed.vae_compiled(pipe):  # the decoder's graph is in the same entry
        signature["vae"] = {k: v for k, v in dict(pipe.vae.config).items() if not k.startswith("_")}
    return speed.compile_cache_digest(pipe.unet, compile_mode, device, dtype, signature)


def load_nsfw_checker(spec: str, cache_dir: str | Path, device: str, dtype, allow_pickle: bool = False):
    """The ``NsfwChecker`` of ``spec``: a hub id or a folder with a ``StableDiffusionSafetyChecker``
    (config.json, weights: safetensors unless ``allow_pickle``) and its ``preprocessor_config.json``."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    from selma_core.models.loading import model_load_error, resolve_model_path, weights_kwargs

    path = resolve_model_path(spec, cache_dir)
    try:
        model = StableDiffusionSafetyChecker.from_pretrained(path, **weights_kwargs(allow_pickle))
        processor = CLIPImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise model_load_error(path, e) from e
    model = model.to(device, dtype=dtype).eval()
    return NsfwChecker(model, processor, device, dtype)


# -- drawing --------------------------------------------------------------------------------------


class _Drawer:
    """Draws shards into local tars, filtering their images; the generator (and the NSFW checker)
    are loaded on first use, so a job that only reuses saved shards loads no model."""

    def __init__(self, ctx, cfg: ImagesConfig, progress) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.progress = progress
        self.pipe = None
        self.checker: NsfwChecker | None = None
        self.device = ""
        self.drawn = 0
        self.compile_mode = "off"  # cfg.compile resolved for the generator (speed.resolve_compile)
        self.compile_cache = None  # speed.StoreCompileCache, when the UNet is compiled
        self.attention = "default"  # the attention kernel batches are drawn under (cfg.attention resolved)
        self.warmup_s: float | None = None  # the first batch's time: what compiling cost this job

    @property
    def cuda_graph(self) -> bool:
        """Whether the compiled UNet is replayed as a CUDA graph (``replays_cuda_graph``)."""
        return replays_cuda_graph(self.cfg, self.pipe, self.compile_mode, self.device)

    @property
    def vae_compiled(self) -> bool:
        from selma_core.models import speed

        return self.pipe is not None and speed.vae_compiled(self.pipe)

    def _load(self) -> None:
        from selma_core.models import speed
        from selma_core.models.loading import load_diffusion_pipeline, resolve_device

        if self.pipe is not None:
            return
        config = self.ctx.config
        self.device = resolve_device(config.device)
        dtype = torch_dtype(self.cfg.dtype, self.device)
        self.pipe = load_diffusion_pipeline(
            config.generator,
            config.cache_dir,
            config.generator_revision,
            dtype,
            allow_pickle=config.allow_pickle_checkpoints,
        ).to(self.device)
        # The guidance drawn with, where the config leaves it to the generator (null: 7.5, SDXL 5.0).
        self.ctx.run.set_tags({"images.guidance_scale_used": str(guidance_scale(self.cfg, self.pipe))})
        unet = getattr(self.pipe, "unet", None)
        self.compile_mode = speed.resolve_compile(self.cfg.compile, unet, self.device)
        if (
            self.cfg.cuda_graph
            and self.device.startswith("cuda")
            and unet is not None
            and not self.cuda_graph
        ):
            why = cuda_graph_refusal(self.cfg, self.pipe, self.compile_mode)
            print(f"warning: images.cuda_graph ignored: {why}", file=sys.stderr)
        if unet is not None:  # transformer-based pipelines (SD3) have none
            compiled = speed.prepare_for_inference(
                self.pipe,
                self.device,
                self.cfg.channels_last,
                self.compile_mode,
                cache_dir=config.cache_dir,
                cuda_graph=self.cuda_graph,
                compile_vae=self.cfg.compile_vae,
            )
            self.attention = self._choose_attention()
            if compiled and self.cfg.compile_cache:
                self._load_compile_cache(dtype)
        if self.cfg.nsfw_checker is not None:
            self.checker = load_nsfw_checker(
                self.cfg.nsfw_checker,
                config.cache_dir,
                self.device,
                dtype,
                allow_pickle=config.allow_pickle_checkpoints,
            )

    def _choose_attention(self) -> str:
        """``cfg.attention`` resolved for this generator (``choose_attention``), tagged on the run."""
        choice = choose_attention(self.pipe, self.cfg, self.device, self.ctx.store)
        self.ctx.run.set_tags({"images.attention_kernel": choice.backend})
        return choice.backend

    def _load_compile_cache(self, dtype) -> None:
        """The compiled kernels of an earlier job with this generator and these shapes, from the store
        (``speed.StoreCompileCache``), before the first batch compiles."""
        from selma_core.models import speed

        digest = compile_cache_digest(
            self.cfg, self.pipe, self.compile_mode, self.device, dtype, self.attention, self.cuda_graph
        )
        self.compile_cache = speed.StoreCompileCache(self.ctx.store, digest, self.ctx.scratch_dir)
        self.compile_cache.load_for_job(self.ctx, "images")

    def _after_first_batch(self, seconds: float) -> None:
        """Once the first batch is drawn (with compile: compiled): its time is logged and what this job
        compiled is saved to the store for the next jobs."""
        self.warmup_s = seconds
        self.ctx.run.log_metrics({"images.warmup_s": seconds})
        if self.cuda_graph:  # the first batch recorded the graphs, or said why not (in the log)
            from selma_core.models import speed

            skips = speed.cuda_graph_skips()
            replayed = f"{skips} graphs not replayed" if skips else "replayed"
            self.ctx.run.set_tags({"images.cuda_graph": replayed})
        if self.compile_cache is not None:
            self.compile_cache.save_for_job(self.ctx)

    def compile_report(self) -> dict:
        """How compiling went, for the job's result: nothing when the UNet was not compiled (or no
        model was loaded); the cache's fields False without ``compile_cache``."""
        if self.compile_mode == "off" or self.pipe is None:
            return {}
        from torch._dynamo.utils import counters

        from selma_core.models import speed

        cache = self.compile_cache
        return {
            "compile": {
                "mode": self.compile_mode,
                "warmup_s": round(self.warmup_s or 0.0, 3),
                "cache_loaded": bool(cache and cache.loaded),
                "cache_saved": bool(cache and cache.saved),
                "graphs_compiled": counters["inductor"]["fxgraph_cache_miss"],
                "cuda_graph": self.cuda_graph,
                "cuda_graph_skips": speed.cuda_graph_skips(),
                "vae_compiled": self.vae_compiled,
            }
        }

    def verdicts(self, images: list) -> list[str | None]:
        """Why each image is dropped (a reason of ``FILTER_REASONS``), None for a kept one. The
        uniform check comes first: an image it drops is not shown to the NSFW checker."""
        reasons: list[str | None] = [None] * len(images)
        if self.cfg.filter_uniform:
            for i, image in enumerate(images):
                if is_uniform(image, self.cfg.uniform_threshold):
                    reasons[i] = "uniform"
        if self.checker is not None:
            unchecked = [i for i, reason in enumerate(reasons) if reason is None]
            if unchecked:
                flags = self.checker.flags([images[i] for i in unchecked])
                for i, flagged in zip(unchecked, flags, strict=True):
                    if flagged:
                        reasons[i] = "nsfw"
        return reasons

    def draw_shard(self, shard: list[dict], path: Path) -> dict[str, str]:
        """Draw ``shard``'s images into the tar ``path``; the images dropped (id -> reason)."""
        from selma_core.models.attention import sdpa_backend

        self._load()
        cfg = self.cfg
        dropped: dict[str, str] = {}
        # A compiled UNet keeps one batch shape: the last batch is padded to it.
        pad_to = cfg.batch_size if self.compile_mode != "off" else None
        with tarfile.open(path, "w") as tar:
            for first in range(0, len(shard), cfg.batch_size):
                batch = shard[first : first + cfg.batch_size]
                texts, seeds = [m["prompt"] for m in batch], [m["seed"] for m in batch]
                started = time.monotonic()
                with sdpa_backend(self.attention):
                    drawn = draw_images(self.pipe, texts, seeds, cfg, self.device, pad_to=pad_to)
                if self.warmup_s is None:
                    self._after_first_batch(time.monotonic() - started)
                images = [image.convert("RGB") for image in drawn]
                for meta, image, reason in zip(batch, images, self.verdicts(images), strict=True):
                    if reason is not None:
                        dropped[meta["id"]] = reason
                        continue
                    buf = io.BytesIO()
                    image.save(buf, format="JPEG", quality=cfg.jpeg_quality)
                    _add_member(tar, f"{meta['id']}.jpg", buf.getvalue())
                    _add_member(tar, f"{meta['id']}.json", json.dumps(meta).encode())
                self.drawn += len(batch)
                self.progress.update(len(batch))
                fault_point("images.after_batch")
        return dropped

    def draw_and_save(self, shard: list[dict], path: Path, saved: str | None) -> dict:
        """Draw a shard, then save it under ``saved`` (None: a process that commits nothing); its record."""
        dropped = self.draw_shard(shard, path)
        if saved is not None:
            kept = len(shard) - len(dropped)
            record = _save_shard(self.ctx.store, saved, path, kept, dropped, self.cfg.filters())
        else:
            record = {"name": path.name, "samples": len(shard) - len(dropped), "dropped": dropped}
        fault_point("images.after_shard")
        return record


def generate_images(
    ctx,
    skill_name: str,
    shard_index: int = 0,
    num_shards: int = 1,
    replace_before: float | None = None,
) -> dict:
    """Draw, save and commit a skill's images; with ``num_shards`` > 1, only the shards ``s`` with
    ``s % num_shards == shard_index``, committing the output only if every shard is then saved.

    ``replace_before``: a forced rerun's start time; an output committed before it is replaced (one
    committed since, by another process of the run, is the run's). None: any committed output is.
    """
    from tqdm import tqdm

    from selma_core.phases.prompts import read_prompts

    if not 0 <= shard_index < num_shards:
        raise ConfigError(
            f"images: shard index {shard_index} of {num_shards} process(es): expected 0 to {num_shards - 1}"
        )
    cfg: ImagesConfig = ctx.config.images
    prompts_dir = ctx.fetch("prompts", skill_name)
    records = [r for r in read_prompts(prompts_dir / "prompts.jsonl") if r["split"] == "train"]
    if not records:
        raise InputError(f"images for skill {skill_name!r}: no training prompts in {prompts_dir}")

    generator = ctx.config.generator
    # Each sample's metadata; shard boundaries depend on shard_size only, never on batch_size.
    samples = [
        {"id": sample_id, "prompt": r["text"], "seed": prompt_seed(cfg.seed, sample_id), "model": generator}
        for r in records
        for sample_id in image_ids(r["id"], cfg.images_per_prompt)
    ]
    shards = [samples[first : first + cfg.shard_size] for first in range(0, len(samples), cfg.shard_size)]
    saved = f"{ctx.job.key}/{SAVED_SHARDS}"
    start = time.monotonic()
    if num_shards > 1:
        return _draw_share(ctx, skill_name, shards, saved, shard_index, num_shards, replace_before, start)
    progress = tqdm(total=len(samples), desc=f"images {skill_name}", unit="image")
    drawer = _Drawer(ctx, cfg, progress)
    with ctx.output() as out:
        try:
            shard_records, reused = _assemble(ctx, drawer, shards, saved, out)
        finally:
            progress.close()
        if reused:
            print(
                f"images {skill_name}: {reused} image(s) from saved shards, {drawer.drawn} drawn",
                file=sys.stderr,
            )
        kept, filtered = _write_or_forget(ctx, saved, out, cfg, shards, shard_records, skill_name)
    if ctx.commits:
        ctx.store.delete_prefix(saved)  # the committed output supersedes the saved shards
    return _finished(ctx, skill_name, shards, drawer, reused, kept, filtered, start)


def _finished(ctx, skill_name, shards, drawer, reused, kept, filtered, start, **extra) -> dict:
    """Log a committed output's metrics; the job's result."""
    elapsed = time.monotonic() - start
    metrics = {
        "images.count": kept,
        "images.drawn": drawer.drawn,
        "images.per_s": drawer.drawn / max(elapsed, 1e-9),
    }
    metrics.update({f"images.filtered.{reason}": count for reason, count in filtered.items()})
    ctx.run.log_metrics(metrics)
    result = {
        "skill": skill_name,
        "images": kept,
        "drawn": drawer.drawn,
        "reused": reused,
        "shards": len(shards),
        "generator": ctx.config.generator,
        "wall_s": round(elapsed, 3),
    }
    if filtered:
        result["prompts"] = sum(len(shard) for shard in shards)
        result["filtered"] = filtered
    return {**result, **drawer.compile_report(), **extra}


def _assemble(ctx, drawer: _Drawer, shards: list[list[dict]], saved: str, out: Path, local=None):
    """Every shard into ``out``: this process's own (``local``: index -> (its tar, its record)),
    else the saved one (checked), else drawn and saved. Each shard's record, and the images reused."""
    saved_keys = set(ctx.store.list_keys(saved)) if ctx.commits else set()
    shard_records, reused = [], 0
    for index, shard in enumerate(shards):
        name = shard_name(index)
        if local and index in local:
            path, record = local[index]
            shutil.move(path, out / name)
            shard_records.append(record)
            continue
        save_to = saved if ctx.commits else None
        record, was_saved = _saved_or_drawn(ctx, drawer, saved, saved_keys, shard, out / name, save_to)
        reused += len(shard) if was_saved else 0
        shard_records.append(record)
    return shard_records, reused


def _saved_or_drawn(ctx, drawer: _Drawer, saved: str, saved_keys: set, shard, path: Path, save_to):
    """The shard named ``path.name`` at ``path``: the saved one when it checks out, else drawn (and
    saved under ``save_to``; None: not saved). Its record, and whether it was the saved one."""
    record = _reuse_saved_shard(ctx.store, saved, saved_keys, path.name, shard, path)
    if record is not None:
        drawer.progress.update(len(shard))
        return record, True
    return drawer.draw_and_save(shard, path, save_to), False


class EveryImageFiltered(InputError):
    """Every image drawn was dropped by the filters."""


def _write_or_forget(ctx, saved: str, out: Path, cfg: ImagesConfig, shards, shard_records, skill_name: str):
    """``_write_output``; when every image was filtered out, the saved shards are deleted first: they
    hold no image, and a rerun after the generator or the checker is mended in place (the same key)
    would reuse their verdicts and fail the same way, --force or not."""
    try:
        return _write_output(out, cfg, shards, shard_records, skill_name)
    except EveryImageFiltered as e:
        if ctx.commits:
            ctx.store.delete_prefix(saved)
        raise EveryImageFiltered(f"{e}; its saved shards are deleted: a rerun draws them again") from None


def _write_output(out: Path, cfg: ImagesConfig, shards, shard_records, skill_name: str):
    """``shards.json`` and ``images.jsonl`` of the kept images; their number and the filters' counts.

    Every image dropped is an ``InputError``: training would have nothing to learn from."""
    filters = cfg.filters()
    totals = dict.fromkeys(filters, 0)
    entries = []
    rows = []
    for i, (shard, record) in enumerate(zip(shards, shard_records, strict=True)):
        dropped = record.get("dropped") or {}
        kept = [meta for meta in shard if meta["id"] not in dropped]
        entry: dict = {"name": shard_name(i), "samples": len(kept)}
        if filters:
            entry["filtered"] = _counts(dropped, filters)
            entry["dropped"] = {meta["id"]: dropped[meta["id"]] for meta in shard if meta["id"] in dropped}
            for reason, count in entry["filtered"].items():
                totals[reason] += count
        entries.append(entry)
        rows += [{**meta, "image": f"{shard_name(i)}/{meta['id']}.jpg"} for meta in kept]
    if not rows:
        counts = ", ".join(f"{reason}: {count}" for reason, count in totals.items())
        raise EveryImageFiltered(
            f"images for skill {skill_name!r}: every one of the {sum(map(len, shards))} images was "
            f"filtered out ({counts}); check the generator, images.uniform_threshold or images.nsfw_checker"
        )
    index: dict = {"samples": len(rows), "shard_size": cfg.shard_size}
    if filters:
        index["prompts"] = sum(len(shard) for shard in shards)
        index["filtered"] = totals
    index["shards"] = entries
    (out / SHARDS_FILE).write_text(json.dumps(index, indent=1) + "\n")
    with open(out / "images.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows), totals


def _counts(dropped: dict[str, str], reasons) -> dict[str, int]:
    return {reason: sum(1 for why in dropped.values() if why == reason) for reason in reasons}


def _draw_share(ctx, skill_name, shards, saved, shard_index, num_shards, replace_before, start) -> dict:
    """Process ``shard_index`` of ``num_shards``: draw and save its shards, then commit the output if
    every shard is saved, under the output's in-flight lease (two processes finishing at once commit
    once: the second finds the output committed). A process that finds shards missing (others still
    drawing them) returns without committing: the one that saves the last shard commits."""
    from tqdm import tqdm

    from selma_core.storage.lease import acquire

    cfg: ImagesConfig = ctx.config.images
    store, key = ctx.store, ctx.job.key
    mine = list(range(shard_index, len(shards), num_shards))
    where = f"images {skill_name} (process {shard_index} of {num_shards})"
    if num_shards > len(shards):
        print(
            f"{where}: warning: {sum(map(len, shards))} image(s) make {len(shards)} shard(s) of "
            f"images.shard_size {cfg.shard_size}, fewer than the {num_shards} processes: "
            f"{num_shards - len(shards)} process(es) have nothing to draw. Lower images.num_jobs, or "
            "images.shard_size (part of the output key: the images are drawn again)",
            file=sys.stderr,
        )
    share = {"shard_index": shard_index, "num_shards": num_shards}

    def committed_by_another() -> bool:
        if not store.is_committed(key):
            return False
        if replace_before is None:
            return True
        try:  # a forced rerun: the output it replaces is older than the run
            return float(store.read_manifest(key).get("committed_at") or 0) >= replace_before
        except (InputError, TypeError, ValueError):
            return False

    def not_committed(drawer: _Drawer, reused: int, **why) -> dict:
        elapsed = time.monotonic() - start
        ctx.run.log_metrics({"images.drawn": drawer.drawn, "images.per_s": drawer.drawn / max(elapsed, 1e-9)})
        return {
            "skill": skill_name,
            "drawn": drawer.drawn,
            "reused": reused,
            "shards": len(shards),
            "own_shards": [shard_name(i) for i in mine],
            "generator": ctx.config.generator,
            "wall_s": round(elapsed, 3),
            **share,
            **drawer.compile_report(),
            "committed": False,
            **why,
        }

    def unsaved() -> list[str]:
        """The shards not saved (tar and record) in the store now."""
        saved_keys = set(store.list_keys(saved))
        return [
            shard_name(i)
            for i in range(len(shards))
            if not {f"{saved}/{shard_name(i)}", f"{saved}/{shard_name(i)}.json"} <= saved_keys
        ]

    scratch = Path(ctx.scratch_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="images-", dir=scratch))
    progress = tqdm(total=sum(len(shards[i]) for i in mine), desc=where, unit="image")
    drawer = _Drawer(ctx, cfg, progress)
    local: dict[int, tuple[Path, dict]] = {}
    reused = 0
    try:
        saved_keys = set(store.list_keys(saved))
        for index in mine:
            if committed_by_another():
                break
            path = work / shard_name(index)
            record, was_saved = _saved_or_drawn(ctx, drawer, saved, saved_keys, shards[index], path, saved)
            reused += len(shards[index]) if was_saved else 0
            local[index] = (path, record)
        progress.close()
        if committed_by_another():
            print(f"{where}: the output was committed by another process", file=sys.stderr)
            return not_committed(drawer, reused, committed_by="another process")
        missing = unsaved()
        if missing:
            print(
                f"{where}: its {len(mine)} shard(s) saved ({drawer.drawn} image(s) drawn, {reused} reused); "
                f"{len(missing)} other shard(s) not saved yet ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}): the process that saves the last one commits",
                file=sys.stderr,
            )
            return not_committed(drawer, reused, missing_shards=missing)
        claim = acquire(store, key, ctx.job.id, done=committed_by_another)
        if claim.lease is None:
            print(f"{where}: the output was committed by another process", file=sys.stderr)
            return not_committed(drawer, reused, committed_by="another process")
        gone = unsaved()
        if gone:
            # The process that held the lease before forgot the saved shards (every image filtered
            # out: it failed with exit 2): assembling would redraw the others' shards to fail alike.
            claim.lease.release()
            print(
                f"{where}: {len(gone)} saved shard(s) are gone since they were counted: the process "
                "that committed before forgot them (see its error); not committing",
                file=sys.stderr,
            )
            return not_committed(drawer, reused, missing_shards=gone)
        claim.lease.start_heartbeat()
        try:
            everything = tqdm(total=sum(map(len, shards)), desc=f"images {skill_name} (commit)", unit="image")
            everything.update(sum(len(shards[i]) for i in local))
            drawer.progress = everything
            with ctx.output() as out:
                try:
                    shard_records, reused_others = _assemble(ctx, drawer, shards, saved, out, local)
                finally:
                    everything.close()
                kept, filtered = _write_or_forget(ctx, saved, out, cfg, shards, shard_records, skill_name)
            store.delete_prefix(saved)  # the committed output supersedes the saved shards
        finally:
            claim.lease.release()
        print(
            f"{where}: every shard saved: committed {kept} image(s) in {len(shards)} shard(s) "
            f"({drawer.drawn} drawn by this process)",
            file=sys.stderr,
        )
        return _finished(
            ctx,
            skill_name,
            shards,
            drawer,
            reused + reused_others,
            kept,
            filtered,
            start,
            **share,
            committed=True,
        )
    finally:
        progress.close()
        shutil.rmtree(work, ignore_errors=True)


def _save_shard(
    store, saved: str, path: Path, samples: int, dropped: dict[str, str] | None = None, reasons=()
) -> dict:
    """Save a complete shard: its tar, then (the shard's completion marker) its record: its sample
    count, size and SHA-256, the images the filters dropped (id -> reason) and their count by reason.

    Both are written atomically; a kill between the two leaves a tar without a record: drawn again."""
    dropped = dict(dropped or {})
    store.upload_file(path, f"{saved}/{path.name}")
    record = {
        "name": path.name,
        "samples": samples,
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
        "dropped": dropped,
        "filtered": _counts(dropped, reasons),
    }
    store.write_json(f"{saved}/{path.name}.json", record)
    return record


def _reuse_saved_shard(
    store, saved: str, saved_keys: set[str], name: str, shard: list, local: Path
) -> dict | None:
    """Download the saved shard ``name`` to ``local`` when it is complete and intact; its record if so.

    A shard whose record is missing was in flight when the job died: drawn again, silently. One whose
    record is damaged, or whose tar is missing, or differs from the record (size, SHA-256) or from the
    samples expected (their names, in order, but for those the record says were dropped), was damaged
    in the store: drawn again, with a warning.
    """
    record_key, tar_key = f"{saved}/{name}.json", f"{saved}/{name}"
    if record_key not in saved_keys:
        return None
    try:
        record = store.read_json(record_key)
        size, digest = record["size"], record["sha256"]
        dropped = record.get("dropped") or {}
        ids = {meta["id"] for meta in shard}
        if not isinstance(dropped, dict) or not all(
            key in ids and reason in FILTER_REASONS for key, reason in dropped.items()
        ):
            raise ValueError("its record's dropped images are not this shard's ids with a filter's reason")
        if tar_key not in saved_keys:
            raise FileNotFoundError("the tar is missing")
        store.download_file(tar_key, local)
        if local.stat().st_size != size or sha256_file(local) != digest:
            raise ValueError(f"size or SHA-256 differs from {store.url(record_key)}")
        expected = [
            f"{meta['id']}.{ext}" for meta in shard if meta["id"] not in dropped for ext in ("jpg", "json")
        ]
        with tarfile.open(local) as tar:
            if tar.getnames() != expected:
                raise ValueError(
                    f"expected the samples {expected[0]} to {expected[-1]}, in order"
                    if expected
                    else "expected no sample (every image was dropped)"
                )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, tarfile.TarError, EOFError) as e:
        print(
            f"warning: {store.url(tar_key)}: damaged saved shard ({type(e).__name__}: {e}); drawn again",
            file=sys.stderr,
        )
        local.unlink(missing_ok=True)
        return None
    return {**record, "dropped": dropped}


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
        return _as_rgb(_upright(image))
    except Exception as e:  # a truncated or corrupt body behind a valid header
        raise InputError(f"image {key!r} cannot be decoded: {e}") from e


def _upright(image):
    """The image as shown: a camera's photo is often stored sideways, with an EXIF tag that says how
    to turn it (Hugging Face's datasets turn it too). Broken EXIF data: the image as stored."""
    from PIL import ImageOps

    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) in (None, 1):
            return image
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _as_rgb(image):
    """8-bit RGB. 16-bit greyscale is scaled to 8 bits: PIL's convert would clip it at 255 (white)."""
    import numpy as np
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or values.max(initial=0) > 255:  # mode I holds 8- or 16-bit values
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")
