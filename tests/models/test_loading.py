"""Model loading: random test models are materialized once; load failures say whether a retry helps."""

from __future__ import annotations

import pytest

from selma_core.errors import ConfigError, EndpointError
from selma_core.models.loading import load_diffusion_pipeline, model_load_error, resolve_model_path
from selma_core.models.random_models import materialize_random_model


def test_random_models_are_built_once_and_load_with_from_pretrained(model_cache):
    path = materialize_random_model("random:tiny-sd", model_cache)
    assert (path / "model_index.json").is_file() and (path / ".complete").is_file()
    mtime = (path / "model_index.json").stat().st_mtime
    assert materialize_random_model("random:tiny-sd", model_cache) == path
    assert (path / "model_index.json").stat().st_mtime == mtime
    pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None


def test_unknown_random_model_lists_the_known_ones(model_cache):
    with pytest.raises(ConfigError, match="random:tiny-sdxl"):
        materialize_random_model("random:huge", model_cache)


def test_a_missing_local_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="local folder not found"):
        resolve_model_path(str(tmp_path / "nope"), tmp_path)


def test_a_folder_that_is_no_model_is_a_config_error(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(ConfigError, match="not a diffusers/transformers model"):
        load_diffusion_pipeline(str(tmp_path / "junk"), tmp_path)


def test_hub_errors_are_classified(monkeypatch):
    class RepositoryNotFoundError(Exception):
        pass

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        raise OSError("org/model is not a local folder") from RepositoryNotFoundError("404")
    except OSError as e:
        assert isinstance(model_load_error("org/model", e), ConfigError)
    assert isinstance(model_load_error("org/model", OSError("connection reset")), EndpointError)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    error = model_load_error("org/model", OSError("not cached"))
    assert isinstance(error, ConfigError) and "huggingface-cli download org/model" in str(error)


def test_a_hub_id_offline_and_uncached_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1"):
        load_diffusion_pipeline("selma-test/no-such-model", tmp_path)


@pytest.mark.parametrize("offline", ["true", "YES", "on"])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    error = model_load_error("org/model", OSError("not cached"))
    assert isinstance(error, ConfigError) and f"HF_HUB_OFFLINE={offline} is set" in str(error)


def test_model_errors_a_retry_cannot_cure_are_configuration_errors(tmp_path, monkeypatch, model_cache):
    from huggingface_hub.errors import HFValidationError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # A hub repo with pickle weights only (many community fine-tunes): say how to opt in.
    only_bin = OSError(
        "Could not find the necessary `safetensors` weights in {'unet/diffusion_pytorch_model.bin'}"
    )
    error = model_load_error("org/old-finetune", only_bin)
    assert isinstance(error, ConfigError) and "allow_pickle_checkpoints: true" in str(error)
    # Not a repo id at all: the hub page's URL, a stray space.
    try:
        raise ValueError("bad id") from HFValidationError("Repo id must use alphanumeric chars")
    except ValueError as e:
        assert isinstance(model_load_error("https://huggingface.co/org/model", e), ConfigError)
    assert isinstance(
        model_load_error("org/model ", ValueError("is neither a valid local path nor a valid repo id")),
        ConfigError,
    )
    # A single-file checkpoint, and a revision for a local folder.
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="a single file"):
        resolve_model_path(str(tmp_path / "model.safetensors"), tmp_path)
    folder = materialize_random_model("random:tiny-sd", model_cache)
    with pytest.raises(ConfigError, match="a revision .'abc123'. pins a hub model"):
        load_diffusion_pipeline(str(folder), model_cache, revision="abc123")


def test_a_local_folder_of_pickle_weights_names_them(tmp_path, model_cache):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(materialize_random_model("random:tiny-sd", model_cache), folder)
    for weights in folder.rglob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ConfigError, match=r"has pickle weights \(.*diffusion_pytorch_model\.bin"):
        load_diffusion_pipeline(str(folder), model_cache)


def test_training_refuses_a_pipeline_without_a_unet():
    from types import SimpleNamespace

    from selma_core.phases.train import ExpertTrainer, TrainConfig

    with pytest.raises(ConfigError, match="has no UNet and VAE; training supports Stable Diffusion"):
        ExpertTrainer(SimpleNamespace(transformer=object(), vae=object()), TrainConfig(), "cpu")


@pytest.mark.parametrize(
    ("class_name", "message"),
    [
        (
            "StableDiffusionImg2ImgPipeline",
            "is a StableDiffusionImg2ImgPipeline, not a text-to-image pipeline",
        ),
        ("NoSuchPipeline", "names a pipeline that diffusers"),
    ],
)
def test_a_folder_of_another_kind_of_pipeline_is_a_config_error(tmp_path, model_cache, class_name, message):
    """An img2img or refiner model as the generator loads, then fails at its first batch for want
    of an input image; a pipeline class this diffusers lacks fails in loading. Neither is worth a
    retry (exit 2), and the message says what selma draws with."""
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(materialize_random_model("random:tiny-sd", model_cache), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    with pytest.raises(ConfigError, match=message) as info:
        load_diffusion_pipeline(str(folder), model_cache)
    assert "StableDiffusionXLPipeline" in str(info.value)
