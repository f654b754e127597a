"""Benchmark: LoRA expert training throughput, selma's trainer vs the reference recipe, in one run.

    python bench/train_throughput.py                       # CPU or GPU: tiny random test model
    python bench/train_throughput.py --arch sd15           # GPU: SD 1.x architecture, random weights
    python bench/train_throughput.py --arch sdxl --compile blocks

Both recipes train the same LoRA (rank = alpha = --rank, Gaussian init, to_q/to_k/to_v/to_out.0) on
the same architecture, batch (one micro-batch per optimizer step), resolution and synthetic images:

- **reference**: the diffusers text-to-image LoRA example's way (../shared/gpu/README.md): fp16
  frozen weights (SDXL: fp32 VAE), the VAE and text encoder(s) run on every batch, fp32 LoRA
  parameters, autocast fp16 + GradScaler, plain AdamW, the loss read every step. Its images are
  decoded to tensors up front (kinder to it than the example's per-step decoding). On CPU: fp32, no
  autocast or scaler.
- **project**: ``selma_core.phases.train.ExpertTrainer`` as the train phase runs it: encoder outputs
  computed once (``cache_latents``), bf16 frozen weights, channels_last, fused AdamW, SDPA, and
  ``--compile`` (auto / off / blocks / full, as the config says). With compile, a second process
  then restarts on a fresh inductor cache directory with the compiled artifacts from the store, as
  a preempted job on another node would, and its warm-up is reported too. ``--cuda-graph``: each
  micro-batch replayed as a CUDA graph (the train config's ``cuda_graph``).

Throughput is images per second over ``--steps`` optimizer steps after ``--warmup`` steps, the device
synchronized at both ends. The last line printed is one JSON object (also appended to
$OUT/train_throughput.jsonl when $OUT is set).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import (
    StepProfiler,
    Timer,
    add_common_arguments,
    apply_defaults,
    architecture_resolution,
    device_description,
    load_pipeline,
    native_resolution,
    peak_gib,
    report_with_restart,
    reset_peak,
    resolve_device,
    run_recipes,
    synchronize,
    synthetic_dataset,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LEARNING_RATE = 1e-4  # small: random weights in half precision must not diverge in a benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "images")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default: 20 on a GPU, 6 on CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, at least 1 (default: 3)")
    parser.add_argument(
        "--rank", type=int, help="LoRA rank = alpha (default: 128, SELMA's; 8 for tiny models)"
    )
    parser.add_argument("--images", type=int, default=64, help="synthetic dataset size (default: 64)")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="the project replays each micro-batch as a CUDA graph (train config cuda_graph; GPU only)",
    )
    args = parser.parse_args(argv)
    if args.warmup < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--warmup and --steps: expected at least 1 (the first step compiles)")
    return args


def defaults(args: argparse.Namespace, device: str) -> argparse.Namespace:
    apply_defaults(args, device)
    if args.steps is None:
        args.steps = 20 if device.startswith("cuda") else 6
    if args.rank is None:
        args.rank = 8 if args.arch.startswith("tiny") else 128
    return args


def reference_recipe(args, device: str, work: Path, dataset) -> dict:
    """The diffusers LoRA example's training loop."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    gpu = device.startswith("cuda")
    weight_dtype = torch.float16 if gpu else torch.float32
    pipe = load_pipeline(args.arch, device, weight_dtype, work / "models")
    sdxl = hasattr(pipe, "text_encoder_2")
    if sdxl and gpu:
        pipe.vae.to(torch.float32)  # the SDXL example keeps the VAE in fp32 (it overflows in fp16)
    unet, vae = pipe.unet, pipe.vae
    for module in (unet, vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    if gpu:
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=gpu)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = args.resolution or native_resolution(pipe)
    vae_dtype = vae.dtype
    # (N, 3, R, R) in [-1, 1], decoded and staged on the device once: the reference pays for its
    # recipe (the VAE and text encoders every step), not for a host-side gather and a pageable copy
    # of ~50 MB a step that the example's data loader would overlap with the GPU's work.
    pixels = _pixels(dataset, resolution).to(device, vae_dtype)
    texts = [meta["prompt"] for meta, _ in dataset]
    input_ids = pipe.tokenizer(
        texts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        idx = torch.randint(len(dataset), (args.batch,), generator=generator)
        pixel_values = pixels[idx.to(device)]
        with torch.no_grad():
            latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
            latents = latents.to(weight_dtype)
            if sdxl:
                embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt=[texts[i] for i in idx.tolist()],
                    device=device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=False,
                )
                added = {
                    "text_embeds": pooled,
                    "time_ids": torch.tensor(
                        [[resolution, resolution, 0, 0, resolution, resolution]] * args.batch
                    ).to(device, embeds.dtype),
                }
            else:
                embeds = pipe.text_encoder(input_ids[idx.to(device)], return_dict=False)[0]
                added = None
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with torch.autocast("cuda", dtype=torch.float16, enabled=gpu):
            pred = unet(noisy, timesteps, embeds, added_cond_kwargs=added, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # the example logs the loss every step

    unet.train()
    reset_peak(device)
    timer = Timer(device)
    timer.start()
    for _ in range(args.warmup):
        step()
    warmup_s = timer.stop()
    timer.start()
    losses = [step() for _ in range(args.steps)]
    elapsed = timer.stop()
    peak = peak_gib(device)
    if peak is not None:
        # The staged pixels are this benchmark's convenience (the example's loader holds a batch,
        # not the dataset, on the device): not the recipe's memory.
        peak = round(peak - pixels.numel() * pixels.element_size() / 2**30, 2)
    result = {
        "img_per_s": args.batch * args.steps / elapsed,
        "step_s": elapsed / args.steps,
        "warmup_s": warmup_s,
        "peak_gib": peak,
        "final_loss": losses[-1],
    }
    return result


def _pixels(dataset, resolution: int):
    from selma_core.phases.train import _decode_images

    pixels_u8 = _decode_images(dataset, resolution).pixels
    return pixels_u8.float().div(127.5).sub(1.0)


def project_recipe(args, device: str, work: Path, dataset) -> dict:
    """selma's trainer, as the train phase runs it (cached encoder outputs, bf16, channels_last, fused
    AdamW, SDPA, compile), its compiled artifacts loaded from / saved to a local store."""
    import torch

    from selma_core.phases.train import ExpertTrainer, TrainConfig
    from selma_core.storage import LocalArtifactStore

    gpu = device.startswith("cuda")
    pipe = load_pipeline(args.arch, device, None, work / "models")
    cfg = TrainConfig(
        rank=args.rank,
        alpha=float(args.rank),
        steps=args.warmup + args.steps + args.profile,
        batch_size=args.batch,
        gradient_accumulation=1,
        learning_rate=LEARNING_RATE,
        resolution=args.resolution,
        log_every=max(args.steps, 10),  # as in the train phase: the loss read every few steps
        checkpoint_every=None,
        validation_every=None,
        compile=args.compile,
        attention=args.attention,
        cuda_graph=args.cuda_graph,
    )
    torch.manual_seed(0)
    trainer = ExpertTrainer(pipe, cfg, device, cache_dir=str(work))
    store = LocalArtifactStore(work / "store")
    trainer.choose_attention(store)  # as the train phase does: measured once, kept in the store
    compile_cache = trainer.store_compile_cache(store, work / "scratch")
    if compile_cache is not None:
        compile_cache.load()  # timed apart: load_s
    times: dict[int, float] = {}
    warmups: list[float] = []
    save_s: list[float] = []
    first, last = args.warmup, args.warmup + args.steps
    name = "train_throughput-graph" if args.cuda_graph else "train_throughput"  # the profile's file
    profiler = StepProfiler(device, name, args.arch, work) if args.profile else None
    profile: dict = {}

    def on_step(step: int) -> None:
        if step not in (1, first, last, last + args.profile):
            return  # not waiting for the device: the steps between queue up as in a real job
        synchronize(device)
        times[step] = time.perf_counter()
        if profiler is not None and step == last:  # the steps after the timed ones
            profiler.start()
        elif profiler is not None and step == last + args.profile:
            profile.update(profiler.stop(args.profile, (times[last] - times[first]) / args.steps))

    def on_warmup(seconds: float) -> None:
        warmups.append(seconds)
        if compile_cache is not None:  # as the train phase does; timed apart from the steps
            saving = time.perf_counter()
            compile_cache.save()
            save_s.append(time.perf_counter() - saving)

    reset_peak(device)
    started = time.perf_counter()
    history = trainer.train(dataset, on_step=on_step, on_warmup=on_warmup)
    elapsed = times[last] - times[first]
    saved_s = sum(save_s)
    encode_s = times[1] - started - warmups[0] - saved_s  # decoding and encoding the dataset, once
    return {
        "img_per_s": args.batch * args.steps / elapsed,
        "step_s": elapsed / args.steps,
        "warmup_s": times[first] - started - encode_s - saved_s,
        "first_step_s": warmups[0],
        "encode_s": encode_s,
        "peak_gib": peak_gib(device),
        "final_loss": history[-1][1],
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "compile_mode": trainer.compile_mode,
        "attention": trainer.attention.backend,
        "attention_measured_ms": trainer.attention.measured_ms,
        "compiled_modules": trainer.compiled_modules,
        "cuda_graph": trainer.cuda_graph_state,
        "compile_cache_loaded": bool(compile_cache and compile_cache.loaded),
        "compile_cache_load_s": compile_cache.load_s if compile_cache else 0.0,
        "compile_cache_save_s": saved_s,
        "gpu": gpu,
        **profile,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="selma-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work_dir = str(work)  # the restart's too
    # Inductor's caches for this run: cold unless --work-dir is reused.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    import torch

    device = resolve_device(args.device)
    args = defaults(args, device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    resolution = args.resolution or architecture_resolution(args.arch, work / "models")
    args.resolution = resolution  # both recipes' (the project's default would be SELMA's 512 for sd2)
    dataset = synthetic_dataset(args.images, resolution)
    record: dict = {
        "bench": "train_throughput",
        "device": device_description(device),
        "arch": args.arch,
        "batch": args.batch,
        "resolution": resolution,
        "rank": args.rank,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "compile": args.compile,
        "attention_setting": args.attention,
        "cuda_graph_setting": args.cuda_graph,
        "torch": torch.__version__,
    }
    project, reference = run_recipes(
        args.only,
        device,
        lambda: reference_recipe(args, device, work, dataset),
        lambda: project_recipe(args, device, work, dataset),
    )
    restart = ["--steps", "2", "--warmup", "1", "--rank", str(args.rank), "--images", str(args.images)]
    restart += ["--resolution", str(resolution)] + ["--cuda-graph"] * args.cuda_graph
    return report_with_restart(record, project, reference, args, __file__, restart)


if __name__ == "__main__":
    main()
