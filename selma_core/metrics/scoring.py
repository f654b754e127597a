"""What the image-text scorers (PickScore, HPS, ImageReward, CLIPScore) share: where and in which dtypes
they compute, and the batched ``score(images, texts)`` loop with its progress bar.

A scorer subclasses ``BatchedScorer``, calls its constructor before loading weights (``self.dtype`` is
the dtype to load them in) and implements ``_score_batch``, the score of one batch of pairs. The
formula, the model and the ``version`` string (the answer cache's key) stay in each scorer's module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar

from selma_core.errors import ConfigError

__all__ = ["BatchedScorer"]


class BatchedScorer:
    """``score(images, texts)``: one float per (image, text) pair, computed ``batch_size`` pairs at a time.

    ``device``: ``"auto"`` is CUDA when there is one, else CPU. ``dtype``: the weights' dtype (None: as
    saved). ``autocast_dtype``: the compute dtype of ``torch.autocast``, on CUDA only (None: none);
    ignored on CPU, where autocast to half precision is slow and rounds needlessly.
    """

    name: ClassVar[str]

    def __init__(
        self,
        *,
        device: str,
        batch_size: int,
        progress: bool,
        dtype: Any = None,
        autocast_dtype: Any = None,
    ) -> None:
        from selma_core.metrics.vqa import torch_dtype
        from selma_core.models.loading import resolve_device

        if batch_size < 1:
            raise ConfigError(f"{self.name}: batch_size must be >= 1")
        self.device = resolve_device(device)
        self.dtype = torch_dtype(dtype)
        self.autocast_dtype = torch_dtype(autocast_dtype) if self.device.startswith("cuda") else None
        self.batch_size = batch_size
        self.progress = progress

    def score(self, images: Sequence[Any], texts: Sequence[str]) -> list[float]:
        """One score per (image, text) pair, in order; see the scorer's ``_score_batch`` for the formula."""
        from tqdm import tqdm

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        scores: list[float] = []
        with tqdm(
            total=len(texts),
            desc=self.name,
            unit="image",
            # a single batch finishes in one step: a bar would only add noise to the log
            disable=not self.progress or len(texts) <= self.batch_size,
        ) as bar:
            for start in range(0, len(texts), self.batch_size):
                stop = start + self.batch_size
                scores.extend(self._score_batch(list(images[start:stop]), list(texts[start:stop])))
                bar.update(len(texts[start:stop]))
        return scores

    def _score_batch(self, images: list, texts: list[str]) -> list[float]:
        """The scores of one batch of at most ``batch_size`` pairs."""
        raise NotImplementedError

    def _autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to ``autocast_dtype`` on CUDA; a no-op context elsewhere or when it is None."""
        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)
