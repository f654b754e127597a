"""Data-parallel expert training (torchrun, gloo on CPU): the same update as one process, one job.

Exactness: two processes that split a step's micro-batches between them, and the encoding of the
dataset's images and prompts, end with the LoRA weights (and losses) one process gets, to float
rounding. End to end: ``torchrun --nproc-per-node=2 -m
jobs.run --phase train`` is one job (one commit, one MLflow run, one result line).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BIN, REPO, free_port

from selma_core.models.loading import load_diffusion_pipeline
from selma_core.phases.train import ExpertTrainer, TrainConfig, micro_batch_parts

from .test_train import tiny_dataset

# (batch_size, gradient_accumulation, random_flip, log_every, images), on two processes:
# - 2 x 2: one whole micro-batch each;
# - 2 x 1: each micro-batch cut in two, one image each (SELMA's 16 x 4 on 8 GPUs, in small);
# - 2 x 3: three micro-batches cut in six parts, three each, the losses read from the device (and
#   summed over the processes) two steps at once; the second of four images cannot be decoded, so
#   the second process finds it and encodes one image (both orientations) of the three;
# - 1 x 1, a dataset of one image: it cannot be cut in two, and the second process idles, adding
#   zeros; it has no image to encode either.
CASES = [
    (2, 2, False, 1, "all"),
    (2, 1, False, 1, "all"),
    (2, 3, True, 3, "one broken"),
    (1, 1, False, 1, "one"),
]
# Images in each UNet call of each of the two processes, a step, by case.
ROWS_PER_RANK = [([2], [2]), ([1], [1]), ([1, 1, 1], [1, 1, 1]), ([1], [])]
# Prompts and images each of the two processes encodes (each image once per orientation), by case.
ENCODED_PER_RANK = [((2, 2), (1, 1)), ((2, 2), (1, 1)), ((2, 4), (1, 2)), ((1, 1), (0, 0))]
BROKEN = ({"id": "broken", "prompt": "an image that cannot be decoded"}, b"\xff\xd8 not a jpeg")
STEPS = 3
# The train job's MLflow runs.
JOB_RUNS = "tags.`selma.phase` = 'train' and tags.`selma.skill` = 'counting'"


def count_encoding(trainer) -> dict:
    """What ``trainer`` will encode: prompts ("text") and images ("image"), counted."""
    encoded = {"text": 0, "image": 0}

    def counted(name: str, encode):
        def wrapper(*args):
            encoded[name] += 1
            return encode(*args)

        return wrapper

    trainer._encode_text = counted("text", trainer._encode_text)
    trainer._encode_image = counted("image", trainer._encode_image)
    return encoded


def case_dataset(dataset, images: str) -> list:
    return {"all": dataset, "one broken": [dataset[0], BROKEN, *dataset[1:]], "one": dataset[:1]}[images]


def train_case(model_cache, dataset, batch: int, accumulation: int, flip: bool, log_every: int, images: str):
    dataset = case_dataset(dataset, images)
    cfg = TrainConfig(
        rank=2,
        alpha=4,
        steps=STEPS,
        batch_size=batch,
        gradient_accumulation=accumulation,
        learning_rate=1e-2,
        log_every=log_every,
        random_flip=flip,
        max_bad_image_share=0.5,
    )
    torch.manual_seed(cfg.seed)  # the LoRA's init, as train_expert seeds it
    trainer = ExpertTrainer(load_diffusion_pipeline("random:tiny-sd", model_cache), cfg, "cpu")
    rows: list[int] = []  # images in each UNet call
    trainer.pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    encoded = count_encoding(trainer)
    history = trainer.train(dataset)
    skipped = trainer.images_skipped
    return (
        [p.detach().clone() for p in trainer.params],
        history,
        trainer.attention.backend,
        rows,
        encoded,
        skipped,
    )


def _worker(rank: int, world_size: int, port: int, model_cache, datasets: dict, out_dir) -> None:
    """One torchrun-like process: its environment as torchrun sets it, then the trainer: CASES on
    ``datasets["cases"]``, then CACHE_RUNS on ``datasets["cache"]`` (a store in ``out_dir``)."""
    from selma_core import distributed

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        SELMA_DIST_TIMEOUT_S="120",
    )
    torch.set_num_threads(1)
    assert distributed.init("cpu") == "cpu"
    assert distributed.rank_and_size() == (rank, world_size)
    # Rank 0's attention kernel is every rank's: each would choose another one here.
    from selma_core.models import attention

    chosen = "math" if rank == 0 else "flash"
    attention.resolve_attention = lambda *args, **kwargs: attention.AttentionChoice(chosen)
    results = {"cases": [train_case(model_cache, datasets["cases"], *case) for case in CASES]}
    store, scratch = os.path.join(out_dir, "store"), os.path.join(out_dir, f"scratch{rank}")
    results["cache"] = cache_runs(model_cache, datasets["cache"], store, scratch, rank)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.shutdown()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, model_cache) -> tuple[dict, list, object]:
    """Both tests' runs on two processes, started once: the datasets, each rank's results, and the
    folder of their store."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("two-processes")
    dataset = tiny_dataset(model_cache)
    datasets = {"cases": dataset, "cache": odd_sizes(dataset)}
    mp.spawn(_worker, args=(2, free_port(), model_cache, datasets, str(out_dir)), nprocs=2, join=True)
    return datasets, [torch.load(out_dir / f"rank{r}.pt") for r in range(2)], out_dir


# One thread, as each process has: the thread count alone changes float rounding.
@pytest.mark.usefixtures("one_torch_thread")
def test_two_processes_give_the_single_process_update(model_cache, two_processes):
    datasets, results, _ = two_processes
    dataset = datasets["cases"]
    single = [train_case(model_cache, dataset, *case) for case in CASES]
    ranks = [r["cases"] for r in results]
    for case, (params, history, _, rows, encoded, skipped) in enumerate(single):
        batch, accumulation, flip, _, images = CASES[case]
        assert rows == [batch] * accumulation * STEPS
        assert max(float(p.abs().max()) for p in params) > 0
        usable = len(case_dataset(dataset, images)) - skipped
        assert encoded == {"text": usable, "image": usable * (1 + flip)}
        for rank, rank_results in enumerate(ranks):
            rank_params, rank_history, rank_attention, rank_rows, rank_encoded, rank_skipped = rank_results[
                case
            ]
            assert rank_attention == "math"
            assert rank_rows == ROWS_PER_RANK[case][rank] * STEPS  # its share, every step
            assert (rank_encoded["text"], rank_encoded["image"]) == ENCODED_PER_RANK[case][rank]
            assert rank_skipped == skipped == (images == "one broken")
            assert [s for s, _ in rank_history] == [s for s, _ in history]
            for (_, loss), (_, rank_loss) in zip(history, rank_history, strict=True):
                assert rank_loss == pytest.approx(loss, rel=1e-5, abs=1e-6)
            for p, q in zip(params, rank_params, strict=True):
                torch.testing.assert_close(q, p, rtol=0, atol=1e-5)
        # Both ranks applied the very same updates: identical weights, bit for bit.
        for p, q in zip(ranks[0][case][0], ranks[1][case][0], strict=True):
            assert torch.equal(p, q)


# The latent cache with two processes, run after run on one store (rank 0 commits): (random_flip,
# rank 1 finds no entry, what each rank finds, (prompts, images, images decoded) each encodes).
CACHE_RUNS = [
    (False, False, "computed", [(2, 2, 2), (1, 1, 1)]),  # rank 0 takes images 0 and 2, rank 1 image 1
    (False, False, "hit", [(0, 0, 0), (0, 0, 0)]),  # nothing decoded, nothing encoded
    (True, False, "computed", [(0, 2, 2), (0, 1, 1)]),  # the flipped images added; prompts reused
    (False, True, "computed", [(2, 2, 2), (1, 1, 1)]),  # the processes disagree: both compute
]


def odd_sizes(dataset) -> list:
    """The dataset's images at three other sizes: crops at other offsets, one not centred."""
    from PIL import Image

    resized = []
    for (meta, jpeg), size in zip(dataset, [(49, 32), (32, 45), (40, 40)], strict=True):
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpeg)).resize(size).save(buf, format="JPEG")
        resized.append((meta, buf.getvalue()))
    return resized


def cache_runs(model_cache, dataset, store_dir, scratch, rank: int) -> list:
    """CACHE_RUNS in this process: by run, what it found, what it encoded, its LoRA weights."""
    from selma_core.latent_cache import LatentCache
    from selma_core.phases import train as train_module
    from selma_core.storage import LocalArtifactStore

    cache = LatentCache(LocalArtifactStore(store_dir), scratch, "random:tiny-sd", None, commit=rank == 0)
    load, open_image = cache.load, train_module.open_image
    results = []
    for flip, rank_1_blind, _, _ in CACHE_RUNS:
        cfg = TrainConfig(rank=2, alpha=4, steps=2, batch_size=2, gradient_accumulation=2, random_flip=flip)
        torch.manual_seed(cfg.seed)
        trainer = ExpertTrainer(load_diffusion_pipeline("random:tiny-sd", model_cache), cfg, "cpu")
        encoded = count_encoding(trainer)
        encoded["decoded"] = 0

        def decoding(*args, encoded=encoded):
            encoded["decoded"] += 1
            return open_image(*args)

        train_module.open_image = decoding
        cache.load = (lambda spec, ids: None) if rank_1_blind and rank == 1 else load
        trainer.train(dataset, latent_cache=cache)
        params = [p.detach().clone() for p in trainer.params]
        results.append(
            (trainer.latent_cache_use, (encoded["text"], encoded["image"], encoded["decoded"]), params)
        )
    train_module.open_image = open_image
    return results


def entry_tensors(store_dir, scratch) -> tuple[dict, dict]:
    """The store's one latent cache entry: its index and its tensors, by file and name."""
    from safetensors.torch import load_file

    from selma_core.latent_cache import CACHE_PREFIX, INDEX_FILE
    from selma_core.storage import LocalArtifactStore

    store = LocalArtifactStore(store_dir)
    (key,) = {k.rsplit("/", 1)[0] for k in store.list_keys(CACHE_PREFIX) if k.endswith("/_manifest.json")}
    folder = store.fetch_dir(key, scratch)
    index = json.loads((folder / INDEX_FILE).read_text())
    return index, {p.name: load_file(str(p)) for p in folder.glob("*.safetensors")}


@pytest.mark.usefixtures("one_torch_thread")
def test_two_processes_share_the_latent_cache_work_and_agree_on_the_entry(
    tmp_path, model_cache, two_processes
):
    """Each process decodes and encodes its share of the images (of three sizes); the entry rank 0
    commits holds, bit for bit, the tensors and crops one process computes; both then find it and
    decode nothing, add the flipped images by shares, and compute it all again when one of them
    finds no entry."""
    from selma_core.phases.train import _decode_images

    datasets, results, out_dir = two_processes
    dataset = datasets["cache"]
    single = cache_runs(model_cache, dataset, tmp_path / "single", tmp_path / "single-scratch", 0)
    single_index, single_tensors = entry_tensors(tmp_path / "single", tmp_path / "single-fetched")
    ranks = [r["cache"] for r in results]
    for run, (_, _, use, encoded) in enumerate(CACHE_RUNS):
        for rank in range(2):
            assert ranks[rank][run][:2] == (use, encoded[rank]), (run, rank)
            # Both processes hold the very same weights, those one process trains, to float rounding.
            for p, q in zip(ranks[0][run][2], ranks[rank][run][2], strict=True):
                assert torch.equal(p, q)
            for p, q in zip(single[run][2], ranks[rank][run][2], strict=True):
                torch.testing.assert_close(q, p, rtol=0, atol=1e-5)
    # The same data and settings, whether computed, read from the entry or computed again.
    for run in (1, 3):
        assert all(torch.equal(p, q) for p, q in zip(ranks[0][0][2], ranks[0][run][2], strict=True))

    index, tensors = entry_tensors(out_dir / "store", tmp_path / "fetched")
    crops = [list(crop) for crop in _decode_images(dataset, 32).crops]
    assert crops == [[32, 49, 0, 8, 9], [45, 32, 6, 0, 0], [40, 40, 0, 0, 0]]  # (h, w, top, left, mirrored)
    assert index["crops"] == single_index["crops"] == crops
    # The last run recomputed the unflipped latents and the prompts; rank 0 recommitted them with
    # the flipped latents its entry held.
    assert sorted(tensors) == ["latents-flipped.safetensors", "latents.safetensors", "text.safetensors"]
    for name, named in tensors.items():
        for key, tensor in named.items():
            assert torch.equal(tensor, single_tensors[name][key]), (name, key)


@pytest.mark.parametrize(
    ("batch", "accumulation", "world_size", "parts"),
    [
        (16, 4, 1, 1),
        (16, 4, 2, 1),  # two whole micro-batches each
        (16, 4, 8, 2),  # SELMA's SD 1.x batch on 8 GPUs: 8 images a process
        (16, 4, 16, 4),
        (4, 8, 8, 1),  # SELMA's SDXL batch on 8 GPUs: one micro-batch each
        (4, 8, 16, 2),
        (16, 4, 3, 1),  # 16 does not divide by 3: whole micro-batches, some processes idle
        (16, 4, 6, 1),
        (12, 4, 6, 3),
    ],
)
def test_micro_batches_are_cut_so_every_process_has_an_equal_share(batch, accumulation, world_size, parts):
    assert micro_batch_parts(batch, accumulation, world_size) == parts
    if parts > 1:
        assert (accumulation * parts) % world_size == 0 and batch % parts == 0


def run_job(*args: str, env: dict | None = None, torchrun: bool = False) -> subprocess.CompletedProcess:
    command = (
        [str(BIN / "torchrun"), "--nproc-per-node=2", "--master-port", str(free_port()), "-m", "jobs.run"]
        if torchrun
        else [sys.executable, "-m", "jobs.run"]
    )
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group, as the local executor starts a job
    )


def json_lines(stdout: str) -> list[dict]:
    lines = []
    for line in stdout.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


@pytest.mark.slow
def test_torchrun_train_job_is_one_job(tmp_path, tiny_config):
    from mlflow import MlflowClient

    config = str(
        tiny_config(skills=["counting"], train={"steps": 2, "batch_size": 2, "gradient_accumulation": 2})
    )
    from jobs.run import run_job as run_in_process

    for phase in ("prompts", "images"):  # the train job's inputs, one process as always
        assert run_in_process(phase, "counting", config)["status"] == "ran"

    env = {"SELMA_DIST_TIMEOUT_S": "120"}
    # As a Kubernetes pod with train_gpus, and the local executor with executor.train_gpus
    # (tests/jobs/test_local_executor.py), run it: jobs.run starts torchrun itself.
    ran = run_job(
        "--phase", "train", "--skill", "counting", "--config", config, "--nproc-per-node=2", env=env
    )
    assert ran.returncode == 0, ran.stderr[-5000:]
    results = json_lines(ran.stdout)
    assert len(results) == 1, ran.stdout
    result = results[0]
    assert result["status"] == "ran" and result["result"]["processes"] == 2
    assert ran.stdout.strip().splitlines()[-1] == json.dumps(result, default=str)

    # One commit: one attempt folder under the key, its manifest naming rank 0's run.
    key_dir = tmp_path / "store" / result["output"].split("/store/", 1)[1]
    assert sorted(p.name for p in key_dir.iterdir() if p.is_dir()) == [
        json.loads((key_dir / "_manifest.json").read_text())["attempt"]
    ]
    manifest = json.loads((key_dir / "_manifest.json").read_text())
    assert manifest["metadata"]["mlflow_run_id"] == result["run_id"]
    assert len(list(tmp_path.glob("store/experts/counting/*/_manifest.json"))) == 1

    # One MLflow run for the train job, finished, with the global loss logged.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("selma-test")
    runs = client.search_runs([experiment.experiment_id], JOB_RUNS)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(result["run_id"], "FINISHED")]
    assert len(client.get_metric_history(result["run_id"], "train.loss")) >= 1

    # Again: rank 0 finds it committed and every process stops at once.
    again = run_job("--phase", "train", "--skill", "counting", "--config", config, env=env, torchrun=True)
    assert again.returncode == 0, again.stderr[-5000:]
    assert json_lines(again.stdout) == [
        {"job": "train:counting", "status": "skipped", "output": result["output"]}
    ]
    assert len(client.search_runs([experiment.experiment_id], JOB_RUNS)) == 1


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_train_runs_on_several_processes(tiny_config, rank):
    env = {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank}
    result = run_job("--phase", "images", "--skill", "counting", "--config", str(tiny_config()), env=env)
    assert result.returncode == 2
    assert "--phase images cannot run on 2 processes" in result.stderr
    # Rank 0 reports the job; another rank only its own failure, marked with its rank (the
    # launcher prefers an exit 2 from any rank).
    [report] = json_lines(result.stdout)
    assert report["status"] == "failed" and "--phase images" in report["error"] and report["exit_code"] == 2
    assert report.get("rank") == (None if rank == "0" else 1)


def test_the_launcher_keeps_the_jobs_exit_code(tiny_config):
    """torchrun reports any failed worker as 1; launched through jobs.run, a configuration error
    stays exit 2, which the Kubernetes podFailurePolicy turns into "fail now, don't retry"."""
    config = str(tiny_config())
    raw = run_job("--phase", "merge", "--config", config, torchrun=True)
    assert raw.returncode == 1
    launched = run_job("--phase", "merge", "--config", config, "--nproc-per-node=2")
    assert launched.returncode == 2, launched.stderr[-3000:]
    assert json_lines(launched.stdout)[-1]["exit_code"] == 2


def test_a_configuration_error_on_one_rank_alone_stays_exit_2(tiny_config, tmp_path):
    """Rank 1 alone meets a configuration error (its node's config or cache); rank 0 fails on what
    follows from it (a collective error: exit 1). The job's verdict is rank 1's: exit 2, not a retry."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if 'RANK' in os.environ:\n"
        "    import selma_core.config as c\n"
        "    from selma_core.errors import ConfigError\n"
        "    def load_config(path):\n"
        "        if os.environ['RANK'] == '1':\n"
        "            raise ConfigError('rank 1: this node has no such model folder')\n"
        "        raise RuntimeError('Connection closed by peer')\n"
        "    c.load_config = load_config\n"
    )
    launched = run_job(
        "--phase",
        "train",
        "--skill",
        "counting",
        "--config",
        str(tiny_config()),
        "--nproc-per-node=2",
        env={"PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])},
    )
    assert launched.returncode == 2, launched.stderr[-3000:]
    verdict = json_lines(launched.stdout)[-1]
    assert verdict["exit_code"] == 2 and verdict["rank"] == 1 and "no such model folder" in verdict["error"]


# Rank 0, at the end of step 2 ($PREEMPT_AT "step") or in its validation at step 2 ("validation"):
# SIGTERM to the launcher, `python -m jobs.run --nproc-per-node 2` (the pod's first process, which
# the kubelet signals; torchrun's parent), or in validation to the launcher's process group (as the
# local executor cancels a job), then a pause in which torchrun passes it on to every process.
PREEMPT_HOOK = """
import os
if os.environ.get("RANK") == "0":
    import signal, time

    def preempt():
        torchrun = os.getppid()
        launcher = int(open(f"/proc/{torchrun}/stat").read().rsplit(")", 1)[1].split()[1])
        if os.environ["PREEMPT_AT"] == "step":
            os.kill(launcher, signal.SIGTERM)
        elif os.environ["PREEMPT_AT"] == "launcher killed":
            os.kill(launcher, signal.SIGKILL)
        else:
            with open(os.environ["PREEMPT_GROUPS"], "w") as f:
                f.write(f"{os.getpgid(launcher)} {os.getpgid(torchrun)}")
            os.killpg(os.getpgid(launcher), signal.SIGTERM)
        time.sleep(2.0)

    if os.environ["PREEMPT_AT"] != "validation":
        import selma_core.faults as faults
        point, reached = faults.fault_point, []
        def fault_point(name):
            point(name)
            if name == "train.after_step":
                reached.append(name)
                if len(reached) == 2:
                    preempt()
        faults.fault_point = fault_point
    else:
        import selma_core.phases.train as train
        validate = train._ValidationImages.__call__
        def call(self, step):
            if step == 2:
                preempt()
            return validate(self, step)
        train._ValidationImages.__call__ = call
"""


def train_job_with_its_inputs(tmp_path, tiny_config, **train) -> tuple[str, Path]:
    """A config whose train job (5 steps, no periodic checkpoint) has its prompts and images, and a
    folder holding PREEMPT_HOOK as sitecustomize.py."""
    train = {"steps": 5, "batch_size": 2, "gradient_accumulation": 2, "checkpoint_every": 100, **train}
    config = str(tiny_config(skills=["counting"], train=train))
    from jobs.run import run_job as run_in_process

    for phase in ("prompts", "images"):
        assert run_in_process(phase, "counting", config)["status"] == "ran"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(PREEMPT_HOOK)
    return config, hook


def preempted_train_job(tmp_path, tiny_config, at: str, **train) -> tuple[tuple, Path]:
    """A two-process train job preempted (see PREEMPT_HOOK) at ``at``: it saved a checkpoint at step 2
    and committed nothing; its arguments and output key's folder."""
    config, hook = train_job_with_its_inputs(tmp_path, tiny_config, **train)
    job = ("--phase", "train", "--skill", "counting", "--config", config, "--nproc-per-node=2")
    env = {
        "SELMA_DIST_TIMEOUT_S": "120",
        "PREEMPT_AT": at,
        "PREEMPT_GROUPS": str(tmp_path / "groups"),
        "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]),
    }
    preempted = run_job(*job, env=env)
    assert preempted.returncode == 130, preempted.stderr[-5000:]
    stops = [line for line in preempted.stderr.splitlines() if "stopped after step" in line]
    assert len(stops) == 2 and all("stopped after step 2 of 5 on SIGTERM" in line for line in stops), stops
    assert "another rank may have failed" not in preempted.stderr  # none did
    # The launcher relays how the job stopped: rank 0's result line, last.
    last = json.loads(preempted.stdout.strip().splitlines()[-1])
    assert last["status"] == "failed" and last["exit_code"] == 130 and "rank" not in last
    assert "stopped after step 2 of 5 on SIGTERM; checkpoint" in last["error"]
    [key_dir] = tmp_path.glob("store/experts/counting/*")
    assert not (key_dir / "_manifest.json").exists()
    assert sorted(p.name for p in (key_dir / "_checkpoints").iterdir()) == ["step-00000002"]
    return job, key_dir


@pytest.mark.slow
def test_a_preempted_torchrun_job_stops_every_process_at_one_step_and_resumes_there(tmp_path, tiny_config):
    """The kubelet's SIGTERM reaches the launcher; torchrun passes it on to each process in turn. The
    processes stop at the same step (they vote at each step's end), rank 0 saves a checkpoint there,
    and the rerun resumes from it and commits, bit for bit, what an uninterrupted run commits."""
    from safetensors.torch import load_file

    job, key_dir = preempted_train_job(tmp_path, tiny_config, "step")
    env = {"SELMA_DIST_TIMEOUT_S": "120"}
    resumed = run_job(*job, env=env)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    result = json_lines(resumed.stdout)[-1]
    assert result["status"] == "ran" and result["result"]["resumed_from_step"] == 2

    fresh = run_job(*job, "--force", env=env)  # from step 0, uninterrupted
    assert fresh.returncode == 0, fresh.stderr[-5000:]
    assert json_lines(fresh.stdout)[-1]["result"]["resumed_from_step"] == 0
    adapters = [
        load_file(str(attempt / "pytorch_lora_weights.safetensors"))
        for attempt in sorted(key_dir.iterdir(), key=lambda p: p.stat().st_mtime)
        if attempt.is_dir() and not attempt.name.startswith("_")
    ]
    assert len(adapters) == 2
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


@pytest.mark.slow
def test_a_torchrun_job_cancelled_during_validation_stops_at_that_step(tmp_path, tiny_config):
    """Rank 0 alone validates, the others wait: a SIGTERM then is voted on once validation ends,
    not a step later (when the wait for the stop may have run out). The SIGTERM goes to the
    launcher's process group, as the local executor's cancel sends it: torchrun is not in that group
    (it would get the signal twice, and pass a second one on: "stop now", no checkpoint)."""
    preempted_train_job(tmp_path, tiny_config, "validation", validation_every=2, validation_prompts=1)
    launcher_group, torchrun_group = (tmp_path / "groups").read_text().split()
    assert launcher_group != torchrun_group


@pytest.mark.slow
def test_a_killed_launcher_still_stops_torchrun_and_its_processes_with_a_checkpoint(tmp_path, tiny_config):
    """The launcher SIGKILLed (a cancel's grace period run out, the OOM killer): torchrun, and through
    it the processes (in sessions of their own, which no group kill reaches), stop as on SIGTERM,
    rather than train on, orphaned."""
    config, hook = train_job_with_its_inputs(tmp_path, tiny_config)
    env = {"PREEMPT_AT": "launcher killed", "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    # Returns once every process has closed the output pipes it inherited: all have exited.
    killed = run_job(
        "--phase", "train", "--skill", "counting", "--config", config, "--nproc-per-node=2", env=env
    )
    assert killed.returncode == -9
    assert "stopped after step 2 of 5 on SIGTERM" in killed.stderr, killed.stderr[-3000:]
    [key_dir] = tmp_path.glob("store/experts/counting/*")
    assert sorted(p.name for p in (key_dir / "_checkpoints").iterdir()) == ["step-00000002"]


def test_a_process_writes_its_result_line_whole(tiny_config, capsys, monkeypatch):
    """Every process under torchrun writes to one pipe: a result line goes out in one write (atomic
    on a pipe), not as print's text and newline apart, which another process's line could split."""
    from jobs.run import main

    writes: list[str] = []
    monkeypatch.setattr(sys.stdout, "write", lambda text: writes.append(text) or len(text))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--phase", "images", "--skill", "counting", "--config", str(tiny_config())]) == 2
    [line] = [w for w in writes if w.startswith("{")]
    assert line.endswith("\n") and json.loads(line)["rank"] == 1
