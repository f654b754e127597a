"""PickScore plumbing on the random tiny CLIP (its scores mean nothing; the arithmetic must hold)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from selma_core.errors import ConfigError
from selma_core.metrics.preference import PICKSCORE_MODEL, PickScorer, projected_features

TEXTS = ["two cats", "a red ball left of a box", "three cups on a table"]


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def scorer(model_cache):
    return PickScorer("random:tiny-clip", model_cache, batch_size=2, progress=False)


def test_plumbing_score_is_the_models_logit_scale_times_the_cosine(scorer):
    imgs = images(3)
    scores = scorer.score(imgs, TEXTS)
    # by hand, through CLIPModel's forward (its own projections, normalised here)
    inputs = scorer.processor(text=TEXTS, images=imgs, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    expected = (scorer.model.logit_scale.exp() * (image * text).sum(-1)).tolist()
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)


def test_plumbing_a_batch_equals_one_by_one(scorer):
    imgs = images(3)
    alone = [scorer.score([i], [t])[0] for i, t in zip(imgs, TEXTS, strict=True)]
    assert scorer.score(imgs, TEXTS) == pytest.approx(alone, abs=1e-5)
    assert scorer.score(imgs, TEXTS) == scorer.score(imgs, TEXTS)


def test_plumbing_probs_are_the_softmax_of_the_scores(scorer):
    imgs = images(3)
    probs = scorer.probs("two cats", imgs)
    scores = torch.tensor(scorer.score(imgs, ["two cats"] * 3), dtype=torch.float64)
    assert probs == pytest.approx(torch.softmax(scores, 0).tolist(), abs=1e-9)
    assert sum(probs) == pytest.approx(1.0)


def test_plumbing_version_names_model_and_processor(scorer):
    assert "random:tiny-clip#v" in scorer.version and "processor=random:tiny-clip#v" in scorer.version


def test_projected_features_from_a_tensor_an_output_object_or_a_tuple():
    features = torch.ones(2, 4)
    assert projected_features(features) is features
    output = BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3, 8), pooler_output=features)
    assert projected_features(output) is features
    assert projected_features((torch.zeros(2, 3, 8), features)) is features
    with pytest.raises(TypeError):
        projected_features({"x": 1})


def test_mismatched_lengths_are_an_error(scorer):
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        scorer.score(images(2), ["x"])


def test_offline_an_uncached_pickscore_is_a_config_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=f"hf download {PICKSCORE_MODEL}"):
        PickScorer(cache_dir=tmp_path)
