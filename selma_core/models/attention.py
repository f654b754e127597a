"""Which kernel computes the UNet's attention: PyTorch's own choice, a named one, or the fastest
measured for this model on this GPU.

``F.scaled_dot_product_attention`` picks a backend (flash, memory-efficient, cuDNN, math) by a
fixed priority. The fastest one depends on the GPU and the shapes: published measurements on an
H100 have cuDNN's kernels well ahead of flash for some head sizes and behind for others, and SD
1.x's heads are 40 wide (flash computes them as 64), SDXL's 64. So ``attention: auto`` measures:

1. ``attention_shapes``: one eager forward of the UNet at batch 1 records every attention call's
   shape (heads, query and key lengths, head size) through a ``TorchFunctionMode``;
2. ``choose_backend``: each candidate backend runs every shape at the job's batch size (forward,
   and backward when training), and is checked against PyTorch's choice for the same numbers; the
   call counts weigh the times;
3. a backend replaces PyTorch's choice only when ``MIN_GAIN`` faster in all (timings jitter).

The choice is kept in the store (``cache/attention/<digest>``, keyed by the GPU, torch, dtype and
shapes), so every job of a model on a GPU type makes the same one: graphs compiled under one
choice are the compile cache's entry for all of them. ``sdpa_backend`` applies a choice around the
work: its backend first, the others after it in PyTorch's order for shapes it cannot run. With
``torch.compile`` the backend in force when a graph is traced is the one compiled into it.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

AttentionSetting = Literal["auto", "default", "flash", "efficient", "cudnn", "math"]
ATTENTION_SETTINGS = ("auto", "default", "flash", "efficient", "cudnn", "math")
# Names of torch.nn.attention.SDPBackend members; "default" is PyTorch's own priority.
_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
# What "auto" tries on a GPU. Not math: it holds every score in memory and never wins at these
# sequence lengths (4,096 tokens at 512 px).
GPU_CANDIDATES = ("flash", "efficient", "cudnn")
# A backend replaces PyTorch's choice only when at least this much faster over all the shapes
# (timings of one kernel jitter by a percent or two).
MIN_GAIN = 0.05
ATTENTION_CACHE_PREFIX = "cache/attention"
# Part of a stored choice's key: raised when what is measured, or how, changes.
MEASUREMENT_VERSION = 1


@dataclass(frozen=True, order=True)
class AttentionShape:
    """One attention call's shape, batch aside: ``heads`` x ``query_len`` queries against
    ``key_len`` keys, each ``head_dim`` wide."""

    heads: int
    query_len: int
    key_len: int
    head_dim: int

    def __str__(self) -> str:
        return f"{self.heads}x{self.query_len}x{self.key_len}x{self.head_dim}"


@dataclass
class AttentionChoice:
    """The backend the work runs under (``"default"``: PyTorch's own priority), and for ``auto`` what
    was measured: each candidate's time in milliseconds over one forward's attention calls (None:
    left out, ``excluded`` says why)."""

    backend: str
    measured_ms: dict[str, float | None] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    from_store: bool = False
    # Each shape's time per call, by backend: {"8x4096x4096x40": {"default": 1.2, "cudnn": 0.9}}.
    per_shape_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)
    # The shapes each backend cannot run (PyTorch's next kernel runs them).
    unsupported: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "measured_ms": self.measured_ms,
            "excluded": self.excluded,
            "per_shape_ms": self.per_shape_ms,
            "unsupported": self.unsupported,
        }


def backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    if name not in _BACKENDS:
        raise ValueError(f"attention: expected one of {', '.join(ATTENTION_SETTINGS)}, got {name!r}")
    return getattr(SDPBackend, _BACKENDS[name])


@contextmanager
def sdpa_backend(name: str) -> Iterator[None]:
    """Attention computed by backend ``name`` first (PyTorch's other backends after it, in its own
    order, for shapes it cannot run: the text encoders' masked attention, say); ``"default"``
    changes nothing. CUDA's dispatch follows this order; the CPU's keeps its own (flash, then math)."""
    if name == "default":
        yield
        return
    import torch
    from torch.nn.attention import sdpa_kernel

    first = backend_enum(name)
    others = [b for b in map(backend_enum, _BACKENDS) if b != first]
    others.sort(key=lambda b: torch._C._get_sdp_priority_order().index(int(b)))
    # Inductor's on-disk caches key a graph by its code, not by the kernel priority it was traced
    # under: without the tag a graph traced under another kernel would be a hit, and run that one.
    with (
        sdpa_kernel([first, *others], set_priority=True),
        torch.compiler.config.patch(cache_key_tag=f"sdpa:{name}"),
    ):
        yield


@contextmanager
def _only(name: str) -> Iterator[None]:
    """Backend ``name`` alone (a shape it cannot run raises): for measuring it."""
    if name == "default":
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend_enum(name)]):
        yield


def unet_sample_inputs(unet, size: tuple[int, int], text_len: int) -> tuple[tuple, dict]:
    """Zero inputs for one UNet forward at batch 1 with latents of ``size`` (height, width) and
    ``text_len`` text tokens (SDXL-style UNets also get pooled text embeddings and time ids)."""
    import torch

    cfg = unet.config
    options = {"device": unet.device, "dtype": unet.dtype}
    sample = torch.zeros(1, cfg.in_channels, *size, **options)
    if not isinstance(cfg.cross_attention_dim, int):
        raise ValueError(f"cross_attention_dim {cfg.cross_attention_dim!r}: expected one width")
    hidden = torch.zeros(1, text_len, cfg.cross_attention_dim, **options)
    kwargs: dict[str, Any] = {"encoder_hidden_states": hidden}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(1, pooled, **options),
            "time_ids": torch.zeros(1, 6, **options),
        }
    return (sample, torch.tensor([1], device=unet.device)), kwargs


def attention_shapes(unet, size: tuple[int, int], text_len: int) -> Counter[AttentionShape]:
    """How many attention calls of each shape one forward of ``unet`` makes (``size``: the latents'
    height and width, ``text_len``: the prompt's tokens): one eager forward at batch 1, recorded."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    seen: Counter[AttentionShape] = Counter()

    class Recording(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                kwargs = kwargs or {}
                query = args[0] if args else kwargs["query"]
                key = args[1] if len(args) > 1 else kwargs["key"]
                seen[AttentionShape(query.shape[1], query.shape[2], key.shape[2], query.shape[3])] += 1
            return func(*args, **(kwargs or {}))

    args, kwargs = unet_sample_inputs(unet, size, text_len)
    # A compiled UNet would compile here (for batch 1): run it eagerly.
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), Recording():
        unet(*args, **kwargs)
    return seen


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _run(shape: AttentionShape, batch: int, dtype, device: str, backward: bool, repeats: int):
    """Time ``repeats`` calls (forward, and backward when ``backward``) on seeded random inputs of
    ``shape`` under the backend in force; (seconds per call, a corner of the first call's outputs and
    gradients, for comparing backends)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator(device="cpu").manual_seed(0)

    def tensor(length: int):
        # (batch, tokens, heads, head) seen as (batch, heads, tokens, head): the strides diffusers'
        # attention processors give SDPA.
        t = torch.randn(batch, length, shape.heads, shape.head_dim, generator=generator)
        return t.to(device, dtype).requires_grad_(backward).transpose(1, 2)

    query, key, value = tensor(shape.query_len), tensor(shape.key_len), tensor(shape.key_len)
    grad = torch.randn(query.shape, generator=generator).to(device, dtype) if backward else None

    def call() -> tuple:
        out = F.scaled_dot_product_attention(query, key, value)
        if backward:
            return (out, *torch.autograd.grad(out, (query, key, value), grad))
        return (out,)

    with torch.enable_grad() if backward else torch.no_grad():
        corner = tuple(t[:1, :, :256].float().cpu() for t in call())  # also the warm-up
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        _synchronize(device)
    return (time.perf_counter() - started) / repeats, corner


def _agrees(outputs: tuple, reference: tuple, dtype) -> bool:
    """Whether a backend's outputs are PyTorch's choice's, up to the dtype's rounding."""
    import torch

    tol = 1e-3 if dtype == torch.float32 else 5e-2
    return all(torch.allclose(a, b, atol=tol, rtol=tol) for a, b in zip(outputs, reference, strict=True))


def _cannot_run(error: RuntimeError) -> bool:
    """Whether ``error`` is PyTorch saying the backend has no kernel for the shape (CUDA's and the
    CPU's wording), where sdpa_backend would fall back to its next backend, unlike out of memory."""
    text = str(error)
    return "No available kernel" in text or "No viable backend" in text


def _free_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def choose_backend(
    shapes: Counter[AttentionShape],
    batch: int,
    dtype,
    device: str,
    backward: bool,
    candidates: tuple[str, ...] = GPU_CANDIDATES,
    repeats: int = 5,
) -> AttentionChoice:
    """The fastest of PyTorch's choice and ``candidates`` for ``shapes`` (call counts as weights) at
    ``batch``; a candidate wins only ``MIN_GAIN`` ahead of PyTorch's choice.

    A shape a candidate cannot run counts at PyTorch's choice's time (``sdpa_backend`` falls back to
    PyTorch's order there) and is listed in ``unsupported``; a candidate that runs none of them, or
    computes other numbers than PyTorch's choice, is left out (``excluded``)."""
    seconds: dict[str, float] = {}
    excluded: dict[str, str] = {}
    unsupported: dict[str, list[str]] = {}
    references: dict[AttentionShape, tuple[float, tuple]] = {}  # PyTorch's choice's, measured first
    per_shape = {str(shape): dict.fromkeys(("default", *candidates)) for shape in sorted(shapes)}
    for name in ("default", *candidates):
        total, ran, why = 0.0, 0, ""
        for shape, count in sorted(shapes.items()):
            try:
                with warnings.catch_warnings(), _only(name):
                    warnings.simplefilter("ignore")  # each backend warns why it cannot run a shape
                    took, outputs = _run(shape, batch, dtype, device, backward, repeats)
            except RuntimeError as e:
                if name == "default":
                    raise
                why = f"shape {shape}: {str(e).strip().splitlines()[0]}"
                if not _cannot_run(e):  # out of memory, a kernel's failure: not to be relied on
                    excluded[name] = why
                    _free_memory(device)
                    break
                unsupported.setdefault(name, []).append(str(shape))
                total += count * references[shape][0]
                continue
            if name == "default":
                references[shape] = (took, outputs)
            elif not _agrees(outputs, references[shape][1], dtype):
                excluded[name] = f"shape {shape}: its outputs differ from PyTorch's own choice's"
                break
            per_shape[str(shape)][name] = round(took * 1e3, 4)
            total += count * took
            ran += 1
        else:
            if ran:
                seconds[name] = total
            else:
                excluded[name] = f"runs none of the shapes ({why})"
                unsupported.pop(name, None)
    measured = {
        name: round(seconds[name] * 1e3, 3) if name in seconds else None for name in ("default", *candidates)
    }
    best = min(seconds, key=seconds.__getitem__)
    if best != "default" and seconds[best] > (1 - MIN_GAIN) * seconds["default"]:
        best = "default"
    return AttentionChoice(best, measured, excluded, per_shape_ms=per_shape, unsupported=unsupported)


def _cache_key(
    shapes: Counter[AttentionShape],
    batch: int,
    dtype,
    device: str,
    backward: bool,
    candidates: tuple[str, ...],
) -> str:
    """The store key of a choice: everything the measurement depends on, hashed."""
    import torch

    from selma_core.models.speed import fingerprint

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    data = {
        "version": MEASUREMENT_VERSION,
        "min_gain": MIN_GAIN,
        "candidates": list(candidates),
        # PyTorch's own choice depends on which backends the process leaves enabled, and their order.
        "enabled": [
            torch._C._get_flash_sdp_enabled(),
            torch._C._get_mem_efficient_sdp_enabled(),
            torch._C._get_cudnn_sdp_enabled(),
            torch._C._get_math_sdp_enabled(),
        ],
        "priority": torch._C._get_sdp_priority_order(),
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "dtype": str(dtype),
        "batch": batch,
        "backward": backward,
        "shapes": sorted((str(shape), count) for shape, count in shapes.items()),
    }
    return f"{ATTENTION_CACHE_PREFIX}/{fingerprint(device, data)}.json"


def resolve_attention(
    setting: str,
    unet,
    device: str,
    *,
    batch: int,
    size: tuple[int, int],
    text_len: int,
    backward: bool,
    store=None,
    candidates: tuple[str, ...] | None = None,
) -> AttentionChoice:
    """What an ``attention`` setting means for ``unet`` on ``device``, for batches of ``batch``
    latents of ``size`` (height, width) with ``text_len`` text tokens (``backward``: training).

    A named backend (or "default") is itself. "auto" is "default" off CUDA (CPU runs are the tests'
    bit-for-bit reference) or without a UNet; on CUDA the fastest of ``GPU_CANDIDATES`` measured
    (``choose_backend``), kept in ``store`` (when given) and taken from it by every later job.
    ``candidates``: measure these, on any device (for tests on the CPU)."""
    if setting not in ATTENTION_SETTINGS:
        raise ValueError(f"attention: expected one of {', '.join(ATTENTION_SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return AttentionChoice(setting)
    if unet is None or (candidates is None and not device.startswith("cuda")):
        return AttentionChoice("default")
    candidates = candidates or GPU_CANDIDATES
    try:
        shapes = attention_shapes(unet, size, text_len)
    except Exception as e:  # a model this recording does not know: PyTorch's own choice
        print(f"warning: attention shapes not recorded ({e}); PyTorch's own kernel choice", file=sys.stderr)
        return AttentionChoice("default")
    if not shapes:
        return AttentionChoice("default")
    key = _cache_key(shapes, batch, unet.dtype, device, backward, candidates)
    stored = _stored_choice(store, key)
    if stored is not None:
        return stored
    try:
        choice = choose_backend(shapes, batch, unet.dtype, device, backward, candidates)
    except Exception as e:  # out of memory, say: PyTorch's own choice, as without measuring
        print(f"warning: attention kernels not measured ({e}); PyTorch's own kernel choice", file=sys.stderr)
        return AttentionChoice("default")
    if store is not None:
        # Jobs measuring at once (several images workers): the first one stored wins, so they all
        # end up with one choice and one compile cache entry.
        stored = _stored_choice(store, key)
        if stored is not None:
            return stored
        try:
            store.write_json(key, {**choice.as_dict(), "shapes": {str(s): n for s, n in shapes.items()}})
        except Exception as e:
            print(f"warning: attention choice not saved to {store.url(key)}: {e}", file=sys.stderr)
    return choice


def _stored_choice(store, key: str) -> AttentionChoice | None:
    """The choice kept at ``key`` (None: none, or unreadable, which is reported)."""
    if store is None:
        return None
    try:
        if not store.exists(key):
            return None
        kept = store.read_json(key)
        return AttentionChoice(
            kept["backend"],
            kept["measured_ms"],
            kept["excluded"],
            from_store=True,
            per_shape_ms=kept["per_shape_ms"],
            unsupported=kept["unsupported"],
        )
    except Exception as e:  # a cache never fails a job
        print(f"warning: attention choice {store.url(key)} not used: {e}", file=sys.stderr)
        return None
