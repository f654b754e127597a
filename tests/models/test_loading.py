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
