"""The UNet speed switches: regional compilation picks the repeated blocks, and compiled kernels
saved to the store are loaded by a fresh process on an empty inductor cache (a restarted job on
another node) instead of being compiled again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selma_core.models import speed
from selma_core.models.loading import load_diffusion_pipeline
from selma_core.storage import LocalArtifactStore

COMPILE_AND_SAVE = """
import json, sys
import torch
from torch._dynamo.utils import counters
from selma_core.models import speed
from selma_core.storage import LocalArtifactStore

cache = speed.StoreCompileCache(LocalArtifactStore(sys.argv[1]), "test-digest", sys.argv[2])
loaded = cache.load()
compiled = torch.compile(lambda x: (x * 2).sin() + 1)
assert torch.allclose(compiled(torch.ones(8)), (torch.ones(8) * 2).sin() + 1)
saved = cache.save()
inductor = counters["inductor"]
print(json.dumps({"loaded": loaded, "saved": saved, "hits": inductor["fxgraph_cache_hit"],
                  "misses": inductor["fxgraph_cache_miss"]}))
"""


def compile_in_a_fresh_process(tmp_path: Path, store: Path, name: str) -> tuple[dict, str]:
    inductor = tmp_path / f"inductor-{name}"  # an empty cache: another node
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_AND_SAVE, str(store), str(tmp_path / f"scratch-{name}")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.slow
def test_compiled_kernels_in_the_store_spare_a_restarted_job_the_compile(tmp_path):
    store = tmp_path / "store"
    first, _ = compile_in_a_fresh_process(tmp_path, store, "first")
    assert first == {"loaded": False, "saved": True, "hits": 0, "misses": 1}
    key = f"{speed.COMPILE_CACHE_PREFIX}/test-digest.bin"
    entry = LocalArtifactStore(store).read_bytes(key)

    # A damaged entry is reported and ignored: the job compiles as if cold, and saves it again.
    LocalArtifactStore(store).write_bytes(key, entry[:-64] + bytes(64))
    second, stderr = compile_in_a_fresh_process(tmp_path, store, "second")
    assert second == {"loaded": False, "saved": True, "hits": 0, "misses": 1}
    assert f"warning: compile cache {LocalArtifactStore(store).url(key)} not used: damaged" in stderr

    # Another node (an empty inductor cache): the kernels come from the store, nothing compiles.
    third, _ = compile_in_a_fresh_process(tmp_path, store, "third")
    assert third == {"loaded": True, "saved": False, "hits": 1, "misses": 0}


def test_the_compile_cache_digest_changes_with_what_compiled_kernels_depend_on(model_cache):
    unet = load_diffusion_pipeline("random:tiny-sd", model_cache).unet
    shapes = {"batch": 16, "resolution": 512, "lora": [128, 128.0, ["to_q"]]}
    digest = speed.compile_cache_digest(unet, "blocks", "cpu", "torch.bfloat16", shapes)
    assert digest == speed.compile_cache_digest(unet, "blocks", "cpu", "torch.bfloat16", dict(shapes))
    others = [
        speed.compile_cache_digest(unet, "full", "cpu", "torch.bfloat16", shapes),
        speed.compile_cache_digest(unet, "blocks", "cpu", "torch.float16", shapes),
        speed.compile_cache_digest(unet, "blocks", "cpu", "torch.bfloat16", {**shapes, "batch": 8}),
        speed.compile_cache_digest(
            unet, "blocks", "cpu", "torch.bfloat16", {**shapes, "lora": [64, 64.0, ["to_q"]]}
        ),
    ]
    assert len({digest, *others}) == 5


def test_regional_compilation_compiles_each_repeated_block(model_cache):
    unet = load_diffusion_pipeline("random:tiny-sd", model_cache).unet
    blocks = [m for m in unet.modules() if type(m).__name__ in speed.REPEATED_BLOCKS]
    assert speed.compile_unet(unet, "off") == 0
    assert speed.compile_unet(unet, "blocks") == len(blocks) > 0
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)
    with pytest.raises(ValueError, match="compile: expected one of off, blocks, full, got 'fast'"):
        speed.compile_unet(unet, "fast")


def test_a_cuda_graph_compiles_the_whole_unet_in_reduce_overhead_mode_and_only_on_cuda(
    model_cache, monkeypatch
):
    """cuda_graph: the whole UNet compiled in inductor's "reduce-overhead" mode (its graph replayed
    as a CUDA graph); never block by block; ``prepare_for_inference`` asks for it on CUDA alone."""
    import torch

    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kwargs: calls.append((type(self).__name__, kwargs))
    )
    pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
    assert speed.compile_unet(pipe.unet, "full", cuda_graph=True) == 1
    assert calls == [("UNet2DConditionModel", {"dynamic": False, "mode": "reduce-overhead"})]
    calls.clear()
    for mode in ("blocks", "off"):
        with pytest.raises(
            ValueError, match=f"cuda_graph: the whole UNet must be compiled .*got compile: {mode}"
        ):
            speed.compile_unet(pipe.unet, mode, cuda_graph=True)
    assert calls == []
    speed.compile_unet(pipe.unet, "full")
    assert calls == [("UNet2DConditionModel", {"dynamic": False})]
    calls.clear()
    speed.prepare_for_inference(pipe, "cpu", compile="full", cuda_graph=True)  # no CUDA graphs there
    assert calls == [("UNet2DConditionModel", {"dynamic": False})]


def test_the_vae_decoder_is_compiled_with_the_unet_when_asked(model_cache, monkeypatch):
    import torch

    calls: list[str] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append(type(self).__name__))
    pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
    assert speed.prepare_for_inference(pipe, "cpu", compile="full", compile_vae=True) == 2
    assert calls == ["UNet2DConditionModel", "Decoder"]
    calls.clear()
    assert speed.prepare_for_inference(pipe, "cpu", compile="off", compile_vae=True) == 0  # nothing compiled
    assert speed.prepare_for_inference(pipe, "cpu", compile="full") == 1 and calls == ["UNet2DConditionModel"]


def test_processes_sharing_a_scratch_folder_load_the_entry_through_files_of_their_own(tmp_path, capsys):
    """torchrun's ranks, or an images job's processes, on one node share the scratch folder and load
    the same entry at the same time: each downloads it to a file of its own, removed afterwards."""
    downloads: list[Path] = []

    class SecondLoadMidway(LocalArtifactStore):
        def download_file(self, key: str, local_path: Path) -> None:
            downloads.append(Path(local_path))
            if len(downloads) == 1:  # another process loads while this one downloads
                assert speed.StoreCompileCache(self, "shared", tmp_path / "scratch").load() is False
            super().download_file(key, local_path)

    store = SecondLoadMidway(tmp_path / "store")
    store.write_bytes(f"{speed.COMPILE_CACHE_PREFIX}/shared.bin", b"not torch's artifacts")
    assert speed.StoreCompileCache(store, "shared", tmp_path / "scratch").load() is False
    assert len(downloads) == 2 and downloads[0] != downloads[1]
    assert list((tmp_path / "scratch" / "compile-cache").iterdir()) == []
    assert capsys.readouterr().err.count("not used: damaged") == 2  # each found the bytes not torch's


def test_auto_compiles_a_small_unet_whole_and_a_large_one_by_blocks_on_cuda_only():
    """SD 1.x (860 M parameters) whole, SDXL (2.6 B) by blocks; the real architectures, built on the
    meta device (shapes, no memory); nothing compiled on the CPU or without a UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from selma_core.models.architectures import unet_config

    with torch.device("meta"):
        sd15, sdxl = (UNet2DConditionModel(**unet_config(arch)) for arch in ("sd15", "sdxl"))
    assert speed.resolve_compile("auto", sd15, "cuda") == "full"
    assert speed.resolve_compile("auto", sdxl, "cuda:1") == "blocks"
    assert speed.resolve_compile("auto", sdxl, "cpu") == "off"
    assert speed.resolve_compile("auto", None, "cuda") == "off"  # a pipeline without a UNet (SD3)
    assert speed.resolve_compile("full", None, "cuda") == "off"
    assert [speed.resolve_compile(m, sdxl, "cpu") for m in speed.COMPILE_MODES] == list(speed.COMPILE_MODES)
    with pytest.raises(ValueError, match="compile: expected one of auto, off, blocks, full, got 'fast'"):
        speed.resolve_compile("fast", sd15, "cuda")
