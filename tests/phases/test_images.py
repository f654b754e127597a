"""The images phase's shards: several per skill, each saved as it completes, reused by a rerun.

The generator is replaced by a fake that paints each prompt's image from its seed (what the shards
do with images does not depend on how they are drawn; tests/test_kill_anywhere.py runs the real
pipeline), so these tests take a second or two.
"""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest

import selma_core.models.loading
import selma_core.phases.images as images_phase
from phases.test_prompts import RecordingRun
from selma_core.config import load_config
from selma_core.context import JobContext
from selma_core.errors import InputError
from selma_core.phases.images import SAVED_SHARDS, generate_images, read_image_dataset
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

    def draw(pipe, prompts, prompt_seeds, cfg, device):
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
