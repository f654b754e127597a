"""Loading models from a hub id, a local folder or a random test model, and choosing the device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from selma_core.errors import ConfigError, EndpointError
from selma_core.models.random_models import is_random_model, materialize_random_model


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_model_path(spec: str, cache_dir: str | Path) -> str:
    """What ``from_pretrained`` should be given: a local folder (random models are built there), a hub id."""
    if is_random_model(spec):
        return str(materialize_random_model(spec, cache_dir))
    local = Path(spec).expanduser()
    if local.is_file():
        raise ConfigError(
            f"model {spec!r}: a single file; give a diffusers/transformers model folder (a single-file "
            "checkpoint converts with diffusers' from_single_file(...).save_pretrained(folder))"
        )
    if spec.startswith(("/", ".", "~")) and not local.is_dir():
        raise ConfigError(f"model {spec!r}: local folder not found")
    return spec


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1, true, yes, on; any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


# Hub answers that a retry cannot change: the id, revision or file does not exist, or access is gated.
_PERMANENT_HUB_ERRORS = (
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "EntryNotFoundError",
    "GatedRepoError",
    "LocalEntryNotFoundError",
    "HFValidationError",  # not a repo id at all: a URL, a stray space
)


def weights_kwargs(allow_pickle: bool) -> dict[str, Any]:
    """``from_pretrained``/``load_lora_weights`` keywords: safetensors only, unless the config's
    ``allow_pickle_checkpoints`` opts in to pickle checkpoints (diffusers and transformers then read
    them with ``torch.load(weights_only=True)``)."""
    return {} if allow_pickle else {"use_safetensors": True}


def revision_kwargs(spec: str, path: str, revision: str | None) -> dict[str, Any]:
    """``from_pretrained``'s ``revision`` for a hub model; a revision given for a local folder is a
    ``ConfigError`` (diffusers would ignore it: the pin would pin nothing)."""
    if not revision:
        return {}
    if not is_random_model(spec) and Path(path).is_dir():
        raise ConfigError(
            f"model {spec!r}: a revision ({revision!r}) pins a hub model; a local folder has none "
            "(leave its revision unset, or name the model by its hub id)"
        )
    return {"revision": revision}


PICKLE_HINT = (
    "only safetensors weights are read (a pickle checkpoint, .bin/.pt/.ckpt, can run arbitrary code); "
    "convert the weights to safetensors, or set allow_pickle_checkpoints: true in the pipeline config"
)


def model_load_error(spec: str, error: Exception) -> Exception:
    """The error to raise when ``from_pretrained(spec)`` failed: ConfigError when retrying cannot help."""
    if Path(spec).is_dir():
        folder = Path(spec)
        pickles = sorted(
            p.relative_to(folder).as_posix()
            for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")
            for p in folder.rglob(pattern)
        )
        if pickles and "safetensors" in str(error):
            shown = ", ".join(pickles[:3]) + (f" and {len(pickles) - 3} more" if len(pickles) > 3 else "")
            return ConfigError(f"model {spec!r} has pickle weights ({shown}): {PICKLE_HINT}: {error}")
        return ConfigError(f"model {spec!r}: the folder is not a diffusers/transformers model: {error}")
    causes = []
    cause: BaseException | None = error
    while cause is not None and len(causes) < 5:
        causes.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    if "`safetensors` weights" in str(error) or "safetensors weights" in str(error):
        # The hub repo (or cache) has pickle weights only: a retry finds the same files.
        return ConfigError(f"model {spec!r}: {PICKLE_HINT}: {error}")
    if hub_offline():
        return ConfigError(
            f"model {spec!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE="
            f"{os.environ['HF_HUB_OFFLINE']} is set; download "
            f"it first (huggingface-cli download {spec}) or give a local folder: {error}"
        )
    text = str(error)
    if (
        any(name in _PERMANENT_HUB_ERRORS for name in causes)
        or "not a valid model identifier" in text
        or "valid repo id" in text
    ):
        return ConfigError(
            f"model {spec!r}: no such model or revision on the hub, or no access (HF_TOKEN): {error}"
        )
    return EndpointError(f"model {spec!r}: cannot load from the Hugging Face hub (network?): {error}")


def load_diffusion_pipeline(
    spec: str,
    cache_dir: str | Path,
    revision: str | None = None,
    torch_dtype: Any = None,
    allow_pickle: bool = False,
):
    """A diffusers text-to-image pipeline (SD 1.x/2.x/XL alike: the folder's model_index.json decides).

    Weights are read from safetensors only, unless ``allow_pickle`` (``allow_pickle_checkpoints``).
    """
    from diffusers import DiffusionPipeline

    path = resolve_model_path(spec, cache_dir)
    kwargs: dict[str, Any] = {**weights_kwargs(allow_pickle), **revision_kwargs(spec, path, revision)}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype  # diffusers 0.42 deprecates torch_dtype for dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise model_load_error(path, e) from e
    except (AttributeError, ImportError) as e:  # a pipeline class this diffusers does not have
        import diffusers

        raise ConfigError(
            f"model {spec!r}: its model_index.json names a pipeline that diffusers {diffusers.__version__} "
            f"cannot load ({type(e).__name__}: {e}); selma draws and trains Stable Diffusion 1.x/2.x "
            "(StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline)"
        ) from e
    _check_text_to_image(spec, pipe)
    if getattr(pipe, "safety_checker", None) is not None:
        # Synthetic training data is judged by the evaluation phase, not blanked by the checker.
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_text_to_image(spec: str, pipe: Any) -> None:
    """A ``ConfigError`` unless ``pipe`` draws from text alone, as SD 1.x/2.x or SDXL: an img2img,
    inpainting or refiner pipeline (``stable-diffusion-xl-refiner-1.0`` as a generator) loads, then
    fails at its first batch for want of an input image, which would read as worth a retry."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ConfigError(
            f"model {spec!r} is a {type(pipe).__name__}, not a text-to-image pipeline selma can draw "
            "and train with: Stable Diffusion 1.x/2.x (StableDiffusionPipeline) or SDXL "
            "(StableDiffusionXLPipeline); an img2img, inpainting or refiner model needs an input image"
        )


def is_sdxl(pipe: Any) -> bool:
    return hasattr(pipe, "text_encoder_2")


def load_vae(spec: str, cache_dir: str | Path, allow_pickle: bool = False, revision: str | None = None):
    """An ``AutoencoderKL`` from a hub id (at ``revision``) or local folder (a VAE's own, or a
    pipeline's ``vae/``)."""
    from diffusers import AutoencoderKL

    path = resolve_model_path(spec, cache_dir)
    kwargs: dict[str, Any] = {**weights_kwargs(allow_pickle), **revision_kwargs(spec, path, revision)}
    if (Path(path) / "vae" / "config.json").is_file():
        kwargs["subfolder"] = "vae"
    try:
        return AutoencoderKL.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise model_load_error(path, e) from e
