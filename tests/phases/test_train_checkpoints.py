"""Training checkpoints: a run stopped after a checkpoint and run again ends, bit for bit on CPU, with
the adapter and loss curve of an uninterrupted run; a damaged newest checkpoint is skipped for the one
before; checkpoints hold no pickle, only the newest ``checkpoints_keep`` stay, and the settings leave
the output key unchanged. The phase (``train_expert``): the resumed job's committed adapter,
``loss.json`` and MLflow curve equal an uninterrupted run's, and its checkpoints are gone once it
committed. (``tests/test_kill_anywhere.py`` kills real ``jobs.run`` processes with SIGKILL.)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import RecordingRun, tiny_train_config, train_job_context

from selma_core import checkpoints as checkpoints_module
from selma_core.checkpoints import CheckpointStore
from selma_core.models.loading import load_diffusion_pipeline
from selma_core.phases.train import ExpertTrainer, TrainConfig
from selma_core.storage import LocalArtifactStore
from selma_core.storage.base import MANIFEST

from .test_train import tiny_dataset

KEY = "experts/counting/test"
STEPS = 4


class Killed(Exception):
    """Stands for the SIGKILL: raised where ``fault_point`` would kill the job."""


def kill_at(monkeypatch, point: str, nth: int) -> None:
    reached = []

    def fault_point(name: str) -> None:
        if name == point:
            reached.append(name)
            if len(reached) == nth:
                raise Killed(f"{point}@{nth}")

    monkeypatch.setattr(checkpoints_module, "fault_point", fault_point)


def config(**overrides) -> TrainConfig:
    # random_flip: one more draw per micro-batch that must resume in step.
    return tiny_train_config(**{"steps": STEPS, "random_flip": True, "checkpoint_every": 1, **overrides})


def run(model_cache, dataset, cfg: TrainConfig, checkpoints=None):
    torch.manual_seed(cfg.seed)  # the LoRA's init, as train_expert seeds it
    trainer = ExpertTrainer(load_diffusion_pipeline("random:tiny-sd", model_cache), cfg, "cpu")
    history = trainer.train(dataset, checkpoints=checkpoints)
    return trainer, history


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dataset(model_cache):
    return tiny_dataset(model_cache)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_cache, dataset):
    """An uninterrupted run that saves no checkpoint: its adapter, loss history and kohya export."""
    from selma_core.lora import load_adapter
    from selma_core.phases.merge import export_kohya

    trainer, history = run(model_cache, dataset, config(checkpoint_every=None))
    folder = tmp_path_factory.mktemp("reference")
    trainer.save(folder)
    export_kohya(load_adapter(folder), folder / "kohya.safetensors")
    return (
        load_file(str(folder / "pytorch_lora_weights.safetensors")),
        history,
        load_file(str(folder / "kohya.safetensors")),
    )


def assert_same_adapter(trainer, reference, tmp_path) -> None:
    trainer.save(tmp_path / "adapter")
    ours, theirs = load_file(str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")), reference
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_a_run_resumed_after_a_checkpoint_ends_bit_identical(
    tmp_path, model_cache, dataset, reference, monkeypatch
):
    store = LocalArtifactStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, KEY, tmp_path / "scratch", keep=2)
    kill_at(monkeypatch, "train.after_checkpoint", 2)
    with pytest.raises(Killed):
        run(model_cache, dataset, config(), checkpoints)
    assert checkpoints.steps() == [1, 2]
    monkeypatch.undo()

    trainer, history = run(model_cache, dataset, config(), checkpoints)
    assert trainer.resumed_from_step == 2
    assert trainer.resumed_elapsed_s > 0
    assert history == reference[1]  # steps and losses, the ones before the checkpoint included
    assert json.dumps(history) == json.dumps(reference[1])  # loss.json's bytes
    assert_same_adapter(trainer, reference[0], tmp_path)
    # Only the newest 2 stay; the last step (the adapter's commit) gets none.
    assert checkpoints.steps() == [2, 3]
    assert sorted(
        {k[len(checkpoints.prefix) + 1 :].split("/")[0] for k in store.list_keys(checkpoints.prefix)}
    ) == [
        "step-00000002",
        "step-00000003",
    ]

    # No pickle: safetensors and JSON only, each read back by its own parser.
    files = [p for p in (tmp_path / "store" / checkpoints.prefix).rglob("*") if p.is_file()]
    assert sorted({p.name for p in files}) == sorted(
        [MANIFEST, "lora.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    )
    for path in files:
        assert not path.read_bytes().startswith(b"\x80")  # the pickle protocol's opcode PROTO
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert load_file(str(path))
    state = checkpoints.load(3)
    assert state.meta["history"] == [list(h) for h in reference[1][:3]]
    assert {"exp_avg", "exp_avg_sq", "step"} <= {k.split(".", 2)[2] for k in state.tensors["optimizer"]}


def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous(
    tmp_path, model_cache, dataset, reference, monkeypatch, capsys
):
    store = LocalArtifactStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, KEY, tmp_path / "scratch", keep=2)
    kill_at(monkeypatch, "train.after_checkpoint", 3)
    with pytest.raises(Killed):
        run(model_cache, dataset, config(), checkpoints)
    monkeypatch.undo()
    assert checkpoints.steps() == [1, 2, 3]  # killed right after the commit, before the pruning
    # The newest checkpoint's LoRA file, damaged behind the store's back (same size, one byte).
    manifest = store.read_manifest(checkpoints.key(3))
    damaged = tmp_path / "store" / checkpoints.key(3) / manifest["files"]["lora.safetensors"]["object"]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))

    capsys.readouterr()
    trainer, history = run(model_cache, dataset, config(), checkpoints)
    warning = capsys.readouterr().err
    assert f"train checkpoint {store.url(checkpoints.key(3))} is unusable (" in warning
    assert "checksum mismatch" in warning
    assert trainer.resumed_from_step == 2
    assert history == reference[1]
    assert_same_adapter(trainer, reference[0], tmp_path)
    assert checkpoints.steps() == [2, 3]  # step 3 made again, whole; step 1 pruned
    assert checkpoints.load(3).step == 3


def test_checkpoint_settings_leave_the_output_key_unchanged(tiny_config):
    from selma_core.config import load_config
    from selma_core.plan import build_plan
    from selma_core.skills import load_skills

    def keys(path) -> dict[str, str]:
        cfg = load_config(path)
        return {
            job.id: job.key for job in build_plan(cfg, load_skills(cfg.skills_path, cfg.skills)).jobs.values()
        }

    base = keys(tiny_config())
    assert keys(tiny_config(train={"checkpoint_every": 1, "checkpoints_keep": 5})) == base
    assert keys(tiny_config(train={"checkpoint_every": None})) == base


def test_checkpoint_settings_validate():
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoints_keep"):
        TrainConfig(checkpoints_keep=0)
    assert TrainConfig().checkpoint_every == 500 and TrainConfig().checkpoints_keep == 2


def test_the_train_job_says_which_batch_it_trained_with(tmp_path, model_cache, dataset, monkeypatch):
    """A batch setting left null is SELMA's for the model (SD 1.x: 4 micro-batches a step): the job's
    result, expert.json and its MLflow params give the values used."""
    from selma_core.phases import images
    from selma_core.phases.train import train_expert

    monkeypatch.setattr(images, "read_image_dataset", lambda folder: dataset)
    store = LocalArtifactStore(tmp_path / "store")
    cfg = tiny_train_config(steps=1, gradient_accumulation=None, checkpoint_every=None)
    ctx = train_job_context(store, KEY, cfg, model_cache, tmp_path / "scratch", tmp_path)
    result = train_expert(ctx, "counting")
    assert (result["batch_size"], result["gradient_accumulation"]) == (2, 4)
    assert (ctx.run.params["batch_size"], ctx.run.params["gradient_accumulation"]) == (2, 4)
    expert = json.loads(store.read_output_file(KEY, "expert.json"))
    assert (expert["batch_size"], expert["gradient_accumulation"]) == (2, 4)


def test_a_killed_train_job_resumes_to_the_uninterrupted_output(
    tmp_path, model_cache, dataset, reference, monkeypatch
):
    """The phase itself (``train_expert``, as ``jobs.run`` calls it, its images given): the committed
    adapter (every tensor, kohya keys too), loss.json and the run's metrics equal an uninterrupted
    run's, and the checkpoints are deleted once the adapter is committed."""
    from selma_core.phases import images
    from selma_core.phases.train import train_expert

    monkeypatch.setattr(images, "read_image_dataset", lambda folder: dataset)
    store = LocalArtifactStore(tmp_path / "store")
    scratch = tmp_path / "scratch"

    def job() -> tuple[dict, RecordingRun]:
        ctx = train_job_context(store, KEY, config(), model_cache, scratch, tmp_path)
        return train_expert(ctx, "counting"), ctx.run

    kill_at(monkeypatch, "train.after_checkpoint", 2)
    with pytest.raises(Killed):
        job()
    assert not store.is_committed(KEY)
    monkeypatch.setattr(checkpoints_module, "fault_point", lambda name: None)
    result, run = job()
    assert result["resumed_from_step"] == 2 and result["steps"] == STEPS
    folder = store.fetch_dir(KEY, tmp_path / "fetched")
    assert (folder / "loss.json").read_text() == json.dumps(reference[1])
    assert "resumed_from_step" not in json.loads((folder / "expert.json").read_text())
    for rel, theirs in [
        ("pytorch_lora_weights.safetensors", reference[0]),
        ("kohya/selma_counting_lora.safetensors", reference[2]),
    ]:
        ours = load_file(str(folder / rel))
        assert ours.keys() == theirs.keys()
        assert all(ours[k].dtype == t.dtype and torch.equal(ours[k], t) for k, t in theirs.items()), rel
    # The run's curve: the checkpoint's steps (1, 2) first, then on at 3 and 4, each once.
    assert run.series("train.loss") == reference[1]
    assert store.list_keys(f"{KEY}/_checkpoints") == []


def test_a_sigterm_saves_a_checkpoint_at_the_end_of_its_step_and_the_rerun_resumes_there(
    tmp_path, model_cache, dataset, reference
):
    """A preempted pod gets SIGTERM: training finishes its step, saves a checkpoint there (not only
    at checkpoint_every) and stops; the rerun resumes from it, bit for bit the uninterrupted run."""
    from selma_core import stopping

    store = LocalArtifactStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, KEY, tmp_path / "scratch", keep=2)
    cfg = config(checkpoint_every=100)  # no periodic checkpoint in these 4 steps

    def preempted(step: int) -> None:
        if step == 2:
            assert stopping.defer_stop()  # what the job's SIGTERM handler asks

    torch.manual_seed(cfg.seed)
    trainer = ExpertTrainer(load_diffusion_pipeline("random:tiny-sd", model_cache), cfg, "cpu")
    with pytest.raises(KeyboardInterrupt, match="stopped after step 2 of 4 on SIGTERM"):
        trainer.train(dataset, checkpoints=checkpoints, on_step=preempted)
    assert checkpoints.steps() == [2]
    assert not stopping.defer_stop()  # outside training, a stop is not deferred

    trainer, history = run(model_cache, dataset, cfg, checkpoints)
    assert trainer.resumed_from_step == 2
    assert history == reference[1]
    assert_same_adapter(trainer, reference[0], tmp_path)


def test_a_sigterm_at_the_last_step_keeps_the_finished_training(tmp_path, model_cache, dataset, reference):
    from selma_core import stopping

    store = LocalArtifactStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, KEY, tmp_path / "scratch", keep=2)
    cfg = config()  # a checkpoint every step, but none at the last (the adapter's commit follows)
    torch.manual_seed(cfg.seed)
    trainer = ExpertTrainer(load_diffusion_pipeline("random:tiny-sd", model_cache), cfg, "cpu")
    with pytest.raises(KeyboardInterrupt, match=f"stopped after step {STEPS} of {STEPS}"):
        trainer.train(
            dataset, checkpoints=checkpoints, on_step=lambda s: s == STEPS and stopping.defer_stop()
        )
    assert checkpoints.steps() == [STEPS - 1, STEPS]
    trainer, history = run(model_cache, dataset, cfg, checkpoints)
    assert trainer.resumed_from_step == STEPS  # no step trained again
    assert history == reference[1]
    assert_same_adapter(trainer, reference[0], tmp_path)


def test_a_checkpoint_of_another_precision_is_refused_and_kernel_choices_stay_this_runs(
    tmp_path, model_cache, dataset
):
    """mixed_precision auto is bf16 on a GPU and fp32 on a CPU: a checkpoint the GPU wrote is not
    resumed by a rerun that landed on a CPU. And resuming keeps this run's optimizer kernels
    (fused_optimizer is execution-only), not the checkpoint's."""
    store = LocalArtifactStore(tmp_path / "store")
    checkpoints = CheckpointStore(store, KEY, tmp_path / "scratch", keep=2)
    trainer, _ = run(model_cache, dataset, config(), checkpoints)
    state = checkpoints.load(STEPS - 1)
    assert state.meta["dtype"] == "torch.float32"
    trainer.check_state(state)
    state.meta["dtype"] = "torch.bfloat16"
    with pytest.raises(ValueError, match="trained in bfloat16, this run computes in float32"):
        trainer.check_state(state)

    state = checkpoints.load(STEPS - 1)
    chosen = trainer.optimizer.param_groups[0]["foreach"]
    state.meta["optimizer"]["param_groups"][0]["foreach"] = not chosen  # another run's choice
    trainer.restore_state(state, torch.Generator())
    assert trainer.optimizer.param_groups[0]["foreach"] == chosen
