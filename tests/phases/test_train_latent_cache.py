"""The latent cache (``train.cache_latents``, ``selma_core.latent_cache``): the frozen encoders run once
per dataset, their outputs committed under ``cache/latents/<digest>`` and reused by a second expert on
the same images, by a resumed job and by a rerun, which decode no image; the adapter is bit for bit
the uncached run's (SD and SDXL, random_flip on), undecodable images skipped alike; the key follows
what determines the tensors and nothing else.
(``tests/test_corruption.py`` damages a committed entry: it is computed again, never trained on.)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_train_config, train_job_context

from selma_core import checkpoints as checkpoints_module
from selma_core.checkpoints import CheckpointStore
from selma_core.errors import InputError
from selma_core.latent_cache import CACHE_PREFIX, INDEX_FILE, LATENT_FILES, TEXT_FILE, LatentCache
from selma_core.models.loading import load_diffusion_pipeline
from selma_core.phases.train import ExpertTrainer, TrainConfig
from selma_core.storage import LocalArtifactStore
from selma_core.storage.base import MANIFEST

from .test_train import tiny_dataset

SD, SDXL = "random:tiny-sd", "random:tiny-sdxl"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def datasets(model_cache):
    return {spec: tiny_dataset(model_cache, spec) for spec in (SD, SDXL)}


@pytest.fixture
def encoder_calls(monkeypatch):
    """How many times the VAE encoder and the pipelines' prompt encoders ran, and how many images
    the trainer decoded."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

    from selma_core.phases import train as train_module

    calls = {"vae": 0, "text": 0, "decoded": 0}

    def counting(cls, name: str, counter: str) -> None:
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            calls[counter] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    counting(AutoencoderKL, "encode", "vae")
    counting(StableDiffusionPipeline, "encode_prompt", "text")
    counting(StableDiffusionXLPipeline, "encode_prompt", "text")
    open_image = train_module.open_image

    def decoding(*args, **kwargs):
        calls["decoded"] += 1
        return open_image(*args, **kwargs)

    monkeypatch.setattr(train_module, "open_image", decoding)
    return calls


def config(**overrides) -> TrainConfig:
    return tiny_train_config(**{"steps": 2, "random_flip": True, "checkpoint_every": None, **overrides})


def train(model_cache, dataset, cfg: TrainConfig, spec: str = SD, latent_cache=None, checkpoints=None):
    torch.manual_seed(cfg.seed)  # the LoRA's init, as train_expert seeds it
    trainer = ExpertTrainer(load_diffusion_pipeline(spec, model_cache), cfg, "cpu")
    history = trainer.train(dataset, checkpoints=checkpoints, latent_cache=latent_cache)
    return trainer, history


def adapter(trainer, folder) -> dict:
    trainer.save(folder)
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def assert_same(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def entries(store) -> list[str]:
    """The committed cache entries' keys."""
    return [k[: -len(MANIFEST) - 1] for k in store.list_keys(CACHE_PREFIX) if k.endswith(f"/{MANIFEST}")]


@pytest.mark.parametrize("spec", [SD, SDXL])
def test_the_adapter_is_the_same_with_and_without_the_cache(
    spec, tmp_path, model_cache, datasets, encoder_calls
):
    """Uncached (every micro-batch encoded), cache computed and committed, cache read back: one
    adapter and one loss curve, bit for bit, with random_flip drawing both orientations."""
    dataset = datasets[spec]
    store = LocalArtifactStore(tmp_path / "store")
    cache = LatentCache(store, tmp_path / "scratch", spec, None)
    results = []
    for name, cfg, latent_cache, use in [
        ("uncached", config(cache_latents=False), None, "off"),
        ("computed", config(), cache, "computed"),
        ("hit", config(), cache, "hit"),
    ]:
        encoder_calls.update(vae=0, text=0, decoded=0)
        trainer, history = train(model_cache, dataset, cfg, spec, latent_cache)
        assert trainer.latent_cache_use == use, name
        results.append((adapter(trainer, tmp_path / name), history))
        if use == "computed":  # each image in both orientations, each prompt, once
            assert encoder_calls == {"vae": 2 * len(dataset), "text": len(dataset), "decoded": len(dataset)}
        if use == "hit":  # not even an image decoded: the crops (SDXL's time ids) are in the entry
            assert encoder_calls == {"vae": 0, "text": 0, "decoded": 0}
    for weights, history in results[1:]:
        assert_same(weights, results[0][0])
        assert history == results[0][1]

    # The entry: safetensors keyed by the sample ids, and JSON; SDXL's pooled embedding and time ids.
    (key,) = entries(store)
    folder = store.fetch_dir(key, tmp_path / "fetched")
    ids = [meta["id"] for meta, _ in dataset]
    for flipped in (False, True):
        assert sorted(load_file(str(folder / LATENT_FILES[flipped]))) == sorted(ids)
    text = load_file(str(folder / TEXT_FILE))
    names = ["prompt_embeds", "pooled_prompt_embeds"] if spec == SDXL else ["prompt_embeds"]
    assert sorted(text) == sorted(f"{i}/{n}" for i in ids for n in names)
    index = json.loads((folder / INDEX_FILE).read_text())
    assert index["ids"] == ids and index["spec"]["base_model"] == spec and index["skipped"] == {}
    assert index["crops"] == [[32, 32, 0, 0, 0]] * len(ids)  # 32 px squares (tiny_dataset): no crop
    assert ("sdxl_time_ids" in index) == (spec == SDXL)
    assert not any(p.read_bytes().startswith(b"\x80") for p in folder.rglob("*") if p.is_file())  # no pickle


def test_an_entry_keeps_the_undecodable_images_and_the_share_check(
    tmp_path, model_cache, datasets, encoder_calls, capsys
):
    """Undecodable images are in the entry, skipped with why: a run that finds the entry decodes
    nothing, reports them as the run that decoded them did, trains as it did, and still fails when
    they exceed its own ``max_bad_image_share``."""
    broken = ({"id": "broken", "prompt": "an image that cannot be decoded"}, b"\xff\xd8 not a jpeg")
    dataset = [datasets[SD][0], broken, *datasets[SD][1:]]
    cache = LatentCache(LocalArtifactStore(tmp_path / "store"), tmp_path / "scratch", SD, None)
    results = []
    for use in ["computed", "hit"]:
        encoder_calls.update(vae=0, text=0, decoded=0)
        trainer, history = train(model_cache, dataset, config(max_bad_image_share=0.5), latent_cache=cache)
        assert (trainer.latent_cache_use, trainer.images_skipped) == (use, 1)
        assert "train: skipped 1 of 4 image(s): image 'broken' cannot be decoded" in capsys.readouterr().err
        assert encoder_calls["decoded"] == (4 if use == "computed" else 0)
        results.append((adapter(trainer, tmp_path / use), history))
    assert_same(results[1][0], results[0][0])
    assert results[1][1] == results[0][1]
    with pytest.raises(InputError, match=r"1 of 4 image\(s\) cannot be used, more than"):
        train(model_cache, dataset, config(max_bad_image_share=0.1), latent_cache=cache)
    assert encoder_calls["decoded"] == 0


def test_an_entry_that_is_not_the_datasets_is_refused(tmp_path, datasets):
    """The index must list the dataset's samples, each usable or skipped, with a crop each."""
    from selma_core.latent_cache import Encoded, read_entry, write_entry

    ids = ["a", "b", "c"]
    spec = {"format": "test"}
    encoded = Encoded(["a", "c"], [(32, 32, 0, 0, 0)] * 2, {"b": "cannot be decoded"})
    encoded.latents[False] = torch.zeros(2, 8, 4, 4)
    encoded.text["prompt_embeds"] = torch.zeros(2, 3, 16)
    write_entry(tmp_path, spec, encoded, {})
    read = read_entry(tmp_path, spec, ids)
    assert (read.ids, read.crops, read.skipped) == (encoded.ids, encoded.crops, encoded.skipped)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    for change, problem in [
        ({"skipped": {}}, "other sample ids"),
        ({"skipped": {"b": 1}}, "skipped images"),
        ({"ids": ["a", "b", "c"], "skipped": {}}, "a crop"),
        ({"crops": [[32, 32, 0, 0]] * 2}, "a crop"),
    ]:
        (tmp_path / INDEX_FILE).write_text(json.dumps({**index, **change}))
        with pytest.raises(ValueError, match=problem):
            read_entry(tmp_path, spec, ids)


def test_a_second_expert_on_the_same_images_reuses_the_cache(
    tmp_path, model_cache, datasets, encoder_calls, monkeypatch, capsys
):
    """The phase (``train_expert``): the first expert computes and commits the entry; a second one on
    the same images, with other steps and batch size, encodes nothing; one with random_flip encodes
    only the flipped images and recommits the entry with them; a rerun reads it."""
    from selma_core.phases import images
    from selma_core.phases.train import train_expert

    dataset = datasets[SD]
    monkeypatch.setattr(images, "read_image_dataset", lambda folder: dataset)
    store = LocalArtifactStore(tmp_path / "store")
    scratch = tmp_path / "scratch"

    def job(key: str, **overrides) -> dict:
        encoder_calls.update(vae=0, text=0, decoded=0)
        train_cfg = config(**{"random_flip": False, **overrides})
        ctx = train_job_context(store, key, train_cfg, model_cache, scratch, tmp_path)
        return train_expert(ctx, "counting")["latent_cache"]

    n = len(dataset)
    assert job("experts/a") == "computed" and encoder_calls == {"vae": n, "text": n, "decoded": n}
    (key,) = entries(store)
    attempt = store.read_manifest(key)["attempt"]
    assert job("experts/b", steps=3, batch_size=1, gradient_accumulation=3) == "hit"
    assert encoder_calls == {"vae": 0, "text": 0, "decoded": 0}
    assert store.read_manifest(key)["attempt"] == attempt  # read, not written again
    assert job("experts/c", random_flip=True) == "computed"
    assert encoder_calls == {"vae": n, "text": 0, "decoded": n}  # the flipped images only
    assert entries(store) == [key]
    assert job("experts/c", random_flip=True) == "hit" and encoder_calls == {
        "vae": 0,
        "text": 0,
        "decoded": 0,
    }
    assert "warning" not in capsys.readouterr().err


def test_a_resumed_run_reads_the_cache_and_ends_as_an_uninterrupted_one(
    tmp_path, model_cache, datasets, encoder_calls, monkeypatch
):
    """Killed after its second checkpoint, the run is resumed: it reads the cache committed before
    its first step (no encoder runs) and ends with the uncached, uninterrupted run's adapter."""

    class Killed(Exception):
        pass

    reached = []

    def kill_at_second_checkpoint(name: str) -> None:
        if name == "train.after_checkpoint":
            reached.append(name)
            if len(reached) == 2:
                raise Killed

    dataset = datasets[SD]
    reference, reference_history = train(model_cache, dataset, config(steps=4, cache_latents=False))
    store = LocalArtifactStore(tmp_path / "store")
    cache = LatentCache(store, tmp_path / "scratch", SD, None)
    checkpoints = CheckpointStore(store, "experts/counting/test", tmp_path / "scratch")
    cfg = config(steps=4, checkpoint_every=1)
    monkeypatch.setattr(checkpoints_module, "fault_point", kill_at_second_checkpoint)
    with pytest.raises(Killed):
        train(model_cache, dataset, cfg, latent_cache=cache, checkpoints=checkpoints)
    assert len(entries(store)) == 1  # committed before the first step

    monkeypatch.setattr(checkpoints_module, "fault_point", lambda name: None)
    encoder_calls.update(vae=0, text=0, decoded=0)
    trainer, history = train(model_cache, dataset, cfg, latent_cache=cache, checkpoints=checkpoints)
    assert (trainer.resumed_from_step, trainer.latent_cache_use) == (2, "hit")
    assert encoder_calls == {"vae": 0, "text": 0, "decoded": 0}
    assert history == reference_history
    assert_same(adapter(trainer, tmp_path / "resumed"), adapter(reference, tmp_path / "reference"))


def test_the_cache_key_follows_what_determines_the_tensors(datasets):
    from selma_core.latent_cache import dataset_digest

    dataset = datasets[SD]

    def key(
        dataset=dataset, base_model=SD, revision=None, resolution=32, dtype="torch.float32", **vae
    ) -> str:
        cache = LatentCache(None, "unused", base_model, revision, **vae)
        return cache.key(cache.spec(dataset, resolution, dtype))

    base = key()
    assert base.startswith(f"{CACHE_PREFIX}/") and key() == base
    others = [
        key(resolution=64),
        key(base_model=SDXL),
        key(revision="0123abc"),
        key(dtype="torch.bfloat16"),
        key(dataset=dataset[:2]),
        key(dataset=[({**dataset[0][0], "prompt": "another"}, dataset[0][1]), *dataset[1:]]),
        key(dataset=[(dataset[0][0], dataset[0][1] + b"\0"), *dataset[1:]]),
        key(vae_model="org/vae"),
        key(vae_model="org/vae", vae_model_revision="0123abc"),  # a pinned VAE's latents are its own
    ]
    assert len({base, *others}) == len(others) + 1
    assert dataset_digest(list(dataset)) == dataset_digest(dataset)
    # Nothing of the expert's settings (steps, batch size, rank, seed, flip) enters: the key is made
    # of the spec only, and a second expert with other ones reads the entry (the test above).
    spec = LatentCache(None, "unused", SD, None).spec(dataset, 32, "torch.float32")
    assert sorted(spec) == ["base_model", "base_model_revision", "dataset", "dtype", "format", "resolution"]


def test_cache_latents_leaves_the_output_key_unchanged(tiny_config):
    from selma_core.config import load_config
    from selma_core.plan import build_plan
    from selma_core.skills import load_skills

    def keys(path) -> dict[str, str]:
        cfg = load_config(path)
        return {
            job.id: job.key for job in build_plan(cfg, load_skills(cfg.skills_path, cfg.skills)).jobs.values()
        }

    assert keys(tiny_config(train={"cache_latents": False})) == keys(tiny_config())
    assert TrainConfig().cache_latents is True
