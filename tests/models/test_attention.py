"""The attention kernel: the shapes a UNet's attention has, measuring the backends on them, choosing
one only when clearly faster, keeping the choice in the store, and running work under it.

On the CPU PyTorch has two of its backends (flash and math), so measuring runs for real there; the
real SD 1.x and SDXL architectures are recorded on the meta device (shapes, no memory)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch.nn.attention import SDPBackend

from selma_core.models import attention
from selma_core.models.attention import AttentionShape, choose_backend, resolve_attention, sdpa_backend
from selma_core.storage import LocalArtifactStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = Counter({AttentionShape(2, 64, 64, 8): 3, AttentionShape(2, 64, 7, 8): 1})


def test_the_real_architectures_attention_shapes():
    """SD 1.x at 512 px: 8 heads, 40 wide at 4,096 tokens (5 self- and 5 cross-attentions), 80 at
    1,024, 160 at 256 and in the middle; SDXL at 1024 px: 64-wide heads, 10 transformer layers per
    block at 4,096 tokens and 60 at 1,024."""
    from diffusers import UNet2DConditionModel

    from selma_core.models.architectures import unet_config

    with torch.device("meta"):
        sd15, sdxl = (UNet2DConditionModel(**unet_config(arch)) for arch in ("sd15", "sdxl"))
    assert attention.attention_shapes(sd15, (64, 64), 77) == Counter(
        {
            AttentionShape(8, 4096, 4096, 40): 5,
            AttentionShape(8, 4096, 77, 40): 5,
            AttentionShape(8, 1024, 1024, 80): 5,
            AttentionShape(8, 1024, 77, 80): 5,
            AttentionShape(8, 256, 256, 160): 5,
            AttentionShape(8, 256, 77, 160): 5,
            AttentionShape(8, 64, 64, 160): 1,
            AttentionShape(8, 64, 77, 160): 1,
        }
    )
    assert attention.attention_shapes(sdxl, (128, 128), 77) == Counter(
        {
            AttentionShape(10, 4096, 4096, 64): 10,
            AttentionShape(10, 4096, 77, 64): 10,
            AttentionShape(20, 1024, 1024, 64): 60,
            AttentionShape(20, 1024, 77, 64): 60,
        }
    )


def test_measuring_times_every_backend_that_runs_and_leaves_out_those_that_cannot():
    """On the CPU: PyTorch's choice, flash and math measured (forward and backward), cuDNN left out
    with PyTorch's reason."""
    choice = choose_backend(SMALL, 2, torch.float32, "cpu", True, ("flash", "math", "cudnn"), repeats=2)
    assert set(choice.measured_ms) == {"default", "flash", "math", "cudnn"}
    assert all(choice.measured_ms[name] > 0 for name in ("default", "flash", "math"))
    assert choice.measured_ms["cudnn"] is None and choice.excluded["cudnn"].startswith(
        "runs none of the shapes"
    )
    fastest = min(("default", "flash", "math"), key=choice.measured_ms.__getitem__)
    assert choice.backend in ("default", fastest)


@pytest.mark.parametrize(
    "times, outputs_differ, expected",
    [
        ({"default": 1.0, "flash": 0.98, "math": 2.0}, False, "default"),  # 2% faster: noise
        ({"default": 1.0, "flash": 0.9, "math": 0.7}, False, "math"),
        ({"default": 1.0, "flash": 0.9, "math": 0.7}, True, "default"),  # wrong numbers never win
    ],
)
def test_a_backend_replaces_pytorchs_choice_only_when_clearly_faster_and_right(
    monkeypatch, times, outputs_differ, expected
):
    def in_force() -> str:
        """The backend measured now: one enabled alone, or PyTorch's choice among all of them."""
        flags = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
            "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        }
        enabled = [name for name, on in flags.items() if on]
        return enabled[0] if len(enabled) == 1 else "default"

    def run(shape, batch, dtype, device, backward, repeats):
        name = in_force()
        wrong = outputs_differ and name != "default"
        return times[name] / 4, (torch.ones(2) + wrong,)

    monkeypatch.setattr(attention, "_run", run)
    choice = choose_backend(SMALL, 2, torch.float32, "cpu", False, ("flash", "math"))
    assert choice.backend == expected
    if outputs_differ:
        assert choice.excluded == {
            name: "shape 2x64x7x8: its outputs differ from PyTorch's own choice's"
            for name in ("flash", "math")
        }


def test_a_shape_a_backend_cannot_run_counts_at_pytorchs_time(monkeypatch):
    """sdpa_backend falls back to PyTorch's order there: flash, 4x faster on the three calls it runs
    and unable to run the fourth, is 1.6x faster in all."""

    def run(shape, batch, dtype, device, backward, repeats):
        flash_alone = not torch.backends.cuda.math_sdp_enabled()
        if flash_alone and shape.key_len == 7:
            raise RuntimeError("No available kernel. Aborting execution.")
        return (0.25 if flash_alone else 1.0), (torch.ones(2),)

    monkeypatch.setattr(attention, "_run", run)
    choice = choose_backend(SMALL, 2, torch.float32, "cpu", False, ("flash",))
    assert choice.backend == "flash" and choice.measured_ms == {"default": 4000.0, "flash": 1750.0}
    assert choice.unsupported == {"flash": ["2x64x7x8"]} and choice.excluded == {}
    assert choice.per_shape_ms == {
        "2x64x7x8": {"default": 1000.0, "flash": None},
        "2x64x64x8": {"default": 1000.0, "flash": 250.0},
    }


def kernels_run(context) -> set[str]:
    """The aten ops one attention call runs under ``context``."""
    q = torch.randn(1, 2, 16, 8)
    with torch.profiler.profile() as profile, context:
        F.scaled_dot_product_attention(q, q, q)
    return {event.name for event in profile.events()}


def test_work_runs_under_the_chosen_backend_first_and_pytorchs_order_returns_after():
    """The chosen backend first, PyTorch's others after it in its order (CUDA's dispatch follows that
    order; the CPU's keeps its own, flash before math). Measuring runs a backend alone: the CPU's
    kernels show it."""
    before = torch._C._get_sdp_priority_order()
    with sdpa_backend("math"):
        assert torch._C._get_sdp_priority_order()[:3] == [int(SDPBackend.MATH), *before[:2]]
        assert torch.backends.cuda.flash_sdp_enabled()  # the fallback for shapes math cannot run
    assert torch._C._get_sdp_priority_order() == before
    with sdpa_backend("default"):
        assert torch._C._get_sdp_priority_order() == before
    flash_op = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert flash_op in kernels_run(attention._only("flash"))
    assert flash_op not in kernels_run(attention._only("math"))
    assert flash_op in kernels_run(attention._only("default"))
    with pytest.raises(ValueError, match="expected one of auto, default, flash, efficient, cudnn, math"):
        attention.backend_enum("xformers")


def test_auto_measures_once_and_every_later_job_reads_the_choice_from_the_store(
    tmp_path, model_cache, monkeypatch
):
    from selma_core.models.loading import load_diffusion_pipeline

    unet = load_diffusion_pipeline("random:tiny-sd", model_cache).unet
    store = LocalArtifactStore(tmp_path / "store")
    measured = []
    real = attention.choose_backend

    def counting(*args, **kwargs):
        measured.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "choose_backend", counting)
    settings = dict(batch=2, size=(16, 16), text_len=77, backward=True, store=store)
    # Named kernels are themselves; auto is PyTorch's own on the CPU: nothing measured.
    assert resolve_attention("math", unet, "cpu", **settings).backend == "math"
    assert resolve_attention("auto", unet, "cpu", **settings).backend == "default"
    assert measured == [] and store.list_keys("cache/attention") == []
    first = resolve_attention("auto", unet, "cpu", candidates=("flash", "math"), **settings)
    assert len(measured) == 1 and measured[0] == attention.attention_shapes(unet, (16, 16), 77)
    [key] = store.list_keys("cache/attention")
    again = resolve_attention("auto", unet, "cpu", candidates=("flash", "math"), **settings)
    assert len(measured) == 1 and again.from_store and again.backend == first.backend
    assert again.measured_ms == first.measured_ms
    # Another batch is another measurement.
    resolve_attention("auto", unet, "cpu", candidates=("flash", "math"), **{**settings, "batch": 4})
    assert len(measured) == 2 and len(store.list_keys("cache/attention")) == 2
    with pytest.raises(ValueError, match="got 'fastest'"):
        resolve_attention("fastest", unet, "cpu", **settings)


def test_a_damaged_stored_choice_is_reported_and_measured_again(tmp_path, model_cache, capsys):
    from selma_core.models.loading import load_diffusion_pipeline

    unet = load_diffusion_pipeline("random:tiny-sd", model_cache).unet
    store = LocalArtifactStore(tmp_path / "store")
    settings = dict(batch=2, size=(16, 16), text_len=77, backward=False, store=store, candidates=("math",))
    resolve_attention("auto", unet, "cpu", **settings)
    [key] = store.list_keys("cache/attention")
    store.write_bytes(key, b"{not json")
    choice = resolve_attention("auto", unet, "cpu", **settings)
    assert not choice.from_store and choice.measured_ms["math"] > 0
    assert f"warning: attention choice {store.url(key)} not used" in capsys.readouterr().err
    assert resolve_attention("auto", unet, "cpu", **settings).from_store  # saved again


COMPILE_UNDER = """
import sys
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from selma_core.models.attention import sdpa_backend

attend = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q) * 2)
with sdpa_backend(sys.argv[1]):
    attend(torch.randn(1, 2, 8, 4))
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


@pytest.mark.slow
def test_a_graph_compiled_under_one_kernel_is_not_another_kernels_cache_hit(tmp_path):
    """Inductor's on-disk cache keys a graph by its code: sdpa_backend tags the key with the kernel,
    so a process under another kernel compiles its own graph instead of running the cached one."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    env["OMP_NUM_THREADS"] = "1"

    def hits_and_misses(kernel: str) -> list[int]:
        done = subprocess.run(
            [sys.executable, "-c", COMPILE_UNDER, kernel], capture_output=True, text=True, cwd=REPO, env=env
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return [int(n) for n in done.stdout.split()]

    assert hits_and_misses("math") == [0, 1]
    assert hits_and_misses("flash") == [0, 1]  # not math's graph
    assert hits_and_misses("math") == [1, 0]
    with sdpa_backend("cudnn"):
        assert torch.compiler.config.cache_key_tag == "sdpa:cudnn"
    assert torch.compiler.config.cache_key_tag == ""
