"""The real Stable Diffusion architectures (SD 1.x, SD 2.x, SDXL) built from their configs, with random
weights: random test models at full size.

For GPU benchmarks where no weights can be downloaded: the compute of a step is the architecture's,
whatever the weights, so throughput measured on these is the real models'. Their images are noise.
The configs are those of the published checkpoints' ``config.json`` files (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0); the tokenizer is the tiny
character-level CLIP tokenizer (77 positions, like CLIP's), so prompts cost the same sequence length.
"""

from __future__ import annotations

from typing import Any, Literal

Arch = Literal["sd15", "sd2", "sdxl"]
ARCHES = ("sd15", "sd2", "sdxl")

_SD_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def unet_config(arch: Arch) -> dict[str, Any]:
    if arch == "sd15":  # 860 M parameters
        return {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
    if arch == "sd2":
        return {
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
        }
    if arch == "sdxl":  # 2.6 B parameters
        return {
            "sample_size": 128,
            "cross_attention_dim": 2048,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        }
    raise ValueError(f"arch: expected one of {', '.join(ARCHES)}, got {arch!r}")


def _vae(arch: Arch):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size={"sd15": 512, "sd2": 768, "sdxl": 1024}[arch],
        scaling_factor=0.13025 if arch == "sdxl" else 0.18215,
        force_upcast=arch == "sdxl",
    )


def _text_encoder(hidden: int, layers: int, heads: int, act: str, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from selma_core.models.random_models import TINY_MAX_TOKENS

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=TINY_MAX_TOKENS,
        hidden_act=act,
        projection_dim=hidden,
        # The tiny tokenizer's ids (its end-of-text token pools the sequence).
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_random_pipeline(arch: Arch, device: str = "cpu", dtype: Any = None):
    """A diffusers pipeline of ``arch`` with random weights, built on ``device`` in ``dtype``.

    Built directly on the device (no CPU copy of billions of random numbers); a DDIM scheduler with
    the model's training betas (SD 2.x predicts v, like stabilityai/stable-diffusion-2-1)."""
    import torch
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from selma_core.models.random_models import tiny_clip_tokenizer

    torch.manual_seed(0)
    prediction = "v_prediction" if arch == "sd2" else "epsilon"
    scheduler = DDIMScheduler(
        **_SD_BETAS, prediction_type=prediction, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(arch))
        vae = _vae(arch)
        if arch == "sdxl":
            text_encoder = _text_encoder(768, 12, 12, "quick_gelu")
            text_encoder_2 = _text_encoder(1280, 32, 20, "gelu", projection=True)
        else:
            text_encoder = _text_encoder(
                *((768, 12, 12, "quick_gelu") if arch == "sd15" else (1024, 23, 16, "gelu"))
            )
    tokenizer = tiny_clip_tokenizer()
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tiny_clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
