"""Test helper: what a LoRA adapter really does to a UNet, measured through diffusers itself."""

from __future__ import annotations

import torch

from selma_core.models.loading import load_diffusion_pipeline

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def fused_deltas(model_cache, adapter_dir) -> dict[str, torch.Tensor]:
    """ΔW per adapted Linear as diffusers applies it: fuse_lora() weights minus the base weights."""
    base = load_diffusion_pipeline("random:tiny-sd", model_cache)
    before = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
    pipe.load_lora_weights(str(adapter_dir))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    deltas = {}
    for name, param in pipe.unet.named_parameters():
        if name in before and any(f".{t}.weight" in f".{name}" for t in TARGETS):
            deltas[name] = param.detach() - before[name]
    return deltas


def trained_like_expert(model_cache, seed: int, rank: int, alpha: float, path):
    """A LoRA on the tiny UNet with random non-zero factors, saved the way diffusers saves LoRAs."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="gaussian")
    pipe.unet.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(
        str(path), unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
    )
    return path
