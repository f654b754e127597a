"""ImageReward plumbing on the random tiny model (its rewards mean nothing; the arithmetic must hold),
and the converter of upstream's pickle checkpoint, on the tiny model's weights under upstream's names."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selma_core.errors import ConfigError
from selma_core.metrics import image_reward
from selma_core.metrics.image_reward import (
    IMAGE_MEAN,
    IMAGE_REWARD_MODEL,
    IMAGE_STD,
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardScorer,
    convert_checkpoint,
    main,
)

TEXTS = ["two cats", "a red ball left of a box", "three cups on a table"]
SIZES = [(48, 40), (33, 50), (32, 32)]  # wider, taller (odd crop offset), already square


def images(sizes=SIZES, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def scorer(model_cache):
    return ImageRewardScorer("random:tiny-image-reward", model_cache, batch_size=2, progress=False)


def by_hand_pixels(imgs: list[Image.Image], size: int) -> torch.Tensor:
    """Upstream's torchvision transform, spelled out: shorter side to ``size`` (PIL bicubic), centre crop
    at round((side - size) / 2), RGB, /255, CLIP mean/std."""
    out = []
    for img in imgs:
        w, h = img.size
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        resized = img.resize(new, Image.Resampling.BICUBIC)
        left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)
        crop = resized.crop((left, top, left + size, top + size)).convert("RGB")
        pixels = np.asarray(crop, dtype=np.float32) / 255
        out.append(((pixels - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def test_plumbing_score_is_the_head_on_cls_of_the_text_encoder_cross_attending_to_the_image(scorer):
    imgs = images()
    scores = scorer.score(imgs, TEXTS)
    pixels = by_hand_pixels(imgs, 32)
    assert torch.allclose(scorer.pixel_values(imgs), pixels, atol=1e-6)
    tokens = scorer.tokenizer(
        TEXTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    assert tokens["input_ids"].shape == (3, 35)
    # upstream's score feeds the ids as tokenized: [CLS] first, not BLIP retrieval's [ENC]
    assert (tokens["input_ids"][:, 0] == scorer.tokenizer.cls_token_id).all()
    with torch.no_grad():
        image_embeds = scorer.vision_model(pixel_values=pixels).last_hidden_state  # every token, post-LN
        assert image_embeds.shape == (3, 17, 128)
        hidden = scorer.text_encoder(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(3, 17, dtype=torch.long),
        ).last_hidden_state
        raw = scorer.head(hidden[:, 0, :].float()).squeeze(-1)
    expected = ((raw - REWARD_MEAN) / REWARD_STD).tolist()
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)


def test_plumbing_the_image_and_the_text_both_move_the_reward(scorer):
    same_text = scorer.score(images(), [TEXTS[0]] * 3)
    same_image = scorer.score(images([(40, 40)]) * 3, TEXTS)
    assert max(same_text) - min(same_text) > 1e-3  # the cross-attention reaches the [CLS] output
    assert max(same_image) - min(same_image) > 1e-3


def test_plumbing_a_batch_equals_one_by_one_and_is_deterministic(scorer):
    imgs = images()
    alone = [scorer.score([i], [t])[0] for i, t in zip(imgs, TEXTS, strict=True)]
    batch = scorer.score(imgs, TEXTS)
    assert batch == pytest.approx(alone, abs=1e-5)
    assert scorer.score(imgs, TEXTS) == batch
    pngs = []
    for img in imgs:
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    assert scorer.score(pngs, TEXTS) == batch  # image file bytes are read as the same pixels


def test_mismatched_lengths_are_an_error(scorer):
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        scorer.score(images()[:2], ["x"])


def test_plumbing_version_names_the_model_and_the_dtypes(scorer):
    assert scorer.version == "random:tiny-image-reward#v1|dtype=float32|autocast=none"
    assert scorer.name == "image_reward"


# -- the converter ---------------------------------------------------------------------------------

# transformers' BlipVisionModel names -> BLIP's VisionTransformer names (the inverse of the converter's).
_TO_UPSTREAM_VISION = (
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.position_embedding", "pos_embed"),
    ("embeddings.patch_embedding.", "patch_embed.proj."),
    ("encoder.layers.", "blocks."),
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
    ("self_attn.projection", "attn.proj"),
    ("self_attn.qkv", "attn.qkv"),
    ("post_layernorm", "norm"),
)


def upstream_state_dict(scorer) -> dict[str, torch.Tensor]:
    """The tiny model's weights as upstream's ImageReward.pt holds them: ``blip.visual_encoder.*``,
    ``blip.text_encoder.*`` (with med.py's position_ids buffer), BLIP's unused contrastive projections
    and ``mlp.layers.N.*``."""
    state = {}
    for key, value in scorer.vision_model.state_dict().items():
        for ours, theirs in _TO_UPSTREAM_VISION:
            key = key.replace(ours, theirs)
        state[f"blip.visual_encoder.{key}"] = value.clone()
    for key, value in scorer.text_encoder.state_dict().items():
        state[f"blip.text_encoder.{key}"] = value.clone()
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).expand(1, -1).clone()
    generator = torch.Generator().manual_seed(1)
    state["blip.vision_proj.weight"] = torch.randn(256, 128, generator=generator)
    state["blip.vision_proj.bias"] = torch.zeros(256)
    state["blip.text_proj.weight"] = torch.randn(256, 32, generator=generator)
    state["blip.text_proj.bias"] = torch.zeros(256)
    for key, value in scorer.head.state_dict().items():
        state[f"mlp.{key}"] = value.clone()
    return state


def med_config(scorer) -> dict:
    """BLIP's med_config.json for the tiny text encoder (a BERT config; encoder_width is overwritten
    with the ViT's width by BLIP_Pretrain, as in the real file)."""
    config = scorer.text_encoder.config
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": config.max_position_embeddings,
        "model_type": "bert",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": config.vocab_size,
        "encoder_width": 768,
        "add_cross_attention": True,
    }


def write_upstream(scorer, folder: Path, state: dict | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, med = folder / "ImageReward.pt", folder / "med_config.json"
    torch.save(upstream_state_dict(scorer) if state is None else state, checkpoint)
    med.write_text(json.dumps(med_config(scorer)))
    return checkpoint, med


def test_plumbing_the_converter_cli_turns_upstreams_checkpoint_into_a_folder_with_the_same_scores(
    scorer, tmp_path
):
    checkpoint, med = write_upstream(scorer, tmp_path / "upstream")
    out = tmp_path / "converted"
    argv = ["convert", "--checkpoint", str(checkpoint), "--med-config", str(med), "--out", str(out)]
    assert main([*argv, "--tokenizer", str(scorer.folder)]) == 0
    converted = ImageRewardScorer(str(out), tmp_path / "cache", progress=False)
    imgs = images()
    assert converted.score(imgs, TEXTS) == pytest.approx(scorer.score(imgs, TEXTS), abs=1e-6)
    # The folder and a digest of its files (weights replaced in place must not hit the cache).
    assert re.fullmatch(
        rf"{re.escape(str(out.resolve()))}#[0-9a-f]{{16}}\|dtype=float32\|.*", converted.version
    )
    assert sorted(converted.meta["source"]["dropped_keys"]) == [
        "blip.text_encoder.embeddings.position_ids",
        "blip.text_proj.bias",
        "blip.text_proj.weight",
        "blip.vision_proj.bias",
        "blip.vision_proj.weight",
    ]
    assert converted.text_encoder.config.encoder_hidden_size == 128  # the ViT's width, not med's 768
    assert converted.vision_model.config.num_attention_heads == 2  # 128 wide / 64 per head
    assert converted.vision_model.config.layer_norm_eps == pytest.approx(1e-6)
    assert main([*argv, "--tokenizer", str(scorer.folder)]) == 2  # never over an existing folder


def test_a_checkpoint_key_the_mapping_does_not_know_is_an_error_naming_it(scorer, tmp_path):
    state = upstream_state_dict(scorer)
    state["blip.visual_encoder.head.weight"] = torch.zeros(2, 128)
    checkpoint, med = write_upstream(scorer, tmp_path, state)
    with pytest.raises(ConfigError, match=r"blip\.visual_encoder\.head\.weight"):
        convert_checkpoint(checkpoint, med, tmp_path / "out", scorer.folder)
    assert not (tmp_path / "out").exists()


def test_a_missing_checkpoint_key_is_an_error_naming_it(scorer, tmp_path):
    state = upstream_state_dict(scorer)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    checkpoint, med = write_upstream(scorer, tmp_path, state)
    with pytest.raises(ConfigError, match=r"encoder\.layer\.1\.crossattention\.self\.key\.weight"):
        convert_checkpoint(checkpoint, med, tmp_path / "out", scorer.folder)


class _RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it without weights_only calls os.mkdir(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_the_converter_reads_the_pickle_with_weights_only(scorer, tmp_path):
    marker = tmp_path / "code-ran"
    state = {**upstream_state_dict(scorer), "payload": _RunsCodeWhenUnpickled(marker)}
    checkpoint, med = write_upstream(scorer, tmp_path, state)
    with pytest.raises(ConfigError, match="weights_only=True"):
        convert_checkpoint(checkpoint, med, tmp_path / "out", scorer.folder)
    assert not marker.exists()


def test_a_folder_that_is_not_converted_or_another_hub_id_is_a_config_error_saying_how_to_convert(tmp_path):
    for spec in (str(tmp_path), "someone/other-reward-model", str(tmp_path / "missing")):
        with pytest.raises(ConfigError, match="python -m selma_core.metrics.image_reward convert"):
            ImageRewardScorer(spec, tmp_path / "cache")


# -- the hub id ------------------------------------------------------------------------------------


def test_the_hub_id_without_allow_pickle_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=f"{IMAGE_REWARD_MODEL}.*allow_pickle_checkpoints") as error:
        ImageRewardScorer(IMAGE_REWARD_MODEL, tmp_path)
    assert "python -m selma_core.metrics.image_reward convert" in str(error.value)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Offline, with a Hugging Face cache of our own (empty until a test fills it)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_offline_an_uncached_image_reward_is_a_config_error_naming_it(tmp_path, empty_hub_cache):
    with pytest.raises(ConfigError, match=f"hf download {IMAGE_REWARD_MODEL} ImageReward.pt"):
        ImageRewardScorer(IMAGE_REWARD_MODEL, tmp_path / "cache", allow_pickle=True)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_plumbing_offline_with_allow_pickle_a_cached_snapshot_is_converted_once_into_the_cache(
    scorer, tmp_path, empty_hub_cache, monkeypatch
):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--THUDM--ImageReward"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    write_upstream(scorer, repo / "snapshots" / commit)
    monkeypatch.setattr(image_reward, "BLIP_TOKENIZER", str(scorer.folder))  # bert-base-uncased's stand-in
    cache = tmp_path / "cache"
    hub = ImageRewardScorer(IMAGE_REWARD_MODEL, cache, allow_pickle=True, progress=False)
    assert hub.version == f"{IMAGE_REWARD_MODEL}@{commit}|dtype=float32|autocast=none"
    assert hub.folder.parent == cache / "models" and hub.meta["source"]["commit"] == commit
    imgs = images()
    assert hub.score(imgs, TEXTS) == pytest.approx(scorer.score(imgs, TEXTS), abs=1e-6)
    stamp = (hub.folder / ".complete").stat().st_mtime_ns
    again = ImageRewardScorer(IMAGE_REWARD_MODEL, cache, allow_pickle=True, progress=False)
    assert again.folder == hub.folder and (again.folder / ".complete").stat().st_mtime_ns == stamp
