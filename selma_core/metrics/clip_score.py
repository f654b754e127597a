"""CLIPScore: how well an image matches its text, by a CLIP model (Hessel et al., 2021).

score = 100 · max(cos(image embedding, text embedding), 0), the scale torchmetrics reports.
The model loads from a hub id (default ``openai/clip-vit-large-patch14``), a local folder, or
``random:tiny-clip``, a random test model whose scores test the plumbing and mean nothing.
"""

from __future__ import annotations

from pathlib import Path


class ClipScorer:
    def __init__(self, spec: str, cache_dir: str | Path, device: str = "cpu", batch_size: int = 16) -> None:
        from transformers import CLIPModel, CLIPProcessor

        from selma_core.models.loading import model_load_error, resolve_model_path

        path = resolve_model_path(spec, cache_dir)
        try:
            self.model = CLIPModel.from_pretrained(path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise model_load_error(path, e) from e
        self.spec = spec
        self.device = device
        self.batch_size = batch_size

    def score(self, images: list, texts: list[str]) -> list[float]:
        """One score per (image, text) pair."""
        import torch

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(
                text=texts[start : start + self.batch_size],
                images=images[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(self.device)
            with torch.no_grad():
                out = self.model(**inputs)
            # CLIPModel returns L2-normalised projections: the row-wise dot product is the cosine.
            cosine = (out.image_embeds * out.text_embeds).sum(dim=-1)
            scores.extend((100.0 * cosine.clamp(min=0)).tolist())
        return scores
