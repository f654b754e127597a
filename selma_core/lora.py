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
# diffusers' save_lora_weights after convert_state_dict_to_diffusers renames the attention
# projections' factors only; any other module keeps peft's names. Both spellings are read.
_SPELLINGS = ((_DOWN, _UP), (".lora_A.weight", ".lora_B.weight"))


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


# Pickle checkpoints: reading one can run arbitrary code, so they are refused unless opted in.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_WEIGHT_NAME = "pytorch_lora_weights.bin"  # diffusers' legacy name
PICKLE_OPT_IN = (
    "convert it to safetensors, or set allow_pickle_checkpoints: true in the pipeline config to read "
    "it with torch.load(weights_only=True)"
)


def load_adapter(path: str | Path, allow_pickle: bool = False) -> LoraAdapter:
    """Read an adapter folder (or its safetensors file) written by ``save_adapter`` or diffusers.

    Only safetensors is read, unless ``allow_pickle`` (the config's ``allow_pickle_checkpoints``):
    then a pickle checkpoint (``.bin``, ``.pt``, ...; a state dict in diffusers' keys, scale 1 as
    diffusers reads one without metadata) is read with ``torch.load(weights_only=True)``.
    Anything unreadable or not a LoRA in diffusers' format is an ``InputError`` naming the file.
    """
    path = Path(path)
    file = path
    if path.is_dir():
        file = path / WEIGHT_NAME
        if not file.is_file() and (path / PICKLE_WEIGHT_NAME).is_file():
            file = path / PICKLE_WEIGHT_NAME
    if not file.is_file():
        raise InputError(f"LoRA adapter {path}: no {WEIGHT_NAME} in it")
    if file.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InputError(
                f"LoRA adapter {file}: a pickle checkpoint, which can run arbitrary code when read; "
                f"only safetensors files are read: {PICKLE_OPT_IN}"
            )
        return _load_pickled_adapter(file)
    if file.suffix != ".safetensors":
        raise InputError(
            f"LoRA adapter {file}: expected a .safetensors file, got {file.suffix or 'no suffix'}"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors' errors: garbage, truncated, a header that lies
        raise InputError(f"LoRA adapter {file}: expected a safetensors file, cannot read it: {e}") from e
    raw = metadata.get(METADATA_KEY)
    if not raw:
        raise InputError(f"LoRA adapter {file}: no '{METADATA_KEY}' metadata (rank and alpha unknown)")
    try:
        packed = json.loads(raw)
        config = {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith("unet.")}
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        rank_pattern = {k: int(v) for k, v in (config.get("rank_pattern") or {}).items()}
        alpha_pattern = {k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
    except json.JSONDecodeError as e:
        raise InputError(f"LoRA adapter {file}: '{METADATA_KEY}' metadata: expected JSON: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(
            f"LoRA adapter {file}: '{METADATA_KEY}' metadata: expected unet.r (rank) and unet.lora_alpha "
            f"numbers: {e!r}"
        ) from e
    adapter = LoraAdapter(
        layers=_lora_layers(file, tensors),
        rank=rank,
        alpha=alpha,
        use_rslora=bool(config.get("use_rslora", False)),
        config=config,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    for module, layer in adapter.layers.items():
        expected = _pattern_value(adapter.rank_pattern, module, adapter.rank)
        if layer.down.shape[0] != expected:
            raise InputError(
                f"LoRA adapter {file}: {module} has rank {layer.down.shape[0]}, but its metadata says "
                f"r={expected}"
            )
    return adapter


def _lora_layers(file: Path, tensors: dict) -> dict[str, LoraLayer]:
    """(down, up) pairs by module, checked: diffusers' keys (or peft's, which diffusers writes for
    modules other than the attention projections), matching ranks, Linear layers' 2-D factors."""
    import torch

    layers: dict[str, LoraLayer] = {}
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise InputError(
                f"LoRA adapter {file}: expected tensors by name, got {key!r}: {type(tensor).__name__}"
            )
        spelling = next(((d, u) for d, u in _SPELLINGS if key.endswith(d) or key.endswith(u)), None)
        if spelling is None:
            raise InputError(f"LoRA adapter {file}: unexpected tensor {key!r} (not diffusers' LoRA format)")
        down_suffix, up_suffix = spelling
        if key.endswith(up_suffix):  # read with its down factor, which must be there
            if key[: -len(up_suffix)] + down_suffix not in tensors:
                raise InputError(
                    f"LoRA adapter {file}: {key} has no matching {key[: -len(up_suffix)] + down_suffix}"
                )
            continue
        module = key[: -len(down_suffix)]
        up = tensors.get(module + up_suffix)
        if up is None:
            raise InputError(f"LoRA adapter {file}: {key} has no matching {module + up_suffix}")
        if tensor.dim() != 2 or up.dim() != 2:
            raise InputError(
                f"LoRA adapter {file}: {module}: down {tuple(tensor.shape)} and up {tuple(up.shape)}: "
                "only LoRA layers of Linear modules (2-D factors) are supported"
            )
        if tensor.shape[0] != up.shape[1]:
            raise InputError(
                f"LoRA adapter {file}: {module}: down {tuple(tensor.shape)} and up {tuple(up.shape)} "
                "do not match; expected down (rank, in) and up (out, rank) of one rank"
            )
        if module in layers:
            raise InputError(f"LoRA adapter {file}: {module} has LoRA factors under two spellings")
        layers[module] = LoraLayer(down=tensor, up=up)
    if not layers:
        raise InputError(f"LoRA adapter {file}: no LoRA layers in it")
    return layers


def _load_pickled_adapter(file: Path) -> LoraAdapter:
    """A pickle checkpoint the user opted in to, read without running code: ``weights_only=True``."""
    import torch

    from selma_core.merging import _unit_scale_adapter

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for any object that is not plain tensors and containers
        raise InputError(
            f"LoRA adapter {file}: refused by torch.load(weights_only=True), which reads tensors only: {e}"
        ) from e
    if not isinstance(state, dict):
        raise InputError(f"LoRA adapter {file}: expected a state dict of tensors, got {type(state).__name__}")
    layers = _lora_layers(file, state)
    names = sorted(module.removeprefix("unet.") for module in layers)
    return _unit_scale_adapter(layers, {"target_modules": names})


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
    canonical_safetensors(Path(path) / WEIGHT_NAME)
    return Path(path)


def canonical_safetensors(path: str | Path) -> None:
    """Put a safetensors file's metadata in key order, in place, so the same tensors and metadata
    are the same bytes. safetensors writes ``__metadata__`` from a Rust HashMap, whose order
    changes from one process to the next; an adapter's SHA-256 is what tells a registered version's
    weights from another's (a merge retried after registering must find its version).

    The header is rewritten at its length (padded with spaces, as safetensors pads it): the
    tensors' offsets, counted from its end, stay where they are."""
    import struct

    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        metadata = header.get("__metadata__")
        if not isinstance(metadata, dict) or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > length:  # not written as safetensors writes: left as it is
            return
        f.seek(8)
        f.write(canonical.ljust(length, b" "))
