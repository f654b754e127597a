"""CLIPScore plumbing on the random tiny CLIP (its scores mean nothing; the arithmetic must hold)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from selma_core.metrics.clip_score import ClipScorer


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def test_score_is_100_times_the_clamped_cosine(model_cache):
    scorer = ClipScorer("random:tiny-clip", model_cache, batch_size=2)
    imgs, texts = images(3), ["two cats", "a red ball left of a box", "three cups"]
    scores = scorer.score(imgs, texts)
    inputs = scorer.processor(text=texts, images=imgs, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    expected = (100 * (image * text).sum(-1).clamp(min=0)).tolist()
    assert scores == pytest.approx(expected, abs=1e-4)
    assert all(0 <= s <= 100 for s in scores)


def test_batches_equal_one_by_one(model_cache):
    scorer = ClipScorer("random:tiny-clip", model_cache, batch_size=4)
    imgs, texts = images(3), ["a", "b c", "d e f"]
    together = scorer.score(imgs, texts)
    alone = [scorer.score([i], [t])[0] for i, t in zip(imgs, texts, strict=True)]
    assert together == pytest.approx(alone, abs=1e-4)


def test_mismatched_lengths_are_an_error(model_cache):
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        ClipScorer("random:tiny-clip", model_cache).score(images(2), ["x"])
