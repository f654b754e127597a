"""Benchmark: PyTorch's attention kernels on the UNet's attention shapes, each against PyTorch's own
choice, in one run: what ``attention: auto`` (selma_core.models.attention) measures and chooses.

    python bench/attention.py                          # CPU or GPU: a tiny random test model's shapes
    python bench/attention.py --arch sd15 sdxl         # GPU: the real architectures (a few seconds)

For each architecture, training (forward and backward at the training batch, bf16 on a GPU) and
generation (forward at twice the batch: classifier-free guidance; fp16 on a GPU). The shapes are
recorded from one forward of the real architecture on the meta device (no weights). Prints a table
per architecture and mode: each shape's time per call under each kernel and its ratio to PyTorch's
choice ("-": a shape the kernel cannot run; PyTorch's next one runs it, at its time in the total);
the last line is one JSON object (also appended to $OUT/attention.jsonl when $OUT is set).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import ARCH_CHOICES, architecture_resolution, device_description, emit, resolve_device

# The throughput benchmarks' batches (their defaults): what each architecture trains and draws at.
TRAIN_BATCH = {"sdxl": 4}
DEFAULT_BATCH = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=ARCH_CHOICES, default=["tiny"], help="(default: tiny)")
    parser.add_argument("--modes", nargs="+", choices=("train", "generate"), default=["train", "generate"])
    parser.add_argument("--batch", type=int, help="training batch (default: 16, 4 for sdxl; 2 on CPU)")
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed calls per shape and kernel (default: 10)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--work-dir", help="model cache (default: a temporary folder)")
    parser.add_argument("--out", help="append the JSON result to this file")
    return parser.parse_args(argv)


def unet_of(arch: str, work: Path):
    """``arch``'s UNet: the tiny random test model's, or the real architecture on the meta device."""
    import torch

    if arch.startswith("tiny"):
        from selma_core.models.loading import load_diffusion_pipeline

        spec = "random:tiny-sdxl" if arch == "tiny-sdxl" else "random:tiny-sd"
        return load_diffusion_pipeline(spec, work / "models").unet
    from diffusers import UNet2DConditionModel

    from selma_core.models.architectures import unet_config

    with torch.device("meta"):
        return UNet2DConditionModel(**unet_config(arch))


def measure(arch: str, mode: str, args, device: str, work: Path) -> dict:
    import torch

    from selma_core.models import attention

    gpu = device.startswith("cuda")
    unet = unet_of(arch, work)
    side = architecture_resolution(arch, work / "models") // 8
    shapes = attention.attention_shapes(unet, (side, side), 77)
    batch = args.batch or (TRAIN_BATCH.get(arch, DEFAULT_BATCH) if gpu else 2)
    training = mode == "train"
    if not training:
        batch *= 2  # classifier-free guidance: the unconditional half
    dtype = (torch.bfloat16 if training else torch.float16) if gpu else torch.float32
    candidates = attention.GPU_CANDIDATES if gpu else ("flash", "math")
    choice = attention.choose_backend(shapes, batch, dtype, device, training, candidates, args.repeats)
    names = ["default", *candidates]
    print(
        f"\n{arch} {mode}: batch {batch}, {str(dtype).removeprefix('torch.')}, ms per call (ratio to default)"
    )
    print(f"{'heads x queries x keys x head':>32} {'calls':>5} " + " ".join(f"{n:>16}" for n in names))
    for shape, count in sorted(shapes.items()):
        times = choice.per_shape_ms[str(shape)]
        base = times["default"]
        cells = []
        for name in names:
            ms = times[name]
            cells.append(f"{'-':>16}" if ms is None else f"{ms:>8.3f} ({base / ms if base else 0:4.2f}x)")
        print(f"{str(shape):>32} {count:>5} " + " ".join(cells))
    total = choice.measured_ms
    print(
        f"{'per forward' + (' and backward' if training else ''):>38} "
        + " ".join(
            f"{'-':>16}" if total[n] is None else f"{total[n]:>8.2f} ({total['default'] / total[n]:4.2f}x)"
            for n in names
        )
    )
    print(
        f"chosen: {choice.backend}"
        + "".join(f"; {n} left out: {why}" for n, why in choice.excluded.items())
        + "".join(
            f"; {n} cannot run {', '.join(s)} (PyTorch's next kernel does)"
            for n, s in choice.unsupported.items()
        )
    )
    return {
        "arch": arch,
        "mode": mode,
        "batch": batch,
        "dtype": str(dtype).removeprefix("torch."),
        "choice": choice.backend,
        "measured_ms": choice.measured_ms,
        "speedup": round(total["default"] / total[choice.backend], 3) if total.get(choice.backend) else None,
        "excluded": choice.excluded,
        "unsupported": choice.unsupported,
        "per_shape_ms": choice.per_shape_ms,
        "calls": {str(shape): count for shape, count in sorted(shapes.items())},
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="selma-bench-attention-"))
    import torch

    device = resolve_device(args.device)
    record = {
        "bench": "attention",
        "device": device_description(device),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if device.startswith("cuda") else None,
        "results": [measure(arch, mode, args, device, work) for arch in args.arch for mode in args.modes],
    }
    emit(record, args.out)  # also to $OUT/attention.jsonl
    return record


if __name__ == "__main__":
    main()
