"""Phase 3, train: one LoRA expert per skill, fine-tuned on that skill's generated image-text pairs.

Recipe, one skill per job:
1. Read the skill's committed images (a WebDataset-layout tar) and decode them to ``resolution``
   (default: SELMA's, 512 px for SD 1.x/2.x, 1024 for SDXL), centre-cropped (not where the latent
   cache below holds their encodings already); ``random_flip`` is off by default because it turns
   "left of" into "right of".
2. Load the base model; freeze the VAE, text encoder(s) and UNet; add a peft LoRA (``rank``,
   ``alpha``, Gaussian init) on ``target_modules`` of the UNet's attention (SELMA: to_q, to_k, to_v,
   to_out.0). Only the LoRA factors train.
3. Standard latent-diffusion loss: noise the VAE latents at a random timestep and regress the UNet's
   output on the scheduler's target (``epsilon`` or ``v_prediction``, from the model's own config).
   SDXL gets its pooled text embedding and each image's own size/crop time ids (``ImageCrop``).
   AdamW, gradient accumulation,
   clipping at ``max_grad_norm``. A non-finite loss stops the job.
4. Commit the adapter exactly as ``pipeline.save_lora_weights`` writes it (``load_lora_weights``
   reads it back), the same in kohya/A1111 keys (``kohya/``), ``expert.json`` (settings, final
   loss) and the loss curve; the loss is logged to the job's MLflow run every ``log_every`` steps.

Several processes (data parallel): ``torchrun --nproc-per-node=N -m jobs.run --phase train ...``
(and ``--nnodes``/``--node-rank`` across nodes) trains one expert on W = N x nodes processes, one GPU
each. The global batch does not depend on W: a step is always ``gradient_accumulation``
micro-batches of ``batch_size`` images. Each micro-batch is cut into P equal parts, P = W /
gcd(``gradient_accumulation``, W) (``micro_batch_parts``: 1 when W divides the accumulation, 2 for
SELMA's 16 x 4 on 8 GPUs, so that each process computes 8 images a step). Process r computes the
parts j (numbered micro-batch by micro-batch) with j % W == r, each part's loss weighted by its
share of the step, and the gradients are summed over all processes (one all-reduce per step)
before clipping and the AdamW step, so every process applies the same update to the same weights,
the update one process would apply. That needs every process to draw the same random numbers in
the same order: all of a micro-batch's draws (image indices, flip mask, the VAE posterior's
sample, the diffusion noise, the timesteps) come from one generator seeded with ``seed``, in that
order, and a process draws (and discards) the numbers of the parts it does not compute. The VAE
posterior is sampled explicitly as ``mean + std * randn`` (the same draw, dtype and math as
diffusers' ``latent_dist.sample(generator)``), so one process gives bit for bit what it gave
before; with W processes only float rounding changes (how losses and gradients are summed). Any
``gradient_accumulation`` works; where ``batch_size`` cannot be cut into P parts (16 images on 3
or 6 processes with an accumulation of 4), micro-batches stay whole and some processes idle part
of each step (a process with nothing to compute adds zeros): the job warns. The logged loss is
the global one. Rank 0 alone commits the adapter and tracks the run (``jobs.run``).

Encoder outputs (``train.cache_latents``, on by default; ``selma_core.latent_cache``): the frozen VAE
and text encoder(s) run once per dataset, before the first step, each image and prompt alone (a batch
of one); the VAE posterior's parameters (both orientations with ``random_flip``) and the prompts'
embeddings are committed under ``cache/latents/<digest>`` and reused by reruns, resumed jobs and every
expert trained on the same images with the same base model, resolution and dtype; with each image's
crop and the undecodable images, so a job that finds the entry decodes no image. A damaged entry is
reported and computed again. Several processes share the decoding and encoding (each 1/W of the
images). Without the cache each micro-batch's distinct images and prompts are
encoded, also alone, so the adapter is the same (bit for bit on CPU) with the cache and without.

Checkpoints (``selma_core.checkpoints``): every ``checkpoint_every`` steps rank 0 commits the LoRA,
AdamW's state, every RNG state (the one generator above is also the data order), the step and the
loss history so far under ``<key>/_checkpoints/step-NNNNNNNN/`` (safetensors + JSON, no pickle) and
keeps the newest ``checkpoints_keep``. A job killed mid-training resumes, on every process, from the
newest checkpoint that verifies (a damaged one, or one trained at another resolution, is skipped,
with a warning, for the one before) and
commits, on CPU, bit for bit the adapter and loss curve of an uninterrupted run; its MLflow run gets
the curve so far, then goes on at the next step. Under ``mixed_precision: fp16`` the checkpoint also
holds the loss scaler's state. The checkpoints are deleted once the adapter is committed; a kill in
between leaves them as garbage (the job is committed: a rerun is skipped).

Precision: the LoRA's factors and AdamW train in float32 whatever ``mixed_precision`` says, which
sets the frozen weights' dtype. The noise schedule's arithmetic (the noisy latents and the target)
is float32 too: in bfloat16 the first timesteps' noise levels round to none at all. Under fp16 the
loss is scaled (``torch.amp.GradScaler``) so the gradients flowing back through the fp16 UNet do
not underflow; a step whose gradients overflow is skipped and the scale lowered, as AMP does.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NamedTuple

from selma_core import stopping
from selma_core.errors import ConfigError, InputError
from selma_core.faults import fault_point
from selma_core.phases.images import MAX_IMAGE_SIDE, open_image
from selma_core.typed_yaml import execution_only, hashed_unless_default

# Optimizer steps per expert: far above any real run (SELMA: 5,000), a bound on a typo.
MAX_STEPS = 1_000_000
# Of train checkpoints (selma_core.checkpoints): one of another format is not resumed from.
CHECKPOINT_FORMAT = 1
# How long a SIGTERM waits for the end of the training step (then it interrupts mid-step, as without
# a checkpoint): within Kubernetes' default grace period (30 s) and the local executor's (20 s),
# leaving time to save the checkpoint.
STOP_WAIT_S = 10.0
# SELMA's batches, (images per micro-batch, micro-batches per update) by whether the model is SDXL:
# 64 images an update for SD 1.x/2.x at 512 px, 32 for SDXL at 1024 px, whose micro-batch of 4
# holds as many latent pixels as one of 16 at 512.
SELMA_BATCHES = {False: (16, 4), True: (4, 8)}
# SELMA's training resolution for SD 1.x and 2.x (SD 2.1 included, native 768: 16 images at 768 px
# hold 2.25 times the pixels of its recipe's batch); SDXL trains at its native 1024.
SELMA_SD_RESOLUTION = 512


def micro_batch_parts(batch_size: int, accumulation: int, world_size: int) -> int:
    """Into how many equal parts each micro-batch is cut so that each of ``world_size`` processes
    computes the same share of every step: ``world_size / gcd(accumulation, world_size)``, or 1
    (whole micro-batches, some processes idle part of each step) where ``batch_size`` does not
    divide by it."""
    parts = world_size // math.gcd(accumulation, world_size)
    return parts if batch_size % parts == 0 else 1


def check_same_latent_space(vae, base_vae, spec: str, base_model: str) -> None:
    """A ``train.vae_model`` must encode into the base model's latent space: the UNet learns on
    its latents, and images, eval and users decode with the base model's own VAE. An SD VAE
    (scaling 0.18215) for SDXL (0.13025) would train on latents scaled wrongly, without an error."""
    for name in ("latent_channels", "scaling_factor", "shift_factor"):
        mine, base = vae.config.get(name), base_vae.config.get(name)
        if mine != base:
            raise ConfigError(
                f"train.vae_model {spec}: its {name} is {mine}, the base model {base_model}'s VAE's is "
                f"{base}: name a VAE made for the base model's latents (for SDXL under fp16: "
                "madebyollin/sdxl-vae-fp16-fix)"
            )


def _smaller_batch(batch_size: int, accumulation: int, world_size: int, rows: int) -> int | None:
    """For out-of-memory advice: a smaller ``batch_size`` that divides the images per step and gives
    each process fewer than its ``rows`` images a micro-batch; preferably half or fewer, then shared
    evenly by the processes, then the largest. None if there is none. On several processes a smaller
    batch is not always less per process: SELMA's 16 x 4 on 8 GPUs gives each 8 images, and so
    does 8 x 8 (4 x 16 gives each 4)."""
    per_step = batch_size * accumulation

    def parts(smaller: int) -> int:
        return micro_batch_parts(smaller, per_step // smaller, world_size)

    fewer = [b for b in range(1, batch_size) if per_step % b == 0 and b // parts(b) < rows]
    return max(
        fewer,
        key=lambda b: (b // parts(b) <= rows // 2, per_step // b * parts(b) % world_size == 0, b),
        default=None,
    )


def part_of_draws(draws: tuple, part: int, parts: int) -> tuple:
    """Part ``part`` of ``parts`` of one micro-batch's random draws (``ExpertTrainer._draw``): its
    rows, in order."""
    if parts == 1:
        return draws
    idx, flip, posterior, noise, timesteps = draws
    size = len(idx) // parts
    rows = slice(part * size, (part + 1) * size)
    return idx[rows], None if flip is None else flip[rows], posterior[rows], noise[rows], timesteps[rows]


@dataclass
class TrainConfig:
    # LoRA rank and alpha (scale = alpha / rank). SELMA: 128 and 128. Higher rank: more capacity and memory.
    rank: int = 128
    alpha: float = 128.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    steps: int = 5000
    # Images per micro-batch and micro-batches per optimizer step (accumulated; the global batch is
    # their product whatever the number of processes). None: SELMA's for the model (SELMA_BATCHES):
    # 16 x 4 for SD 1.x/2.x, 4 x 8 for SDXL (resolved_for, once the model is loaded).
    batch_size: int | None = None
    gradient_accumulation: int | None = None
    learning_rate: float = 3e-4
    weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # Training resolution in pixels; None: SELMA's, 512 for SD 1.x/2.x, SDXL's native 1024.
    resolution: int | None = None
    random_flip: bool = False
    # SDXL's own VAE overflows in float16: with mixed_precision fp16 it encodes in float32, unless an
    # fp16-safe VAE is named here (hub id or local folder, e.g. madebyollin/sdxl-vae-fp16-fix),
    # which then replaces the base model's VAE for training (its latents, so part of the output).
    vae_model: str | None = hashed_unless_default(None)
    # The hub revision (commit) of vae_model, as base_model_revision pins the base model: an
    # upstream change to the VAE would otherwise change the latents under the same name.
    vae_model_revision: str | None = hashed_unless_default(None)
    # Compute dtype of the frozen weights: "auto" is bfloat16 on CUDA, float32 on CPU.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    log_every: int = execution_only(10)
    # Every checkpoint_every optimizer steps rank 0 commits a checkpoint (LoRA, optimizer and RNG
    # states, step, loss so far) under <key>/_checkpoints/; a rerun of a killed job resumes from the
    # newest one that verifies and ends with the very adapter an uninterrupted run commits. None: no
    # checkpoints. The newest checkpoints_keep are kept; all go once the adapter is committed.
    checkpoint_every: int | None = execution_only(500)
    checkpoints_keep: int = execution_only(2)
    # VAE latents (the posterior's parameters) and text embeddings computed once per dataset, base
    # model, resolution and dtype and committed under cache/latents/<digest> (selma_core.latent_cache):
    # reruns, resumed jobs and every expert on the same images reuse them. The adapter is the same
    # with and without (each image and prompt is encoded alone either way). False: encode every
    # micro-batch.
    cache_latents: bool = execution_only(True)
    # Speed (selma_core.models.speed); none changes what is computed beyond float rounding. On CUDA:
    # the UNet and VAE in channels_last and AdamW's fused kernel (on CPU both are left off: slower
    # there, and CPU runs are the bit-for-bit reference of the tests). Attention always goes through
    # SDPA (flash / memory-efficient kernels); with bf16 on CUDA the UNet runs under bf16 autocast,
    # so the LoRA's fp32 factors multiply on tensor cores too.
    channels_last: bool = execution_only(True)
    fused_optimizer: bool = execution_only(True)
    # torch.compile of the UNet: "blocks" compiles each transformer and ResNet block (one graph per
    # distinct block shape: SDXL's 16 compile in about 2 minutes on an H100, where its whole UNet
    # took over 5 on an H200), "full" the whole UNet as one graph (SD 1.x: about 3 minutes on an
    # H100; its 21 block shapes were not done within 2.5), "off" eager; "auto": full for SD 1.x/2.x
    # and blocks for SDXL on CUDA, off on the CPU (speed.resolve_compile). Compiled kernels are
    # cached under cache_dir and in the store (cache/compile/), so a restarted job on another node
    # loads them instead of compiling.
    compile: Literal["auto", "off", "blocks", "full"] = execution_only("auto")
    compile_cache: bool = execution_only(True)
    # The attention kernel (selma_core.models.attention): "default" is PyTorch's own choice; "flash",
    # "efficient", "cudnn", "math" put that one first; "auto" measures them on this model's shapes
    # on CUDA once per GPU type (the choice kept in the store: cache/attention/) and takes one only
    # when faster than PyTorch's own; on the CPU it is "default".
    attention: Literal["auto", "default", "flash", "efficient", "cudnn", "math"] = execution_only("auto")
    # Each micro-batch's forward and backward replayed as a CUDA graph
    # (selma_core.models.cuda_graph): one launch instead of thousands, so the GPU no longer waits
    # for Python to launch them (SDXL compiled by blocks left it idle half of each step on an H200,
    # bench/RESULTS.md). On CUDA only; not with gradient_checkpointing. A micro-batch that cannot be
    # captured stops the job naming why. Off until a GPU run has measured it.
    cuda_graph: bool = execution_only(False)
    # Recompute activations in the backward pass: far less GPU memory for about a third more time.
    gradient_checkpointing: bool = execution_only(False)
    # Images of a dataset that cannot be decoded are skipped and counted; above this share of the
    # dataset the job fails naming them.
    max_bad_image_share: float = execution_only(0.01)
    # Every validation_every steps (None: never) rank 0 draws validation_prompts held-out prompts
    # (the skill's held-out split; else the first training prompts) with the expert being trained,
    # validation_inference_steps denoising steps, fixed seeds, and logs them to MLflow under
    # validation/step-NNNNNNNN/.
    validation_every: int | None = execution_only(500)
    validation_prompts: int = execution_only(4)
    validation_inference_steps: int = execution_only(25)

    def __post_init__(self) -> None:
        if self.vae_model_revision is not None and self.vae_model is None:
            raise ValueError(
                "vae_model_revision: pins vae_model, which is not set (the base model's VAE is used)"
            )
        for name in (
            "rank",
            "steps",
            "log_every",
            "checkpoints_keep",
            "validation_prompts",
            "validation_inference_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "gradient_accumulation"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: expected >= 1 or null (SELMA's for the model), got {value}")
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps: expected at most {MAX_STEPS:,} (SELMA: 5,000), got {self.steps:,}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(
                f"checkpoint_every: expected >= 1 or null (no checkpoints), got {self.checkpoint_every}"
            )
        if self.alpha <= 0:
            raise ValueError(f"alpha: expected > 0, got {self.alpha}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate: expected > 0, got {self.learning_rate}")
        # Below zero the clip reverses every gradient (training ascends the loss), at zero it
        # zeroes them; AdamW divides by eps, and torch refuses a negative decay only once the
        # models are loaded.
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: expected > 0 (SELMA: 1.0), got {self.max_grad_norm}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps: expected > 0 (SELMA: 1e-8), got {self.adam_eps}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay: expected >= 0 (SELMA: 1e-2), got {self.weight_decay}")
        if not self.target_modules:
            raise ValueError("target_modules: expected at least one module name")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution: expected a multiple of 8, got {self.resolution}")
        if self.validation_every is not None and self.validation_every < 1:
            raise ValueError(f"validation_every: expected >= 1 or null (never), got {self.validation_every}")
        if not 0 <= self.max_bad_image_share < 1:
            raise ValueError(f"max_bad_image_share: expected >= 0 and < 1, got {self.max_bad_image_share}")
        if self.resolution is not None and self.resolution > MAX_IMAGE_SIDE:
            raise ValueError(f"resolution: expected at most {MAX_IMAGE_SIDE}, got {self.resolution}")
        if self.cuda_graph and self.gradient_checkpointing:
            raise ValueError(
                "cuda_graph and gradient_checkpointing: choose one (checkpointing's recomputation "
                "saves and restores the GPU's random state, which a CUDA graph cannot hold)"
            )

    def resolved_for(self, sdxl: bool) -> TrainConfig:
        """This config with ``batch_size`` and ``gradient_accumulation`` left null set to SELMA's for
        the model (``SELMA_BATCHES``; ``sdxl``: whether it is SDXL)."""
        batch, accumulation = SELMA_BATCHES[sdxl]
        return replace(
            self,
            batch_size=batch if self.batch_size is None else self.batch_size,
            gradient_accumulation=accumulation
            if self.gradient_accumulation is None
            else self.gradient_accumulation,
        )


def _weight_dtype(cfg: TrainConfig, device: str):
    import torch

    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]


class ImageCrop(NamedTuple):
    """Where a training image's pixels come from (SDXL's size and crop conditioning): its size before
    resizing, and the top-left corner of its centre crop in the resized image, as it is and mirrored
    (``random_flip``: the same crop seen from the other side)."""

    original_height: int
    original_width: int
    top: int
    left: int
    left_mirrored: int

    def sdxl_time_ids(self, resolution: int, flipped: bool = False) -> list[int]:
        """SDXL's micro-conditioning, as diffusers' SDXL training computes it: (original size, crop
        top-left, target size), each (height, width)."""
        left = self.left_mirrored if flipped else self.left
        return [self.original_height, self.original_width, self.top, left, resolution, resolution]


class DecodedImages(NamedTuple):
    samples: list  # the usable (meta, bytes) samples
    pixels: object  # their uint8 tensor (N, 3, R, R)
    crops: list[ImageCrop]


class DecodedShare(NamedTuple):
    """Some of a dataset's images, decoded (``_decode_share``)."""

    positions: list[int]  # the usable images' positions in the dataset, ascending
    pixels: object  # their uint8 tensor (N, 3, R, R); None when there are none
    crops: list[ImageCrop]
    skipped: dict[int, str]  # position -> why the image cannot be used


def _decode_share(dataset: list[tuple[dict, bytes]], resolution: int, positions) -> DecodedShare:
    """The images at ``positions``: each resized so its short side is R, centre-cropped, and where
    its crop came from (``ImageCrop``). One that cannot be decoded (or is too small, too large, a
    decompression bomb) is skipped, with why."""
    import numpy as np
    import torch
    from PIL import Image

    arrays, kept, crops, skipped = [], [], [], {}
    for position in positions:
        meta, jpeg = dataset[position]
        try:
            # Its size is checked from the header before any pixel is decoded (decompression bombs).
            image = open_image(jpeg, str(meta.get("id")))
        except InputError as e:
            skipped[position] = str(e)
            continue
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        original = image.height, image.width
        image = image.resize(size, Image.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        crops.append(ImageCrop(*original, top, left, image.width - resolution - left))
        image = image.crop((left, top, left + resolution, top + resolution))
        arrays.append(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
        kept.append(position)
    pixels = torch.from_numpy(np.stack(arrays)) if arrays else None
    return DecodedShare(kept, pixels, crops, skipped)


class SharedDecode(NamedTuple):
    """A dataset's images, decoded by a job's processes together: each process decoded those at the
    positions p with p % W == its rank, and the processes exchanged what they found."""

    positions: list[int]  # every usable image's position in the dataset, ascending
    crops: list[ImageCrop]  # each usable image's, by row (positions' order)
    skipped: dict[int, str]  # position -> why the image cannot be used, ascending
    mine_rows: list[int]  # the rows (usable images) this process decoded, ascending
    mine_pixels: object  # their uint8 pixels, in mine_rows' order; None when there are none


def _cat_rows(tensors: list):
    """``tensors`` (each a few rows) as one CPU tensor; None when there are none."""
    import torch

    return torch.cat([t.cpu() for t in tensors]) if tensors else None


def _check_skipped(reasons: list[str], total: int, max_bad_share: float) -> None:
    """Report the images that cannot be used (``reasons``, of ``total``); an ``InputError`` naming
    them when they are more than ``max_bad_share`` of the dataset, or all of it."""
    if not reasons:
        return
    listed = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
    if len(reasons) / total > max_bad_share or len(reasons) == total:
        raise InputError(
            f"{len(reasons)} of {total} image(s) cannot be used, more than train.max_bad_image_share "
            f"({max_bad_share:.1%}): {listed}"
        )
    print(f"train: skipped {len(reasons)} of {total} image(s): {listed}", file=sys.stderr)


def _decode_images(
    dataset: list[tuple[dict, bytes]], resolution: int, max_bad_share: float = 0.0
) -> DecodedImages:
    """The dataset's usable samples, their pixels and crops (``_decode_share``, every image).

    Images that cannot be used are skipped and reported; when they are more than ``max_bad_share``
    of the dataset the job fails with an ``InputError`` naming them.
    """
    decoded = _decode_share(dataset, resolution, range(len(dataset)))
    _check_skipped(list(decoded.skipped.values()), len(dataset), max_bad_share)
    return DecodedImages([dataset[p] for p in decoded.positions], decoded.pixels, decoded.crops)


class ExpertTrainer:
    """Trains one LoRA expert on a base pipeline; ``train`` returns the loss history."""

    def __init__(self, pipe, cfg: TrainConfig, device: str, cache_dir: str | None = None) -> None:
        import torch
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        from selma_core.models import speed

        if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
            # An SD3, PixArt or Flux pipeline (a transformer, no UNet): SELMA's recipe targets the
            # UNet's attention. Refused here, not as an AttributeError a retry would repeat.
            raise ConfigError(
                f"base model: a {type(pipe).__name__}, which has no UNet and VAE; training supports "
                "Stable Diffusion 1.x, 2.x and XL pipelines"
            )
        self.sdxl = hasattr(pipe, "text_encoder_2")
        # The batch settings resolved for this model: what the trainer, its checkpoints and the
        # job's result go by.
        self.pipe, self.cfg, self.device = pipe, cfg.resolved_for(self.sdxl), device
        cfg = self.cfg
        self.dtype = _weight_dtype(cfg, device)
        # Training noise follows the model's own schedule and prediction type.
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in self._frozen_modules():
            module.requires_grad_(False)
            module.to(device, dtype=self.dtype)
        self.vae_dtype = self.dtype
        # The VAE's own config says whether it is fp16-safe (sdxl-vae-fp16-fix: force_upcast false).
        if self.sdxl and self.dtype == torch.float16 and pipe.vae.config.force_upcast:
            self.vae_dtype = torch.float32  # SDXL's VAE gives inf/NaN latents in float16
            pipe.vae.to(dtype=torch.float32)
        pipe.unet.to(device, dtype=self.dtype)
        pipe.unet.requires_grad_(False)
        self.lora_config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=cfg.target_modules
        )
        try:
            pipe.unet.add_adapter(self.lora_config)
        except ValueError as e:
            raise InputError(f"train.target_modules {cfg.target_modules}: {e}") from e
        refuse_non_linear_targets(pipe.unet, cfg.target_modules)
        # LoRA factors train in float32 whatever the frozen weights' dtype.
        named = [(name, p) for name, p in pipe.unet.named_parameters() if p.requires_grad]
        self.param_names = [name for name, _ in named]
        self.params = [p for _, p in named]
        for p in self.params:
            p.data = p.data.float()
        cuda = device.startswith("cuda")
        # fp16 gradients of a mean-squared loss over a whole batch underflow without a loss scale.
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=self.dtype == torch.float16)
        self.steps_skipped = 0  # fp16 steps whose gradients overflowed (the scaler skipped them)
        self._time_ids: dict = {}  # SDXL: by orientation, every image's time ids on the device
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            eps=cfg.adam_eps,
            # One kernel for every parameter's update instead of a dozen per tensor.
            fused=True if cfg.fused_optimizer and cuda else None,
        )
        speed.use_sdpa(pipe.unet)
        self.channels_last = cfg.channels_last and cuda
        if cuda:  # one input shape all job long: let cuDNN pick its fastest convolution once
            torch.backends.cudnn.benchmark = True
        if self.channels_last:
            speed.to_channels_last(pipe.unet, pipe.vae)
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        # Inductor's on-disk caches under cache_dir outlive this process.
        kernels = cache_dir if cfg.compile_cache else None
        self.compile_mode = speed.resolve_compile(cfg.compile, pipe.unet, device)
        self.compiled_modules = speed.compile_unet(pipe.unet, self.compile_mode, cache_dir=kernels)
        self.attention = None  # an attention.AttentionChoice, once choose_attention has run
        # cfg.cuda_graph: how micro-batches ran ("off", or GraphedCall.state after training); tests
        # on the CPU set graph_backend (a selma_core.models.cuda_graph.GraphBackend) to run it there.
        self.cuda_graph_state = "off"
        self.graph_backend = None
        self._forward_backward_call = self._forward_backward
        self._parts = 1  # parts_per_micro_batch(), set for each training
        self._world_size = 1  # processes training this expert, set for each training
        # What training is doing ("encoding", "training", "validation"): out-of-memory advice for it.
        self._doing = "training"

    def choose_attention(self, store=None):
        """The attention kernel training runs under: ``cfg.attention`` resolved, measured at most once
        (``selma_core.models.attention.resolve_attention``; ``store`` keeps the measurement for every
        later job). ``train`` calls it when nothing did before."""
        from selma_core import distributed
        from selma_core.models.attention import AttentionChoice, resolve_attention

        if self.attention is None:
            # Rank 0 resolves (and measures, and stores); the others take its kernel: every process
            # must run, and compile, the same one. A collective: every process calls this.
            rank, world_size = distributed.rank_and_size()
            side = self.training_resolution() // self.pipe.vae_scale_factor
            choice = None
            if rank == 0:
                choice = resolve_attention(
                    self.cfg.attention,
                    self.pipe.unet,
                    self.device,
                    batch=self.rows_per_part(),
                    size=(side, side),
                    text_len=self.pipe.tokenizer.model_max_length,
                    backward=True,
                    store=store,
                )
            if world_size > 1:
                backend = distributed.broadcast_object(choice.backend if choice else None)
                choice = choice or AttentionChoice(backend)
            self.attention = choice
            if self.attention.measured_ms and not self.attention.from_store:
                print(
                    f"train: attention kernel {self.attention.backend} (measured, ms per forward "
                    f"and backward: {self.attention.measured_ms})",
                    file=sys.stderr,
                )
        return self.attention

    def _frozen_modules(self) -> list:
        modules = [self.pipe.vae, self.pipe.text_encoder]
        if self.sdxl:
            modules.append(self.pipe.text_encoder_2)
        return modules

    def native_resolution(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def training_resolution(self) -> int:
        """``cfg.resolution``, or SELMA's: 512 px for SD 1.x/2.x (SD 2.1's native 768 too), SDXL's
        native 1024 (a smaller random test model: its own)."""
        if self.cfg.resolution is not None:
            return self.cfg.resolution
        native = self.native_resolution()
        return native if self.sdxl else min(native, SELMA_SD_RESOLUTION)

    def _text_names(self) -> list[str]:
        """The text encoders' outputs training reads (``_encode_text``'s keys)."""
        return ["prompt_embeds", "pooled_prompt_embeds"] if self.sdxl else ["prompt_embeds"]

    def _encode_text(self, text: str) -> dict:
        """One prompt's text-encoder outputs, encoded alone (a batch of one): ``prompt_embeds`` and,
        for SDXL, ``pooled_prompt_embeds``, each with a leading dimension of 1."""
        import torch

        with torch.no_grad():
            encoded = self.pipe.encode_prompt(
                prompt=[text], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        rows = {"prompt_embeds": encoded[0]}
        if self.sdxl:
            rows["pooled_prompt_embeds"] = encoded[2]
        return rows

    def _encode_image(self, pixels_u8, flipped: bool):
        """One image's VAE posterior parameters (diffusers' ``latent_dist.parameters``: mean and
        log-variance), encoded alone (a batch of one), so they do not depend on a batch's other
        images: cached or not, the same tensors. Contiguous: the VAE may return channels-last
        tensors, and the UNet's gradients would then differ (in float rounding) from a cached run's."""
        import torch

        pixels = pixels_u8.float().div(127.5).sub(1.0)
        if flipped:
            pixels = pixels.flip(-1)
        with torch.no_grad():
            params = self.pipe.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist.parameters
            params = params.to(self.dtype)
        return params.contiguous()

    def _place_time_ids(self, crops: list[ImageCrop], resolution: int) -> None:
        """SDXL: every image's time ids (``ImageCrop.sdxl_time_ids``), as it is and mirrored, on the
        device once; each micro-batch gathers its rows there (a copy from ordinary host memory
        would wait for the GPU every time)."""
        import torch

        self._time_ids = {
            flipped: torch.tensor([crop.sdxl_time_ids(resolution, flipped) for crop in crops]).to(self.device)
            for flipped in (False, True)
        }

    def _conditioning(self, text: dict, idx, flip) -> tuple:
        """The UNet's text conditioning for the images ``idx`` (flipped where ``flip``): the prompts'
        hidden states and, for SDXL, the pooled embedding and each image's own time ids."""
        import torch

        prompt_embeds = text["prompt_embeds"]
        if not self.sdxl:
            return prompt_embeds, None
        if not self._time_ids:
            raise RuntimeError("SDXL time ids are placed by train() (_place_time_ids) before any micro-batch")
        rows = self._upload(idx, self.device)
        time_ids = self._time_ids[False][rows]
        if flip is not None:
            mirrored = self._time_ids[True][rows]
            time_ids = torch.where(self._upload(flip, self.device).view(-1, 1), mirrored, time_ids)
        return prompt_embeds, {
            "text_embeds": text["pooled_prompt_embeds"],
            "time_ids": time_ids.to(prompt_embeds.dtype),
        }

    def _encode_dataset(self, dataset, resolution: int, latent_cache=None) -> tuple[list, object]:
        """The dataset's usable samples and their encoder outputs (an ``Encoded``): every image's
        posterior parameters (both orientations with ``random_flip``), every prompt's embeddings,
        every image's crop. From ``latent_cache`` (a ``selma_core.latent_cache.LatentCache``) when it
        holds them all and they verify: then no image is decoded. Else the images are decoded and
        encoded (reusing what the entry holds: a run with ``random_flip`` adds the flipped images to
        an entry without them) and the entry committed. Sets ``latent_cache_use``: "hit",
        "computed" or "memory" (no store cache given).

        Under torchrun the processes share the work: each decodes and encodes the images (and their
        prompts) at the positions p with p % W == its rank, and every process gets every row.
        """
        from selma_core import distributed
        from selma_core.latent_cache import Encoded, sample_ids

        ids = sample_ids(dataset)
        orientations = [False, True] if self.cfg.random_flip else [False]
        spec = latent_cache.spec(dataset, resolution, str(self.dtype)) if latent_cache else None
        entry = latent_cache.load(spec, ids) if latent_cache else None
        if entry is not None:
            problem = self._check_encoded(entry, len(entry.ids), resolution)
            if problem:
                latent_cache.warn(latent_cache.key(spec), problem)
                entry = None
        # Every process takes the same path (the collectives below): the entry serves if it serves all.
        if distributed.all_true(entry is not None and all(f in entry.latents for f in orientations)):
            skipped = [entry.skipped[i] for i in ids if i in entry.skipped]
            _check_skipped(skipped, len(ids), self.cfg.max_bad_image_share)
            self.latent_cache_use = "hit"
            return [sample for sample, i in zip(dataset, ids, strict=True) if i not in entry.skipped], entry

        decoded = self._decode_shared(dataset, resolution)
        usable = [ids[p] for p in decoded.positions]
        if entry is not None and entry.ids != usable:  # its images decode otherwise here: not this entry
            entry = None
        encoded = Encoded(usable, decoded.crops, {ids[p]: why for p, why in decoded.skipped.items()})
        if distributed.all_true(entry is not None):
            encoded.text, encoded.latents = entry.text, dict(entry.latents)
        else:
            encoded.text = self._encode_texts_shared(dataset, decoded)
        for flipped in orientations:
            # Agreed orientation by orientation: another job may have added one to the entry
            # between two processes' reads of it.
            if not distributed.all_true(flipped in encoded.latents):
                encoded.latents[flipped] = self._encode_images_shared(decoded, flipped)
        if entry is not None:  # this process's entry (not every one's): recommitted with what it held
            for flipped, latents in entry.latents.items():
                encoded.latents.setdefault(flipped, latents)
        self.latent_cache_use = "memory"
        if latent_cache is not None:
            self.latent_cache_use = "computed"
            extra = {}
            if self.sdxl:  # for whoever reads the entry: which crop each image's latents are of
                time_ids = [ImageCrop(*crop).sdxl_time_ids(resolution) for crop in encoded.crops]
                extra["sdxl_time_ids"] = dict(zip(usable, time_ids, strict=True))
            latent_cache.save(spec, encoded, extra)
        return [dataset[p] for p in decoded.positions], encoded

    def _decode_shared(self, dataset, resolution: int) -> SharedDecode:
        """The dataset's images decoded by this job's processes together (``SharedDecode``); the
        undecodable ones reported, or an ``InputError`` in every process when there are too many."""
        from selma_core import distributed

        rank, world_size = distributed.rank_and_size()
        mine = _decode_share(dataset, resolution, range(rank, len(dataset), world_size))
        crops, skipped = {}, {}
        for positions, share_crops, share_skipped in distributed.all_gather_object(
            (mine.positions, mine.crops, mine.skipped)
        ):
            crops.update(zip(positions, share_crops, strict=True))
            skipped.update(share_skipped)
        skipped = dict(sorted(skipped.items()))
        _check_skipped(list(skipped.values()), len(dataset), self.cfg.max_bad_image_share)
        positions = sorted(crops)
        mine_rows = [row for row, p in enumerate(positions) if p % world_size == rank]
        return SharedDecode(positions, [crops[p] for p in positions], skipped, mine_rows, mine.pixels)

    def _encode_texts_shared(self, dataset, decoded: SharedDecode) -> dict:
        """Every usable sample's prompt embeddings (``_encode_text``), each process encoding its rows."""
        from selma_core import distributed

        rows = [self._encode_text(dataset[decoded.positions[row]][0]["prompt"]) for row in decoded.mine_rows]
        return {
            name: distributed.assemble_rows(
                decoded.mine_rows, _cat_rows([r[name] for r in rows]), len(decoded.positions)
            )
            for name in self._text_names()
        }

    def _encode_images_shared(self, decoded: SharedDecode, flipped: bool):
        """Every usable image's posterior parameters (``_encode_image``), each process encoding its
        rows (a progress bar on rank 0, for its share)."""
        from tqdm import tqdm

        from selma_core import distributed

        mine = tqdm(
            range(len(decoded.mine_rows)),
            desc="encode" + (" flipped" if flipped else ""),
            unit="image",
            disable=not distributed.is_main(),
        )
        latents = _cat_rows([self._encode_image(decoded.mine_pixels[k : k + 1], flipped) for k in mine])
        return distributed.assemble_rows(decoded.mine_rows, latents, len(decoded.positions))

    def _place_encoded(self, encoded) -> None:
        """On CUDA, the dataset's encoder outputs (read by every micro-batch) on the GPU when they
        take at most a quarter of its free memory (SD 1.x at 512 px: about 180 KB an image), else in
        pinned CPU memory, gathered there and uploaded without waiting."""
        import torch

        if not self.device.startswith("cuda"):
            return
        tensors = [*encoded.latents.values(), *encoded.text.values()]
        size = sum(t.numel() * t.element_size() for t in tensors)
        free, _ = torch.cuda.mem_get_info(torch.device(self.device))
        on_gpu = size <= free // 4
        if not on_gpu:
            print(
                f"train: encoded dataset ({size / 2**30:.1f} GiB) kept in pinned CPU memory", file=sys.stderr
            )

        def move(tensor):
            return tensor.to(self.device) if on_gpu else tensor.pin_memory()

        encoded.latents = {f: move(t) for f, t in encoded.latents.items()}
        encoded.text = {name: move(t) for name, t in encoded.text.items()}

    def store_compile_cache(self, store, scratch_dir):
        """The store entry of this trainer's compiled kernels (``speed.StoreCompileCache``, keyed by
        everything they depend on); None when nothing is compiled or ``compile_cache`` is off."""
        from selma_core.models import speed

        if self.compile_mode == "off" or not self.cfg.compile_cache:
            return None
        self.choose_attention(store)  # the graphs depend on it; the store keeps the measurement
        unet = self.pipe.unet
        digest = speed.compile_cache_digest(
            unet, self.compile_mode, self.device, self.dtype, self.compile_signature()
        )
        return speed.StoreCompileCache(store, digest, scratch_dir)

    def compile_signature(self) -> dict:
        """What the compiled graphs depend on beyond the UNet's config, dtype and input shapes (for
        the compile cache's digest): the LoRA, checkpointing, memory layout, autocast and attention kernel."""
        cfg = self.cfg
        return {
            "lora": [cfg.rank, cfg.alpha, sorted(cfg.target_modules)],
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "channels_last": self.channels_last,
            "autocast": type(self._autocast()).__name__,
            "attention": self.choose_attention().backend,
            "batch": self.rows_per_part(),
            "resolution": self.training_resolution(),
        }

    def parts_per_micro_batch(self) -> int:
        """Into how many parts each micro-batch is cut between this job's processes
        (``micro_batch_parts``)."""
        from selma_core import distributed

        _, world_size = distributed.rank_and_size()
        return micro_batch_parts(self.cfg.batch_size, self.cfg.gradient_accumulation, world_size)

    def rows_per_part(self) -> int:
        """Images per UNet call in this process: ``batch_size``, or its share when micro-batches are
        cut between processes."""
        return self.cfg.batch_size // self.parts_per_micro_batch()

    def _check_encoded(self, encoded, n_images: int, resolution: int) -> str | None:
        """Why cached tensors cannot be this model's (None: they can)."""
        side = resolution // self.pipe.vae_scale_factor
        expected = (n_images, 2 * self.pipe.vae.config.latent_channels, side, side)
        for params in encoded.latents.values():
            if tuple(params.shape) != expected or params.dtype != self.dtype:
                return f"latents {tuple(params.shape)} {params.dtype}, expected {expected} {self.dtype}"
        names = set(self._text_names())
        if set(encoded.text) != names or any(len(t) != n_images for t in encoded.text.values()):
            return f"text embeddings {sorted(encoded.text)}, expected {sorted(names)} per sample"
        return None

    def _draw(self, generator, n_images: int, latent_shape: tuple[int, ...]) -> tuple:
        """Every random number of one micro-batch, from the one generator, in a fixed order.

        Every process draws every micro-batch's numbers, computed here or not, so all processes'
        generators stay in step. The order (indices, flip mask, posterior sample, noise, timesteps)
        and dtypes are those the single-process trainer always used.
        """
        import torch

        cfg = self.cfg
        idx = torch.randint(n_images, (cfg.batch_size,), generator=generator)
        flip = torch.rand(cfg.batch_size, generator=generator) < 0.5 if cfg.random_flip else None
        # The VAE posterior's sample, drawn as diffusers' latent_dist.sample(generator) draws it.
        posterior = torch.randn(latent_shape, generator=generator, dtype=self.dtype)
        noise = torch.randn(latent_shape, generator=generator)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator
        )
        return idx, flip, posterior, noise, timesteps

    def _micro_batch(self, draws, pixels_u8, texts: list[str], resolution: int, encoded=None):
        """Forward and backward one micro-batch (gradients accumulate); its loss / accumulation, a
        float64 tensor left on the device (read only every few steps, see ``_settle``).

        The encoders' outputs come from ``encoded`` (the whole dataset's, ``_encode_dataset``) or,
        without it, are computed here, each image and prompt alone as ``_encode_dataset`` does."""
        inputs = self._unet_inputs(draws, pixels_u8, texts, resolution, encoded)
        # Consumed at once (the caller adds it up): with a CUDA graph the next call overwrites it.
        return self._forward_backward_call(*inputs)

    def _unet_inputs(self, draws, pixels_u8, texts: list[str], resolution: int, encoded=None) -> list:
        """One micro-batch's tensors for ``_forward_backward``: noisy latents, timesteps, text
        embeddings, the loss's target and (SDXL) the added conditioning."""
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        idx, flip, posterior, noise, timesteps = draws
        rows = idx.tolist()
        flips = flip.tolist() if flip is not None else [False] * len(rows)
        if encoded is not None:  # gathered where the cache lives (on the GPU when training there)
            where = encoded.latents[False].device
            params = encoded.latents[False][self._upload(idx, where)]
            if flip is not None:
                mask = self._upload(flip, where).view(-1, 1, 1, 1)
                params = torch.where(mask, encoded.latents[True][self._upload(idx, where)], params)
            text = {
                name: self._upload(t[self._upload(idx, t.device)], self.device)
                for name, t in encoded.text.items()
            }
        else:  # each distinct image (and orientation) and prompt encoded once, alone
            images: dict[tuple[int, bool], object] = {}
            prompts: dict[int, dict] = {}
            for i, f in zip(rows, flips, strict=True):
                if (i, f) not in images:
                    images[i, f] = self._encode_image(pixels_u8[i : i + 1], f)
                if i not in prompts:
                    prompts[i] = self._encode_text(texts[i])
            params = torch.cat([images[i, f] for i, f in zip(rows, flips, strict=True)])
            text = {name: torch.cat([prompts[i][name] for i in rows]) for name in prompts[rows[0]]}
        # One memory layout whichever way the parameters came (the UNet's kernels depend on it).
        # The noise schedule's arithmetic in float32 (see the module docstring); the UNet's input in
        # the weights' dtype. On CPU in float32 every cast is a no-op.
        params = self._upload(params, self.device).float().contiguous()
        latent_dist = DiagonalGaussianDistribution(params)
        if tuple(latent_dist.mean.shape) != tuple(posterior.shape):
            raise InputError(
                f"VAE latents {tuple(latent_dist.mean.shape)} != expected {tuple(posterior.shape)} "
                f"at resolution {resolution}"
            )
        with torch.no_grad():
            sample = latent_dist.mean + latent_dist.std * self._upload(posterior, self.device).float()
            latents = sample * self.pipe.vae.config.scaling_factor
        hidden, added = self._conditioning(text, idx, flip)
        noise = self._upload(noise, self.device).float()
        timesteps = self._upload(timesteps, self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps).to(self.dtype)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:  # epsilon (train() checked)
            target = noise
        extra = [added["text_embeds"], added["time_ids"]] if added else []
        return [noisy, timesteps, hidden, target, *extra]

    def _forward_backward(self, noisy, timesteps, hidden, target, *added):
        """The UNet's forward and backward on one micro-batch's tensors (``_unet_inputs``); the loss /
        accumulation as a float64 device tensor. Tensors in, tensors out, nothing read on the host:
        what a CUDA graph can replay (``cfg.cuda_graph``)."""
        import torch.nn.functional as F

        conditioning = {"text_embeds": added[0], "time_ids": added[1]} if added else None
        with self._autocast():
            pred = self.pipe.unet(
                noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=conditioning
            ).sample
        # The part's mean weighted by its share of the step: summed over every part of every
        # micro-batch, the step's mean loss (and its gradient) whatever the number of processes.
        loss = F.mse_loss(pred.float(), target) / (self.cfg.gradient_accumulation * self._parts)
        self.scaler.scale(loss).backward()  # unscaled unless fp16
        return loss.detach().double()

    def _autocast(self):
        """bf16 autocast on CUDA: the LoRA's own matmuls (fp32 weights) run on bf16 tensor cores,
        16 times the fp32 rate on an H100 (at rank 128 they are a good share of the attention's
        projections). Not under fp16 (its frozen weights are fp16 already; the loss scaler guards its
        gradients) nor on the CPU (where runs are the bit-for-bit reference)."""
        import torch

        if self.device.startswith("cuda") and self.dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def _upload(tensor, device):
        """``tensor`` (drawn on the CPU) on ``device``. To a GPU through pinned memory, without
        waiting: a copy from ordinary memory would block until the GPU has finished all queued work,
        every micro-batch, and the GPU would idle while the next one's kernels are launched."""
        import torch

        device = torch.device(device)
        if device.type != "cuda" or tensor.device.type == "cuda":
            return tensor.to(device)
        return tensor.pin_memory().to(device, non_blocking=True)

    # -- checkpoints (selma_core.checkpoints) -----------------------------------------------------

    def checkpoint_state(self, step: int, generator, history: list, elapsed_s: float):
        """Everything the rest of the run depends on, after ``step``: the LoRA, AdamW's state, every
        RNG state (the micro-batch generator is also the data order), the loss history so far."""
        from selma_core.checkpoints import TrainState, capture_rng, split_optimizer_state
        from selma_core.typed_yaml import output_dict

        optimizer_tensors, optimizer_meta = split_optimizer_state(self.optimizer.state_dict())
        rng_tensors, rng_meta = capture_rng(generator, self.device)
        lora = dict(zip(self.param_names, (p.detach() for p in self.params), strict=True))
        meta = {
            "format": CHECKPOINT_FORMAT,
            "config": output_dict(self.cfg),
            "resolution": self.training_resolution(),  # resolution null has meant other sizes
            # mixed_precision auto means bf16 on a GPU, fp32 on a CPU: the same settings, other numbers.
            "dtype": str(self.dtype),
            "history": history,
            "elapsed_s": elapsed_s,
            "optimizer": optimizer_meta,
            "rng": rng_meta,
        }
        if self.scaler.is_enabled():
            meta["grad_scaler"] = self.scaler.state_dict()
            meta["steps_skipped"] = self.steps_skipped
        return TrainState(step, {"lora": lora, "optimizer": optimizer_tensors, "rng": rng_tensors}, meta)

    def check_state(self, state) -> None:
        """Raise ``ValueError`` when this run cannot resume from checkpoint ``state``."""
        from selma_core.typed_yaml import output_dict

        meta = state.meta
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT}")
        if meta.get("config") != json.loads(json.dumps(output_dict(self.cfg))):
            raise ValueError("written with other train settings")
        # Written before checkpoints said: null then meant the model's native size.
        trained_at = meta.get("resolution", self.native_resolution())
        if trained_at != self.training_resolution():
            raise ValueError(
                f"trained at {trained_at} px, this run trains at {self.training_resolution()} px"
            )
        # Written before checkpoints said: taken as this run's.
        if meta.get("dtype", str(self.dtype)) != str(self.dtype):
            raise ValueError(
                f"trained in {meta['dtype'].removeprefix('torch.')}, this run computes in "
                f"{str(self.dtype).removeprefix('torch.')} (mixed_precision auto on another device?)"
            )
        # The last step only from a stop there (periodic checkpoints end before it): resuming then
        # trains no step and commits.
        if not 0 < state.step <= self.cfg.steps:
            raise ValueError(f"step {state.step} is not within 1..{self.cfg.steps}")
        missing = {"history", "elapsed_s", "optimizer", "rng"} - set(meta)
        if self.scaler.is_enabled():
            missing |= {"grad_scaler"} - set(meta)
        missing |= {"generator", "torch_cpu"} - set(state.tensors["rng"])
        if missing:
            raise ValueError(f"it lacks {', '.join(sorted(missing))}")
        lora = state.tensors["lora"]
        if sorted(lora) != sorted(self.param_names) or any(
            lora[n].shape != p.shape or lora[n].dtype != p.dtype
            for n, p in zip(self.param_names, self.params, strict=True)
        ):
            raise ValueError("its LoRA tensors are not this model's")
        groups = meta["optimizer"]["param_groups"]
        if sum(len(g["params"]) for g in groups) != len(self.params):
            raise ValueError("its optimizer state is not this model's")

    def restore_state(self, state, generator) -> None:
        import torch

        from selma_core.checkpoints import join_optimizer_state, restore_rng

        with torch.no_grad():
            for name, p in zip(self.param_names, self.params, strict=True):
                p.copy_(state.tensors["lora"][name])
        meta = state.meta
        # load_state_dict also restores each group's kernel choice (fused, foreach): this run's
        # settings (fused_optimizer, execution-only) go back over the checkpoint's.
        kernels = [
            {k: g[k] for k in ("fused", "foreach", "capturable") if k in g}
            for g in self.optimizer.param_groups
        ]
        self.optimizer.load_state_dict(join_optimizer_state(state.tensors["optimizer"], meta["optimizer"]))
        for group, chosen in zip(self.optimizer.param_groups, kernels, strict=True):
            group.update(chosen)
        restore_rng(generator, self.device, state.tensors["rng"], meta["rng"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(meta["grad_scaler"])
            self.steps_skipped = meta.get("steps_skipped", 0)

    def train(
        self,
        dataset: list[tuple[dict, bytes]],
        on_log=None,
        checkpoints=None,
        latent_cache=None,
        on_validate=None,
        on_warmup=None,
        on_step=None,
    ) -> list[tuple[int, float]]:
        """Train; the loss history.

        ``checkpoints`` (a ``selma_core.checkpoints.CheckpointStore``): resume from its newest usable
        checkpoint, and (rank 0) save one every ``cfg.checkpoint_every`` steps. ``resumed_from_step``
        and ``resumed_elapsed_s`` tell what the run took over. With ``cfg.cache_latents`` the encoders
        run once, before the first step, their outputs read from (or committed to) ``latent_cache``
        (a ``selma_core.latent_cache.LatentCache``; None: kept in memory only); ``latent_cache_use``
        tells which ("hit", "computed", "memory", "off"). Undecodable images are skipped
        (``images_skipped``).

        Callbacks, on rank 0: ``on_log(step, metrics)`` every ``log_every`` steps (``train.loss``,
        the step's, ``train.loss_mean`` and ``train.images_per_s`` over the interval, ``train.lr``,
        ``train.gpu_memory_gib`` on CUDA);
        ``on_validate(step)`` every ``validation_every`` steps; ``on_warmup(seconds)`` once the first
        step is done (with ``compile``: how long compiling took); ``on_step(step)`` after every
        step, without waiting for the device (its work may still be queued).
        """
        import torch

        from selma_core.models.attention import sdpa_backend
        from selma_core.models.cuda_graph import CudaGraphError, GraphedCall

        args = (dataset, on_log, checkpoints, latent_cache, on_validate, on_warmup, on_step)
        self._doing = "training"  # measuring attention kernels at the training batch's shapes first
        try:
            with sdpa_backend(self.choose_attention().backend):
                return self._train(*args)
        except torch.OutOfMemoryError as e:
            # Not retried (exit 2): the same settings run out of memory again.
            resolution = self.training_resolution()
            raise ConfigError(self._out_of_memory_message(resolution, e)) from e
        except CudaGraphError as e:
            raise ConfigError(f"train.cuda_graph: {e}. Set train.cuda_graph: false to train without") from e
        finally:
            # The graph, its memory pool and its buffers go with the training that used them.
            if isinstance(self._forward_backward_call, GraphedCall):
                self.cuda_graph_state = self._forward_backward_call.state
            self._forward_backward_call = self._forward_backward

    def _train(self, dataset, on_log, checkpoints, latent_cache, on_validate, on_warmup, on_step) -> list:
        import torch
        from tqdm import tqdm

        from selma_core import distributed

        cfg = self.cfg
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise InputError(f"base model's scheduler predicts {prediction_type!r}; expected epsilon or v")
        rank, world_size = distributed.rank_and_size()
        self._world_size = world_size
        self._parts = parts = self.parts_per_micro_batch()
        if (cfg.gradient_accumulation * parts) % world_size:
            print(
                f"train: {cfg.gradient_accumulation} micro-batches of {cfg.batch_size} images cannot be "
                f"shared evenly by {world_size} processes; some processes idle part of every step. "
                f"Choose a gradient_accumulation that is a multiple of {world_size}, or a batch_size "
                f"that is a multiple of {world_size // math.gcd(cfg.gradient_accumulation, world_size)}",
                file=sys.stderr,
            )
        resolution = self.training_resolution()
        self.latent_cache_use = "off"
        encoded, pixels_u8 = None, None
        if cfg.cache_latents:
            # Micro-batches read the encoded tensors alone: no process keeps the pixels (SDXL: 3 MB
            # an image), and none decodes any where the cache has them.
            self._doing = "encoding"
            usable, encoded = self._encode_dataset(dataset, resolution, latent_cache)
            # Only the orientations training reads are kept (an entry may hold both).
            encoded.latents = {f: t for f, t in encoded.latents.items() if cfg.random_flip or not f}
            crops = [ImageCrop(*crop) for crop in encoded.crops]
            self._place_encoded(encoded)
        else:
            usable, pixels_u8, crops = _decode_images(dataset, resolution, cfg.max_bad_image_share)
        self.images_skipped = len(dataset) - len(usable)
        if self.sdxl:
            self._place_time_ids(crops, resolution)
        dataset = usable
        texts = [meta["prompt"] for meta, _ in dataset]
        side = resolution // self.pipe.vae_scale_factor
        latent_shape = (cfg.batch_size, self.pipe.vae.config.latent_channels, side, side)
        self._doing = "training"
        generator = torch.Generator().manual_seed(cfg.seed)
        history: list[tuple[int, float]] = []
        self.resumed_from_step, self.resumed_elapsed_s = 0, 0.0
        state = checkpoints.resume(self.check_state) if checkpoints is not None else None
        last_checkpoint = None  # the newest checkpoint's step, kept when the loss diverges
        if state is not None:
            self.restore_state(state, generator)
            history = [(step, loss) for step, loss in state.meta["history"]]
            self.resumed_from_step, self.resumed_elapsed_s = state.step, state.meta["elapsed_s"]
            last_checkpoint = state.step
            if rank == 0:
                print(
                    f"train: resuming at step {state.step} of {cfg.steps} from checkpoint "
                    f"{checkpoints.key(state.step)}",
                    file=sys.stderr,
                )
            if on_log:  # this run's metrics: the curve so far, then on from the checkpoint's step
                for step, loss in history:
                    on_log(step, {"train.loss": loss})
        # Every process starts from rank 0's LoRA (the seeded init makes them equal already).
        distributed.broadcast_tensors(self.params)
        started = time.monotonic()
        interval = (started, self.resumed_from_step)  # (time, step) at the last log
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        images_per_step = cfg.batch_size * cfg.gradient_accumulation
        unet = self.pipe.unet
        unet.train()
        steps = range(self.resumed_from_step + 1, cfg.steps + 1)
        first = self.resumed_from_step + 1
        # Each step's loss and gradient norm stay on the device until a step that needs them: see
        # _settle. Under fp16 every step needs them before its update (the loss scale's verdict).
        pending: list[tuple[int, object, object]] = []
        interval_losses: list[float] = []  # every settled step's loss since the last log
        fp16 = self.scaler.is_enabled()
        graphed = self._graph_micro_batches() if cfg.cuda_graph else None
        # A SIGTERM (a preempted pod, a cancelled pipeline) waits for the end of the step, which saves a
        # checkpoint and stops: the rerun resumes there, not at the last periodic checkpoint.
        stoppable = checkpoints is not None and bool(cfg.checkpoint_every)

        def stop_asked() -> bool:
            """Whether training stops at the end of this step. Several processes stop at the same
            step (the checkpoint's, and each collective of the stop is every process's): they vote
            at each step's end (and again after rank 0's validation), on the CPU, and stop when any
            one was asked to."""
            if world_size == 1:
                return stopping.stop_requested()
            return stoppable and distributed.any_process(stopping.stop_requested())

        def save_checkpoint(step: int) -> None:
            elapsed = self.resumed_elapsed_s + time.monotonic() - started
            checkpoints.save(self.checkpoint_state(step, generator, history, elapsed))

        def stop_here(step: int) -> None:
            """Take a deferred SIGTERM at the end of ``step``: a checkpoint there, then stop."""
            stopping.take_stop()
            if pending:
                self._settle(pending, last_checkpoint, checkpoints)  # a collective: on every process
            if last_checkpoint != step and rank == 0:
                save_checkpoint(step)
            # No process leaves before the checkpoint is saved: torchrun would take a process's
            # exit for a failure and stop the others, rank 0 in the middle of its save.
            distributed.any_process(False)
            raise KeyboardInterrupt(
                f"stopped after step {step} of {cfg.steps} on SIGTERM; checkpoint "
                f"{checkpoints.key(step)} saved: a rerun resumes there"
            )

        with stopping.safe_points(STOP_WAIT_S) if stoppable else contextlib.nullcontext():
            for step in tqdm(
                steps,
                desc="train",
                unit="step",
                disable=rank != 0,
                initial=self.resumed_from_step,
                total=cfg.steps,
            ):
                local_loss = torch.zeros((), dtype=torch.float64, device=self.device)
                for micro in range(cfg.gradient_accumulation):
                    draws = self._draw(generator, len(dataset), latent_shape)
                    for part in range(parts):
                        if (micro * parts + part) % world_size == rank:
                            share = part_of_draws(draws, part, parts)
                            local_loss += self._micro_batch(share, pixels_u8, texts, resolution, encoded)
                # The step's global batch: gradients and loss summed over every process's micro-batches.
                distributed.all_reduce_gradients(self.params)
                self.scaler.unscale_(self.optimizer)  # clipping and the norm see the true gradients
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                pending.append((step, local_loss, grad_norm))
                settled: dict[int, tuple[float, float]] = {}
                if fp16:  # checked before the update: an overflow skips it, divergence stops the job
                    settled = self._settle(pending, last_checkpoint, checkpoints)
                self.scaler.step(self.optimizer)  # optimizer.step() unless fp16 gradients overflowed
                self.scaler.update()
                # A CUDA graph adds into the gradients where it found them: zeroed in place, never freed.
                self.optimizer.zero_grad(set_to_none=graphed is None)
                if not fp16 and self._settle_due(step, first):
                    settled = self._settle(pending, last_checkpoint, checkpoints)
                interval_losses.extend(loss for loss, _ in settled.values())
                if step == first and on_warmup and rank == 0:
                    on_warmup(time.monotonic() - started)
                fault_point("train.after_step")
                if step % cfg.log_every == 0 or step == cfg.steps:
                    step_loss, norm = settled[step]
                    history.append((step, step_loss))
                    now = time.monotonic()
                    rate = (step - interval[1]) * images_per_step / max(now - interval[0], 1e-9)
                    metrics = {
                        "train.loss": step_loss,
                        # The step's loss is one batch's, noisy; the mean is every step's since the last
                        # log (since the resume, after one).
                        "train.loss_mean": math.fsum(interval_losses) / len(interval_losses),
                        "train.grad_norm": norm,  # before clipping
                        "train.lr": self.optimizer.param_groups[0]["lr"],
                        "train.images_per_s": rate,
                    }
                    if cuda:
                        metrics["train.gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                    if self.scaler.is_enabled():
                        metrics["train.loss_scale"] = self.scaler.get_scale()
                        metrics["train.steps_skipped"] = self.steps_skipped
                    interval = (now, step)
                    interval_losses.clear()
                    if on_log:
                        on_log(step, metrics)
                every = cfg.checkpoint_every
                if checkpoints is not None and every and step % every == 0 and step < cfg.steps:
                    if rank == 0:  # rank 0 saves; every rank knows it (a divergence names it alike)
                        save_checkpoint(step)
                    last_checkpoint = step
                if stop_asked():
                    stop_here(step)
                if on_validate and rank == 0 and cfg.validation_every and step % cfg.validation_every == 0:
                    unet.eval()
                    self._doing = "validation"
                    on_validate(step)
                    self._doing = "training"
                    unet.train()
                if on_step and rank == 0:
                    on_step(step)
                # A signal during rank 0's validation, voted on before the next step (several
                # processes: only at a step where rank 0 validates, the others waiting meanwhile).
                validates = bool(cfg.validation_every and step % cfg.validation_every == 0)
                if (world_size == 1 or validates) and stop_asked():
                    stop_here(step)
        unet.eval()
        return history

    def _graph_micro_batches(self):
        """``cfg.cuda_graph``: ``_forward_backward`` as a ``GraphedCall`` from now on (None on the
        CPU, unless a test gave a ``graph_backend``), every LoRA gradient allocated first."""
        import torch

        from selma_core.models.cuda_graph import GraphedCall

        if not (self.device.startswith("cuda") or self.graph_backend is not None):
            return None
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        graphed = GraphedCall(
            self._forward_backward,
            self.device,
            backend=self.graph_backend,
            name="the micro-batch's forward and backward",
        )
        self._forward_backward_call = graphed
        return graphed

    def _settle_due(self, step: int, first: int) -> bool:
        """Whether ``step`` reads the pending losses from the device: the first step (its time is the
        warm-up's), the last, and every log, checkpoint and validation step (the same on every
        process, as the read is a collective)."""
        cfg = self.cfg
        return (
            step in (first, cfg.steps)
            or step % cfg.log_every == 0
            or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            or bool(cfg.validation_every and step % cfg.validation_every == 0)
        )

    def _settle(self, pending: list, last_checkpoint: int | None, checkpoints) -> dict:
        """The pending steps' global losses and gradient norms, ``{step: (loss, norm)}``, read from the
        device at once; ``pending`` is emptied.

        Each read waits for the GPU to finish everything queued; one read per step would leave it
        idle while the CPU launches the next step. So steps in between only queue work, and the read
        comes at a step that needs the numbers (``_settle_due``). A non-finite loss or norm stops
        training, naming the first such step: its update has changed the weights in memory only, as
        no checkpoint is saved before the read that covers every step up to it has passed. Under
        fp16 (read every step, before the update) an overflowing gradient is the loss scale's doing,
        not divergence: the scaler skips the update and halves the scale; only a scale driven below
        2 means divergence."""
        import torch

        from selma_core import distributed

        steps = [s for s, _, _ in pending]
        pairs = torch.stack(
            [torch.stack([loss, norm.to(loss.device, torch.float64)]) for _, loss, norm in pending]
        ).tolist()
        pending.clear()
        losses = distributed.all_reduce_sum([loss for loss, _ in pairs])
        settled = {}
        for at, loss, (_, norm) in zip(steps, losses, pairs, strict=True):
            overflow = self.scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(norm)
            if overflow and self.scaler.get_scale() >= 2.0:
                self.steps_skipped += 1
            elif not (math.isfinite(loss) and math.isfinite(norm)):
                # Deterministic for the seed: a retry would diverge again.
                kept = (
                    f"the last good checkpoint, step {last_checkpoint}, is kept at "
                    f"{checkpoints.key(last_checkpoint)}"
                    if last_checkpoint is not None and checkpoints is not None
                    else "no checkpoint was saved before it"
                )
                what = f"loss became {loss}" if not math.isfinite(loss) else f"gradient norm became {norm}"
                # Float32 already: mixed_precision: no would change nothing.
                precision = " or use mixed_precision: no" if self.dtype != torch.float32 else ""
                raise ConfigError(
                    f"{what} at step {at}; training stopped, {kept}. Lower "
                    f"train.learning_rate ({self.cfg.learning_rate}){precision} (a new "
                    "expert, trained from step 0)"
                )
            settled[at] = (loss, norm)
        return settled

    def _out_of_memory_message(self, resolution: int, error: Exception) -> str:
        """What ran out of GPU memory, and what to change: advice for what training was doing."""
        cfg = self.cfg
        dtype = str(self.dtype).removeprefix("torch.")
        if self._doing == "encoding":
            hints = [f"train at a lower train.resolution (now {resolution} px)"]
            if self.vae_dtype != self.dtype and cfg.vae_model is None:  # SDXL's VAE upcast under fp16
                hints.insert(0, "name an fp16-safe VAE in train.vae_model (madebyollin/sdxl-vae-fp16-fix)")
            return (
                f"CUDA out of memory encoding the dataset's images and prompts ({resolution} px, one "
                f"at a time, {dtype}): " + "; or ".join(hints) + f". ({error})"
            )
        if self._doing == "validation":
            return (
                f"CUDA out of memory drawing {cfg.validation_prompts} validation image(s) at "
                f"{resolution} px: lower train.validation_prompts or set train.validation_every: null "
                f"(no validation images). ({error})"
            )
        per_step = cfg.batch_size * cfg.gradient_accumulation
        rows = cfg.batch_size // self._parts
        hints = []
        smaller = _smaller_batch(cfg.batch_size, cfg.gradient_accumulation, self._world_size, rows)
        if smaller is not None:
            hints.append(
                f"lower train.batch_size to {smaller} and raise train.gradient_accumulation to "
                f"{per_step // smaller} (the same {per_step} images per step)"
            )
        if not cfg.gradient_checkpointing:
            # The config refuses the two together.
            off = "train.cuda_graph: false and " if cfg.cuda_graph else ""
            hints.append(f"set {off}train.gradient_checkpointing: true (less memory, about a third slower)")
        hints.append(f"train at a lower train.resolution (now {resolution} px)")
        shared = f", {rows} of them in each process" if rows != cfg.batch_size else ""
        return (
            f"CUDA out of memory at train.batch_size {cfg.batch_size}{shared} ({resolution} px, LoRA "
            f"rank {cfg.rank}, {dtype}): " + "; or ".join(hints) + f". ({error})"
        )

    def draw_validation(self, prompts: list[str], seeds: list[int], sampling) -> list:
        """Images of ``prompts`` drawn with the expert as it is now (``sampling``: a
        ``SamplingConfig``), each from its own seeded generator; the training RNG is untouched."""
        import torch

        from selma_core.phases.images import draw_images

        # Compiled blocks would compile again for inference shapes: validation runs eagerly.
        eager = contextlib.nullcontext()
        if self.compiled_modules:
            eager = torch.compiler.set_stance("force_eager")
        if self.vae_dtype != self.dtype:  # SDXL under fp16: its pipeline upcasts the VAE to decode
            self.pipe.vae.to(dtype=self.dtype)
        try:
            with torch.no_grad(), eager:
                return draw_images(self.pipe, prompts, seeds, sampling, self.device)
        finally:
            self.pipe.vae.to(dtype=self.vae_dtype)

    def save(self, path) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        from selma_core.lora import WEIGHT_NAME, canonical_safetensors, lora_config_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet))
        layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
        metadata = lora_config_dict(self.cfg.rank, self.cfg.alpha, self.cfg.target_modules)
        type(self.pipe).save_lora_weights(
            str(path), unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, safe_serialization=True
        )
        canonical_safetensors(Path(path) / WEIGHT_NAME)


def refuse_non_linear_targets(unet, target_modules: list[str]) -> None:
    """Before any step: LoRA on a convolution (``proj_in`` of SD 1.x, ``conv1``) trains, but its 4-D
    factors are not what merging (ΔW = B·A), the kohya export or the merge search compute with."""
    import torch
    from peft.tuners.lora import LoraLayer

    convolutions = sorted(
        name
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer) and not isinstance(module.get_base_layer(), torch.nn.Linear)
    )
    if convolutions:
        shown = ", ".join(convolutions[:3]) + (
            f" and {len(convolutions) - 3} more" if len(convolutions) > 3 else ""
        )
        raise InputError(
            f"train.target_modules {target_modules}: matches modules that are not Linear layers ({shown}); "
            "name Linear modules only (SELMA's: to_q, to_k, to_v, to_out.0; also e.g. ff.net.2, and proj_in "
            "or proj_out where the model's config has use_linear_projection)"
        )


def train_expert(ctx, skill_name: str) -> dict:
    import torch

    from selma_core import distributed
    from selma_core.checkpoints import CheckpointStore
    from selma_core.datasets import load_training_pairs
    from selma_core.latent_cache import LatentCache
    from selma_core.lora import load_adapter
    from selma_core.models.loading import load_diffusion_pipeline, load_vae, resolve_device
    from selma_core.phases.merge import export_kohya

    cfg: TrainConfig = ctx.config.train
    # Every process reads the same committed images (each its own verified copy).
    dataset = load_training_pairs(ctx, skill_name)
    # Under torchrun: joins the process group (jobs.run already did) and pins this process's GPU.
    device = distributed.init(resolve_device(ctx.config.device))
    rank, world_size = distributed.rank_and_size()
    torch.manual_seed(cfg.seed)  # the LoRA's Gaussian init
    pipe = load_diffusion_pipeline(
        ctx.config.base_model,
        ctx.config.cache_dir,
        ctx.config.base_model_revision,
        allow_pickle=ctx.config.allow_pickle_checkpoints,
    )
    if cfg.vae_model:
        vae = load_vae(
            cfg.vae_model,
            ctx.config.cache_dir,
            allow_pickle=ctx.config.allow_pickle_checkpoints,
            revision=cfg.vae_model_revision,
        )
        check_same_latent_space(vae, pipe.vae, cfg.vae_model, ctx.config.base_model)
        pipe.vae = vae
    trainer = ExpertTrainer(pipe, cfg, device, cache_dir=ctx.config.cache_dir)
    cfg = trainer.cfg  # batch_size and gradient_accumulation resolved for the model
    ctx.run.log_params(
        {
            "images": len(dataset),
            "batch_size": cfg.batch_size,
            "gradient_accumulation": cfg.gradient_accumulation,
            "resolution": trainer.training_resolution(),
        }
    )
    checkpoints = CheckpointStore(ctx.store, ctx.job.key, ctx.scratch_dir, cfg.checkpoints_keep)
    if ctx.commits and ctx.store.is_committed(ctx.job.key):
        checkpoints.clear()  # a forced rerun (--force) starts afresh
    # Rank 0 commits the cache; every rank reads it, or computes its share of the tensors (1/W).
    latent_cache = LatentCache(
        ctx.store,
        ctx.scratch_dir,
        ctx.config.base_model,
        ctx.config.base_model_revision,
        ctx.commits,
        vae_model=cfg.vae_model,
        vae_model_revision=cfg.vae_model_revision,
        vae_dtype=str(trainer.vae_dtype) if trainer.vae_dtype != trainer.dtype else None,
    )
    start = time.monotonic()
    # Measured once per GPU type and model (on CUDA, with attention: auto), then read from the store.
    ctx.run.set_tags({"train.attention_kernel": trainer.choose_attention(ctx.store).backend})
    compile_cache = trainer.store_compile_cache(ctx.store, ctx.scratch_dir)
    if compile_cache is not None:
        compile_cache.load_for_job(ctx, "train")

    def on_warmup(seconds: float) -> None:
        # The first step compiles (cold, or from the cache): what compile costs this job.
        ctx.run.log_metrics({"train.warmup_s": seconds})
        if compile_cache is not None:
            compile_cache.save_for_job(ctx)

    # Rank 0 alone draws and logs them (reading a dataset skill's held-out captions once).
    validation = None
    if cfg.validation_every and cfg.validation_every <= cfg.steps and rank == 0:
        validation = _ValidationImages(ctx, skill_name, trainer, dataset)
    history = trainer.train(
        dataset,
        on_log=lambda step, metrics: ctx.run.log_metrics(metrics, step),
        checkpoints=checkpoints,
        latent_cache=latent_cache,
        on_validate=validation,
        on_warmup=on_warmup,
    )
    # Training time over every run that contributed (a resumed run adds the checkpoint's).
    elapsed = trainer.resumed_elapsed_s + time.monotonic() - start
    summary = {
        "skill": skill_name,
        "base_model": ctx.config.base_model,
        "base_model_revision": ctx.config.base_model_revision,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "target_modules": cfg.target_modules,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "gradient_accumulation": cfg.gradient_accumulation,
        "resolution": trainer.training_resolution(),
        "images": len(dataset),
        "final_loss": history[-1][1],
        "wall_s": round(elapsed, 3),
        "images_per_s": cfg.steps * cfg.batch_size * cfg.gradient_accumulation / max(elapsed, 1e-9),
        "processes": world_size,
        "images_skipped": trainer.images_skipped,
    }
    ctx.run.log_metrics({"train.images_skipped": trainer.images_skipped})
    # "off", "captured", or why the capture failed (training went on without a graph).
    ctx.run.set_tags({"train.cuda_graph": trainer.cuda_graph_state})
    # Not in expert.json (a resumed run commits what an uninterrupted one does): the steps taken over.
    result = {
        **summary,
        "resumed_from_step": trainer.resumed_from_step,
        "latent_cache": trainer.latent_cache_use,
        "attention_kernel": trainer.attention.backend,
        "cuda_graph": trainer.cuda_graph_state,
    }
    if rank != 0:  # every process holds the same weights; rank 0 saves and commits them
        return result
    with ctx.output() as out:
        trainer.save(out)
        # The same expert in kohya/A1111 keys, for ComfyUI and WebUI users.
        export_kohya(load_adapter(out), out / "kohya" / f"selma_{skill_name}_lora.safetensors")
        (out / "expert.json").write_text(json.dumps(summary, indent=1))
        (out / "loss.json").write_text(json.dumps(history))
    # The committed adapter supersedes the checkpoints. A kill before this line leaves them behind
    # as garbage: the job is committed, so its rerun is skipped and never reads them.
    checkpoints.clear()
    return result


class _ValidationImages:
    """``on_validate``: draws a few held-out prompts with the expert in training and logs the images
    to the job's MLflow run under ``validation/step-NNNNNNNN/`` (seeded: the same noise every time,
    so the images show what training changed)."""

    def __init__(self, ctx, skill_name: str, trainer: ExpertTrainer, dataset) -> None:
        from selma_core.phases.images import SamplingConfig, prompt_seed

        cfg: TrainConfig = ctx.config.train
        self.ctx, self.trainer = ctx, trainer
        self.prompts = _validation_prompts(ctx, skill_name, dataset, cfg.validation_prompts)
        self.seeds = [prompt_seed(cfg.seed, f"validation-{i}") for i in range(len(self.prompts))]
        side = trainer.training_resolution()
        self.sampling = SamplingConfig(
            num_inference_steps=cfg.validation_inference_steps,
            guidance_scale=ctx.config.eval.guidance_scale,
            height=side,
            width=side,
            batch_size=len(self.prompts),
        )

    def __call__(self, step: int) -> None:
        import tempfile

        images = self.trainer.draw_validation(self.prompts, self.seeds, self.sampling)
        with tempfile.TemporaryDirectory(dir=self.ctx.scratch_dir) as tmp:
            folder = Path(tmp) / f"step-{step:08d}"
            folder.mkdir()
            for i, (prompt, image) in enumerate(zip(self.prompts, images, strict=True)):
                image.convert("RGB").save(folder / f"{i:02d}.jpg", quality=90)
                (folder / f"{i:02d}.txt").write_text(prompt + "\n", encoding="utf-8")
            # MLflow logs a folder's contents under artifact_path: one folder per step.
            self.ctx.run.log_artifact(folder, f"validation/{folder.name}")


def _validation_prompts(ctx, skill_name: str, dataset, count: int) -> list[str]:
    """The skill's first ``count`` held-out prompts, never trained on (a generated skill's held-out
    split, a dataset skill's held-out captions); without any, the first training prompts."""
    from selma_core.datasets import prompt_records
    from selma_core.phases.prompts import read_prompts

    prompts: list[str] = []
    with contextlib.suppress(KeyError, InputError, FileNotFoundError):  # none: fall back
        records = prompt_records(ctx, skill_name, read_prompts)
        prompts = [r["text"] for r in records if r["split"] == "heldout"]
    if not prompts:
        prompts = [meta["prompt"] for meta, _ in dataset]
    return prompts[:count]
