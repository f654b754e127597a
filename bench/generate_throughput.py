"""Benchmark: image generation throughput, selma's generator vs diffusers' fp16 pipeline, in one run.

    python bench/generate_throughput.py                    # CPU or GPU: tiny random test model
    python bench/generate_throughput.py --arch sd15        # GPU: SD 1.x architecture, random weights

Both draw the same prompts with the same architecture, batch, denoising steps (25, DDIM),
classifier-free guidance (7.5: the UNet sees twice the batch) and resolution, VAE decoding and PIL
conversion included:

- **reference**: the diffusers pipeline in fp16 (float32 on CPU), called eagerly.
- **project**: the images phase's way (``selma_core.phases.images.draw_images``: one seeded
  generator per prompt, so an image does not depend on its batch) on a pipeline prepared by
  ``selma_core.models.speed.prepare_for_inference``: SDPA, channels_last, fused QKV projections and
  ``--compile`` (auto / off / blocks / full, as the config says); with ``--cuda-graph`` the compiled
  UNet's graphs replayed as CUDA graphs (the images config's ``cuda_graph``), with
  ``--compile-vae`` the VAE's decoder compiled too (``compile_vae``).

Throughput is images per second over ``--batches`` batches after one untimed warm-up batch (which
compiles); the last line printed is one JSON object (also appended to
$OUT/generate_throughput.jsonl when $OUT is set).

When the project compiles (``--compile``, or ``auto`` on a GPU) it keeps its compiled kernels in a
store compile cache, as the images phase does (loaded before the warm-up batch, saved after it);
then, unless ``--no-restart-check``, a restart is measured: a new process with an empty inductor
cache (a job on a fresh node) loads them from the store and draws its first batch
(``compile_restart_warmup_s``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import (
    PROMPTS,
    StepProfiler,
    Timer,
    add_common_arguments,
    apply_defaults,
    architecture_resolution,
    device_description,
    load_pipeline,
    peak_gib,
    report_with_restart,
    reset_peak,
    resolve_device,
    run_recipes,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "prompts")
    parser.add_argument("--batches", type=int, help="timed batches (default: 3 on a GPU, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="the project replays the compiled UNet's graphs as CUDA graphs (images config cuda_graph; "
        "GPU only)",
    )
    parser.add_argument(
        "--compile-vae",
        action="store_true",
        help="the project compiles the VAE's decoder too, with --compile on (images config compile_vae)",
    )
    parser.add_argument(
        "--vae-contiguous",
        action="store_true",
        help="after the project's batches, also time its eager VAE decode in the contiguous layout (no "
        "layout copies around its group norms): the other way than --compile-vae to spare them",
    )
    args = parser.parse_args(argv)
    if args.vae_contiguous and args.compile_vae:
        parser.error("--vae-contiguous times the eager decoder: not with --compile-vae")
    return args


def prompts_for(batch: int, index: int) -> list[str]:
    return [f"{PROMPTS[(index * batch + i) % len(PROMPTS)]}, view {index * batch + i}" for i in range(batch)]


def measure(draw, args, device: str, profiler: StepProfiler | None = None, after_warmup=None) -> dict:
    """One untimed warm-up batch, then ``args.batches`` timed ones; then, with ``profiler``,
    ``args.profile`` profiled ones. ``after_warmup()`` runs between the warm-up and the timed
    batches, untimed."""
    reset_peak(device)
    timer = Timer(device)
    timer.start()
    draw(prompts_for(args.batch, 0))
    warmup_s = timer.stop()
    if after_warmup is not None:
        after_warmup()
    timer.start()
    for index in range(1, args.batches + 1):
        images = draw(prompts_for(args.batch, index))
        assert len(images) == args.batch
    elapsed = timer.stop()
    result = {
        "img_per_s": args.batch * args.batches / elapsed,
        "batch_s": elapsed / args.batches,
        "warmup_s": warmup_s,
        "peak_gib": peak_gib(device),
    }
    if profiler is not None:
        profiler.start()
        for index in range(args.batches + 1, args.batches + 1 + args.profile):
            draw(prompts_for(args.batch, index))
        result.update(profiler.stop(args.profile, result["batch_s"]))
    return result


def reference_recipe(args, device: str, work: Path) -> dict:
    import torch

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load_pipeline(args.arch, device, dtype, work / "models")
    side = args.resolution

    def draw(prompts: list[str]) -> list:
        generator = torch.Generator(device="cpu").manual_seed(0)
        return pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=side,
            width=side,
            generator=generator,
        ).images

    return measure(draw, args, device)


def vae_decode_times(pipe, batch: int, side: int, device: str) -> tuple[float, float]:
    """(seconds of the first decode, milliseconds of the next) of one batch's latents: the first
    warms up (cuDNN's autotuner picks its convolutions; a compiled decoder compiles), the second is
    the VAE's part of ``batch_s``, what compiling or speeding up the decoder could save."""
    import torch

    vae = pipe.vae
    latents = torch.randn(batch, vae.config.latent_channels, side, side, device=device, dtype=vae.dtype)
    timer = Timer(device)
    with torch.no_grad():
        timer.start()
        vae.decode(latents)
        first_s = timer.stop()
        timer.start()
        vae.decode(latents)
    return first_s, timer.stop() * 1e3


def vae_decode_contiguous_ms(pipe, batch: int, side: int, device: str) -> float:
    """The eager VAE decode in the contiguous layout instead of the project's channels_last: no
    layout copies around its group norms, which take contiguous tensors (the other way to spare them
    is compiling the decoder: ``--compile-vae``). Leaves the VAE channels_last, as it was."""
    import torch

    vae = pipe.vae
    vae.to(memory_format=torch.contiguous_format)
    try:
        return vae_decode_times(pipe, batch, side, device)[1]
    finally:
        vae.to(memory_format=torch.channels_last)


def project_recipe(args, device: str, work: Path) -> dict:
    from selma_core.models import speed
    from selma_core.models.attention import sdpa_backend
    from selma_core.phases.images import (
        ImagesConfig,
        choose_attention,
        compile_cache_digest,
        draw_images,
        prompt_seed,
        replays_cuda_graph,
        torch_dtype,
    )
    from selma_core.storage import LocalArtifactStore

    cfg = ImagesConfig(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.resolution,
        width=args.resolution,
        batch_size=args.batch,
        attention=args.attention,
        cuda_graph=args.cuda_graph,
    )
    pipe = load_pipeline(args.arch, device, torch_dtype(cfg.dtype, device), work / "models")
    mode = speed.resolve_compile(args.compile, pipe.unet, device)
    graph = replays_cuda_graph(cfg, pipe, mode, device)  # as the images phase decides
    compiled = speed.prepare_for_inference(
        pipe, device, compile=mode, cache_dir=work, cuda_graph=graph, compile_vae=args.compile_vae
    )
    store = LocalArtifactStore(work / "store")
    # As the images phase does: measured once, kept in the store (a restart takes the same kernel,
    # so its compiled graphs' key is the same).
    attention = choose_attention(pipe, cfg, device, store)
    compile_cache = None  # as the images phase keeps its kernels: loaded now, saved after a batch
    save_s: list[float] = []
    if compiled:
        dtype = torch_dtype(cfg.dtype, device)
        digest = compile_cache_digest(cfg, pipe, mode, device, dtype, attention.backend, graph)
        compile_cache = speed.StoreCompileCache(store, digest, work / "scratch")
        compile_cache.load()

    def save_compiled() -> None:
        if compile_cache is not None:
            started = time.perf_counter()
            compile_cache.save()
            save_s.append(time.perf_counter() - started)

    def draw(prompts: list[str]) -> list:
        seeds = [prompt_seed(cfg.seed, prompt) for prompt in prompts]
        with sdpa_backend(attention.backend):
            return draw_images(pipe, prompts, seeds, cfg, device)

    name = "generate_throughput-graph" if graph else "generate_throughput"  # the profile's file
    profiler = StepProfiler(device, name, args.arch, work) if args.profile else None
    result = measure(draw, args, device, profiler, after_warmup=save_compiled)
    result["compile_cache_loaded"] = bool(compile_cache and compile_cache.loaded)
    result["compile_cache_load_s"] = compile_cache.load_s if compile_cache else 0.0
    result["compile_cache_save_s"] = round(sum(save_s), 3)
    side = args.resolution // pipe.vae_scale_factor
    result["vae_decode_ms"] = vae_decode_times(pipe, args.batch, side, device)[1]
    if args.vae_contiguous:
        result["vae_decode_contiguous_ms"] = vae_decode_contiguous_ms(pipe, args.batch, side, device)
    result["compile_mode"] = mode
    result["attention"] = attention.backend
    result["attention_measured_ms"] = attention.measured_ms
    result["compiled_modules"] = compiled
    result["cuda_graph"] = graph
    result["cuda_graph_skips"] = speed.cuda_graph_skips()  # graphs run without one, though asked
    result["vae_compiled"] = speed.vae_compiled(pipe)
    result["dtype"] = str(torch_dtype(cfg.dtype, device)).removeprefix("torch.")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="selma-bench-generate-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work_dir = str(work)  # the restart's too
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    import torch

    device = resolve_device(args.device)
    gpu = device.startswith("cuda")
    apply_defaults(args, device)
    if args.batches is None:
        args.batches = 3 if gpu else 2
    args.resolution = args.resolution or architecture_resolution(args.arch, work / "models")
    record: dict = {
        "bench": "generate_throughput",
        "device": device_description(device),
        "arch": args.arch,
        "batch": args.batch,
        "resolution": args.resolution,
        "steps": args.steps,
        "guidance": args.guidance,
        "batches": args.batches,
        "compile": args.compile,
        "attention_setting": args.attention,
        "cuda_graph_setting": args.cuda_graph,
        "compile_vae_setting": args.compile_vae,
        "torch": torch.__version__,
    }
    project, reference = run_recipes(
        args.only,
        device,
        lambda: reference_recipe(args, device, work),
        lambda: project_recipe(args, device, work),
    )
    restart = ["--batches", "1", "--steps", str(args.steps), "--guidance", str(args.guidance)]
    restart += ["--resolution", str(args.resolution)]
    restart += ["--cuda-graph"] * args.cuda_graph + ["--compile-vae"] * args.compile_vae
    return report_with_restart(record, project, reference, args, __file__, restart)


if __name__ == "__main__":
    main()
