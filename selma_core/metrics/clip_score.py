"""CLIPScore: how well an image matches its text, by a CLIP model (Hessel et al., 2021).

score = 100 · max(cos(image embedding, text embedding), 0), the scale torchmetrics reports.
The model loads through ``selma_core.metrics.vqa.load_pretrained`` (safetensors only unless
``allow_pickle``; offline, the local cache only, and a missing model is an error naming it) from a
hub id (default ``openai/clip-vit-large-patch14``), a local folder, or ``random:tiny-clip``, a random
test model whose scores test the plumbing and mean nothing.
"""

from __future__ import annotations

from pathlib import Path


class ClipScorer:
    name = "clip_score"

    def __init__(
        self,
        spec: str,
        cache_dir: str | Path,
        device: str = "cpu",
        batch_size: int = 16,
        revision: str | None = None,
        allow_pickle: bool = False,
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        from selma_core.metrics.vqa import load_pretrained

        model, self.processor, reference = load_pretrained(
            spec,
            cache_dir,
            CLIPModel,
            CLIPProcessor,
            revision=revision,
            allow_pickle=allow_pickle,
            what="CLIPScore model",
        )
        self.model = model.to(device).eval()
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        # The answer cache's key: the weights (reference), the formula and the text truncation.
        self.version = f"{reference}|float32|100*clamp(cos)|max_len=77"

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
