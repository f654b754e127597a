"""Human Preference Score v2 and v2.1 (Wu et al., *Human Preference Score v2: A Solid Benchmark for
Evaluating Human Preferences of Text-to-Image Synthesis*, 2023) on transformers' ``CLIPModel``.

HPS v2 is open_clip's ``ViT-H-14`` (the ``laion2B-s32B-b79K`` CLIP, the architecture of transformers'
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) fine-tuned on human preferences; the fine-tuned weights are
the ``state_dict`` of a pickle on the hub repository ``xswu/HPSv2``: ``HPS_v2_compressed.pt`` (v2.0)
and ``HPS_v2.1_compressed.pt`` (v2.1). The score, as upstream's ``hpsv2/img_score.py`` computes it, is

    score = cos(image features, text features)

the diagonal of ``image_features @ text_features.T`` of the L2-normalised projected features, *without*
the model's ``logit_scale``. ``HpsScorer.score`` returns that raw cosine (typically 0.2 to 0.3 for
Stable Diffusion images); papers and leaderboards print it x100 (e.g. "27.5").

Neither open_clip (which needs torchvision) nor the ``hpsv2`` package is used: the open_clip weights
are renamed into ``CLIPModel``'s, once, by ``python -m selma_core.metrics.hps convert`` (or on first
use of ``hps-v2``/``hps-v2.1`` with the pickle opt-in), and the image transform is reimplemented with
PIL + torch.

**Image transform** (``hps_transform``), upstream's evaluation transform (``preprocess_val`` of
``create_model_and_transforms(..., light_augmentation=True)``: ``image_transform(is_train=False,
resize_longest_max=True)``):

1. RGB (``to_rgb``; upstream keeps an RGBA image's 4 channels, which its model cannot take: the alpha
   channel is dropped here);
2. ``ToTensor``: float32 in [0, 1], *before* resizing, so the resize works on floats (no rounding to
   8 bits, no clamping of bicubic overshoot);
3. ``ResizeMaxSize(224)``: scale = 224 / longest side; new size = ``round(side * scale)`` (Python's
   rounding) for each side; bicubic resize of the float tensor (torchvision's tensor path, i.e.
   ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``), with antialiasing (the
   default of torchvision >= 0.17; see below); then zero padding to 224 x 224, ``pad // 2`` on the
   left/top and the rest on the right/bottom, in [0, 1] space, i.e. black;
4. ``Normalize`` with OpenAI CLIP's mean and std (upstream's default: open_clip's ``laion2b_s32b_b79k``
   pretrained config names no mean/std of its own).

**Text**: open_clip's ViT-H-14 tokenizer is OpenAI CLIP's BPE (49408 tokens, lowercased, context 77,
truncated to ``<start> + 75 tokens + <end>``), the same vocabulary and merges as the hub's laion CLIP
tokenizer, which is used here (``CLIPProcessor``'s tokenizer, from the converted folder). Padding
differs (open_clip pads with id 0 to 77, transformers to the longest prompt) but cannot change the
score: the text tower is causal and reads its output at the end token.

**What was checked against upstream** (its source, read through a code search; never run here):
``hpsv2/img_score.py`` (model ``ViT-H-14``/``laion2B-s32B-b79K``, ``load_state_dict(checkpoint
['state_dict'])``, tokenizer ``get_tokenizer('ViT-H-14')``, the score above, ``torch.cuda.amp.autocast``
i.e. float16, ``light_augmentation=True``), ``hpsv2/utils.py`` (the checkpoint file names), HPSv2's
``open_clip/factory.py`` and ``transform.py`` as vendored in forks of the repository (the
``light_augmentation`` branch, ``ResizeMaxSize``, ToTensor before resizing), open_clip's ``ViT-H-14``
config (vision 32 layers x 1280, 80-wide heads so 16, patch 14, image 224, MLP ratio 4; text 24
layers x 1024, 16 heads; embed 1024; no ``quick_gelu``, so exact GELU) and ``laion2b_s32b_b79k``'s
pretrained config (no mean/std). The key mapping follows transformers'
``models/clip/convert_clip_original_pytorch_to_hf.py``.

**Not verified** (no upstream run, no weights here): scores against published numbers; the
antialiasing of the bicubic resize, which depends on the torchvision version upstream runs with
(``antialias=True`` since torchvision 0.17, the version a fresh install gets; False before, which HPS
v2's 2023 results may have used; it changes the pixels of downscaled images, by how much in the score
was not measured); open_clip's truncation as HPSv2's vendored tokenizer does it (not read); that
the published checkpoints hold no key beyond the plain open_clip ``CLIP`` ones (upstream loads them
strictly into that model, so they should not: any other key is an error here, never dropped). Known
deviations: an image whose longest side is already 224 but is not square is padded here (upstream
skips the padding then and hands its model a non-square tensor, which fails), and open_clip's text
cleaning (``ftfy.fix_text``, HTML unescaping) is not applied. Autocast defaults to bfloat16 on CUDA as
for the other scorers; ``autocast_dtype="float16"`` is upstream's.

``HpsScorer`` loads a converted folder, ``random:tiny-clip`` (random weights: the scores test plumbing
and mean nothing), or the names ``hps-v2`` / ``hps-v2.1``: the upstream checkpoints, only with
``allow_pickle`` (the project's ``allow_pickle_checkpoints`` opt-in); the pickle is then fetched with
the hub client (with ``HF_HUB_OFFLINE=1`` from the local Hugging Face cache only), read with
``torch.load(weights_only=True)`` and converted once into ``cache_dir/hps/<version>/``. Nothing is
downloaded otherwise; a missing asset is a ``ConfigError`` (an ``EndpointError`` when the hub is
unreachable) naming it and saying how to provide it.

``version`` (the answer cache's key): model reference (hub file and commit, folder, or random model)
+ the HPS version label + weights dtype + autocast dtype + ``PREPROCESS_ID``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from selma_core.errors import ConfigError, EndpointError, SelmaError
from selma_core.metrics.scoring import BatchedScorer
from selma_core.storage.base import sha256_file

__all__ = [
    "HPS_CHECKPOINTS",
    "HPS_PROCESSOR",
    "HPS_REPO",
    "PREPROCESS_ID",
    "HpsScorer",
    "clip_to_open_clip_state_dict",
    "convert_checkpoint",
    "converted_upstream",
    "hps_transform",
    "load_checkpoint_state_dict",
    "open_clip_to_clip_state_dict",
    "vit_h14_config",
]

log = logging.getLogger(__name__)

HPS_REPO = "xswu/HPSv2"
#: scorer name -> (upstream's ``hps_version``, checkpoint file on ``HPS_REPO``)
HPS_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "hps-v2": ("v2.0", "HPS_v2_compressed.pt"),
    "hps-v2.1": ("v2.1", "HPS_v2.1_compressed.pt"),
}
#: Where the tokenizer (open_clip ViT-H-14's BPE) comes from when converting.
HPS_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONTEXT_LENGTH = 77
#: Names the image transform in ``version``; bump when ``hps_transform`` changes.
PREPROCESS_ID = "longest-side-bicubic-aa+pad0+openai-norm.v1"
#: Written into a converted folder: what it was converted from.
CONVERSION_FILE = "hps_conversion.json"

_CONVERT_HINT = (
    "convert it once with `python -m selma_core.metrics.hps convert --checkpoint FILE.pt --out DIR` "
    "and give DIR as the HPS model"
)


def vit_h14_config() -> Any:
    """``CLIPConfig`` of open_clip's ``ViT-H-14`` (its ``ViT-H-14.json``): exact GELU, LayerNorm eps 1e-5."""
    from transformers import CLIPConfig

    return CLIPConfig(
        projection_dim=1024,
        text_config={
            "vocab_size": 49408,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "max_position_embeddings": CONTEXT_LENGTH,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": 1024,
            "bos_token_id": 49406,
            "eos_token_id": 49407,  # pooled at the first end token
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": 1024,
        },
    )


# -- open_clip <-> CLIPModel key names ---------------------------------------------------------------

#: open_clip key -> CLIPModel key, outside the transformer blocks; projections are transposed.
_TOP_LEVEL = {
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
}
#: open_clip stores projections as ``x @ proj`` (in, out); ``nn.Linear`` weights are (out, in).
_TRANSPOSED = {"text_projection", "visual.proj"}
#: Inside a residual block (``transformer.resblocks.N.`` / ``visual.transformer.resblocks.N.``).
_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
}
#: ``nn.MultiheadAttention``'s fused input projection: rows are q, then k, then v.
_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_QKV = ("q_proj", "k_proj", "v_proj")
_OPEN_CLIP_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_CLIP_BLOCK = re.compile(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)$")


def open_clip_to_clip_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(CLIPModel state dict, {CLIPModel key: open_clip key it came from})`` from an open_clip ``CLIP``
    state dict (plain ``transformer`` text tower). The fused ``attn.in_proj_*`` are split into
    q/k/v; ``text_projection`` and ``visual.proj`` are transposed. A key that is not part of an
    open_clip ``CLIP`` is a ``ConfigError`` naming it: nothing is silently dropped."""
    mapped: dict[str, Any] = {}
    sources: dict[str, str] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        if key in _TOP_LEVEL:
            target = _TOP_LEVEL[key]
            mapped[target] = tensor.t().contiguous() if key in _TRANSPOSED else tensor
            sources[target] = key
            continue
        block = _OPEN_CLIP_BLOCK.match(key)
        if block is None:
            unknown.append(key)
            continue
        tower = "vision_model" if block.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{block.group(2)}."
        part = block.group(3)
        if part in _BLOCK:
            mapped[prefix + _BLOCK[part]] = tensor
            sources[prefix + _BLOCK[part]] = key
        elif part in _IN_PROJ:
            if tensor.shape[0] % 3:
                raise ConfigError(f"hps: {key} has shape {tuple(tensor.shape)}: not q, k and v stacked")
            for name, chunk in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                target = f"{prefix}self_attn.{name}.{_IN_PROJ[part]}"
                mapped[target] = chunk.contiguous()
                sources[target] = key
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(
            f"hps: {len(unknown)} checkpoint key(s) that are not part of an open_clip CLIP (ViT vision "
            f"tower, transformer text tower): {', '.join(sorted(unknown)[:20])}"
        )
    return mapped, sources


def _open_clip_name(clip_key: str) -> str:
    """The open_clip key a ``CLIPModel`` key comes from (for error messages and the inverse mapping)."""
    for source, target in _TOP_LEVEL.items():
        if target == clip_key:
            return source
    block = _CLIP_BLOCK.match(clip_key)
    if block is None:
        raise ConfigError(f"hps: no open_clip name for the CLIPModel key {clip_key!r}")
    prefix = f"{'visual.' if block.group(1) == 'vision' else ''}transformer.resblocks.{block.group(2)}."
    part = block.group(3)
    for source, target in _BLOCK.items():
        if target == part:
            return prefix + source
    for name in _QKV:
        for source, kind in _IN_PROJ.items():
            if part == f"self_attn.{name}.{kind}":
                return prefix + source
    raise ConfigError(f"hps: no open_clip name for the CLIPModel key {clip_key!r}")


def clip_to_open_clip_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``open_clip_to_clip_state_dict``: q/k/v fused back into ``attn.in_proj_*``,
    projections transposed back. The converter's tests build open_clip-style checkpoints with it from
    ``random:tiny-clip``; it can also export a converted model back to open_clip names."""
    import torch

    out: dict[str, Any] = {}
    fused: dict[str, dict[str, Any]] = {}
    for key, tensor in state_dict.items():
        source = _open_clip_name(key)
        if source.endswith(tuple(_IN_PROJ)):
            name = next(n for n in _QKV if f".{n}." in key)
            fused.setdefault(source, {})[name] = tensor
        else:
            out[source] = tensor.t().contiguous() if source in _TRANSPOSED else tensor
    for source, parts in fused.items():
        if set(parts) != set(_QKV):
            raise ConfigError(f"hps: {source}: only {sorted(parts)} of q/k/v in the state dict")
        out[source] = torch.cat([parts[n] for n in _QKV], dim=0)
    return out


# -- the converter ----------------------------------------------------------------------------------


def load_checkpoint_state_dict(checkpoint: str | Path) -> dict[str, Any]:
    """The open_clip state dict of an HPS pickle, read with ``torch.load(weights_only=True)`` (tensors and
    plain containers only: the pickle cannot run code). Upstream's layout ``{"state_dict": ...}`` and a
    bare state dict are both accepted; a ``module.`` prefix (DistributedDataParallel) is removed."""
    import pickle

    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"hps: checkpoint {str(path)!r} not found")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ConfigError(
            f"hps: cannot read {str(path)!r} with torch.load(weights_only=True) (not a state dict of "
            f"tensors, or a damaged file): {e}"
        ) from e
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state, Mapping) or not state:
        raise ConfigError(f"hps: {str(path)!r} holds no state dict (a mapping of names to tensors)")
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConfigError(f"hps: {str(path)!r}: entry {key!r} is not a named tensor")
        out[key.removeprefix("module.")] = value
    return out


def _load_config(config: str | None, cache_dir: str | Path) -> Any:
    """The ``CLIPConfig`` to convert into: open_clip ViT-H-14's by default, else a folder, hub id (offline:
    cached only) or ``random:NAME`` holding a CLIP ``config.json``. Head counts are not in the weights."""
    if config is None:
        return vit_h14_config()
    from transformers import CLIPConfig

    from selma_core.metrics.vqa import hub_offline
    from selma_core.models.loading import resolve_model_path

    path = resolve_model_path(config, cache_dir)
    try:
        return CLIPConfig.from_pretrained(path, local_files_only=hub_offline())
    except (OSError, ValueError) as e:
        raise ConfigError(f"hps: cannot read a CLIP config.json from {config!r}: {e}") from e


def _check_against_model(
    mapped: Mapping[str, Any], sources: Mapping[str, str], expected: Mapping[str, Any]
) -> None:
    """Every checkpoint tensor has a place in the model, with the right shape, and every model tensor is
    filled; otherwise a ``ConfigError`` naming the keys (open_clip and CLIPModel names)."""
    unexpected = sorted(sources[k] for k in mapped if k not in expected)
    missing = sorted(f"{_open_clip_name(k)} (CLIPModel {k})" for k in expected if k not in mapped)
    wrong = sorted(
        f"{sources[k]}: {tuple(v.shape)}, the model needs {tuple(expected[k].shape)}"
        for k, v in mapped.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    )
    problems = []
    if unexpected:
        problems.append(f"not in the model (more layers than its config?): {', '.join(unexpected[:20])}")
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:20])}")
    if wrong:
        problems.append(f"wrong shape: {'; '.join(wrong[:20])}")
    if problems:
        raise ConfigError("hps: the checkpoint does not fit the CLIP config: " + " | ".join(problems))


def _no_init_weights() -> Any:
    """transformers' context that builds a model without initialising its weights (where it has one)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished ``tmp`` folder into ``target`` (atomic): a job that loses a race to convert the
    same checkpoint keeps the winner's identical folder."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / ".complete").is_file():
            raise


def convert_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    processor: str = HPS_PROCESSOR,
    config: str | None = None,
    cache_dir: str | Path = "selma-data/cache",
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Convert an HPS (open_clip CLIP) pickle into a transformers folder at ``out`` (which must not exist or
    must be empty): ``config.json`` + ``model.safetensors`` (``save_pretrained``, in the checkpoint's
    float dtype), the processor files of ``processor`` (its tokenizer is what ``HpsScorer`` uses),
    ``CONVERSION_FILE`` (where the weights came from, their SHA-256) and a ``.complete`` marker.

    ``config``: the architecture (default open_clip ViT-H-14's; ``vit_h14_config``). Every checkpoint
    key must map onto the model and every model tensor must be filled (``ConfigError`` otherwise,
    naming the keys). Written into a temporary sibling and renamed, so no half folder is ever left.
    """
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from selma_core.metrics.vqa import load_pretrained

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"hps: {str(out)!r} exists and is not empty; remove it or choose another --out")
    state = load_checkpoint_state_dict(checkpoint)
    mapped, sources = open_clip_to_clip_state_dict(state)
    clip_config = _load_config(config, cache_dir)
    with torch.device("meta"):  # shapes only: the check costs no memory even for ViT-H
        expected = CLIPModel(clip_config).state_dict()
    _check_against_model(mapped, sources, expected)
    _, clip_processor, processor_ref = load_pretrained(
        processor, cache_dir, None, CLIPProcessor, what="HPS processor (tokenizer)"
    )
    float_dtypes = {t.dtype for t in mapped.values() if t.is_floating_point()}
    dtype = float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32
    with _no_init_weights():  # every tensor is overwritten below: skip ViT-H's random init (~15 s)
        model = CLIPModel(clip_config)
    model = model.to(dtype)
    model.load_state_dict(mapped, strict=True)
    checkpoint = Path(checkpoint)
    known = {filename: version for version, filename in HPS_CHECKPOINTS.values()}
    meta = {
        "format": "selma-hps",
        "format_version": 1,
        "checkpoint": checkpoint.name,
        # upstream's file name says which HPS it is; a renamed file is labelled by its hash only
        "hps_version": known.get(checkpoint.name),
        "sha256": sha256_file(checkpoint),
        "dtype": str(dtype).removeprefix("torch."),
        "processor": processor_ref,
        **(source or {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp = scratch / "converted"
    try:
        model.save_pretrained(tmp)
        clip_processor.save_pretrained(tmp)
        (tmp / CONVERSION_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / ".complete").write_text(f"converted from {checkpoint.name}\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        _publish(tmp, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("hps: converted %s into %s", checkpoint, out)
    return out


# -- the upstream checkpoints -------------------------------------------------------------------------


def _hub_error(filename: str, offline: bool, revision: str | None, error: Exception) -> SelmaError:
    """The error for an HPS checkpoint the hub client could not provide: ConfigError when retrying cannot
    help, EndpointError when the hub was unreachable."""
    how = (
        f"`hf download {HPS_REPO} {filename}{f' --revision {revision}' if revision else ''}` and "
        f"`hf download {HPS_PROCESSOR}`"
    )
    if offline:
        return ConfigError(
            f"hps: the checkpoint {HPS_REPO}/{filename} is not in the local Hugging Face cache and downloads "
            f"are off (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); on a machine with network run {how} and copy "
            f"the Hugging Face cache (HF_HOME) here, or {_CONVERT_HINT}: {error}"
        )
    causes = []
    cause: BaseException | None = error
    while cause is not None and len(causes) < 5:
        causes.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    permanent = (
        "RepositoryNotFoundError",
        "RevisionNotFoundError",
        "RemoteEntryNotFoundError",
        "EntryNotFoundError",  # the remote one's name in older hub clients (not LocalEntryNotFoundError)
        "GatedRepoError",
    )
    if any(name in permanent for name in causes):
        return ConfigError(
            f"hps: no checkpoint {HPS_REPO}/{filename} on the Hugging Face hub, or no access: {error}"
        )
    return EndpointError(
        f"hps: cannot fetch the checkpoint {HPS_REPO}/{filename} (hub unreachable?) and it is not in the "
        f"local cache; retry, or run {how} where there is network and copy the cache (HF_HOME) here, or "
        f"{_CONVERT_HINT}: {error}"
    )


def converted_upstream(
    spec: str, cache_dir: str | Path, *, revision: str | None = None, allow_pickle: bool = False
) -> Path:
    """The converted folder of ``hps-v2``/``hps-v2.1``: ``cache_dir/hps/<version>[@revision]/``, converted
    from the hub's pickle on first use; only with ``allow_pickle`` (the explicit opt-in)."""
    from selma_core.metrics.vqa import hub_offline

    version, filename = HPS_CHECKPOINTS[spec]
    if not allow_pickle:
        raise ConfigError(
            f"hps model {spec!r}: its weights are the pickle checkpoint {HPS_REPO}/{filename}, and only "
            f"safetensors are read; {_CONVERT_HINT}, or opt in to pickle checkpoints "
            "(allow_pickle_checkpoints: true; it is then fetched once and converted with "
            "torch.load(weights_only=True))"
        )
    folder = version if revision is None else f"{version}@{re.sub(r'[^A-Za-z0-9._-]', '_', revision)}"
    target = Path(cache_dir) / "hps" / folder
    if (target / ".complete").is_file():
        return target
    from huggingface_hub import hf_hub_download

    offline = hub_offline()
    log.warning(
        "hps: fetching %s/%s (about 2 GB%s) to convert it into %s",
        HPS_REPO,
        filename,
        ", local cache only" if offline else "",
        target,
    )
    try:
        path = Path(hf_hub_download(HPS_REPO, filename, revision=revision, local_files_only=offline))
    except Exception as e:  # the hub client's errors, httpx/requests errors, OSError ...
        raise _hub_error(filename, offline, revision, e) from e
    commit = path.parent.name if path.parent.parent.name == "snapshots" else (revision or "main")
    if target.exists():  # a stale folder of a dead job (no .complete)
        shutil.rmtree(target, ignore_errors=True)
    try:
        convert_checkpoint(
            path,
            target,
            processor=HPS_PROCESSOR,
            cache_dir=cache_dir,
            source={"hps_version": version, "hub": HPS_REPO, "file": filename, "commit": commit},
        )
    except ConfigError:
        if (target / ".complete").is_file():  # another job converted it meanwhile
            return target
        raise
    return target


# -- the image transform --------------------------------------------------------------------------------


def hps_transform(image: Any, size: int = 224) -> Any:
    """Upstream's evaluation transform without torchvision: a float32 (3, size, size) tensor (see the
    module docstring): RGB, [0, 1], longest side to ``size`` (bicubic, antialiased, on floats), zero
    padding centred (``pad // 2`` left/top), OpenAI CLIP normalisation."""
    import numpy as np
    import torch

    from selma_core.metrics.vqa import to_rgb

    pixels = torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1).float() / 255
    height, width = pixels.shape[1:]
    if max(height, width) != size:
        scale = size / float(max(height, width))
        new_h, new_w = round(height * scale), round(width * scale)
        pixels = torch.nn.functional.interpolate(
            pixels[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
        )[0]
    pad_h, pad_w = size - pixels.shape[1], size - pixels.shape[2]
    if pad_h or pad_w:
        pixels = torch.nn.functional.pad(
            pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0
        )
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


# -- the scorer -------------------------------------------------------------------------------------------


def _conversion_info(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / CONVERSION_FILE).read_text())
    except (OSError, ValueError):
        return {}


class HpsScorer(BatchedScorer):
    """HPS v2/v2.1 of (image, prompt) pairs: the cosine of the model's normalised image and text features.

    ``spec``: ``hps-v2`` / ``hps-v2.1`` (upstream's checkpoints; need ``allow_pickle``), a converted
    folder (``python -m selma_core.metrics.hps convert``), a hub id of one, or ``random:tiny-clip``.
    """

    name = "hps"

    def __init__(
        self,
        spec: str = "hps-v2.1",
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
        from transformers import CLIPModel, CLIPProcessor

        from selma_core.metrics.vqa import dtype_name, load_pretrained
        from selma_core.models.random_models import is_random_model

        super().__init__(
            device=device,
            dtype=dtype,
            autocast_dtype=autocast_dtype,
            batch_size=batch_size,
            progress=progress,
        )
        if spec in HPS_CHECKPOINTS:
            folder = converted_upstream(spec, cache_dir, revision=revision, allow_pickle=allow_pickle)
            load_spec, load_revision, load_pickle = str(folder), None, False  # safetensors now
        else:
            load_spec, load_revision, load_pickle = spec, revision, allow_pickle
        self.model, processor, reference = load_pretrained(
            load_spec,
            cache_dir,
            CLIPModel,
            CLIPProcessor,
            revision=load_revision,
            dtype=self.dtype,
            allow_pickle=load_pickle,
            what="HPS model",
        )
        self.tokenizer = processor.tokenizer
        self.model = self.model.to(self.device).eval()
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_length = min(CONTEXT_LENGTH, int(self.model.config.text_config.max_position_embeddings))
        info = _conversion_info(Path(load_spec)) if Path(load_spec).is_dir() else {}
        if spec in HPS_CHECKPOINTS and info.get("commit"):
            reference = f"{info.get('hub', HPS_REPO)}/{info.get('file')}@{info['commit']}"
        if info.get("sha256"):
            reference += f"#sha256={info['sha256'][:16]}"
        label = info.get("hps_version") or ("random" if is_random_model(spec) else "unknown")
        self.reference = reference
        self.version = (
            f"{reference}|hps={label}|dtype={dtype_name(self.dtype)}"
            f"|autocast={dtype_name(self.autocast_dtype)}|preprocess={PREPROCESS_ID}@{self.image_size}"
        )

    def _score_batch(self, images: list, texts: list[str]) -> list[float]:
        """HPS of each pair: the raw cosine in [-1, 1] (published numbers are x100)."""
        import torch

        from selma_core.metrics.preference import clip_cosine

        pixel_values = torch.stack([hps_transform(i, self.image_size) for i in images])
        pixel_values = pixel_values.to(self.device, self.model.dtype)
        text_inputs = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        text_inputs = {k: v.to(self.device) for k, v in text_inputs.items()}
        return clip_cosine(self.model, pixel_values, text_inputs, self._autocast()).tolist()


# -- the command line ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selma_core.metrics.hps",
        description="HPS v2/v2.1: convert an upstream checkpoint into a transformers CLIPModel folder.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="convert an HPS pickle (e.g. HPS_v2.1_compressed.pt) into a folder HpsScorer loads",
        description=(
            "Read an HPS v2/v2.1 checkpoint (open_clip ViT-H-14 state dict; torch.load with "
            "weights_only=True) and write config.json + model.safetensors + the tokenizer files into "
            "--out. Every key must map onto the model. Exit 2 on invalid input."
        ),
    )
    convert.add_argument("--checkpoint", required=True, help="the .pt file (HPS_v2.1_compressed.pt, ...)")
    convert.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    convert.add_argument(
        "--processor",
        default=HPS_PROCESSOR,
        help=f"hub id or local folder of the CLIP processor/tokenizer to bundle (default: {HPS_PROCESSOR})",
    )
    convert.add_argument(
        "--config",
        default=None,
        help="folder or hub id of a CLIP config.json for another architecture (default: open_clip ViT-H-14)",
    )
    convert.add_argument(
        "--cache-dir", default="selma-data/cache", help="the project cache (for random:NAME test models)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert_checkpoint(
            args.checkpoint, args.out, processor=args.processor, config=args.config, cache_dir=args.cache_dir
        )
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({"out": str(out), **_conversion_info(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
