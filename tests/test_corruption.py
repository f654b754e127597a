"""Corruption, proven by fault injection: a damaged artifact is detected by size or checksum before it
is used, reported with its store URL, and either rejected (exit code 2, nothing new committed) or, for
a cache, regenerated, giving bit for bit the output of an undamaged run.

One tiny pipeline (one skill, tiny random models) runs once per module; every test damages a copy of
its store (``shutil.copytree``) and runs, in-process through ``jobs.run.main``, the job that reads the
damaged artifact. Each test has its own ``cache_dir`` (its fetched copies), sharing only the random
models. The cases are tables: to add one, append a ``Damage`` (rejected) or a ``CacheDamage``
(regenerated). docs/reliability.md ("Corruption") lists what each case guarantees.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import S3_BUCKET, write_config

from jobs import run as job_run
from selma_core.config import load_config
from selma_core.errors import EXIT_INVALID
from selma_core.latent_cache import CACHE_PREFIX, LATENT_FILES
from selma_core.lora import WEIGHT_NAME, load_adapter
from selma_core.phases.evaluate import ANSWER_CACHE_KEY, IMAGE_CACHE_PREFIX, ImageCache
from selma_core.phases.images import SHARD_NAME, read_image_dataset
from selma_core.phases.merge import ADAPTER_DIR
from selma_core.phases.prompts import read_prompts
from selma_core.plan import build_plan
from selma_core.skills import load_skills
from selma_core.storage import MANIFEST, ArtifactStore, LocalArtifactStore, open_store
from selma_core.storage.base import sha256_file

SKILL = "counting"
# configs/demo.yaml, smaller still: one skill, two training steps, one evaluation image.
SETTINGS = dict(
    skills=[SKILL],
    prompts={"num_prompts": 8},
    train={"steps": 2, "batch_size": 2, "log_every": 1},
    merge={"register": False},
    eval={
        "models": ["base"],
        "max_prompts_per_skill": 1,
        "num_inference_steps": 1,
        "bootstrap_resamples": 100,
        "report_samples_per_skill": 1,
    },
)
PROMPTS, IMAGES, TRAIN, MERGE = f"prompts:{SKILL}", f"images:{SKILL}", f"train:{SKILL}", "merge"
JOBS = [PROMPTS, IMAGES, TRAIN, MERGE, "eval"]  # the pipeline, in order


def private_cache(folder: Path, model_cache: Path) -> Path:
    """A cache_dir of one's own (fetched copies, scratch) that shares the random test models."""
    (model_cache / "models").mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True)
    (folder / "models").symlink_to(model_cache / "models")
    return folder


def make_config(folder: Path, model_cache: Path, pipeline: Path, **storage) -> Path:
    return write_config(
        folder,
        model_cache,
        **SETTINGS,
        cache_dir=str(private_cache(folder / "cache", model_cache)),
        tracking={"uri": f"sqlite:///{pipeline / 'mlflow.db'}"},  # one MLflow database per module
        **({"storage": storage} if storage else {}),
    )


@pytest.fixture(autouse=True)
def sigterm_restored():
    """``jobs.run.main`` installs a SIGTERM handler; put pytest's back."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, model_cache) -> Path:
    """A folder whose ``store`` holds a whole committed pipeline: prompts, images, expert, merge, eval."""
    root = tmp_path_factory.mktemp("corruption")
    config = make_config(root, model_cache, root)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        for job in JOBS:
            assert job_run.main([*flags(job), "--config", str(config)]) == 0, job
    finally:
        signal.signal(signal.SIGTERM, previous)
    return root


# -- the test's world: a damaged copy of the pipeline's store ---------------------------------------


@dataclass
class World:
    root: Path
    config: Path
    store: ArtifactStore

    def __post_init__(self) -> None:
        cfg = load_config(self.config)
        self.plan = build_plan(cfg, load_skills(cfg.skills_path, cfg.skills))
        self.cache = Path(cfg.cache_dir)

    def key(self, job: str) -> str:
        """The store key of a job's output; ``job`` as jobs are named: "merge", "train:counting"."""
        phase, _, skill = job.partition(":")
        return self.plan.job(phase, skill or None).key

    def obj(self, key: str, rel: str, manifest: dict | None = None) -> str:
        """The store key of file ``rel`` of the committed output ``key`` (or of ``manifest``'s attempt)."""
        return f"{key}/{(manifest or self.store.read_manifest(key))['files'][rel]['object']}"

    def read(self, key: str) -> bytes:
        return self.store.read_bytes(key)

    def write(self, key: str, data: bytes) -> None:
        """Replace an object behind the commit protocol's back (its manifest is not updated)."""
        self.store.write_bytes(key, data)

    def delete(self, key: str) -> None:
        if isinstance(self.store, LocalArtifactStore):
            (self.store.root / key).unlink()
        else:
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self.store._key(key))

    def listing(self) -> list[tuple]:
        """Every object with its size and modification time (or ETag): any write shows."""
        if isinstance(self.store, LocalArtifactStore):
            root = self.store.root
            return sorted(
                (p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                for p in root.rglob("*")
                if p.is_file()
            )
        pages = self.store.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.store.bucket, Prefix=f"{self.store.prefix}/"
        )
        return sorted((o["Key"], o["Size"], o["ETag"]) for page in pages for o in page.get("Contents", []))


@pytest.fixture
def world(pipeline, tmp_path, model_cache) -> World:
    shutil.copytree(pipeline / "store", tmp_path / "store")
    config = make_config(tmp_path, model_cache, pipeline)
    return World(tmp_path, config, LocalArtifactStore(tmp_path / "store"))


@pytest.fixture
def never_used(monkeypatch):
    """The readers of the damaged inputs: a job that reaches one has used its input. (This module
    bound the real ones at import, to show what they make of a damaged file.)"""

    def used(*args, **kwargs):
        raise AssertionError("a damaged input reached its reader")

    for name in (
        "selma_core.phases.prompts.read_prompts",
        "selma_core.phases.images.read_image_dataset",
        "selma_core.lora.load_adapter",
    ):
        monkeypatch.setattr(name, used)


def flags(job: str) -> list[str]:
    """jobs.run's flags for a job id: "merge", "train:counting"."""
    phase, _, skill = job.partition(":")
    return ["--phase", phase, *(["--skill", skill] if skill else [])]


def run_job(w: World, argv: list[str], capsys) -> tuple[int, dict, str]:
    code = job_run.main([*argv, "--config", str(w.config)])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err + out


# -- damages the readers cannot see: only the manifest's size and checksum tell ---------------------


def silent_to(reader: Callable[[Path], object], name: str, data: bytes, folder: Path) -> object:
    """What ``reader`` makes of a folder holding the damaged ``data`` as ``name`` (no error)."""
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return reader(folder / name if name.endswith(".jsonl") else folder)


def shard_cut_between_samples(w: World) -> str:
    """The shard cut just before its last sample: still a valid tar, one sample fewer."""
    obj = w.obj(w.key(IMAGES), SHARD_NAME)
    data = w.read(obj)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()  # <id>.jpg, <id>.json per sample
    cut = data[: members[-2].offset]
    assert len(silent_to(read_image_dataset, SHARD_NAME, cut, w.root / "silent")) == len(members) // 2 - 1
    w.write(obj, cut)
    return w.store.url(obj)


def shard_byte_flipped(w: World) -> str:
    """One byte of the first image changed: same size, so only the checksum can tell."""
    obj = w.obj(w.key(IMAGES), SHARD_NAME)
    data = bytearray(w.read(obj))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        first = tar.getmembers()[0]
    data[first.offset_data + first.size // 2] ^= 0x01
    w.write(obj, bytes(data))
    return w.store.url(obj)


def shard_deleted(w: World) -> str:
    obj = w.obj(w.key(IMAGES), SHARD_NAME)
    w.delete(obj)
    return w.store.url(obj)


def prompts_cut_between_lines(w: World) -> str:
    """prompts.jsonl without its last line: valid JSON Lines, one prompt fewer."""
    obj = w.obj(w.key(PROMPTS), "prompts.jsonl")
    lines = w.read(obj).splitlines(keepends=True)
    cut = b"".join(lines[:-1])
    assert len(silent_to(read_prompts, "prompts.jsonl", cut, w.root / "silent")) == len(lines) - 1
    w.write(obj, cut)
    return w.store.url(obj)


def adapter_of_another_size(w: World) -> str:
    """The expert replaced by a valid adapter of another size: half its layers, same metadata."""
    from safetensors.torch import load, save

    obj = w.obj(w.key(TRAIN), WEIGHT_NAME)
    data = w.read(obj)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    tensors = load(data)
    modules = sorted({k.rsplit(".lora", 1)[0] for k in tensors})
    kept = set(modules[: len(modules) // 2])
    smaller = save(
        {k: v for k, v in tensors.items() if k.rsplit(".lora", 1)[0] in kept}, header["__metadata__"]
    )
    assert len(smaller) != len(data)
    assert len(silent_to(load_adapter, WEIGHT_NAME, smaller, w.root / "silent").layers) == len(kept)
    w.write(obj, smaller)
    return w.store.url(obj)


def edit_manifest(job: str, edit: Callable[[dict], None]) -> Callable[[World], str]:
    """A damage: ``edit`` changes the manifest of ``job``'s output (its files stay as they are)."""

    def damage(w: World) -> str:
        manifest = w.store.read_manifest(w.key(job))
        url = w.store.url(w.obj(w.key(job), WEIGHT_NAME, manifest))
        edit(manifest)
        w.write(f"{w.key(job)}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
        return url

    return damage


def wrong_sha256(manifest: dict) -> None:
    manifest["files"][WEIGHT_NAME]["sha256"] = hashlib.sha256(b"another file").hexdigest()


def no_sha256(manifest: dict) -> None:
    del manifest["files"][WEIGHT_NAME]["sha256"]


def manifest_cut(w: World) -> str:
    manifest = f"{w.key(TRAIN)}/{MANIFEST}"
    data = w.read(manifest)
    w.write(manifest, data[: len(data) // 2])
    return w.store.url(manifest)


def manifest_without_checksum(w: World) -> str:
    edit_manifest(TRAIN, no_sha256)(w)
    return w.store.url(f"{w.key(TRAIN)}/{MANIFEST}")


@dataclass(frozen=True)
class Damage:
    id: str
    job: str  # the job that reads the damaged output, "phase" or "phase:skill"
    damage: Callable[[World], str]  # damages the store; returns the URL the error must name
    expected: str  # what the error says


# fmt: off
DAMAGES = [
    Damage("shard-truncated-between-samples", TRAIN, shard_cut_between_samples, "size mismatch"),
    Damage("shard-byte-flipped", TRAIN, shard_byte_flipped, "checksum mismatch"),
    Damage("shard-deleted", TRAIN, shard_deleted, "missing, though"),
    Damage("prompts-truncated-between-lines", IMAGES, prompts_cut_between_lines, "size mismatch"),
    Damage("adapter-of-another-size", MERGE, adapter_of_another_size, "size mismatch"),
    Damage("manifest-sha256-mismatch", MERGE, edit_manifest(TRAIN, wrong_sha256), "checksum mismatch"),
    Damage("manifest-truncated", MERGE, manifest_cut, "not valid JSON"),
    Damage("manifest-without-checksum", MERGE, manifest_without_checksum, "the manifest is corrupt"),
]
# fmt: on


def assert_refused(w: World, case: Damage, capsys) -> None:
    w.store.delete_prefix(w.key(case.job))  # the reading job has not run yet
    url = case.damage(w)
    before = w.listing()
    code, last, message = run_job(w, flags(case.job), capsys)
    assert code == EXIT_INVALID, message
    assert "Traceback" not in message, message
    assert last["status"] == "failed" and last["exit_code"] == EXIT_INVALID
    assert url in last["error"] and case.expected in last["error"], last["error"]
    assert w.listing() == before, "the failed job changed the store"


@pytest.mark.parametrize("case", DAMAGES, ids=[c.id for c in DAMAGES])
def test_damaged_output_is_refused_before_use(case: Damage, world: World, never_used, capsys):
    assert_refused(world, case, capsys)


@pytest.mark.parametrize("case", [DAMAGES[4], DAMAGES[5]], ids=lambda c: c.id)
def test_on_s3_damage_is_refused_naming_the_s3_url(
    case, pipeline, moto_s3, tmp_path, model_cache, never_used, capsys
):
    """The same guarantee on S3 (moto_server), for the merge job: its only input, the expert, uploaded."""
    import boto3

    prefix = f"corruption-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=moto_s3)
    store_dir = pipeline / "store"
    for path in sorted((store_dir / "experts").rglob("*")):
        if path.is_file():
            client.upload_file(str(path), S3_BUCKET, f"{prefix}/{path.relative_to(store_dir).as_posix()}")
    config = make_config(
        tmp_path, model_cache, pipeline, uri=f"s3://{S3_BUCKET}/{prefix}", endpoint_url=moto_s3
    )
    w = World(tmp_path, config, open_store(load_config(config).storage))
    assert w.store.url("x") == f"s3://{S3_BUCKET}/{prefix}/x"
    assert_refused(w, case, capsys)


# -- caches: a damaged entry is regenerated, and the result is the undamaged run's, bit for bit ----


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


@dataclass(frozen=True)
class CacheDamage:
    id: str
    job: str  # the job rerun (--force) over the damaged fetched copy
    upstream: str  # the job whose output was fetched
    rel: str  # the damaged file of that output
    damage: Callable[[Path], None]
    output: str  # a file of the rerun job's output that must be bit-identical


# The fetched copies of train's and merge's inputs, under cache_dir/fetched/. (Train's latent cache,
# in the store, is damaged by LATENT_CACHE_DAMAGES below.)
CACHE_DAMAGES = [
    CacheDamage("fetched-shard-truncated", TRAIN, IMAGES, SHARD_NAME, truncate, WEIGHT_NAME),
    CacheDamage("fetched-shard-deleted", TRAIN, IMAGES, SHARD_NAME, delete, WEIGHT_NAME),
    CacheDamage(
        "fetched-adapter-byte-flipped", MERGE, TRAIN, WEIGHT_NAME, flip_a_byte, f"{ADAPTER_DIR}/{WEIGHT_NAME}"
    ),
]


def same_safetensors(a: bytes, b: bytes) -> bool:
    """The same tensors, bit for bit, and the same metadata. (Not the same bytes: safetensors writes
    its metadata map in an order that changes from one call to the next.)"""
    import torch
    from safetensors.torch import load

    def metadata(data: bytes) -> dict:
        return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})

    ta, tb = load(a), load(b)
    return (
        metadata(a) == metadata(b)
        and ta.keys() == tb.keys()
        and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    )


@pytest.mark.parametrize("case", CACHE_DAMAGES, ids=[c.id for c in CACHE_DAMAGES])
def test_damaged_fetched_copy_is_downloaded_again(case: CacheDamage, world: World, capsys):
    upstream = world.key(case.upstream)
    local = world.store.fetch_dir(upstream, world.cache) / case.rel  # what an earlier job left
    case.damage(local)
    output = world.key(case.job)
    undamaged = world.store.read_manifest(output)

    code, _, message = run_job(world, [*flags(case.job), "--force"], capsys)
    assert code == 0, message
    rerun = world.store.read_manifest(output)
    assert rerun["attempt"] != undamaged["attempt"], "the job did not run again"
    assert sha256_file(local) == world.store.read_manifest(upstream)["files"][case.rel]["sha256"]
    before, after = (world.read(world.obj(output, case.output, m)) for m in (undamaged, rerun))
    assert same_safetensors(before, after), "the rerun's output differs from the undamaged run's"


# The latent cache (cache/latents/<digest>, committed by the train phase): a damaged entry is found by
# fetch_dir before use, reported naming the object, computed again and recommitted.
LATENT_CACHE_DAMAGES = [
    ("latents-deleted", delete, "missing, though"),
    ("latents-truncated", truncate, "size mismatch"),
    ("latents-byte-flipped", flip_a_byte, "checksum mismatch"),
]


@pytest.mark.parametrize(
    ("damage", "expected"), [d[1:] for d in LATENT_CACHE_DAMAGES], ids=[d[0] for d in LATENT_CACHE_DAMAGES]
)
def test_damaged_latent_cache_is_computed_again(damage, expected, world: World, capsys):
    (key,) = [k[: -len(MANIFEST) - 1] for k in world.store.list_keys(CACHE_PREFIX) if k.endswith(MANIFEST)]
    cached = world.store.read_manifest(key)
    obj = world.obj(key, LATENT_FILES[False], cached)
    good = world.read(obj)
    damage(world.store.root / obj)
    output = world.key(TRAIN)
    undamaged = world.store.read_manifest(output)

    code, last, message = run_job(world, [*flags(TRAIN), "--force"], capsys)
    assert code == 0, message
    assert f"warning: latent cache {world.store.url(key)} is unusable ({world.store.url(obj)}: " in message
    assert expected in message
    assert last["result"]["latent_cache"] == "computed"
    # Recommitted whole (a new attempt that verifies), with the undamaged tensors.
    recommitted = world.store.read_manifest(key)
    assert recommitted["attempt"] != cached["attempt"]
    fetched = world.store.fetch_dir(key, world.root / "check")
    assert same_safetensors((fetched / LATENT_FILES[False]).read_bytes(), good)
    # Never trained on: the expert is the undamaged run's, bit for bit.
    rerun = world.store.read_manifest(output)
    assert rerun["attempt"] != undamaged["attempt"], "the job did not run again"
    before, after = (world.read(world.obj(output, WEIGHT_NAME, m)) for m in (undamaged, rerun))
    assert same_safetensors(before, after), "the rerun's output differs from the undamaged run's"


def test_damaged_eval_caches_are_redrawn_and_recomputed(world: World, capsys):
    """A cached evaluation image cut inside its last chunk (PIL's verify() passes it) is drawn
    again, and an answer cache that fails its checksum is recomputed: same images, same scores."""
    (png,) = world.store.list_keys(IMAGE_CACHE_PREFIX)
    good = world.read(png)
    world.write(png, good[:-1])
    answers = world.obj(ANSWER_CACHE_KEY, "answers.sqlite")
    world.write(answers, world.read(answers)[:4096])
    undamaged = json.loads(world.store.read_output_file(world.key("eval"), "results.json"))

    code, _, message = run_job(world, ["--phase", "eval", "--force"], capsys)
    assert code == 0, message
    results = json.loads(world.store.read_output_file(world.key("eval"), "results.json"))
    assert results["cache"] == {"images_cached": 0, "images_drawn": 1}
    assert world.read(png) == good
    assert "clip_score: 1 pair(s) scored" in message
    assert [r["scores"] for r in results["per_prompt"]] == [r["scores"] for r in undamaged["per_prompt"]]
    assert world.store.read_output_file(world.key("eval"), results["per_prompt"][0]["image"]) == good


def test_image_cache_redraws_every_damaged_entry(world: World):
    (png,) = world.store.list_keys(IMAGE_CACHE_PREFIX)
    good = world.read(png)
    cache = ImageCache(world.store, {})
    assert cache.get(png) == good
    damaged = {
        "cut-inside-iend": good[:-1],
        "cut-in-half": good[: len(good) // 2],
        "byte-flipped": good[:60] + bytes([good[60] ^ 1]) + good[61:],
        "empty": b"",
        "not-a-png": b"GIF89a" + good[6:],
    }
    for name, data in damaged.items():
        world.write(png, data)
        assert cache.get(png) is None, name
    world.delete(png)
    assert cache.get(png) is None


def same_size_other_digit(data: bytes) -> bytes:
    i = next(i for i, c in enumerate(data) if chr(c).isdigit())
    return data[:i] + (b"2" if data[i : i + 1] == b"1" else b"1") + data[i + 1 :]


def test_a_damaged_file_read_alone_is_refused(world: World, capsys):
    """``read_output_file`` (merge reads the weight search's search.json this way, jobs.submit the
    results table) checks as ``fetch_dir`` does: same size, one digit changed, refused naming the
    object; jobs.submit, whose jobs are done by then, says so instead of printing the table."""
    from jobs.submit import _print_results
    from selma_core.errors import InputError

    key = world.key("eval")
    for rel in ("results.json", "results.md"):
        obj = world.obj(key, rel)
        world.write(obj, same_size_other_digit(world.read(obj)))
        with pytest.raises(InputError, match="checksum mismatch") as info:
            world.store.read_output_file(key, rel)
        assert world.store.url(obj) in str(info.value)
    _print_results(world.store, world.plan)
    assert f"Evaluation table not shown: {world.store.url(obj)}: checksum mismatch" in capsys.readouterr().err
