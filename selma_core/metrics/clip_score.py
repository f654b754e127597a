"""CLIPScore: how well an image matches its text, by a CLIP model (Hessel et al., 2021).

score = 100 · max(cos(image embedding, text embedding), 0), the scale torchmetrics reports.
The model loads through ``selma_core.metrics.vqa.load_pretrained`` (safetensors only unless
``allow_pickle``; offline, the local cache only, and a missing model is an error naming it) from a
hub id (default ``openai/clip-vit-large-patch14``), a local folder, or ``random:tiny-clip``, a random
test model whose scores test the plumbing and mean nothing.
"""

from __future__ import annotations

from pathlib import Path

from selma_core.metrics.scoring import BatchedScorer


class ClipScorer(BatchedScorer):
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

        # No weights dtype, no autocast: CLIPScore computes without either (``version`` says float32).
        super().__init__(device=device, batch_size=batch_size, progress=False)
        model, self.processor, reference = load_pretrained(
            spec,
            cache_dir,
            CLIPModel,
            CLIPProcessor,
            revision=revision,
            allow_pickle=allow_pickle,
            what="CLIPScore model",
        )
        self.model = model.to(self.device).eval()
        self.spec = spec
        # The answer cache's key: the weights (reference), the formula and the text truncation.
        self.version = f"{reference}|float32|100*clamp(cos)|max_len=77"

    def _score_batch(self, images: list, texts: list[str]) -> list[float]:
        """100 * max(cosine, 0) of each pair."""
        import torch

        inputs = self.processor(
            text=texts, images=images, return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        # CLIPModel returns L2-normalised projections: the row-wise dot product is the cosine.
        cosine = (out.image_embeds * out.text_embeds).sum(dim=-1)
        return (100.0 * cosine.clamp(min=0)).tolist()
