"""GPU speed for the UNet: memory layout, attention kernel, ``torch.compile`` and its persistent cache.

Shared by the trainer and the image generator. Each switch changes how fast the same computation
runs, never what it computes (beyond float rounding), so the configs mark them execution-only.

- **channels_last**: convolutions in NHWC, the layout cuDNN's tensor-core kernels want.
- **SDPA**: diffusers' ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``); set explicitly so
  a model saved with another processor (xformers, the slow classic one) does not keep it. Which of
  PyTorch's kernels computes it: ``selma_core.models.attention``.
- **compile** ``"blocks"`` (regional compilation): each transformer block and ResNet block of the UNet
  is compiled on its own, one graph per distinct block shape, reused by every block of that shape.
  SDXL's blocks repeat (16 graphs, 121 s cold on an H100, where its whole UNet took over 5 minutes
  on an H200); SD 1.x's hardly do (21 graphs, not done within 150 s). ``"full"`` compiles the whole
  UNet as one graph: the fastest steps; 177 s cold for SD 1.x on an H100. ``"auto"``
  (``resolve_compile``) picks between them by the UNet's size.
- **CUDA graph** (inference only, ``cuda_graph``): the whole compiled UNet in inductor's
  "reduce-overhead" mode, its graph recorded once as a CUDA graph and replayed at every later call,
  so the GPU does not wait for Python to launch its kernels one by one (it sat idle 8% of each
  SD 1.x generation batch on an H200, ``bench/RESULTS.md``). Not with "blocks": without a backward
  pass to wait for, every call of a compiled block starts a new generation of CUDA graph trees,
  which frees the previous block's outputs while the UNet still holds them (its residuals and skip
  connections; pytorch/pytorch#152887). Training graphs its micro-batches itself
  (``selma_core.models.cuda_graph``).
- **compile cache**: inductor's on-disk caches live under ``<cache_dir>/torch-compile`` (a volume on
  Kubernetes when ``cache_volume_claim`` is set), and the compiled artifacts are also saved to the
  store (``cache/compile/<digest>``, torch's portable "mega-cache") once the first steps have compiled,
  so a restarted or preempted job on a fresh node loads them instead of compiling again. The digest
  covers everything a compiled kernel depends on: torch and CUDA versions, the GPU, the mode, the
  model's architecture, dtype and input shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

CompileMode = Literal["off", "blocks", "full"]
COMPILE_MODES = ("off", "blocks", "full")
# What a config may say: a mode, or "auto" (``resolve_compile``).
CompileSetting = Literal["auto", "off", "blocks", "full"]
COMPILE_SETTINGS = ("auto", *COMPILE_MODES)
# "auto" compiles the whole UNet below this size, its blocks above. Whole-UNet compile time grows
# with the graph: SD 1.x's (860 M parameters) took 177 s on an H100, SDXL's (2.6 B) over 5 minutes
# on an H200, where SDXL's blocks, which repeat (its 10-deep transformer stacks), took 121 s.
FULL_COMPILE_MAX_PARAMETERS = 1.5e9
# The UNet's repeated blocks (SD 1.x/2.x/XL): compiled one by one in "blocks" mode.
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
COMPILE_CACHE_PREFIX = "cache/compile"


def use_sdpa(unet) -> None:
    """Attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient on CUDA).

    Kept as is when a LoRA or another custom processor is already set on some layer: those already
    call SDPA themselves, and replacing them would drop what they do."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = getattr(unet, "attn_processors", {})
    plain = ("AttnProcessor", "AttnProcessor2_0")
    if processors and all(type(p).__name__ in plain for p in processors.values()):
        unet.set_attn_processor(AttnProcessor2_0())


def to_channels_last(*modules) -> None:
    """Convolution weights in NHWC (``torch.channels_last``): cuDNN's fastest layout on tensor cores."""
    import torch

    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)


def resolve_compile(setting: str, unet, device: str) -> CompileMode:
    """The compile mode a ``compile`` setting means for ``unet`` on ``device``: "off" without a UNet
    (a transformer-based pipeline); else a mode is itself, and "auto" is "off" off CUDA (on the CPU
    compiling costs more than it saves, and CPU runs are the tests' bit-for-bit reference), else
    "full" for a UNet under ``FULL_COMPILE_MAX_PARAMETERS`` (SD 1.x/2.x: one graph, the fastest
    steps) and "blocks" above (SDXL: its whole UNet compiles for too long, its repeated blocks
    quickly)."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile: expected one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}")
    if unet is None:  # nothing to compile
        return "off"
    if setting != "auto":
        return setting  # type: ignore[return-value]
    if not device.startswith("cuda"):
        return "off"
    parameters = sum(p.numel() for p in unet.parameters())
    return "full" if parameters < FULL_COMPILE_MAX_PARAMETERS else "blocks"


def compile_unet(
    unet,
    mode: CompileMode,
    dynamic: bool = False,
    cache_dir: str | Path | None = None,
    cuda_graph: bool = False,
) -> int:
    """Compile the UNet in place; how many modules were compiled (0 for "off").

    "blocks" compiles each repeated block (``REPEATED_BLOCKS``), "full" the whole UNet. ``dynamic``
    False: one graph per input shape, the fastest kernels (a training job has one shape).
    ``cache_dir``: inductor's on-disk caches go there (``compile_cache_dir``), so they outlive the
    process; None leaves them where they are. ``cuda_graph``: inductor's "reduce-overhead" mode,
    the UNet's graph replayed as a CUDA graph, "full" only (see the module docstring); for inference:
    its outputs are overwritten by its next replay, and ``torch.compile`` copies the inputs into the
    graph's own buffers.
    """
    import torch

    if mode not in COMPILE_MODES:
        raise ValueError(f"compile: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if cuda_graph and mode != "full":
        raise ValueError(f"cuda_graph: the whole UNet must be compiled (compile: full), got compile: {mode}")
    if mode == "off":
        return 0
    if cache_dir is not None:
        compile_cache_dir(cache_dir)
    # Many blocks of one class, each a module instance: the default limit (8 graphs per code
    # object) would fall back to eager after the eighth shape or instance.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    options: dict[str, Any] = {"dynamic": dynamic}
    if cuda_graph:
        options["mode"] = "reduce-overhead"
    if mode == "full":
        unet.compile(**options)
        return 1
    count = 0
    for module in unet.modules():
        if type(module).__name__ in REPEATED_BLOCKS:
            module.compile(**options)
            count += 1
    return count


def vae_compiled(pipe) -> bool:
    """Whether the pipeline's VAE decoder is compiled (``prepare_for_inference``'s ``compile_vae``)."""
    vae = getattr(pipe, "vae", None)
    return vae is not None and getattr(vae.decoder, "_compiled_call_impl", None) is not None


def cuda_graph_skips() -> int:
    """Compiled graphs inductor ran without a CUDA graph in this process, though asked to (it logs
    why: an input on the CPU, a mutated input, ...): 0 when every graph replays as one."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def compile_cache_dir(cache_dir: str | Path) -> Path:
    """Inductor's on-disk caches (FX graphs, AOTAutograd, Triton kernels) under ``cache_dir``, so they
    outlive the process: set before the first compile."""
    path = Path(cache_dir) / "torch-compile"
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    return path


def compile_cache_digest(unet, mode: str, device: str, dtype: Any, signature: dict[str, Any]) -> str:
    """What a compiled artifact depends on, hashed: a cache entry is only ever loaded where it fits.

    ``signature``: what the caller's graphs depend on besides the UNet's config and dtype (input
    shapes, adapters, layout, autocast: ``ExpertTrainer.compile_signature``)."""
    data = {
        "mode": mode,
        "dtype": str(dtype),
        "unet": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        "signature": signature,
        "python": sys.version_info[:2],
    }
    return fingerprint(device, data)


def fingerprint(device: str, data: dict[str, Any]) -> str:
    """``data``, with the torch and CUDA versions and the GPU model ``device`` is, hashed (20 hex
    digits): the key of a cache entry measured or compiled there, only ever used where it fits."""
    import torch

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(torch.device(device)) if cuda else "cpu"
    data = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu, **data}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class StoreCompileCache:
    """Torch's portable compile artifacts ("mega-cache") kept in the artifact store.

    ``load`` before the first compiled call, ``save`` once the first steps have compiled; a damaged
    or incompatible entry is reported and ignored (the job compiles as if cold)."""

    def __init__(self, store, digest: str, scratch_dir: str | Path) -> None:
        self.store, self.digest = store, digest
        self.key = f"{COMPILE_CACHE_PREFIX}/{digest}.bin"
        self.scratch = Path(scratch_dir)
        self.loaded = False
        self.saved = False
        self.load_s = 0.0  # downloading and installing the entry
        self._misses_at_load = 0

    @contextmanager
    def _local_file(self) -> Iterator[Path]:
        """A file of this process's own in the scratch folder, removed afterwards: the processes of
        one job on a node (torchrun's ranks, an images job's processes) share that folder and load
        and save the same entry at the same time."""
        folder = self.scratch / "compile-cache"
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f"{self.digest}-", suffix=".bin", dir=folder)
        os.close(handle)
        try:
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    @staticmethod
    def _graph_misses() -> int:
        """Graphs inductor has compiled in this process (its FX graph cache had none for them)."""
        from torch._dynamo.utils import counters

        return counters["inductor"]["fxgraph_cache_miss"]

    def load(self) -> bool:
        import torch

        started = time.monotonic()
        try:
            if not self.store.exists(self.key):
                return False
            with self._local_file() as local:
                self.store.download_file(self.key, local)
                blob = local.read_bytes()
            # None (torch logs why) when the bytes are not its artifacts: a damaged entry.
            if torch.compiler.load_cache_artifacts(blob) is None:
                raise ValueError("damaged (its checksum does not match)")
        except Exception as e:  # a cache never fails a job
            print(f"warning: compile cache {self.store.url(self.key)} not used: {e}", file=sys.stderr)
            return False
        finally:
            self.load_s = time.monotonic() - started
        self.loaded = True
        self._misses_at_load = self._graph_misses()
        return True

    def save(self) -> bool:
        """Save what this process has compiled; nothing when everything came from the loaded entry."""
        import torch

        if self.saved or (self.loaded and self._graph_misses() == self._misses_at_load):
            return False
        try:
            artifacts = torch.compiler.save_cache_artifacts()
            if not artifacts:
                return False
            blob, _info = artifacts
            with self._local_file() as local:
                local.write_bytes(blob)
                self.store.upload_file(local, self.key)
        except Exception as e:
            print(f"warning: compile cache not saved to {self.store.url(self.key)}: {e}", file=sys.stderr)
            return False
        self.saved = True
        return True

    def load_for_job(self, ctx, phase: str) -> bool:
        """``load`` in a job (``ctx``: its ``JobContext``): an entry loaded is said on stderr and
        logged to the job's run as ``<phase>.compile_cache_load_s``."""
        if not self.load():
            return False
        print(f"{phase}: compiled kernels from {self.store.url(self.key)}", file=sys.stderr)
        ctx.run.log_metrics({f"{phase}.compile_cache_load_s": self.load_s})
        return True

    def save_for_job(self, ctx) -> bool:
        """``save`` in a job, from a process that commits (not torchrun's ranks above 0)."""
        return self.save() if ctx.commits else False


def prepare_for_inference(
    pipe,
    device: str,
    channels_last: bool = True,
    compile: CompileMode = "off",
    fuse_qkv: bool = True,
    cache_dir: str | Path | None = None,
    cuda_graph: bool = False,
    compile_vae: bool = False,
) -> int:
    """A pipeline set up for fast sampling; how many modules were compiled.

    SDPA attention; on CUDA (on CPU they are slower and change rounding): cuDNN's autotuner
    (``cudnn.benchmark``), channels_last UNet and VAE,
    and each attention's query/key/value projections fused into one matmul (``fuse_qkv``; not with
    LoRA adapters loaded, whose layers wrap the separate projections); the UNet compiled as
    ``compile`` says (its kernels cached under ``cache_dir``, see ``compile_unet``), its graphs
    replayed as a CUDA graph with ``cuda_graph`` (on CUDA only: there are none on the CPU); with
    ``compile_vae`` and ``compile`` on, the VAE's decoder compiled too (once a batch, with
    inductor's own group norms, which take channels_last tensors without the layout copies eager
    ones need)."""
    use_sdpa(pipe.unet)
    if device.startswith("cuda"):
        import torch

        # A job draws batches of one shape: let cuDNN pick its fastest convolutions once.
        torch.backends.cudnn.benchmark = True
        if channels_last:
            to_channels_last(pipe.unet, pipe.vae)
        if fuse_qkv and not getattr(pipe.unet, "peft_config", None) and hasattr(pipe, "fuse_qkv_projections"):
            pipe.fuse_qkv_projections()
    graph = cuda_graph and device.startswith("cuda")
    compiled = compile_unet(pipe.unet, compile, cache_dir=cache_dir, cuda_graph=graph)
    if compiled and compile_vae and getattr(pipe, "vae", None) is not None:
        pipe.vae.decoder.compile(dynamic=False)
        compiled += 1
    return compiled
