"""The full-size architectures the GPU benchmarks build with random weights are the published
models' shapes: their parameter counts are those of the released checkpoints."""

from __future__ import annotations

import pytest

from selma_core.models.architectures import build_random_pipeline, unet_config


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("arch", "unet", "text"),
    [
        ("sd15", 859_520_964, [123_060_480]),  # CLIP ViT-L/14 text encoder
        ("sd2", 865_910_724, [340_387_840]),  # OpenCLIP ViT-H/14
        ("sdxl", 2_567_463_684, [123_060_480, 694_659_840]),  # + OpenCLIP ViT-bigG/14
    ],
)
def test_random_architectures_have_the_published_parameter_counts(arch, unet, text):
    pipe = build_random_pipeline(arch, device="meta")  # shapes only: no memory, no compute
    assert parameters(pipe.unet) == unet
    assert parameters(pipe.vae) == 83_653_863
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    assert [parameters(e) for e in encoders] == text
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if arch == "sd2" else "epsilon")
    assert (
        pipe.unet.config.sample_size * pipe.vae_scale_factor == {"sd15": 512, "sd2": 768, "sdxl": 1024}[arch]
    )


def test_an_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="arch: expected one of sd15, sd2, sdxl, got 'sd3'"):
        unet_config("sd3")
