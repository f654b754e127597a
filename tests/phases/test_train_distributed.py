"""Data-parallel expert training (torchrun, gloo on CPU): the same update as one process, one job.

Exactness: two processes that split a step's micro-batches between them, and the encoding of the
dataset's images and prompts, end with the LoRA weights (and losses) one process gets, to float
rounding. End to end: ``torchrun --nproc-per-node=2 -m
jobs.run --phase train`` is one job (one commit, one MLflow run, one result line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    encoded = {"text": 0, "image": 0}  # prompts and images this process encoded

    def counted(name: str, encode):
        def wrapper(*args):
            encoded[name] += 1
            return encode(*args)

        return wrapper

    trainer._encode_text = counted("text", trainer._encode_text)
    trainer._encode_image = counted("image", trainer._encode_image)
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


def _worker(rank: int, world_size: int, port: int, model_cache, dataset, out_dir) -> None:
    """One torchrun-like process: its environment as torchrun sets it, then the trainer."""
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
    results = [train_case(model_cache, dataset, *case) for case in CASES]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.shutdown()


# One thread, as each process has: the thread count alone changes float rounding.
@pytest.mark.usefixtures("one_torch_thread")
def test_two_processes_give_the_single_process_update(tmp_path, model_cache):
    import torch.multiprocessing as mp

    dataset = tiny_dataset(model_cache)
    single = [train_case(model_cache, dataset, *case) for case in CASES]
    mp.spawn(_worker, args=(2, free_port(), model_cache, dataset, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
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
    # Only rank 0 reports.
    reports = json_lines(result.stdout)
    if rank == "0":
        assert reports[-1]["status"] == "failed" and "--phase images" in reports[-1]["error"]
    else:
        assert reports == []


def test_the_launcher_keeps_the_jobs_exit_code(tiny_config):
    """torchrun reports any failed worker as 1; launched through jobs.run, a configuration error
    stays exit 2, which the Kubernetes podFailurePolicy turns into "fail now, don't retry"."""
    config = str(tiny_config())
    raw = run_job("--phase", "merge", "--config", config, torchrun=True)
    assert raw.returncode == 1
    launched = run_job("--phase", "merge", "--config", config, "--nproc-per-node=2")
    assert launched.returncode == 2, launched.stderr[-3000:]
    assert json_lines(launched.stdout)[-1]["exit_code"] == 2
