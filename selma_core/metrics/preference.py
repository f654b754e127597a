"""Human-preference scores of an image for its prompt: PickScore (Kirstain et al., *Pick-a-Pic*, 2023).

PickScore is a CLIP-H fine-tune, ``yuvalkirstain/PickScore_v1``, read with the processor of its base
model, ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. As the PickScore repository computes it:

    score = logit_scale.exp() * cos(image embedding, text embedding)

with the model's *own* learned ``logit_scale`` (about 100 for PickScore_v1), so scores are comparable
with published PickScore numbers (around 20 to 23 for good Stable Diffusion images). The softmax of
the scores of several images for one prompt (``PickScorer.probs``) is PickScore's preference
probability. The model loads from a hub id, a local folder, or ``random:tiny-clip`` (random weights:
the scores test plumbing and mean nothing), through ``selma_core.metrics.vqa.load_pretrained`` (offline,
only the local cache is read; a missing model is a ``ConfigError`` saying how to provide it).

Not implemented here, left for later:

- ImageReward (Xu et al., 2023): in its own module, ``selma_core.metrics.image_reward``
  (``ImageRewardScorer``): transformers' BLIP ViT-L and cross-attention text encoder plus upstream's MLP
  head, from ``THUDM/ImageReward``'s ``ImageReward.pt`` (a pickle) converted to safetensors by that
  module's ``convert`` command.
- HPS v2 / v2.1 (Wu et al., 2023): in its own module, ``selma_core.metrics.hps`` (``HpsScorer``):
  transformers' ``CLIPModel`` in open_clip ViT-H-14's shape, with the ``xswu/HPSv2`` checkpoint
  (``HPS_v2.1_compressed.pt``, a pickle) converted to safetensors by that module's ``convert``
  command; score = cosine(image, text), returned raw (upstream reports it x100).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from selma_core.metrics.scoring import BatchedScorer

__all__ = ["PICKSCORE_MODEL", "PICKSCORE_PROCESSOR", "PickScorer", "clip_cosine", "projected_features"]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def projected_features(output: Any) -> Any:
    """The projected embedding from ``CLIPModel.get_image_features``/``get_text_features``: a tensor in
    transformers 4, an output object (``pooler_output`` holds the projection) in transformers 5."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]  # (last_hidden_state, pooler_output, ...) with return_dict=False
    raise TypeError(f"cannot find the projected features in a {type(output).__name__}")


class PickScorer(BatchedScorer):
    """PickScore of (image, prompt) pairs with a transformers ``CLIPModel``.

    ``processor_spec``: where the processor (tokenizer, image preprocessing) comes from; by default
    ``PICKSCORE_PROCESSOR`` for ``PICKSCORE_MODEL`` (whose repository has no processor) and the model's
    own folder for anything else (``random:tiny-clip``, a local copy holding both).
    """

    name = "pickscore"

    def __init__(
        self,
        spec: str = PICKSCORE_MODEL,
        cache_dir: str | Path = "selma-data/cache",
        *,
        processor_spec: str | None = None,
        device: str = "auto",
        dtype: Any = "float32",
        autocast_dtype: Any = "bfloat16",
        batch_size: int = 16,
        revision: str | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        from selma_core.metrics.vqa import dtype_name, load_pretrained

        super().__init__(
            device=device,
            dtype=dtype,
            autocast_dtype=autocast_dtype,
            batch_size=batch_size,
            progress=progress,
        )
        processor_spec = processor_spec or (PICKSCORE_PROCESSOR if spec == PICKSCORE_MODEL else spec)
        self.model, _, self.reference = load_pretrained(
            spec,
            cache_dir,
            CLIPModel,
            None,
            revision=revision,
            dtype=self.dtype,
            allow_pickle=allow_pickle,
            what="PickScore model",
        )
        _, self.processor, processor_ref = load_pretrained(
            processor_spec, cache_dir, None, CLIPProcessor, what="PickScore processor"
        )
        self.model = self.model.to(self.device).eval()
        self.version = (
            f"{self.reference}|processor={processor_ref}|dtype={dtype_name(self.dtype)}"
            f"|autocast={dtype_name(self.autocast_dtype)}"
        )

    def probs(self, text: str, images: Sequence[Any]) -> list[float]:
        """PickScore's preference probabilities: the softmax of the scores of ``images`` for ``text``."""
        import torch

        scores = torch.tensor(self.score(images, [text] * len(images)), dtype=torch.float64)
        return torch.softmax(scores, dim=0).tolist()

    def _score_batch(self, images: list, texts: list[str]) -> list[float]:
        """PickScore of each pair: ``logit_scale.exp() * cosine``."""
        import torch

        from selma_core.metrics.vqa import to_rgb

        image_inputs = self.processor(images=[to_rgb(i) for i in images], return_tensors="pt")
        text_inputs = self.processor(
            text=texts, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        pixel_values = image_inputs["pixel_values"].to(self.device, self.model.dtype)
        text_inputs = {k: v.to(self.device) for k, v in text_inputs.items()}
        with torch.inference_mode():
            scale = self.model.logit_scale.float().exp()
        cosine = clip_cosine(self.model, pixel_values, text_inputs, self._autocast())
        return (scale * cosine).tolist()


def clip_cosine(model: Any, pixel_values: Any, text_inputs: Mapping[str, Any], autocast: Any) -> Any:
    """The cosine of ``model``'s (a ``CLIPModel``) projected image and text features, row i for pair i,
    in float32: the features are cast up before normalising, so autocast rounds only the towers."""
    import torch

    with torch.inference_mode(), autocast:
        image_embeds = projected_features(model.get_image_features(pixel_values=pixel_values))
        text_embeds = projected_features(model.get_text_features(**text_inputs))
    image_embeds = image_embeds.float()
    text_embeds = text_embeds.float()
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return (image_embeds * text_embeds).sum(dim=-1)
