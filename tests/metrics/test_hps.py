"""HPS v2 plumbing on the random tiny CLIP (its scores mean nothing; the arithmetic, the image transform,
the checkpoint conversion and the loading rules must hold). No upstream weights are used or fetched."""

from __future__ import annotations

import io
import json
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image

from selma_core.errors import ConfigError, EndpointError
from selma_core.metrics import hps
from selma_core.metrics.hps import (
    HPS_PROCESSOR,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PREPROCESS_ID,
    HpsScorer,
    clip_to_open_clip_state_dict,
    convert_checkpoint,
    hps_transform,
    open_clip_to_clip_state_dict,
    vit_h14_config,
)
from selma_core.models.loading import resolve_model_path

TEXTS = ["two cats", "a red ball left of a box", "three cups on a table"]
#: What a zero (black) pixel becomes after normalisation, per channel.
BLACK = [(0 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, strict=True)]


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


def solid(width: int, height: int, rgb: tuple[int, int, int] = (200, 100, 50)) -> Image.Image:
    return Image.new("RGB", (width, height), rgb)


@pytest.fixture(scope="module")
def scorer(model_cache):
    return HpsScorer("random:tiny-clip", model_cache, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def tiny_folder(model_cache) -> str:
    return resolve_model_path("random:tiny-clip", model_cache)


@pytest.fixture(scope="module")
def open_clip_state(scorer) -> dict[str, torch.Tensor]:
    """The tiny CLIP's weights under open_clip's names (fused q/k/v, (in, out) projections)."""
    return clip_to_open_clip_state_dict(scorer.model.state_dict())


@pytest.fixture(scope="module")
def upstream_style_checkpoint(open_clip_state, tmp_path_factory):
    """As upstream saves them: ``{"state_dict": ...}`` with DistributedDataParallel's ``module.`` prefix."""
    path = tmp_path_factory.mktemp("hps-ckpt") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in open_clip_state.items()}}, path)
    return path


# -- scores -----------------------------------------------------------------------------------------


def test_plumbing_score_is_the_cosine_of_the_normalised_projected_features(scorer):
    imgs = images(3)
    scores = scorer.score(imgs, TEXTS)
    # by hand, through CLIPModel's forward (its own projections), on the HPS transform's pixels
    pixel_values = torch.stack([hps_transform(i, 32) for i in imgs])
    tokens = scorer.tokenizer(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(pixel_values=pixel_values, **tokens)
    image = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    text = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    assert scores == pytest.approx((image * text).sum(-1).tolist(), abs=1e-5)  # no logit_scale


def test_plumbing_a_batch_equals_one_by_one_and_is_deterministic(scorer):
    imgs = images(3)
    alone = [scorer.score([i], [t])[0] for i, t in zip(imgs, TEXTS, strict=True)]
    assert scorer.score(imgs, TEXTS) == pytest.approx(alone, abs=1e-5)
    assert scorer.score(imgs, TEXTS) == scorer.score(imgs, TEXTS)


def test_plumbing_one_float_per_pair_in_minus_one_to_one(scorer):
    scores = scorer.score(images(3), TEXTS)
    assert len(scores) == 3
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in scores)


def test_mismatched_lengths_are_an_error(scorer):
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        scorer.score(images(2), ["x"])


def test_plumbing_version_names_model_label_dtypes_and_preprocessing(scorer):
    assert scorer.name == "hps"
    assert scorer.version.startswith("random:tiny-clip#v")
    for part in ("|hps=random", "|dtype=float32", "|autocast=none", f"|preprocess={PREPROCESS_ID}@32"):
        assert part in scorer.version


# -- the image transform ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "content", "pads"),
    [
        # 40 x 21 -> scale 0.8 -> 32 x round(16.8) = 17 rows; 15 rows of padding: 7 on top, 8 below
        (40, 21, (32, 17), (0, 0, 7, 8)),
        # 10 x 64 -> scale 0.5 -> 5 columns; 27 of padding: 13 left, 14 right
        (10, 64, (5, 32), (13, 14, 0, 0)),
    ],
)
def test_transform_resizes_the_longest_side_and_pads_with_black(width, height, content, pads):
    rgb = (200, 100, 50)
    pixels = hps_transform(solid(width, height, rgb), 32)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    left, right, top, bottom = pads
    content_w, content_h = content
    assert (left + content_w + right, top + content_h + bottom) == (32, 32)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[top : top + content_h, left : left + content_w] = True
    for c in range(3):
        # padding: black in [0, 1] space, normalised
        assert torch.allclose(pixels[c][~mask], torch.tensor(BLACK[c]), atol=1e-6)
        # content: a flat colour stays that colour through the bicubic resize
        value = (rgb[c] / 255 - OPENAI_CLIP_MEAN[c]) / OPENAI_CLIP_STD[c]
        assert torch.allclose(pixels[c][mask], torch.tensor(value), atol=1e-4)


def test_transform_of_an_image_of_the_model_size_only_normalises():
    rng = np.random.default_rng(1)
    array = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    pixels = hps_transform(Image.fromarray(array), 32)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    expected = (torch.from_numpy(array).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(pixels, expected, atol=1e-6)


def test_transform_pads_an_image_whose_longest_side_is_already_the_size():
    pixels = hps_transform(solid(32, 20), 32)  # no resize; 12 rows of padding, 6 above and 6 below
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels[0, :6], torch.tensor(BLACK[0])) and torch.allclose(
        pixels[0, 26:], torch.tensor(BLACK[0])
    )
    assert not torch.allclose(pixels[0, 6:26], torch.tensor(BLACK[0]))


def test_transform_drops_alpha_and_reads_file_bytes():
    rgba = Image.new("RGBA", (32, 32), (200, 100, 50, 0))
    assert torch.equal(hps_transform(rgba, 32), hps_transform(solid(32, 32), 32))
    buffer = io.BytesIO()
    solid(32, 32).save(buffer, format="PNG")
    assert torch.equal(hps_transform(buffer.getvalue(), 32), hps_transform(solid(32, 32), 32))


# -- the converter ----------------------------------------------------------------------------------


def test_converter_round_trip_keeps_every_weight_and_every_score(
    scorer, open_clip_state, upstream_style_checkpoint, tiny_folder, model_cache, tmp_path
):
    out = convert_checkpoint(
        upstream_style_checkpoint,
        tmp_path / "converted",
        processor=tiny_folder,
        config=tiny_folder,
        cache_dir=model_cache,
    )
    meta = json.loads((out / hps.CONVERSION_FILE).read_text())
    assert meta["checkpoint"] == "HPS_v2.1_compressed.pt" and meta["hps_version"] == "v2.1"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    converted = HpsScorer(str(out), model_cache, batch_size=2, progress=False)
    original = scorer.model.state_dict()
    assert set(converted.model.state_dict()) == set(original)
    for key, value in converted.model.state_dict().items():
        assert torch.equal(value, original[key]), key
    imgs = images(3)
    assert converted.score(imgs, TEXTS) == pytest.approx(scorer.score(imgs, TEXTS), abs=1e-6)
    assert "|hps=v2.1|" in converted.version and f"#sha256={meta['sha256'][:16]}" in converted.version


def test_converter_cli_reads_a_bare_state_dict(open_clip_state, tiny_folder, model_cache, tmp_path, capsys):
    checkpoint = tmp_path / "bare.pt"
    torch.save({k: v.half() for k, v in open_clip_state.items()}, checkpoint)  # as upstream's: float16
    argv = ["convert", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    argv += ["--processor", tiny_folder, "--config", tiny_folder, "--cache-dir", str(model_cache)]
    assert hps.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(tmp_path / "out") and printed["hps_version"] is None
    assert printed["dtype"] == "float16"  # kept as the checkpoint has it: no size doubling
    assert (tmp_path / "out" / "config.json").is_file()
    # a second conversion into the same, now full, folder is refused (exit 2), never overwrites
    assert hps.main(argv) == 2
    assert "not empty" in capsys.readouterr().err


def test_converter_an_unknown_key_is_an_error_naming_it(open_clip_state, tiny_folder, model_cache, tmp_path):
    checkpoint = tmp_path / "extra.pt"
    torch.save({**open_clip_state, "visual.score_head.weight": torch.zeros(2)}, checkpoint)
    with pytest.raises(ConfigError, match="visual.score_head.weight"):
        convert_checkpoint(checkpoint, tmp_path / "out", processor=tiny_folder, config=tiny_folder)
    assert not (tmp_path / "out").exists()


def test_converter_a_missing_key_is_an_error_naming_it(open_clip_state, tiny_folder, model_cache, tmp_path):
    checkpoint = tmp_path / "missing.pt"
    state = {
        k: v for k, v in open_clip_state.items() if k != "visual.transformer.resblocks.1.attn.in_proj_bias"
    }
    torch.save(state, checkpoint)
    with pytest.raises(
        ConfigError,
        match=r"missing from the checkpoint: visual\.transformer\.resblocks\.1\.attn\.in_proj_bias",
    ):
        convert_checkpoint(checkpoint, tmp_path / "out", processor=tiny_folder, config=tiny_folder)


def test_converter_a_layer_the_config_lacks_or_a_wrong_shape_is_an_error(
    open_clip_state, tiny_folder, tmp_path
):
    extra_layer = {
        k.replace("resblocks.1.", "resblocks.7."): v
        for k, v in open_clip_state.items()
        if ".resblocks.1." in k
    }
    torch.save({**open_clip_state, **extra_layer}, tmp_path / "deeper.pt")
    with pytest.raises(ConfigError, match=r"not in the model.*transformer\.resblocks\.7\."):
        convert_checkpoint(tmp_path / "deeper.pt", tmp_path / "a", processor=tiny_folder, config=tiny_folder)
    torch.save({**open_clip_state, "ln_final.bias": torch.zeros(5)}, tmp_path / "shape.pt")
    with pytest.raises(ConfigError, match=r"wrong shape: ln_final\.bias"):
        convert_checkpoint(tmp_path / "shape.pt", tmp_path / "b", processor=tiny_folder, config=tiny_folder)


class NotATensor:
    """A pickled object that ``torch.load(weights_only=True)`` must refuse to build."""


def test_converter_reads_pickles_with_weights_only(tmp_path, tiny_folder):
    torch.save({"state_dict": {"x": NotATensor()}}, tmp_path / "code.pt")
    with pytest.raises(ConfigError, match="weights_only=True"):
        convert_checkpoint(tmp_path / "code.pt", tmp_path / "out", processor=tiny_folder, config=tiny_folder)


def test_vit_h14_config_takes_open_clip_vit_h14_names_and_shapes():
    """The default architecture against open_clip ViT-H-14's state dict layout (on the meta device)."""
    from transformers import CLIPModel

    config = vit_h14_config()
    assert config.text_config.hidden_act == config.vision_config.hidden_act == "gelu"  # not quick_gelu
    with torch.device("meta"):
        model_state = CLIPModel(config).state_dict()
    names = clip_to_open_clip_state_dict(model_state)
    assert len(names) == 6 + 24 * 12 + 8 + 32 * 12  # text top level, text blocks, vision top, vision blocks
    shapes = {
        "token_embedding.weight": (49408, 1024),
        "positional_embedding": (77, 1024),
        "text_projection": (1024, 1024),
        "visual.proj": (1280, 1024),
        "visual.conv1.weight": (1280, 3, 14, 14),
        "visual.class_embedding": (1280,),
        "visual.positional_embedding": (257, 1280),
        "visual.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "visual.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
        "transformer.resblocks.23.attn.in_proj_bias": (3072,),
        "transformer.resblocks.23.mlp.c_proj.weight": (1024, 4096),
        "logit_scale": (),
    }
    for key, shape in shapes.items():
        assert tuple(names[key].shape) == shape, key
    mapped, _ = open_clip_to_clip_state_dict(names)
    assert set(mapped) == set(model_state)


# -- the upstream checkpoints: opt-in, offline, hub errors, convert once ---------------------------------


def test_hps_v21_without_allow_pickle_is_a_config_error_naming_the_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match=r"HPS_v2\.1_compressed\.pt.*allow_pickle_checkpoints: true") as e:
        HpsScorer("hps-v2.1", tmp_path)
    assert "python -m selma_core.metrics.hps convert" in str(e.value)


def test_offline_an_uncached_checkpoint_is_a_config_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(ConfigError, match=r"xswu/HPSv2/HPS_v2_compressed\.pt is not in the local") as e:
        HpsScorer("hps-v2", tmp_path / "cache", allow_pickle=True)
    assert "hf download xswu/HPSv2 HPS_v2_compressed.pt" in str(e.value) and HPS_PROCESSOR in str(e.value)
    assert not (tmp_path / "cache" / "hps" / "v2.0").exists()


def test_an_unreachable_hub_is_an_endpoint_error(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub and no cached copy")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(EndpointError, match=r"HPS_v2\.1_compressed\.pt"):
        HpsScorer("hps-v2.1", tmp_path, allow_pickle=True)


def test_plumbing_hps_v21_with_the_opt_in_is_fetched_converted_once_and_loaded(
    scorer, upstream_style_checkpoint, tiny_folder, tmp_path, monkeypatch
):
    snapshot = tmp_path / "hub" / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    shutil.copy(upstream_style_checkpoint, snapshot / "HPS_v2.1_compressed.pt")
    fetched = []

    def fake_download(repo_id, filename, revision=None, local_files_only=False):
        fetched.append((repo_id, filename, local_files_only))
        return str(snapshot / filename)

    real_convert = hps.convert_checkpoint

    def tiny_convert(checkpoint, out, **kwargs):  # the tiny model's tokenizer and architecture
        return real_convert(checkpoint, out, **{**kwargs, "processor": tiny_folder, "config": tiny_folder})

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(hps, "convert_checkpoint", tiny_convert)
    cache = tmp_path / "cache"
    first = HpsScorer("hps-v2.1", cache, allow_pickle=True, progress=False)
    assert fetched == [("xswu/HPSv2", "HPS_v2.1_compressed.pt", True)]  # offline in tests: cache only
    assert (cache / "hps" / "v2.1" / ".complete").is_file()
    assert first.version.startswith("xswu/HPSv2/HPS_v2.1_compressed.pt@c0ffee#sha256=")
    assert "|hps=v2.1|" in first.version
    second = HpsScorer("hps-v2.1", cache, allow_pickle=True, progress=False)
    assert len(fetched) == 1 and second.version == first.version  # converted once, reused
    imgs = images(2)
    assert second.score(imgs, TEXTS[:2]) == pytest.approx(scorer.score(imgs, TEXTS[:2]), abs=1e-6)
