"""LoRA adapters in diffusers' format: reading, writing, and the ΔW each layer adds.

An adapter is a folder with ``pytorch_lora_weights.safetensors`` whose keys are
``unet.<module>.lora.down.weight`` (A, rank x in) and ``unet.<module>.lora.up.weight`` (B, out x rank),
and whose safetensors metadata carries the peft ``LoraConfig`` (rank, alpha, targets) under
``lora_adapter_metadata``: exactly what ``pipeline.save_lora_weights`` writes and
``pipeline.load_lora_weights`` reads. A layer's update is ΔW = (alpha / rank) · B·A.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma_core.errors import InputError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
_DOWN = ".lora.down.weight"
_UP = ".lora.up.weight"


@dataclass
class LoraLayer:
    down: Any  # A: (rank, in_features) torch.Tensor
    up: Any  # B: (out_features, rank) torch.Tensor


@dataclass
class LoraAdapter:
    """One adapter: per-module factors plus the config that gives their scale."""

    layers: dict[str, LoraLayer]  # key: module path with its component prefix, e.g. "unet.down_blocks..."
    rank: int
    alpha: float
    use_rslora: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # the full peft LoraConfig dict
    # peft's per-layer exceptions to rank and alpha, keyed by module name (without "unet.").
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """The scale of layers without a pattern entry."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    def layer_scale(self, module: str) -> float:
        rank = _pattern_value(self.rank_pattern, module, self.rank)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def delta(self, module: str):
        """ΔW of one module, as the loaded adapter adds it to the frozen weight."""
        layer = self.layers[module]
        return self.layer_scale(module) * (layer.up.float() @ layer.down.float())


def _pattern_value(pattern: dict, module: str, default: Any) -> Any:
    """peft's rule: a pattern key applies to a module whose name is the key or ends with ``.key``."""
    name = module.removeprefix("unet.")
    for key, value in pattern.items():
        if name == key or name.endswith("." + key):
            return value
    return default


def lora_config_dict(
    rank: int, alpha: float, target_modules: list[str], init: str | bool = "gaussian"
) -> dict:
    """The peft ``LoraConfig`` as the metadata dict diffusers expects."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=init)
    data = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read an adapter folder (or its safetensors file) written by ``save_adapter`` or diffusers."""
    from safetensors import safe_open

    path = Path(path)
    file = path / WEIGHT_NAME if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"LoRA adapter {path}: no {WEIGHT_NAME} in it")
    if file.suffix != ".safetensors":
        raise InputError(f"LoRA adapter {file}: only safetensors files are read (pickle files can run code)")
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        metadata = f.metadata() or {}
    raw = metadata.get(METADATA_KEY)
    if not raw:
        raise InputError(f"LoRA adapter {file}: no '{METADATA_KEY}' metadata (rank and alpha unknown)")
    packed = json.loads(raw)
    config = {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith("unet.")}
    layers: dict[str, LoraLayer] = {}
    for key, tensor in tensors.items():
        if key.endswith(_DOWN):
            module = key[: -len(_DOWN)]
            up = tensors.get(module + _UP)
            if up is None:
                raise InputError(f"LoRA adapter {file}: {key} has no matching {module + _UP}")
            layers[module] = LoraLayer(down=tensor, up=up)
        elif not key.endswith(_UP):
            raise InputError(f"LoRA adapter {file}: unexpected tensor {key!r} (not diffusers' LoRA format)")
    if not layers:
        raise InputError(f"LoRA adapter {file}: no LoRA layers in it")
    return LoraAdapter(
        layers=layers,
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora", False)),
        config=config,
        rank_pattern={k: int(v) for k, v in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
    )


def save_adapter(adapter: LoraAdapter, path: str | Path, pipeline_class: Any = None) -> Path:
    """Write ``adapter`` as diffusers' ``save_lora_weights`` does, so ``load_lora_weights`` reads it."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipeline_class = pipeline_class or StableDiffusionPipeline
    unet_layers: dict[str, torch.Tensor] = {}
    for module, layer in adapter.layers.items():
        name = module.removeprefix("unet.")
        unet_layers[name + _DOWN] = layer.down.contiguous()
        unet_layers[name + _UP] = layer.up.contiguous()

    def number(value: float) -> float | int:
        return int(value) if float(value).is_integer() else value

    config = {
        **adapter.config,
        "r": adapter.rank,
        "lora_alpha": number(adapter.alpha),
        "use_rslora": adapter.use_rslora,
        "rank_pattern": dict(adapter.rank_pattern),
        "alpha_pattern": {k: number(v) for k, v in adapter.alpha_pattern.items()},
    }
    pipeline_class.save_lora_weights(
        str(path), unet_lora_layers=unet_layers, unet_lora_adapter_metadata=config, safe_serialization=True
    )
    return Path(path)
