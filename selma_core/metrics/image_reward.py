"""ImageReward (Xu et al., *ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation*, 2023): a human-preference reward of an image for its prompt, with transformers classes.

The model, as upstream's ``ImageReward.score`` (``THUDM/ImageReward``, ``ImageReward/ImageReward.py``)
computes it:

1. the image: resized so its shorter side is 224 px (PIL bicubic), center-cropped to 224 x 224
   (torchvision's ``Resize``/``CenterCrop`` arithmetic), *then* converted to RGB, scaled to [0, 1]
   and normalised with the CLIP/BLIP mean and std (``preprocess``);
2. BLIP's ViT-L/16 (24 layers, 1024 wide, 16 heads) embeds it: all tokens, after the last LayerNorm;
3. the prompt: bert-base-uncased with BLIP's added tokens (``[DEC]`` as bos, ``[ENC]``), padded to
   ``max_length`` 35, truncated. The ids are used *as the tokenizer gives them*: the first token stays
   ``[CLS]`` (BLIP's retrieval code swaps it for ``[ENC]``; ImageReward's ``score`` does not);
4. BLIP's BERT-base text encoder (``med_config.json``) reads the prompt with cross-attention to every
   image token (an all-ones image mask); its output at position 0 (``[CLS]``), in float32,
5. goes through the MLP head: Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
   Dropout, Linear(64, 16), Linear(16, 1) (no activations: upstream commented them out), and
6. reward = (head output - 0.16717362830052426) / 1.0333394966054072 (upstream's constants).

In transformers the ViT is a ``BlipVisionModel`` (its ``qkv``/``projection`` layout is BLIP's own) and
the text encoder a ``BlipTextModel`` without pooler whose config has ``is_decoder`` set: that is what
gives its layers the cross-attention block (it still runs bidirectionally: ``is_decoder=False`` at call
time, BLIP's ``mode='multimodal'``). Both are the modules of ``BlipForImageTextRetrieval``.

**Checkpoint.** Upstream publishes ``ImageReward.pt`` (a pickle of the whole model's ``state_dict``)
and ``med_config.json`` on the hub repository ``THUDM/ImageReward``. This project reads weights from
safetensors only, so ``python -m selma_core.metrics.image_reward convert`` turns them into a
self-contained *converted folder*, read with ``torch.load(weights_only=True)`` (tensors only: a pickle
cannot run code through it):

- ``vision_model/`` and ``text_encoder/``: each a transformers ``config.json`` + ``model.safetensors``
  (loaded with ``from_pretrained``, safetensors only, every key checked);
- ``head.safetensors``: the MLP head, upstream's ``mlp.layers.{0,2,4,6,7}`` as ``layers.N``;
- ``image_reward.json``: mean, std, max_length, image size/mean/std and where the weights came from;
- the tokenizer files (bert-base-uncased plus ``[DEC]``/``[ENC]``, as BLIP's ``init_tokenizer``).

Every key of the checkpoint is accounted for (``rename_upstream_keys``): renamed, or dropped on
purpose (BLIP's contrastive projections ``blip.vision_proj``/``blip.text_proj``, which ``score`` never
uses, and the text ``position_ids`` buffer, which transformers rebuilds); any other key, or a missing
one, is an error naming it. The ViT's head count is not in the weights: BLIP's ViTs (base and large)
all have 64-wide heads, so it is width / 64; its LayerNorm eps is BLIP's 1e-6.

``ImageRewardScorer`` loads a converted folder, ``random:tiny-image-reward`` (random weights in the same
format: the scores test plumbing and mean nothing), or the hub id ``THUDM/ImageReward``: that one only
with ``allow_pickle`` (the project's ``allow_pickle_checkpoints`` opt-in); it is then fetched with the
hub client (with ``HF_HUB_OFFLINE=1`` from the local Hugging Face cache only; bert-base-uncased's
tokenizer likewise) and converted once into ``cache_dir`` with ``weights_only=True``. Nothing is ever
downloaded otherwise; a missing asset is a ``ConfigError`` (an ``EndpointError`` when the hub is
unreachable) that names it and says how to provide it.

``version`` (the answer cache's key): the model reference (converted folder, ``random:NAME#vN`` or
``THUDM/ImageReward@commit``) + weights dtype + autocast dtype. Upstream computes in float32; the
default bfloat16 autocast on CUDA (as for PickScore) rounds the encoders' arithmetic (the head always
runs in float32): pass ``autocast_dtype=None`` to compute as upstream does.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma_core.errors import ConfigError, EndpointError, SelmaError
from selma_core.metrics.scoring import BatchedScorer

__all__ = [
    "BLIP_TOKENIZER",
    "IMAGE_REWARD_MODEL",
    "ConvertedWeights",
    "ImageRewardScorer",
    "blip_tokenizer",
    "build_head",
    "convert_checkpoint",
    "load_converted",
    "preprocess",
    "rename_upstream_keys",
    "resolve_image_reward",
    "save_converted",
]

log = logging.getLogger(__name__)

IMAGE_REWARD_MODEL = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
#: BLIP's ``init_tokenizer`` starts from this tokenizer (upstream's name for it).
BLIP_TOKENIZER = "bert-base-uncased"

#: Upstream's reward normalisation (``ImageReward.__init__``: ``self.mean``, ``self.std``).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
#: Upstream's tokenizer call: ``padding='max_length', truncation=True, max_length=35``.
MAX_LENGTH = 35
#: Upstream's ``_transform``: CLIP's normalisation constants.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
#: BLIP's ViT (``models/vit.py``): ``partial(nn.LayerNorm, eps=1e-6)``, GELU, qkv bias, 64-wide heads.
VISION_LAYER_NORM_EPS = 1e-6
VISION_HEAD_DIM = 64

FOLDER_FORMAT = "selma-image-reward"
FOLDER_FORMAT_VERSION = 1
META_FILE = "image_reward.json"
VISION_DIR = "vision_model"
TEXT_DIR = "text_encoder"
HEAD_FILE = "head.safetensors"
#: The Linear layers of upstream's ``MLP.layers`` (Dropouts sit at 1, 3 and 5) and their dropout rates.
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)
HEAD_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}

_CONVERT_HINT = (
    f"convert upstream's {CHECKPOINT_FILE} + {MED_CONFIG_FILE} (from the hub repository "
    f"{IMAGE_REWARD_MODEL}) with `python -m selma_core.metrics.image_reward convert --checkpoint "
    f"{CHECKPOINT_FILE} --med-config {MED_CONFIG_FILE} --out DIR` and give DIR"
)


# -- the pieces -----------------------------------------------------------------------------------


def build_head(widths: Sequence[int]) -> Any:
    """Upstream's ``MLP.layers`` for ``widths`` = (input, 1024, 128, 64, 16, 1) in ImageReward: five
    Linear layers at the indices of ``HEAD_LINEAR_INDICES``, Dropouts between the first four, and no
    activation (upstream commented the ReLUs out), so the state dict keys match upstream's."""
    from torch import nn

    if len(widths) != len(HEAD_LINEAR_INDICES) + 1:
        raise ConfigError(f"image_reward: the head needs {len(HEAD_LINEAR_INDICES) + 1} widths, got {widths}")
    layers: list[nn.Module] = []
    linear = 0
    for index in range(HEAD_LINEAR_INDICES[-1] + 1):
        if index in HEAD_LINEAR_INDICES:
            layers.append(nn.Linear(widths[linear], widths[linear + 1]))
            linear += 1
        else:
            layers.append(nn.Dropout(HEAD_DROPOUTS[index]))
    head = nn.Sequential()
    head.add_module("layers", nn.Sequential(*layers))
    return head


def _head_widths(state: Mapping[str, Any], where: str) -> list[int]:
    """The head's widths from its weights (``layers.N.weight``/``bias``), every key checked."""
    expected = {f"layers.{i}.{p}" for i in HEAD_LINEAR_INDICES for p in ("weight", "bias")}
    if set(state) != expected:
        missing = sorted(expected - set(state))
        extra = sorted(set(state) - expected)
        raise ConfigError(f"image_reward: {where}: head weights missing {missing}, unexpected {extra}")
    widths = [int(state[f"layers.{HEAD_LINEAR_INDICES[0]}.weight"].shape[1])]
    for i in HEAD_LINEAR_INDICES:
        weight = state[f"layers.{i}.weight"]
        if weight.ndim != 2 or weight.shape[1] != widths[-1]:
            raise ConfigError(f"image_reward: {where}: head layer {i} has shape {tuple(weight.shape)}")
        widths.append(int(weight.shape[0]))
    if widths[-1] != 1:
        raise ConfigError(f"image_reward: {where}: the head must end in one output, not {widths[-1]}")
    return widths


def blip_tokenizer(tokenizer: Any) -> Any:
    """BLIP's ``init_tokenizer``: ``[DEC]`` added as the bos token and ``[ENC]`` as an additional
    special token (a no-op for a tokenizer that has them already)."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.padding_side = "right"  # the reward is read at position 0, which must be [CLS]
    return tokenizer


def _open_image(image: Any) -> Any:
    """A PIL image as given (file bytes are opened); not converted yet: upstream converts after cropping."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or image file bytes, got {type(image).__name__}")
    return image


def preprocess(
    image: Any,
    size: int = 224,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> Any:
    """Upstream's ``_transform(size)`` without torchvision: a float32 (3, size, size) tensor.

    ``Resize(size, BICUBIC)`` on a PIL image: the shorter side becomes ``size``, the longer
    ``int(size * long / short)``, PIL bicubic; ``CenterCrop(size)``: offsets ``round((side - size) / 2)``;
    then RGB, ``ToTensor`` (/255) and ``Normalize``, in that order, as upstream does them.
    """
    import numpy as np
    import torch
    from PIL import Image

    image = _open_image(image)
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != (width, height):
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return pixels.sub_(mean_t).div_(std_t)


# -- upstream's key names -> the converted folder -------------------------------------------------

# (upstream name after "blip.visual_encoder.", BlipVisionModel name): re.fullmatch, then expand.
_VISION_RULES = (
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
)
# BLIP's med.py BertModel and transformers' BlipTextModel share their names (the latter was ported
# from the former): these are the names that exist, anything else is unknown.
_TEXT_RULES = (
    r"embeddings\.(word_embeddings|position_embeddings)\.weight",
    r"embeddings\.LayerNorm\.(weight|bias)",
    r"encoder\.layer\.\d+\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
    r"encoder\.layer\.\d+\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
    r"encoder\.layer\.\d+\.intermediate\.dense\.(weight|bias)",
    r"encoder\.layer\.\d+\.output\.(dense|LayerNorm)\.(weight|bias)",
)
# Known and deliberately not converted: BLIP's image-text contrastive projections (ImageReward's score
# never uses them) and med.py's persistent position_ids buffer (an arange transformers rebuilds).
_DROPPED_RULES = (
    r"blip\.(vision_proj|text_proj)\.(weight|bias)",
    r"blip\.text_encoder\.embeddings\.position_ids",
)
_HEAD_RULE = r"mlp\.layers\.(\d+)\.(weight|bias)"


@dataclass
class ConvertedWeights:
    """A checkpoint's tensors under the converted folder's names; ``dropped``: upstream keys left out
    on purpose (see ``_DROPPED_RULES``)."""

    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)


def rename_upstream_keys(state_dict: Mapping[str, Any]) -> ConvertedWeights:
    """Sort every key of upstream's ``ImageReward`` state dict into the vision model, the text encoder,
    the head or the deliberately dropped; a key no rule knows is a ``ConfigError`` naming it (upstream
    loads with ``strict=False``, which would hide a mismatch: here nothing is silently ignored)."""
    out = ConvertedWeights()
    unknown: list[str] = []
    for key, value in state_dict.items():
        if any(re.fullmatch(rule, key) for rule in _DROPPED_RULES):
            out.dropped.append(key)
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder.") :]
            for pattern, target in _VISION_RULES:
                match = re.fullmatch(pattern, rest)
                if match:
                    out.vision[match.expand(target)] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            rest = key[len("blip.text_encoder.") :]
            if any(re.fullmatch(rule, rest) for rule in _TEXT_RULES):
                out.text[rest] = value
            else:
                unknown.append(key)
        elif (match := re.fullmatch(_HEAD_RULE, key)) and int(match.group(1)) in HEAD_LINEAR_INDICES:
            out.head[f"layers.{match.group(1)}.{match.group(2)}"] = value
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ConfigError(
            f"image_reward: {len(unknown)} checkpoint key(s) that the ImageReward key mapping does not know: "
            f"{shown} (is this upstream's {CHECKPOINT_FILE}?)"
        )
    return out


def _vision_config(weights: Mapping[str, Any]) -> Any:
    """BlipVisionConfig from the ViT's weights (width, depth, patch and image size, MLP width); heads =
    width / 64, as in every BLIP ViT."""
    from transformers import BlipVisionConfig

    try:
        width = int(weights["embeddings.class_embedding"].shape[-1])
        patch = int(weights["embeddings.patch_embedding.weight"].shape[-1])
        positions = int(weights["embeddings.position_embedding"].shape[1])
        intermediate = int(weights["encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise ConfigError(f"image_reward: the checkpoint has no vision weight {e.args[0]!r}") from e
    depth = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers."))
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1 or width % VISION_HEAD_DIM:
        raise ConfigError(
            f"image_reward: not a BLIP ViT: {positions} positions, width {width} "
            f"(its heads are {VISION_HEAD_DIM} wide)"
        )
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=depth,
        num_attention_heads=width // VISION_HEAD_DIM,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        initializer_range=0.02,
    )


def _text_config(med: Mapping[str, Any], encoder_width: int, tokenizer: Any) -> Any:
    """BlipTextConfig from BLIP's ``med_config.json`` (a BERT config). ``encoder_width`` is the ViT's
    width: BLIP_Pretrain overwrites the file's ``encoder_width`` with it, and so does this."""
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", True):
        raise ConfigError(
            "image_reward: med_config has add_cross_attention false; ImageReward's text encoder needs it"
        )
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"image_reward: unsupported position_embedding_type {med['position_embedding_type']!r}"
        )
    try:
        return BlipTextConfig(
            vocab_size=int(med["vocab_size"]),
            hidden_size=int(med["hidden_size"]),
            encoder_hidden_size=int(encoder_width),
            intermediate_size=int(med["intermediate_size"]),
            num_hidden_layers=int(med["num_hidden_layers"]),
            num_attention_heads=int(med["num_attention_heads"]),
            max_position_embeddings=int(med["max_position_embeddings"]),
            hidden_act=str(med.get("hidden_act", "gelu")),
            layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
            hidden_dropout_prob=float(med.get("hidden_dropout_prob", 0.0)),
            attention_probs_dropout_prob=float(med.get("attention_probs_dropout_prob", 0.0)),
            initializer_range=float(med.get("initializer_range", 0.02)),
            pad_token_id=int(med.get("pad_token_id", tokenizer.pad_token_id)),
            bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
            is_decoder=True,  # gives every layer its cross-attention block (BLIP's add_cross_attention)
        )
    except KeyError as e:
        raise ConfigError(f"image_reward: med_config has no {e.args[0]!r}") from e


def _load_strict(module: Any, weights: Mapping[str, Any], what: str) -> None:
    """``load_state_dict`` that names every missing, unexpected or misshapen weight in a ConfigError."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"image_reward: the {what} weights do not fit the architecture: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
        )
    try:
        module.load_state_dict(dict(weights), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"image_reward: the {what} weights do not fit the architecture: {e}") from e


def save_converted(
    out: str | Path,
    vision_model: Any,
    text_encoder: Any,
    head: Any,
    tokenizer: Any,
    *,
    mean: float = REWARD_MEAN,
    std: float = REWARD_STD,
    max_length: int = MAX_LENGTH,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write a converted folder (see the module docstring) from live modules; the random test model
    uses this too, so it is read by the very code that reads a converted ImageReward.pt."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vision_model.save_pretrained(out / VISION_DIR, safe_serialization=True)
    text_encoder.save_pretrained(out / TEXT_DIR, safe_serialization=True)
    head_state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(head_state, str(out / HEAD_FILE))
    tokenizer.save_pretrained(out)
    meta = {
        "format": FOLDER_FORMAT,
        "format_version": FOLDER_FORMAT_VERSION,
        "mean": float(mean),
        "std": float(std),
        "max_length": int(max_length),
        "image_size": int(vision_model.config.image_size),
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "source": dict(source or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _load_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """Upstream's pickle read with ``weights_only=True``: tensors and plain containers only."""
    import pickle

    import torch

    try:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except OSError as e:
        raise ConfigError(f"image_reward: cannot read checkpoint {str(checkpoint)!r}: {e}") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        raise ConfigError(
            f"image_reward: cannot read {str(checkpoint)!r} with torch.load(weights_only=True) (only "
            f"tensors are accepted from a pickle; is this upstream's {CHECKPOINT_FILE}?): {e}"
        ) from e
    if isinstance(state, Mapping) and set(state) <= {"model", "state_dict"} and len(state) == 1:
        state = next(iter(state.values()))  # a {"model": state_dict} wrapper, as BLIP's own checkpoints
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"image_reward: {str(checkpoint)!r} is not a state dict of tensors")
    return dict(state)


def convert_checkpoint(
    checkpoint: str | Path,
    med_config: str | Path,
    out: str | Path,
    tokenizer: Any = BLIP_TOKENIZER,
    *,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Convert upstream's ``ImageReward.pt`` + ``med_config.json`` into a converted folder at ``out``
    (which must not exist or be empty); ``tokenizer``: a tokenizer object, or a path or hub id to load
    (with ``HF_HUB_OFFLINE=1`` from the local cache only). Written to a temporary sibling and renamed,
    so a failed conversion leaves no half folder."""
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

    from selma_core.metrics.vqa import hub_offline

    out = Path(out)
    if not Path(checkpoint).is_file():  # before the tokenizer, which may take a while to fail
        raise ConfigError(f"image_reward: checkpoint {str(checkpoint)!r} not found (or not a file)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"image_reward: {str(out)!r} exists and is not empty; remove it or choose another --out"
        )
    try:
        med = json.loads(Path(med_config).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"image_reward: cannot read med config {str(med_config)!r}: {e}") from e
    if isinstance(tokenizer, (str, Path)):
        name = str(tokenizer)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=hub_offline())
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"image_reward: cannot load the tokenizer {name!r} (BLIP's is {BLIP_TOKENIZER}: "
                f"`hf download {BLIP_TOKENIZER}` where there is network, or give --tokenizer a local "
                f"folder): {e}"
            ) from e
    tokenizer = blip_tokenizer(tokenizer)
    weights = rename_upstream_keys(_load_checkpoint(checkpoint))
    vision_config = _vision_config(weights.vision)
    text_config = _text_config(med, vision_config.hidden_size, tokenizer)
    if len(tokenizer) > text_config.vocab_size:
        raise ConfigError(
            f"image_reward: the tokenizer has {len(tokenizer)} tokens, the text encoder only "
            f"{text_config.vocab_size}"
        )
    vision_model = BlipVisionModel(vision_config)
    _load_strict(vision_model, weights.vision, "vision")
    text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
    _load_strict(text_encoder, weights.text, "text encoder")
    head = build_head(_head_widths(weights.head, str(checkpoint)))
    _load_strict(head, weights.head, "head")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_converted(
            tmp,
            vision_model,
            text_encoder,
            head,
            tokenizer,
            source={
                "checkpoint": str(checkpoint),
                "med_config": str(med_config),
                "dropped_keys": sorted(weights.dropped),
                **(source or {}),
            },
        )
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- loading ---------------------------------------------------------------------------------------


@dataclass
class LoadedImageReward:
    """The modules and settings of a converted folder."""

    vision_model: Any
    text_encoder: Any
    head: Any
    tokenizer: Any
    meta: dict[str, Any]


def load_converted(folder: str | Path, dtype: Any = None) -> LoadedImageReward:
    """Read a converted folder: both models with ``from_pretrained`` (safetensors only; a missing or
    unexpected weight is an error), the head in float32 (upstream runs it on ``.float()`` features)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except FileNotFoundError as e:
        raise ConfigError(
            f"image_reward: {str(folder)!r} is not a converted ImageReward folder (no {META_FILE}); "
            f"{_CONVERT_HINT}"
        ) from e
    except ValueError as e:
        raise ConfigError(f"image_reward: {str(folder / META_FILE)!r} is not valid JSON: {e}") from e
    if meta.get("format") != FOLDER_FORMAT or meta.get("format_version") != FOLDER_FORMAT_VERSION:
        raise ConfigError(
            f"image_reward: {str(folder)!r}: format {meta.get('format')!r} v{meta.get('format_version')}, "
            f"expected {FOLDER_FORMAT!r} v{FOLDER_FORMAT_VERSION}; convert it again"
        )
    kwargs: dict[str, Any] = {"use_safetensors": True, "output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    models = []
    for model_class, sub, extra in (
        (BlipVisionModel, VISION_DIR, {}),
        (BlipTextModel, TEXT_DIR, {"add_pooling_layer": False}),
    ):
        try:
            model, info = model_class.from_pretrained(str(folder / sub), **kwargs, **extra)
        except (OSError, ValueError) as e:
            raise ConfigError(f"image_reward: cannot load {str(folder / sub)!r}: {e}") from e
        bad = {
            k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v
        }
        if bad:
            raise ConfigError(f"image_reward: {str(folder / sub)!r} does not match its config: {bad}")
        models.append(model.eval())
    try:
        head_state = load_file(str(folder / HEAD_FILE))
    except (OSError, ValueError) as e:
        raise ConfigError(f"image_reward: cannot read {str(folder / HEAD_FILE)!r}: {e}") from e
    head = build_head(_head_widths(head_state, str(folder / HEAD_FILE)))
    _load_strict(head, head_state, "head")
    try:
        tokenizer = blip_tokenizer(AutoTokenizer.from_pretrained(str(folder)))
    except (OSError, ValueError) as e:
        raise ConfigError(f"image_reward: cannot load the tokenizer of {str(folder)!r}: {e}") from e
    if models[0].config.hidden_size != models[1].config.encoder_hidden_size:
        raise ConfigError(
            f"image_reward: {str(folder)!r}: the text encoder does not cross-attend to this ViT's width"
        )
    return LoadedImageReward(models[0], models[1], head.float().eval(), tokenizer, meta)


def _hub_error(spec: str, asset: str, how: str, offline: bool, error: Exception) -> SelmaError:
    """The error for a hub asset that could not be fetched: ConfigError when retrying cannot help."""
    causes = []
    cause: BaseException | None = error
    while cause is not None and len(causes) < 5:
        causes.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    if offline:
        return ConfigError(
            f"ImageReward model {spec!r}: {asset} is not in the local Hugging Face cache and downloads are "
            f"off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); on a machine with network run `{how}` and copy the "
            f"Hugging Face cache (HF_HOME) here, or {_CONVERT_HINT}: {error}"
        )
    permanent = ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "GatedRepoError")
    if any(name in permanent for name in causes):
        return ConfigError(
            f"ImageReward model {spec!r}: no {asset} on the Hugging Face hub, or no access: {error}"
        )
    return EndpointError(
        f"ImageReward model {spec!r}: cannot fetch {asset} from the Hugging Face hub (network?) and it is "
        f"not in the local cache; retry, or run `{how}` where there is network and copy the cache (HF_HOME) "
        f"here, or {_CONVERT_HINT}: {error}"
    )


def _converted_from_hub(spec: str, cache_dir: str | Path, revision: str | None) -> tuple[Path, str]:
    """``THUDM/ImageReward`` (with ``allow_pickle``): fetch it with the hub client (offline: the local
    cache only), convert it once into ``cache_dir/models``, keyed by the snapshot's commit."""
    from huggingface_hub import hf_hub_download
    from transformers import AutoTokenizer

    from selma_core.metrics.vqa import hub_offline

    offline = hub_offline()
    pin = f" --revision {revision}" if revision else ""
    # the tokenizer is needed too, for the conversion
    how = f"hf download {spec} {CHECKPOINT_FILE} {MED_CONFIG_FILE}{pin}` and `hf download {BLIP_TOKENIZER}"
    files = {}
    log.info(
        "ImageReward: fetching %s and %s from %s%s (%s; about 1.7 GB the first time)",
        CHECKPOINT_FILE,
        MED_CONFIG_FILE,
        spec,
        f" revision {revision}" if revision else "",
        "offline: local cache only" if offline else "allow_pickle_checkpoints is on",
    )
    for filename in (CHECKPOINT_FILE, MED_CONFIG_FILE):
        try:
            files[filename] = Path(
                hf_hub_download(spec, filename, revision=revision, local_files_only=offline)
            )
        except Exception as e:  # the hub client's errors, httpx/requests errors, OSError ...
            raise _hub_error(spec, filename, how, offline, e) from e
    snapshot = files[CHECKPOINT_FILE].parent
    commit = snapshot.name if snapshot.parent.name == "snapshots" else (revision or "main")
    reference = f"{spec}@{commit}"
    target = Path(cache_dir) / "models" / f"image-reward-{spec.replace('/', '--')}-{commit}"
    if (target / ".complete").is_file():
        return target, reference
    try:
        tokenizer = AutoTokenizer.from_pretrained(BLIP_TOKENIZER, local_files_only=offline)
    except Exception as e:
        raise _hub_error(
            spec, f"the tokenizer {BLIP_TOKENIZER}", f"hf download {BLIP_TOKENIZER}", offline, e
        ) from e
    log.info("converting %s (%s) into %s, read with weights_only=True", reference, CHECKPOINT_FILE, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp = scratch / "converted"
    try:
        convert_checkpoint(
            files[CHECKPOINT_FILE],
            files[MED_CONFIG_FILE],
            tmp,
            tokenizer,
            source={"hub": spec, "commit": commit, "tokenizer": BLIP_TOKENIZER},
        )
        (tmp / ".complete").write_text(f"converted from {reference}\n")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / ".complete").is_file():  # a stale half-written folder of a dead job
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
            # else another job converted it at the same time: keep its identical copy
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target, reference


def resolve_image_reward(
    spec: str, cache_dir: str | Path, *, revision: str | None = None, allow_pickle: bool = False
) -> tuple[Path, str]:
    """``(converted folder, reference)`` for a converted folder, ``random:NAME`` or the hub id."""
    from selma_core.metrics.vqa import model_reference
    from selma_core.models.random_models import is_random_model, materialize_random_model

    if is_random_model(spec):
        path = materialize_random_model(spec, cache_dir)
        return path, model_reference(spec, str(path))
    if Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        return folder, model_reference(spec, str(folder))
    if spec.startswith(("/", ".", "~")):
        raise ConfigError(f"ImageReward model {spec!r}: local folder not found; {_CONVERT_HINT}")
    if spec.lower() == IMAGE_REWARD_MODEL.lower():
        if not allow_pickle:
            raise ConfigError(
                f"ImageReward model {spec!r}: its weights are a pickle ({CHECKPOINT_FILE}) and only "
                f"safetensors are read; {_CONVERT_HINT}, or opt in to pickle checkpoints "
                "(allow_pickle_checkpoints: true; it is then converted with torch.load(weights_only=True))"
            )
        return _converted_from_hub(IMAGE_REWARD_MODEL, cache_dir, revision)
    raise ConfigError(
        f"ImageReward model {spec!r}: give a converted folder, random:tiny-image-reward or "
        f"{IMAGE_REWARD_MODEL}; {_CONVERT_HINT}"
    )


# -- the scorer ------------------------------------------------------------------------------------


class ImageRewardScorer(BatchedScorer):
    """ImageReward of (image, prompt) pairs; see the module docstring for the computation."""

    name = "image_reward"

    def __init__(
        self,
        spec: str = IMAGE_REWARD_MODEL,
        cache_dir: str | Path = "selma-data/cache",
        *,
        device: str = "auto",
        dtype: Any = "float32",
        autocast_dtype: Any = "bfloat16",
        batch_size: int = 16,
        revision: str | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
    ) -> None:
        """``dtype``: the weights' dtype (the head stays float32); ``autocast_dtype``: the compute dtype
        of ``torch.autocast`` on CUDA (None: none; ignored on CPU); ``allow_pickle``: allow fetching
        and converting upstream's pickle checkpoint for the hub id."""
        from selma_core.metrics.vqa import dtype_name

        super().__init__(
            device=device,
            dtype=dtype,
            autocast_dtype=autocast_dtype,
            batch_size=batch_size,
            progress=progress,
        )
        self.folder, self.reference = resolve_image_reward(
            spec, cache_dir, revision=revision, allow_pickle=allow_pickle
        )
        loaded = load_converted(self.folder, self.dtype)
        self.vision_model = loaded.vision_model.to(self.device)
        self.text_encoder = loaded.text_encoder.to(self.device)
        self.head = loaded.head.to(self.device)
        self.tokenizer = loaded.tokenizer
        self.meta = loaded.meta
        self.mean = float(self.meta["mean"])
        self.std = float(self.meta["std"])
        self.max_length = int(self.meta["max_length"])
        self.image_size = int(self.meta["image_size"])
        self.version = (
            f"{self.reference}|dtype={dtype_name(self.dtype)}|autocast={dtype_name(self.autocast_dtype)}"
        )

    def pixel_values(self, images: Sequence[Any]) -> Any:
        """Upstream's preprocessing of ``images``, stacked: (n, 3, size, size) float32."""
        import torch

        mean, std = self.meta["image_mean"], self.meta["image_std"]
        return torch.stack([preprocess(image, self.image_size, mean, std) for image in images])

    def _score_batch(self, images: list, texts: list[str]) -> list[float]:
        """ImageReward of each pair (upstream's ``score(prompt, image)`` for each)."""
        import torch

        pixel_values = self.pixel_values(images).to(self.device, self.vision_model.dtype)
        tokens = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.inference_mode():
            with self._autocast():
                image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
                image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
                hidden = self.text_encoder(
                    input_ids=tokens["input_ids"].to(self.device),
                    attention_mask=tokens["attention_mask"].to(self.device),
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=image_mask,
                ).last_hidden_state
            rewards = self.head(hidden[:, 0, :].float()).squeeze(-1)
            rewards = (rewards - self.mean) / self.std
        return rewards.float().cpu().tolist()


# -- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selma_core.metrics.image_reward",
        description="ImageReward: convert upstream's pickle checkpoint into a safetensors folder.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help=f"convert {CHECKPOINT_FILE} + {MED_CONFIG_FILE} (hub repository {IMAGE_REWARD_MODEL})",
        description=(
            f"Read upstream's {CHECKPOINT_FILE} with torch.load(weights_only=True), rename its keys to the "
            "transformers BLIP layout and write a folder that ImageRewardScorer loads: vision_model/ and "
            "text_encoder/ (config.json + model.safetensors), head.safetensors, image_reward.json and the "
            "tokenizer. Exit 2 on invalid input."
        ),
    )
    convert.add_argument("--checkpoint", required=True, help=f"upstream's {CHECKPOINT_FILE}")
    convert.add_argument("--med-config", required=True, help=f"upstream's {MED_CONFIG_FILE}")
    convert.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    convert.add_argument(
        "--tokenizer",
        default=BLIP_TOKENIZER,
        help=f"tokenizer folder or hub id (default: {BLIP_TOKENIZER}, BLIP's; [DEC]/[ENC] are added)",
    )
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.checkpoint, args.med_config, args.out, args.tokenizer)
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({"converted": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
