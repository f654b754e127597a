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
