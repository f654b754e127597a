"""The images phase's shards: several per skill, each saved as it completes, reused by a rerun;
drawn by several processes (``images.num_jobs``), the last to finish committing; the filters
(blank images, an NSFW checker) and their counts.

The generator is replaced by a fake that paints each prompt's image from its seed (what the shards
do with images does not depend on how they are drawn; tests/test_kill_anywhere.py runs the real
pipeline), so these tests take a second or two.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import REPO

import selma_core.models.loading
import selma_core.phases.images as images_phase
from phases.test_prompts import RecordingRun
from selma_core.config import load_config
from selma_core.context import JobContext
from selma_core.errors import InputError
from selma_core.models import speed
from selma_core.phases.images import SAVED_SHARDS, ImagesConfig, generate_images, read_image_dataset
from selma_core.phases.prompts import generate_prompts
from selma_core.plan import build_plan
from selma_core.skills import load_skills
from selma_core.storage import LocalArtifactStore

SKILL = "counting"
# 20 prompts, 5 held out: 15 images in shards of 4, 4, 4 and 3 (batches of 3 cross shard boundaries).
OVERRIDES = {
    "skills": [SKILL],
    "prompts": {"num_prompts": 20, "heldout_fraction": 0.25},
    "images": {"shard_size": 4, "batch_size": 3},
}
SHARDS = ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar", "shard-00003.tar"]


class Killed(BaseException):
    """A kill, simulated in-process (the real one, SIGKILL, is in tests/test_kill_anywhere.py)."""


@pytest.fixture
def drawn(monkeypatch) -> list[int]:
    """The seeds of the images drawn; the generator is a fake painting noise from each seed."""
    from PIL import Image

    seeds: list[int] = []

    class FakePipeline:
        def to(self, device):
            return self

    def draw(pipe, prompts, prompt_seeds, cfg, device, pad_to=None):
        seeds.extend(prompt_seeds)
        return [
            Image.frombytes("RGB", (16, 16), random.Random(s).randbytes(16 * 16 * 3)) for s in prompt_seeds
        ]

    monkeypatch.setattr(selma_core.models.loading, "load_diffusion_pipeline", lambda *a, **k: FakePipeline())
    monkeypatch.setattr(images_phase, "draw_images", draw)
    return seeds


def images_job(config, store_root, **images) -> JobContext:
    """The images job's context over a store holding the skill's committed prompts."""
    cfg = load_config(config(**{**OVERRIDES, "images": {**OVERRIDES["images"], **images}}))
    skills = load_skills(cfg.skills_dir, cfg.skills)
    plan = build_plan(cfg, skills)
    store = LocalArtifactStore(store_root)
    ctx = JobContext(cfg, skills, plan, plan.job("prompts", SKILL), store, RecordingRun())
    if not store.is_committed(ctx.job.key):
        generate_prompts(ctx, SKILL)
    return JobContext(cfg, skills, plan, plan.job("images", SKILL), store, RecordingRun())


def killed_after_shard(monkeypatch, ctx: JobContext, nth: int) -> None:
    """Run the job and kill it right after its ``nth`` shard was saved."""
    reached = []

    def fault_point(name):
        reached.append(name)
        if reached.count("images.after_shard") == nth:
            raise Killed(name)

    with monkeypatch.context() as patch:
        patch.setattr(images_phase, "fault_point", fault_point)
        with pytest.raises(Killed):
            generate_images(ctx, SKILL)
    assert not ctx.store.is_committed(ctx.job.key)


def committed_bytes(ctx: JobContext) -> dict[str, bytes]:
    files = ctx.store.read_manifest(ctx.job.key)["files"]
    return {rel: ctx.store.read_output_file(ctx.job.key, rel) for rel in files}


def test_shards_saved_as_they_complete_and_reused_after_a_kill(tiny_config, tmp_path, monkeypatch, drawn):
    unbroken = images_job(tiny_config, tmp_path / "unbroken")
    result = generate_images(unbroken, SKILL)
    assert (result["images"], result["drawn"], result["reused"], result["shards"]) == (15, 15, 0, 4)
    reference = committed_bytes(unbroken)
    assert sorted(reference) == sorted([*SHARDS, "images.jsonl", "shards.json"])
    fetched = unbroken.store.fetch_dir(unbroken.job.key, tmp_path / "fetch")
    with tarfile.open(fetched / "shard-00003.tar") as tar:
        assert len(tar.getnames()) == 2 * 3
    dataset = read_image_dataset(fetched)
    assert [meta["id"] for meta, _ in dataset] == [
        json.loads(row)["id"] for row in reference["images.jsonl"].splitlines()
    ]
    assert unbroken.store.list_keys(f"{unbroken.job.key}/{SAVED_SHARDS}") == []  # cleaned up

    # Killed after its 2nd shard, with another batch size (execution only: the same output key).
    ctx = images_job(tiny_config, tmp_path / "broken", batch_size=5)
    assert ctx.job.key == unbroken.job.key
    drawn.clear()
    killed_after_shard(monkeypatch, ctx, 2)
    assert len(drawn) == 8
    saved = ctx.store.list_keys(f"{ctx.job.key}/{SAVED_SHARDS}")
    assert [k.rsplit("/", 1)[1] for k in saved] == [
        "shard-00000.tar",
        "shard-00000.tar.json",
        "shard-00001.tar",
        "shard-00001.tar.json",
    ]
    drawn.clear()
    result = generate_images(ctx, SKILL)
    assert (result["drawn"], result["reused"]) == (7, 8) and len(drawn) == 7  # shards 2 and 3 only
    assert committed_bytes(ctx) == reference  # bit-identical to the uninterrupted run
    assert ctx.store.list_keys(f"{ctx.job.key}/{SAVED_SHARDS}") == []


def test_a_shard_killed_between_its_tar_and_its_record_is_drawn_again_silently(
    tiny_config, tmp_path, monkeypatch, drawn, capsys
):
    """A shard's record is its completion marker: a job killed after saving a shard's tar but before
    its record draws that shard again on rerun, as in flight (no warning), and commits the very
    bytes of an uninterrupted run."""
    unbroken = images_job(tiny_config, tmp_path / "unbroken")
    generate_images(unbroken, SKILL)
    reference = committed_bytes(unbroken)

    ctx = images_job(tiny_config, tmp_path / "killed")
    real = ctx.store.write_json

    def write_json(key, data):
        if key.endswith("/shard-00001.tar.json"):
            raise Killed(key)
        return real(key, data)

    with monkeypatch.context() as patch:
        patch.setattr(ctx.store, "write_json", write_json)
        with pytest.raises(Killed):
            generate_images(ctx, SKILL)
    saved = f"{ctx.job.key}/{SAVED_SHARDS}"
    assert [k.rsplit("/", 1)[1] for k in ctx.store.list_keys(saved)] == [
        "shard-00000.tar",
        "shard-00000.tar.json",
        "shard-00001.tar",  # its record never written
    ]
    drawn.clear()
    capsys.readouterr()
    result = generate_images(ctx, SKILL)
    assert (result["reused"], result["drawn"]) == (4, 11) and len(drawn) == 11  # shards 1 to 3
    assert "warning" not in capsys.readouterr().err
    assert committed_bytes(ctx) == reference


def test_a_damaged_saved_shard_is_drawn_again(tiny_config, tmp_path, monkeypatch, drawn, capsys):
    unbroken = images_job(tiny_config, tmp_path / "unbroken")
    generate_images(unbroken, SKILL)
    reference = committed_bytes(unbroken)

    ctx = images_job(tiny_config, tmp_path / "broken")
    killed_after_shard(monkeypatch, ctx, 3)
    saved = Path(ctx.store.root) / ctx.job.key / SAVED_SHARDS
    shard0 = bytearray((saved / "shard-00000.tar").read_bytes())
    shard0[600] ^= 0x01  # inside the first image: same size, another checksum
    (saved / "shard-00000.tar").write_bytes(bytes(shard0))
    (saved / "shard-00001.tar.json").write_text('{"size": 1')  # its record damaged
    capsys.readouterr()

    drawn.clear()
    result = generate_images(ctx, SKILL)
    err = capsys.readouterr().err
    for name in ("shard-00000.tar", "shard-00001.tar"):
        assert f"{ctx.store.url(f'{ctx.job.key}/{SAVED_SHARDS}/{name}')}: damaged saved shard" in err
    assert "shard-00002.tar: damaged" not in err
    assert (result["drawn"], result["reused"]) == (4 + 4 + 3, 4) and len(drawn) == 11
    assert committed_bytes(ctx) == reference


def test_the_reader_refuses_a_missing_or_short_shard(tiny_config, tmp_path, drawn):
    ctx = images_job(tiny_config, tmp_path / "store", shard_size=8)
    generate_images(ctx, SKILL)
    fetched = ctx.store.fetch_dir(ctx.job.key, tmp_path / "fetch")
    assert len(read_image_dataset(fetched)) == 15

    (fetched / "shard-00001.tar").rename(tmp_path / "second.tar")
    with pytest.raises(InputError, match=r"shard-00001\.tar: missing, though .*shards\.json lists it"):
        read_image_dataset(fetched)

    with tarfile.open(tmp_path / "second.tar") as tar, tarfile.open(fetched / "shard-00001.tar", "w") as cut:
        for member in tar.getmembers()[:-2]:  # its last sample left out
            cut.addfile(member, tar.extractfile(member))
    with pytest.raises(InputError, match=r"shard-00001\.tar: 6 sample\(s\), .*shards\.json lists 7"):
        read_image_dataset(fetched)


def test_shard_size_is_part_of_the_output_key(tiny_config, tmp_path):
    keys = {size: images_job_key(tiny_config, shard_size=size) for size in (4, 8)}
    assert keys[4] != keys[8]
    assert images_job_key(tiny_config, shard_size=4, batch_size=7) == keys[4]
    with pytest.raises(ValueError, match="shard_size"):
        images_phase.ImagesConfig(shard_size=0)


def images_job_key(config, **images) -> str:
    cfg = load_config(config(**{**OVERRIDES, "images": {**OVERRIDES["images"], **images}}))
    return build_plan(cfg, load_skills(cfg.skills_dir, cfg.skills)).job("images", SKILL).key


# -- several processes per skill (images.num_jobs) ------------------------------------------------


def killed_at(monkeypatch, ctx: JobContext, point: str, nth: int, *args) -> None:
    """Run the job (``args``: its process index and count) and kill it at the ``nth`` ``point``."""
    reached = []

    def fault_point(name):
        reached.append(name)
        if reached.count(point) == nth:
            raise Killed(name)

    with monkeypatch.context() as patch:
        patch.setattr(images_phase, "fault_point", fault_point)
        with pytest.raises(Killed):
            generate_images(ctx, SKILL, *args)
    assert not ctx.store.is_committed(ctx.job.key)


def saved_names(ctx: JobContext) -> list[str]:
    return [k.rsplit("/", 1)[1] for k in ctx.store.list_keys(f"{ctx.job.key}/{SAVED_SHARDS}")]


def test_two_processes_commit_what_one_process_commits(tiny_config, tmp_path, drawn):
    one = images_job(tiny_config, tmp_path / "one")
    generate_images(one, SKILL)
    reference = committed_bytes(one)

    ctx = images_job(tiny_config, tmp_path / "two", num_jobs=2)
    assert ctx.job.key == one.job.key  # num_jobs is execution only
    drawn.clear()
    first = generate_images(ctx, SKILL, 0, 2)  # shards 0 and 2: saved, then shards 1 and 3 missing
    assert first["committed"] is False and first["missing_shards"] == [SHARDS[1], SHARDS[3]]
    assert first["own_shards"] == [SHARDS[0], SHARDS[2]] and first["drawn"] == len(drawn) == 8
    assert not ctx.store.is_committed(ctx.job.key)
    assert saved_names(ctx) == [f"{n}{ext}" for n in (SHARDS[0], SHARDS[2]) for ext in ("", ".json")]

    second = generate_images(ctx, SKILL, 1, 2)  # shards 1 and 3, then every shard is saved: commits
    assert second["committed"] is True
    assert (second["images"], second["drawn"], second["reused"]) == (15, 7, 8) and len(drawn) == 15
    assert committed_bytes(ctx) == reference  # bit-identical to the one-process run
    assert saved_names(ctx) == []
    assert sorted(drawn) == sorted(json.loads(r)["seed"] for r in reference["images.jsonl"].splitlines())


def test_more_processes_than_shards_warn_that_some_have_nothing_to_draw(tiny_config, tmp_path, drawn, capsys):
    ctx = images_job(tiny_config, tmp_path, num_jobs=5)  # 15 images in 4 shards
    idle = generate_images(ctx, SKILL, 4, 5)
    assert idle["own_shards"] == [] and idle["drawn"] == 0 and drawn == []
    warning = capsys.readouterr().err
    assert "15 image(s) make 4 shard(s) of images.shard_size 4, fewer than the 5 processes" in warning
    assert "1 process(es) have nothing to draw. Lower images.num_jobs" in warning
    generate_images(ctx, SKILL, 0, 4)
    assert "nothing to draw" not in capsys.readouterr().err


def test_a_killed_process_leaves_no_partial_shard_and_its_rerun_draws_only_what_is_missing(
    tiny_config, tmp_path, monkeypatch, drawn
):
    one = images_job(tiny_config, tmp_path / "one")
    generate_images(one, SKILL)
    reference = committed_bytes(one)

    ctx = images_job(tiny_config, tmp_path / "two", num_jobs=2)
    drawn.clear()
    # Process 0 killed in its second shard (shard 2: batches of 3 and 1), after its first batch.
    killed_at(monkeypatch, ctx, "images.after_batch", 3, 0, 2)
    assert len(drawn) == 4 + 3
    assert saved_names(ctx) == [SHARDS[0], f"{SHARDS[0]}.json"]  # nothing of shard 2 is visible
    other = generate_images(ctx, SKILL, 1, 2)
    assert other["committed"] is False and other["missing_shards"] == [SHARDS[2]]
    drawn.clear()
    rerun = generate_images(ctx, SKILL, 0, 2)  # shard 0 reused, shard 2 drawn, then the commit
    assert rerun["committed"] is True and (rerun["drawn"], rerun["reused"]) == (4, 11) and len(drawn) == 4
    assert committed_bytes(ctx) == reference
    assert saved_names(ctx) == []


def test_processes_that_finish_together_commit_once(tiny_config, tmp_path, monkeypatch, drawn):
    import threading

    from selma_core.storage.base import ArtifactStore

    monkeypatch.setenv("SELMA_LEASE_POLL_S", "0.02")
    one = images_job(tiny_config, tmp_path / "one")
    generate_images(one, SKILL)
    reference = committed_bytes(one)

    contexts = [images_job(tiny_config, tmp_path / "two", num_jobs=2) for _ in range(2)]
    killed_after_shard(monkeypatch, contexts[0], 4)  # every shard saved, nothing committed
    commit = ArtifactStore.commit_dir
    commits = []

    def slow_commit(store, *args, **kwargs):  # the other process looks while this one commits
        commits.append(args[1])
        time.sleep(0.3)
        return commit(store, *args, **kwargs)

    monkeypatch.setattr(ArtifactStore, "commit_dir", slow_commit)
    drawn.clear()
    results: dict[int, dict] = {}
    start = threading.Barrier(2)

    def process(index: int) -> None:
        start.wait()
        results[index] = generate_images(contexts[index], SKILL, index, 2)

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(r["committed"] for r in results.values()) == [False, True]
    (waiter,) = [r for r in results.values() if not r["committed"]]
    assert waiter["committed_by"] == "another process" and waiter["drawn"] == 0
    assert commits == [contexts[0].job.key] and not drawn
    assert committed_bytes(contexts[0]) == reference
    assert saved_names(contexts[0]) == []


def test_a_process_waiting_on_a_commit_that_forgot_the_shards_draws_nothing(
    tiny_config, tmp_path, monkeypatch, drawn
):
    """Every image filtered out, two processes finishing together: the one holding the lease fails
    (exit 2) and deletes the saved shards; the one waiting on the lease then finds them gone and
    commits nothing, rather than redraw the other's shards to fail the same way."""
    import threading

    from selma_core.storage.base import ArtifactStore

    monkeypatch.setenv("SELMA_LEASE_POLL_S", "0.02")
    contexts = [
        images_job(tiny_config, tmp_path / "two", num_jobs=2, filter_uniform=True, uniform_threshold=255)
        for _ in range(2)
    ]
    killed_after_shard(monkeypatch, contexts[0], 4)  # every shard saved (all filtered), nothing committed
    delete = ArtifactStore.delete_prefix

    def slow_delete(store, prefix):  # the other process waits on the lease meanwhile
        time.sleep(0.5)
        return delete(store, prefix)

    monkeypatch.setattr(ArtifactStore, "delete_prefix", slow_delete)
    drawn.clear()
    results: dict[int, object] = {}
    start = threading.Barrier(2)

    def process(index: int) -> None:
        start.wait()
        try:
            results[index] = generate_images(contexts[index], SKILL, index, 2)
        except InputError as e:
            results[index] = e

    threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    [failed] = [r for r in results.values() if isinstance(r, InputError)]
    assert "every one of the 15 images was filtered out" in str(failed)
    [waiter] = [r for r in results.values() if isinstance(r, dict)]
    assert waiter["committed"] is False and waiter["drawn"] == 0 and not drawn
    assert saved_names(contexts[0]) == []


def test_a_process_index_out_of_range_is_a_config_error(tiny_config, tmp_path):
    from selma_core.errors import ConfigError

    ctx = images_job(tiny_config, tmp_path / "store", num_jobs=2)
    with pytest.raises(ConfigError, match="shard index 2 of 2"):
        generate_images(ctx, SKILL, 2, 2)
    with pytest.raises(ValueError, match="num_jobs"):
        images_phase.ImagesConfig(num_jobs=0)


# -- filters ------------------------------------------------------------------------------------


def tiny_safety_checker(folder: Path, images: list) -> list[bool]:
    """A random ``StableDiffusionSafetyChecker`` (tiny CLIP vision tower) saved in ``folder`` with its
    image processor, its concepts and threshold set so that it flags some of ``images`` and not
    others (with a margin: it rounds its scores); which ones, by its own verdicts."""
    import numpy as np
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from selma_core.models.random_models import _text_config, _tiny_clip_vision

    # The tiny CLIP's configs (the checker builds only the vision tower; the text one is required).
    vision, text = _tiny_clip_vision(), _text_config(64)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    ).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        concept = embeds[0] - embeds[1]  # a direction along which the images differ
        cos = torch.nn.functional.cosine_similarity(embeds, concept[None]).tolist()
        # The threshold in the widest gap between two scores (the checker rounds to 3 decimals).
        ranked = sorted(cos)
        gap, threshold = max(
            (high - low, (high + low) / 2) for low, high in zip(ranked[1:-2], ranked[2:-1], strict=True)
        )
        assert gap > 0.01, ranked
        checker.concept_embeds.copy_(concept.expand_as(checker.concept_embeds))
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(10.0)  # never "special care"
    checker.save_pretrained(folder)
    processor.save_pretrained(folder)
    with torch.no_grad():  # what the checker itself says, for all the images at once
        _, verdicts = checker(clip_input=pixels, images=[np.zeros((32, 32, 3))] * len(images))
    assert any(verdicts) and not all(verdicts)
    return verdicts


@pytest.mark.usefixtures("one_torch_thread")
def test_filters_drop_blank_and_flagged_images_and_count_them(tiny_config, tmp_path, monkeypatch, drawn):
    from PIL import Image

    from selma_core.phases.images import prompt_seed
    from selma_core.phases.prompts import read_prompts

    plain = images_job(tiny_config, tmp_path / "plain")
    prompts = read_prompts(plain.fetch("prompts", SKILL) / "prompts.jsonl")
    seeds = {
        r["id"]: prompt_seed(plain.config.images.seed, r["id"]) for r in prompts if r["split"] == "train"
    }
    blank = set(list(seeds)[3::5])  # 3 of the 15: a flat grey, or noise of a std below 2
    noise = images_phase.draw_images

    def draw(pipe, texts, batch_seeds, cfg, device, pad_to=None):
        images = noise(pipe, texts, batch_seeds, cfg, device)
        by_seed = {seed: key for key, seed in seeds.items()}
        return [
            (
                Image.new("RGB", (16, 16), (90, 90, 90))
                if i % 2
                else Image.effect_noise((16, 16), 1).convert("RGB")
            )
            if by_seed[seed] in blank
            else image
            for i, (seed, image) in enumerate(zip(batch_seeds, images, strict=True))
        ]

    monkeypatch.setattr(images_phase, "draw_images", draw)
    kept = [key for key in seeds if key not in blank]
    painted = [Image.frombytes("RGB", (16, 16), random.Random(seeds[k]).randbytes(16 * 16 * 3)) for k in kept]
    flags = tiny_safety_checker(tmp_path / "checker", painted)
    flagged = {key for key, flag in zip(kept, flags, strict=True) if flag}

    ctx = images_job(
        tiny_config,
        tmp_path / "store",
        num_jobs=2,
        filter_uniform=True,
        nsfw_checker=str(tmp_path / "checker"),
    )
    assert ctx.job.key != plain.job.key  # the filters are part of the output's key
    generate_images(ctx, SKILL, 0, 2)
    dropped = {}
    for key in ctx.store.list_keys(f"{ctx.job.key}/{SAVED_SHARDS}"):  # shards 0 and 2's records
        if key.endswith(".json"):
            record = ctx.store.read_json(key)
            assert record["filtered"] == {
                reason: sum(1 for why in record["dropped"].values() if why == reason)
                for reason in ("uniform", "nsfw")
            }
            assert record["samples"] == 4 - len(record["dropped"])
            dropped.update(record["dropped"])
    result = generate_images(ctx, SKILL, 1, 2)
    expected = {"uniform": len(blank), "nsfw": len(flagged)}
    assert result["filtered"] == expected and result["images"] == 15 - len(blank) - len(flagged)
    assert ("images.filtered.uniform", len(blank)) in ctx.run.metrics[-1][0].items()
    assert ctx.run.metrics[-1][0]["images.filtered.nsfw"] == len(flagged)

    fetched = ctx.store.fetch_dir(ctx.job.key, tmp_path / "fetch")
    index = json.loads((fetched / "shards.json").read_text())
    assert index["filtered"] == expected and index["prompts"] == 15 and index["samples"] == result["images"]
    reasons = {key: why for shard in index["shards"] for key, why in shard["dropped"].items()}
    assert reasons == {**dict.fromkeys(blank, "uniform"), **dict.fromkeys(flagged, "nsfw")}
    assert {k: v for k, v in reasons.items() if k in dropped} == dropped
    dataset = read_image_dataset(fetched)  # the sample counts agree with the tars
    assert sorted(meta["id"] for meta, _ in dataset) == sorted(set(seeds) - blank - flagged)
    rows = [json.loads(line) for line in (fetched / "images.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == [meta["id"] for meta, _ in dataset]


def test_every_image_filtered_out_is_an_input_error(tiny_config, tmp_path, drawn):
    """Exit 2, and its saved shards go: they hold no image, and a rerun after the filter or the
    generator is mended in place (the same key) would reuse their verdicts, --force or not."""
    ctx = images_job(tiny_config, tmp_path / "store", filter_uniform=True, uniform_threshold=255)
    with pytest.raises(
        InputError, match=r"every one of the 15 images was filtered out \(uniform: 15\)"
    ) as info:
        generate_images(ctx, SKILL)
    assert "its saved shards are deleted: a rerun draws them again" in str(info.value)
    assert not ctx.store.is_committed(ctx.job.key)
    assert ctx.store.list_keys(f"{ctx.job.key}/_shards") == []


def test_selmas_sampling_is_the_default(model_cache):
    """A config that sets nothing draws SELMA's way: 50 steps of the model's own scheduler, the
    model's usual guidance, its native resolution, one image per prompt; fp16 on CUDA, float32 on
    the CPU."""
    import torch

    from selma_core.models.loading import load_diffusion_pipeline
    from selma_core.phases.images import draw_images, torch_dtype

    cfg = ImagesConfig()
    assert (cfg.num_inference_steps, cfg.guidance_scale, cfg.height, cfg.width) == (50, None, None, None)
    assert cfg.images_per_prompt == 1
    assert (
        torch_dtype(cfg.dtype, "cuda:0") is torch.float16 and torch_dtype(cfg.dtype, "cpu") is torch.float32
    )
    pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
    scheduler = type(pipe.scheduler)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    (image,) = draw_images(pipe, ["one red apple"], [1], cfg, "cpu")
    assert image.size == (native, native)
    assert type(pipe.scheduler) is scheduler and pipe.scheduler.num_inference_steps == 50


def test_the_generator_may_be_another_model_than_the_one_trained(tiny_config, tmp_path, monkeypatch, drawn):
    """Weak-to-strong: with generator_model set, the images job loads that model (at its own
    revision) and every sample's metadata names it."""
    loaded = []
    fake_load = selma_core.models.loading.load_diffusion_pipeline  # the drawn fixture's

    def load(spec, cache_dir, revision=None, *args, **kwargs):
        loaded.append((spec, revision))
        return fake_load(spec, cache_dir, revision, *args, **kwargs)

    def config(**overrides):
        return tiny_config(generator_model="random:tiny-sd-v", generator_model_revision="v2", **overrides)

    monkeypatch.setattr(selma_core.models.loading, "load_diffusion_pipeline", load)
    ctx = images_job(config, tmp_path / "store")
    assert ctx.config.base_model != "random:tiny-sd-v"
    generate_images(ctx, SKILL)
    assert loaded == [("random:tiny-sd-v", "v2")]
    samples = [meta for meta, _ in read_image_dataset(ctx.store.fetch_dir(ctx.job.key, tmp_path / "out"))]
    assert len(samples) == 15 and {m["model"] for m in samples} == {"random:tiny-sd-v"}
    # The guidance the generator drew with is on the run, where the config left it to the model.
    assert ctx.config.images.guidance_scale is None
    assert {"images.guidance_scale_used": "7.5"} in ctx.run.tags  # an SD 2.x-like generator's


def test_guidance_left_null_is_the_models_usual_one():
    """SELMA's 7.5 for SD 1.x/2.x, 5.0 for SDXL (a pipeline with a second text encoder); a
    configured value is used as is."""
    from types import SimpleNamespace

    from selma_core.phases.images import SamplingConfig, draw_images

    class Recorder:
        def __init__(self, sdxl: bool) -> None:
            if sdxl:
                self.text_encoder_2 = object()
            self.calls: list[dict] = []

        def __call__(self, prompts, **kwargs):
            import torch

            self.calls.append(kwargs)
            return SimpleNamespace(images=torch.zeros(len(prompts), 3, 8, 8))  # output_type "pt"

    for sdxl, config, expected in [
        (False, SamplingConfig(), 7.5),
        (True, SamplingConfig(), 5.0),
        (True, SamplingConfig(guidance_scale=9.0), 9.0),
        (False, SamplingConfig(guidance_scale=0.0), 0.0),
    ]:
        pipe = Recorder(sdxl)
        draw_images(pipe, ["a cat"], [1], config, "cpu")
        assert pipe.calls[0]["guidance_scale"] == expected
    with pytest.raises(
        ValueError, match=r"guidance_scale: expected 0 to 50.0 or null \(the model's usual\), got -1"
    ):
        SamplingConfig(guidance_scale=-1)


def test_several_images_per_prompt_are_samples_with_their_own_seeds(tiny_config, tmp_path, drawn):
    """``images_per_prompt`` 2: each prompt's first image keeps the id (and seed) it has with one
    image per prompt, the second is ``<id>-1`` with its own seed; a new output key, while the
    default leaves the key as it was."""
    one = images_job(tiny_config, tmp_path / "one")
    two = images_job(tiny_config, tmp_path / "two", images_per_prompt=2)
    assert one.job.key == images_job(tiny_config, tmp_path / "one", images_per_prompt=1).job.key
    assert two.job.key != one.job.key
    generate_images(one, SKILL)
    seeds_one = list(drawn)
    drawn.clear()
    result = generate_images(two, SKILL)
    assert result["images"] == 30 and len(drawn) == 30 and len(set(drawn)) == 30
    dataset = read_image_dataset(two.store.fetch_dir(two.job.key, tmp_path / "fetched"))
    ids = [meta["id"] for meta, _ in dataset]
    first = read_image_dataset(one.store.fetch_dir(one.job.key, tmp_path / "fetched-one"))
    assert ids[0::2] == [meta["id"] for meta, _ in first]
    assert ids[1::2] == [f"{meta['id']}-1" for meta, _ in first]
    assert [meta["prompt"] for meta, _ in dataset][0::2] == [meta["prompt"] for meta, _ in dataset][1::2]
    assert drawn[0::2] == seeds_one  # the first image of each prompt is the one-image run's
    with pytest.raises(ValueError, match="images_per_prompt: expected 1 to 64, got 0"):
        ImagesConfig(images_per_prompt=0)


def test_a_compiled_generator_draws_every_batch_at_one_shape(tiny_config, tmp_path, monkeypatch, drawn):
    """With compile on, each shard's last, shorter batch is padded to batch_size (a compiled UNet
    would otherwise compile again for it); eager drawing pads nothing."""
    calls = []
    fake = images_phase.draw_images  # the drawn fixture's

    def recording(pipe, prompts, seeds, cfg, device, pad_to=None):
        calls.append((len(prompts), pad_to))
        return fake(pipe, prompts, seeds, cfg, device)

    monkeypatch.setattr(images_phase, "draw_images", recording)
    # The fake generator has a UNet that compiling leaves as it is.
    fake_pipeline = selma_core.models.loading.load_diffusion_pipeline()
    monkeypatch.setattr(type(fake_pipeline), "unet", object(), raising=False)
    monkeypatch.setattr(speed, "prepare_for_inference", lambda *args, **kwargs: 0)
    monkeypatch.setattr(images_phase._Drawer, "_choose_attention", lambda self: "default")  # no real UNet
    result = generate_images(images_job(tiny_config, tmp_path / "compiled", compile="blocks"), SKILL)
    assert calls == [(3, 3), (1, 3)] * 3 + [(3, 3)]  # shards of 4, 4, 4 and 3 in batches of 3
    assert result["compile"]["mode"] == "blocks" and result["compile"]["cache_loaded"] is False
    calls.clear()
    result = generate_images(images_job(tiny_config, tmp_path / "eager"), SKILL)  # auto: off on the CPU
    assert len(calls) == 7 and {pad for _, pad in calls} == {None} and "compile" not in result


def test_a_cuda_graph_is_replayed_only_for_a_whole_compiled_unet_on_cuda_with_guidance():
    """images.cuda_graph: the UNet replayed as a CUDA graph on CUDA alone, compiled whole (by
    blocks, each block's call would free the previous one's outputs), and with classifier-free
    guidance (without it a multistep scheduler keeps the UNet's output itself for later steps,
    which the next replay would overwrite): else the reason why not."""
    from types import SimpleNamespace

    def drawer(device: str = "cuda:0", mode: str = "full", time_cond_proj_dim=None, **settings):
        drawer = images_phase._Drawer(None, ImagesConfig(**{"cuda_graph": True, **settings}), None)
        # What the decision reads of a generator: its UNet's config (no text_encoder_2: not SDXL).
        unet = SimpleNamespace(config=SimpleNamespace(time_cond_proj_dim=time_cond_proj_dim))
        drawer.device, drawer.compile_mode, drawer.pipe = device, mode, SimpleNamespace(unet=unet)
        return drawer

    assert drawer().cuda_graph and drawer(guidance_scale=1.5).cuda_graph
    assert not drawer(device="cpu").cuda_graph and not drawer(cuda_graph=False).cuda_graph

    def refusal(drawer) -> str | None:
        return images_phase.cuda_graph_refusal(drawer.cfg, drawer.pipe, drawer.compile_mode)

    assert refusal(drawer(mode="blocks")) == (
        "the whole UNet must be compiled, and compile resolved to blocks"  # auto, for SDXL
    )
    assert not drawer(mode="blocks").cuda_graph and not drawer(mode="off").cuda_graph
    unguided = "there is no classifier-free guidance (guidance_scale <= 1, or a guidance-distilled UNet)"
    for refused in (drawer(guidance_scale=1.0), drawer(guidance_scale=0.0), drawer(time_cond_proj_dim=256)):
        assert not refused.cuda_graph and refusal(refused) == unguided
    for compile in ("off", "blocks"):
        with pytest.raises(ValueError, match=f"cuda_graph: the whole UNet .*got compile: {compile} "):
            ImagesConfig(cuda_graph=True, compile=compile)
    with pytest.raises(
        ValueError, match="compile_vae: the decoder is compiled with the UNet; got compile: off"
    ):
        ImagesConfig(compile_vae=True, compile="off")


def test_padding_a_batch_draws_the_padded_shape_and_the_same_images(model_cache):
    import numpy as np

    from selma_core.models.loading import load_diffusion_pipeline

    pipe = load_diffusion_pipeline("random:tiny-sd", model_cache)
    cfg = ImagesConfig(num_inference_steps=2, height=32, width=32)
    batches = []
    pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    prompts, seeds = ["one red apple", "two cats", "a dog left of a car"], [1, 2, 3]
    padded = images_phase.draw_images(pipe, prompts, seeds, cfg, "cpu", pad_to=5)
    assert len(padded) == 3 and set(batches) == {10}  # classifier-free guidance doubles the batch
    batches.clear()
    plain = images_phase.draw_images(pipe, prompts, seeds, cfg, "cpu")
    assert set(batches) == {6}
    for a, b in zip(padded, plain, strict=True):  # each image from its own generator
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def images_job_on_a_fresh_node(
    config: Path, skill: str, inductor: Path, kernels_from: Path | None = None
) -> dict:
    """``jobs.run --phase images`` in a new process on an empty inductor cache (a pod on a fresh
    node); its result. ``kernels_from``: an inductor cache whose compiled C++ kernels are copied in
    first, but none of its graphs (see the caller)."""
    if kernels_from is not None:
        # Inductor keeps each C++ kernel's source and binary in a folder named by its hash; the
        # compiled graphs, which the store's entry must provide, are under fxgraph/ and aotautograd/.
        for folder in kernels_from.iterdir():
            if folder.is_dir() and folder.name not in ("fxgraph", "aotautograd", "locks"):
                shutil.copytree(folder, inductor / folder.name)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.run", "--phase", "images", "--skill", skill, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["result"]


def micro_generator(folder: Path) -> str:
    """A random test model smaller still than random:tiny-sd, saved to ``folder`` (a generator named
    by its path, as a local model is): one resolution level in the UNet and the VAE, whose CPU
    compile takes about 60 s instead of 90."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from selma_core.models.random_models import TINY_TEXT_DIM, _scheduler, _text_config, tiny_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_clip_tokenizer()
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=32,  # the VAE keeps the size: 32 px images
        block_out_channels=(16,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        layers_per_block=1,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    pipe = StableDiffusionPipeline(
        vae, text_encoder, tokenizer, unet, _scheduler(), None, None, requires_safety_checker=False
    )
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_compiled_kernels_in_the_store_spare_the_next_images_job_its_compile(tiny_config, tmp_path):
    """Two skills' images jobs with one generator, each on a fresh node: the first compiles the UNet
    and the VAE's decoder and saves the kernels to the store, the second loads them and compiles
    nothing."""
    skills = [SKILL, "spatial"]
    images = {**OVERRIDES["images"], "compile": "full", "compile_vae": True}
    generator = micro_generator(tmp_path / "micro-sd")
    config = tiny_config(**{**OVERRIDES, "skills": skills, "images": images, "generator_model": generator})
    cfg = load_config(config)
    loaded = load_skills(cfg.skills_dir, cfg.skills)
    plan = build_plan(cfg, loaded)
    store = LocalArtifactStore(tmp_path / "store")  # the config's
    for skill in skills:
        job = plan.job("prompts", skill)
        generate_prompts(JobContext(cfg, loaded, plan, job, store, RecordingRun()), skill)
    first = images_job_on_a_fresh_node(config, SKILL, tmp_path / "inductor-1")
    assert first["images"] == 15 and first["compile"]["mode"] == "full"
    assert first["compile"]["cache_loaded"] is False and first["compile"]["cache_saved"] is True
    assert first["compile"]["graphs_compiled"] >= 2  # the UNet's and the decoder's
    assert first["compile"]["cuda_graph"] is False and first["compile"]["cuda_graph_skips"] == 0  # CPU
    assert first["compile"]["vae_compiled"] is True
    assert len(store.list_keys("cache/compile")) == 1

    # On a GPU the entry carries the kernels' binaries too (Triton's); on the CPU, inductor's C++
    # kernels stay outside it and a fresh node builds them again (about 35 s of g++ here), so the
    # second node gets the first's binaries, but none of its graphs.
    second = images_job_on_a_fresh_node(
        config, "spatial", tmp_path / "inductor-2", kernels_from=tmp_path / "inductor-1"
    )
    assert second["images"] == 15
    assert second["compile"]["cache_loaded"] is True and second["compile"]["cache_saved"] is False
    assert second["compile"]["graphs_compiled"] == 0


def test_batches_are_drawn_under_the_configured_attention_kernel(tiny_config, tmp_path, monkeypatch):
    """The real tiny generator: every batch drawn with the configured kernel first, the choice tagged
    on the job's run; PyTorch's order returns afterwards."""
    import torch
    from torch.nn.attention import SDPBackend

    firsts = []
    real = images_phase.draw_images

    def recording(*args, **kwargs):
        firsts.append(torch._C._get_sdp_priority_order()[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(images_phase, "draw_images", recording)
    before = torch._C._get_sdp_priority_order()
    ctx = images_job(tiny_config, tmp_path, attention="math")
    generate_images(ctx, SKILL)
    assert len(firsts) == 7 and set(firsts) == {int(SDPBackend.MATH)}
    assert {"images.attention_kernel": "math"} in ctx.run.tags
    assert torch._C._get_sdp_priority_order() == before


@pytest.mark.parametrize("spec", ["random:tiny-sd", "random:tiny-sdxl"])
def test_images_are_the_very_pixels_of_diffusers_pil_output(model_cache, spec):
    """draw_images converts to 8-bit pixels on the device; the bytes are the pipeline's own PIL
    output's."""
    import numpy as np
    import torch

    from selma_core.models.loading import load_diffusion_pipeline

    pipe = load_diffusion_pipeline(spec, model_cache)
    cfg = ImagesConfig(num_inference_steps=2, height=32, width=32)
    prompts, seeds = ["one red apple", "two cats left of a dog"], [1, 2]
    drawn = images_phase.draw_images(pipe, prompts, seeds, cfg, "cpu")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    guidance = images_phase.guidance_scale(cfg, pipe)
    pil = pipe(
        prompts, num_inference_steps=2, guidance_scale=guidance, height=32, width=32, generator=generators
    )
    assert [image.mode for image in drawn] == ["RGB", "RGB"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(drawn, pil.images, strict=True))


def test_open_image_turns_photos_upright_and_scales_16_bit_greyscale():
    """A dataset's images as they are shown: EXIF orientation applied (as Hugging Face's datasets
    do), 16-bit greyscale scaled to 8 bits, not clipped to white by PIL's convert."""
    import io

    import numpy as np
    from PIL import Image

    def encoded(image, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    sideways = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = sideways.getexif()
    exif[images_phase.EXIF_ORIENTATION] = 6  # shown turned 90 degrees clockwise
    assert images_phase.open_image(encoded(sideways, "JPEG", exif=exif.tobytes()), "photo").size == (20, 40)
    assert images_phase.open_image(encoded(sideways, "JPEG"), "plain").size == (40, 20)

    grey = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257  # 0 .. 65535 in 256 steps
    decoded = images_phase.open_image(encoded(Image.fromarray(grey), "PNG"), "grey16")
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded)[..., 0], np.arange(256, dtype=np.uint8).reshape(16, 16))
