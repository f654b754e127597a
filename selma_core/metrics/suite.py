"""The image-text metrics evaluation can compute, behind one small interface, each cached.

Every metric here scores one (image, prompt) pair with one model call, so they share one shape,
``ImageTextMetric``: ``score(images, texts) -> list[float]`` plus a ``name`` and a ``version``
(what identifies the model's behaviour). ``open_metric`` builds one from the eval config;
``CachedMetric`` routes it through the answer cache (``selma_core.metrics.answer_cache``), keyed by
(metric name, version, SHA-256 of the image bytes, prompt), so a second evaluation of the same
images scores nothing again.

Metrics (names as in ``eval.metrics``), each on its published scale:

- ``clip_score``: 100 · max(cos, 0) with a CLIP model: torchmetrics' scale of CLIPScore (Hessel
  et al., 2021, whose CLIP-S is 2.5 · max(cos, 0) with ViT-B/32: figures differ by that factor).
- ``pickscore``: PickScore_v1, logit_scale · cos (Kirstain et al., 2023), about 18 to 23.
- ``image_reward``: ImageReward, the standardised reward (Xu et al., 2023), about -2 to 2.
- ``hps``: HPS v2 / v2.1, the cosine of the fine-tuned OpenCLIP (Wu et al., 2023), about 0.2 to 0.35.
- ``vqascore``: P("Yes") of a VQA model asked whether the image shows the prompt (Lin et al., 2024).

DSG and TIFA ask many questions per image; they are computed by the eval phase from the cached
VQA backend (``selma_core.metrics.vqa.cached_backend``), not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from selma_core.errors import ConfigError

__all__ = ["IMAGE_TEXT_METRICS", "CachedMetric", "ImageTextMetric", "MetricInfo", "open_metric"]


class ImageTextMetric(Protocol):
    name: str
    version: str

    def score(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]: ...


@dataclass(frozen=True)
class MetricInfo:
    """What a report says about a metric: its label, direction and scale."""

    label: str
    scale: str
    higher_is_better: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "scale": self.scale, "higher_is_better": self.higher_is_better}


IMAGE_TEXT_METRICS: dict[str, MetricInfo] = {
    # torchmetrics' scale, 100·max(cos, 0) (Hessel et al.'s CLIP-S is 2.5·max(cos, 0), with ViT-B/32).
    "clip_score": MetricInfo("CLIPScore", "100·max(cos, 0), torchmetrics' scale, 0-100"),
    "pickscore": MetricInfo("PickScore", "logit scale x cosine (about 18-23)"),
    "image_reward": MetricInfo("ImageReward", "standardised reward (about -2 to 2)"),
    "hps": MetricInfo("HPS v2", "cosine (about 0.2-0.35)"),
    "vqascore": MetricInfo("VQAScore", "P(yes), 0-1"),
}


def open_metric(
    name: str, cfg: Any, cache_dir: str | Path, device: str, allow_pickle: bool
) -> ImageTextMetric:
    """The metric ``name`` with the models ``cfg`` (an ``EvalConfig``) names, on ``device``."""
    if name == "clip_score":
        from selma_core.metrics.clip_score import ClipScorer

        return ClipScorer(cfg.clip_model, cache_dir, device, allow_pickle=allow_pickle)
    if name == "pickscore":
        from selma_core.metrics.preference import PickScorer

        return PickScorer(
            cfg.pickscore_model,
            cache_dir,
            processor_spec=cfg.pickscore_processor,
            device=device,
            allow_pickle=allow_pickle,
        )
    if name == "image_reward":
        from selma_core.metrics.image_reward import ImageRewardScorer

        return ImageRewardScorer(cfg.image_reward_model, cache_dir, device=device, allow_pickle=allow_pickle)
    if name == "hps":
        from selma_core.metrics.hps import HpsScorer

        return HpsScorer(cfg.hps_model, cache_dir, device=device, allow_pickle=allow_pickle)
    if name == "vqascore":
        from selma_core.metrics.vqa import load_vqa_backend

        backend = load_vqa_backend(
            cfg.vqascore_backend, cfg.vqascore_model, cache_dir, device=device, allow_pickle=allow_pickle
        )
        return _VqaScore(backend)
    raise ConfigError(f"eval.metrics: unknown metric {name!r}; known: {', '.join(IMAGE_TEXT_METRICS)}")


class _VqaScore:
    """VQAScore as an image-text metric: the backend's ``prob_yes``."""

    name = "vqascore"

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.version = f"{backend.name}|{backend.version}|{backend.yes_template}"

    def score(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        return self.backend.prob_yes(images, texts)


class CachedMetric:
    """``metric`` with its scores in an ``AnswerCache``: only pairs the cache lacks reach the model.

    Images are given as the bytes of their (committed) PNG files: the cache key is their SHA-256.
    """

    def __init__(self, metric: ImageTextMetric, cache: Any) -> None:
        from selma_core.metrics.answer_cache import cached

        self.metric = metric
        self.name = metric.name
        self.version = metric.version
        self.computed = 0  # pairs that reached the model (for the log: a rerun computes none)

        def compute(images: list[bytes], texts: list[str]) -> list[float]:
            from selma_core.metrics.vqa import to_rgb

            self.computed += len(images)
            return metric.score([to_rgb(i) for i in images], texts)

        self._cached = cached(compute, cache, f"metric:{metric.name}", metric.version, field="score")

    def score(self, images: Sequence[bytes], texts: Sequence[str]) -> list[float]:
        return self._cached(list(images), list(texts))
