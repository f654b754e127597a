"""What the GPU throughput benchmarks share: the model under test, a synthetic dataset, timing, output.

Imports only torch, diffusers, transformers, peft and selma_core's training and generation modules:
the GPU machine has no MLflow, boto3 or Kubernetes client (../shared/gpu/README.md).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selma_core.models.attention import ATTENTION_SETTINGS  # noqa: E402  (stdlib only at import)
from selma_core.models.speed import COMPILE_SETTINGS  # noqa: E402  (stdlib only at import)

ARCH_CHOICES = ("tiny", "tiny-sdxl", "sd15", "sd2", "sdxl")
PROMPTS = (
    "three red apples on a wooden table",
    "a cat sitting to the left of a blue box",
    "a lighthouse on a cliff at sunset, oil painting",
    "two dogs playing in the snow next to a red car",
)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_pipeline(arch: str, device: str, dtype: Any, cache_dir: Path):
    """The model under test: a tiny random test model (any machine) or a full-size architecture with
    random weights (``selma_core.models.architectures``; meant for a GPU)."""
    if arch.startswith("tiny"):
        from selma_core.models.loading import load_diffusion_pipeline

        spec = "random:tiny-sdxl" if arch == "tiny-sdxl" else "random:tiny-sd"
        return load_diffusion_pipeline(spec, cache_dir, torch_dtype=dtype).to(device)
    from selma_core.models.architectures import build_random_pipeline

    return build_random_pipeline(arch, device, dtype)


def native_resolution(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def architecture_resolution(arch: str, cache_dir: Path) -> int:
    """The native resolution of ``arch`` without building its weights."""
    if arch.startswith("tiny"):
        return native_resolution(load_pipeline(arch, "cpu", None, cache_dir))
    from selma_core.models.architectures import unet_config

    return unet_config(arch)["sample_size"] * 8  # the SD VAE downsamples 8x


def synthetic_dataset(count: int, resolution: int, seed: int = 0) -> list[tuple[dict, bytes]]:
    """(metadata, JPEG bytes) pairs as the images phase writes them: noise images, varied prompts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    data = []
    for i in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        data.append(
            ({"id": f"bench-{i:05d}", "prompt": f"{PROMPTS[i % len(PROMPTS)]}, number {i}"}, buf.getvalue())
        )
    return data


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return None  # CPU: no per-recipe peak to read


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Timer:
    """Seconds between ``start`` and ``stop``, the device synchronized at both ends."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.started = self.elapsed = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.started = time.perf_counter()

    def stop(self) -> float:
        synchronize(self.device)
        self.elapsed = time.perf_counter() - self.started
        return self.elapsed


def emit(record: dict, out: str | None) -> None:
    """Print ``record`` as one JSON line (the last line of a benchmark is its result) and append it to
    ``out`` (or $OUT/<bench>.jsonl on the GPU machine)."""
    line = json.dumps(record, sort_keys=False)
    print(line, flush=True)
    target = out or (
        os.path.join(os.environ["OUT"], f"{record['bench']}.jsonl") if os.environ.get("OUT") else None
    )
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def ratio(project: float, reference: float) -> float:
    return round(project / reference, 3) if reference > 0 else float("nan")


def add_common_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The flags both throughput benchmarks take."""
    parser.add_argument(
        "--arch", choices=ARCH_CHOICES, default="tiny", help="model architecture (default: tiny)"
    )
    parser.add_argument(
        "--batch", type=int, help=f"{what} per step (default: 16 on a GPU, 4 for sdxl, 4 on CPU)"
    )
    parser.add_argument("--resolution", type=int, help="pixels (default: the architecture's native size)")
    parser.add_argument(
        "--compile",
        choices=COMPILE_SETTINGS,
        default="auto",
        help="project's torch.compile of the UNet, as the config's compile setting (default: auto, "
        "the project's default: full for SD 1.x/2.x and blocks for SDXL on a GPU, off on CPU)",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_SETTINGS,
        default="auto",
        help="project's attention kernel, as the config's attention setting (default: auto, the "
        "project's default: the fastest measured on this GPU for the model's shapes, on CPU PyTorch's own)",
    )
    parser.add_argument("--only", choices=("both", "project", "reference"), default="both")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--work-dir", help="model cache and compile caches (default: a temporary folder)")
    parser.add_argument("--out", help="append the JSON result to this file")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed ones, N more of the project's steps under torch.profiler: where their "
        "time goes, kernel by kernel, in the JSON and in a table beside it (default: 0, none)",
    )
    parser.add_argument(
        "--no-restart-check",
        action="store_true",
        help="when the project compiles, skip the restart measurement (a new process loading the "
        "compiled kernels from the store into an empty inductor cache, as a job on a fresh node does)",
    )
    parser.add_argument(
        "--restart-timeout", type=float, default=300, help="seconds for the compiled restart (default: 300)"
    )


def apply_defaults(args: argparse.Namespace, device: str) -> None:
    gpu = device.startswith("cuda")
    if args.batch is None:
        args.batch = (4 if args.arch == "sdxl" else 16) if gpu else 4


# Kernel families by name, first match wins (names as cuDNN, cuBLAS, flash attention and inductor
# give them): a rough split of a step's device time, for finding what to speed up next. Inductor's
# come first: its names list the ops it fused (triton_poi_fused_convolution_backward_3 is
# elementwise work around a convolution, not one).
KERNEL_FAMILIES = (
    ("inductor fused", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit")),
    ("matmul", ("gemm", "nvjet", "cutlass", "matmul")),
)


def kernel_family(name: str) -> str:
    lowered = name.lower()
    for family, marks in KERNEL_FAMILIES:
        if any(mark in lowered for mark in marks):
            return family
    return "other"


class StepProfiler:
    """torch.profiler over a few of the project's steps (a training step, or a generation batch: its
    denoising steps and VAE decoding), run after the timed ones (profiling slows what it watches).
    ``stop`` returns, per step: the device's busy time (on a GPU, the kernels' time), the share of
    the unprofiled step it left the device idle (waiting for the CPU), the busy time's split by
    kernel family and the heaviest kernels (on CPU: operators). The full table is written beside
    the JSON lines ($OUT on the GPU machine) or in ``work``."""

    def __init__(self, device: str, bench: str, arch: str, work: Path) -> None:
        import torch

        folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else work
        self.device, self.path = device, folder / f"{bench}-{arch}-profile.txt"
        self.gpu = device.startswith("cuda")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.gpu:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)

    def start(self) -> None:
        synchronize(self.device)
        self.profiler.start()

    def stop(self, steps: int, step_s: float) -> dict:
        """The figures for ``steps`` profiled steps; ``step_s``: one step's time, unprofiled."""
        from torch.autograd import DeviceType

        synchronize(self.device)
        self.profiler.stop()
        events = self.profiler.key_averages()
        if self.gpu:
            timed = [
                (e.key, e.self_device_time_total)
                for e in events
                if e.device_type == DeviceType.CUDA and not e.is_user_annotation
            ]
        else:
            timed = [(e.key, e.self_cpu_time_total) for e in events]
        timed = sorted(((k, us) for k, us in timed if us > 0), key=lambda item: -item[1])
        total_us = sum(us for _, us in timed) or 1.0
        families: dict[str, float] = {}
        for key, us in timed:
            family = kernel_family(key) if self.gpu else "cpu operators"
            families[family] = families.get(family, 0.0) + us
        sort_by = "self_cuda_time_total" if self.gpu else "self_cpu_time_total"
        self.path.write_text(f"{steps} profiled steps\n{events.table(sort_by=sort_by, row_limit=60)}")
        busy_ms = total_us / 1000 / steps
        return {
            "profile_steps": steps,
            "profile_busy_ms_per_step": busy_ms,
            "profile_idle_share": round(max(0.0, 1 - busy_ms / 1000 / step_s), 3),
            "profile_families": {f: round(us / total_us, 3) for f, us in sorted(families.items())},
            "profile_top": [
                {"name": key[:80], "ms": round(us / 1000 / steps, 3), "share": round(us / total_us, 3)}
                for key, us in timed[:8]
            ],
            "profile_table": str(self.path),
        }


def report(record: dict, project: dict | None, reference: dict | None, out: str | None) -> dict:
    """Both recipes' figures into ``record`` (rates to 3 decimals, times to 2), the ratio when both
    ran; emitted as the last line."""
    for prefix, figures in (("project", project), ("reference", reference)):
        if figures is None:
            continue
        for name, value in figures.items():
            if name == "peak_gib":
                record["peak_gib" if prefix == "project" else "reference_peak_gib"] = value
            elif isinstance(value, float):
                digits = 4 if name.endswith("loss") else 3 if name.endswith(("per_s", "step_s")) else 2
                record[f"{prefix}_{name}"] = round(value, digits)
            elif name not in ("gpu",):
                record[f"{prefix}_{name}"] = value
    if project and reference:
        record["speedup"] = ratio(project["img_per_s"], reference["img_per_s"])
    emit(record, out)
    return record


def report_with_restart(
    record: dict,
    project: dict | None,
    reference: dict | None,
    args: argparse.Namespace,
    script: str,
    restart_flags: list[str],
) -> dict:
    """``report``, and when the project compiled (and not ``--no-restart-check``) again with the
    restart measured: ``script`` (the benchmark's own) run anew on the same work folder with
    ``restart_flags`` (the project alone, briefly) and an empty inductor cache, loading the compiled
    kernels from the store. ``compile_restart_warmup_s`` is its warm-up."""
    if not (project and project["compile_mode"] != "off" and not args.no_restart_check):
        return report(record, project, reference, args.out)
    # Printed before the restart is measured too: a time limit hit there loses nothing measured.
    report(record, project, reference, args.out)
    work = Path(args.work_dir)
    fresh = Path(tempfile.mkdtemp(prefix="inductor-fresh-", dir=work))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(fresh), "TRITON_CACHE_DIR": str(fresh / "triton")}
    env.pop("OUT", None)
    common = ["--only", "project", "--arch", args.arch, "--batch", str(args.batch), "--compile", args.compile]
    common += ["--attention", args.attention, "--device", args.device, "--work-dir", str(work)]
    command = [sys.executable, script, *common, *restart_flags, "--no-restart-check"]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, check=False, timeout=args.restart_timeout
        )
        if done.returncode != 0:
            error = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        else:
            restarted = json.loads(done.stdout.strip().splitlines()[-1])
            record["compile_restart_warmup_s"] = restarted["project_warmup_s"]
            record["compile_restart_cache_load_s"] = restarted.get("project_compile_cache_load_s")
            record["compile_restart_cache_loaded"] = restarted["project_compile_cache_loaded"]
            error = None
    except subprocess.TimeoutExpired:
        error = [f"the restart took over {args.restart_timeout} s"]
    if error is not None:
        record["compile_restart_error"] = error
    return report(record, project, reference, args.out)


def run_recipes(only: str, device: str, reference, project) -> tuple[dict | None, dict | None]:
    """(project's figures, reference's figures): the recipes ``--only`` selects, the reference first
    (its memory freed before the project's runs), each one's figures on stderr as it ends."""
    results: dict[str, dict | None] = {"reference": None, "project": None}
    for name, recipe in (("reference", reference), ("project", project)):
        if only in ("both", name):
            results[name] = recipe()
            print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
            gc.collect()  # the recipe's models, held in reference cycles (peft, dynamo) until now
            if device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
    return results["project"], results["reference"]
