"""The job entry point: the contract's exit codes and its last JSON line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.run", *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_per_skill_phase_without_skill_is_invalid(tiny_config):
    result = run_job("--phase", "train", "--config", str(tiny_config()))
    assert result.returncode == 2 and "--phase train needs --skill" in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["status"] == "failed"


def test_missing_upstream_output_is_invalid_input(tiny_config):
    result = run_job("--phase", "images", "--skill", "counting", "--config", str(tiny_config()))
    assert result.returncode == 2
    assert "images:counting needs the output of prompts:counting" in result.stderr
    # The failure's last line names the job as a success's does (and as jobs.submit does).
    last = json.loads(result.stdout.splitlines()[-1])
    assert (last["job"], last["skill"], last["status"], last["exit_code"]) == (
        "images:counting",
        "counting",
        "failed",
        2,
    )


def test_a_committed_job_is_skipped(tiny_config):
    config = str(tiny_config())
    first = run_job("--phase", "prompts", "--skill", "spatial", "--config", config)
    assert first.returncode == 0, first.stderr
    ran = json.loads(first.stdout.splitlines()[-1])
    assert ran["status"] == "ran" and ran["result"]["accepted"] == 20  # the demo config's num_prompts
    second = run_job("--phase", "prompts", "--skill", "spatial", "--config", config)
    assert second.returncode == 0
    assert json.loads(second.stdout.splitlines()[-1]) == {
        "job": "prompts:spatial",
        "status": "skipped",
        "output": ran["output"],
    }


# -- the images phase in several processes (images.num_jobs) ---------------------------------------


def test_image_workers_come_from_the_flags_or_job_completion_index(monkeypatch):
    import pytest

    from jobs.run import image_workers
    from selma_core.errors import ConfigError

    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert image_workers(None, None, 3) == (0, 1)  # a plain run draws every shard itself
    assert image_workers(1, 3, 1) == (1, 3)
    assert image_workers(None, 1, 1) == (0, 1)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")  # a pod of an Indexed Job
    assert image_workers(None, 3, 1) == (2, 3)
    assert image_workers(None, None, 3) == (2, 3)  # images.num_jobs, when --num-shards is not given
    assert image_workers(0, 3, 1) == (0, 3)  # the flag wins
    for shard, count, message in [
        (None, 2, r"--shard-index 2: expected 0 to 1"),
        (3, None, "needs --num-shards"),
        (None, 0, "expected at least 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            image_workers(shard, count, 1)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(ConfigError, match=r"needs --shard-index I \(0 to 1\) or \$JOB_COMPLETION_INDEX"):
        image_workers(None, 2, 1)


def test_images_processes_draw_their_shards_and_the_last_commits(tiny_config, monkeypatch, capsys):
    """In-process ``jobs.run.main`` (a fake generator, no MLflow): JOB_COMPLETION_INDEX picks the
    process, each holds a lease of its own, the process that saves the last shard commits."""
    import random
    import signal

    from PIL import Image

    import jobs.run as job_run
    import selma_core.models.loading
    import selma_core.phases.images as images_phase
    import selma_core.tracking
    from selma_core.config import load_config
    from selma_core.context import JobContext, NullJobRun
    from selma_core.phases.prompts import generate_prompts
    from selma_core.plan import build_plan
    from selma_core.skills import load_skills
    from selma_core.storage import open_store

    config = str(tiny_config(skills=["counting"], images={"shard_size": 4, "num_jobs": 2}))
    cfg = load_config(config)
    skills = load_skills(cfg.skills_path, cfg.skills)
    plan = build_plan(cfg, skills)
    store = open_store(cfg.storage)
    generate_prompts(
        JobContext(cfg, skills, plan, plan.job("prompts", "counting"), store, NullJobRun()), "counting"
    )
    key = plan.job("images", "counting").key

    class Pipeline:
        def to(self, device):
            return self

    class Tracker:
        def start_job_run(self, *args):
            return NullJobRun()

        def end_job_run(self, run, ok):
            pass

    drawn = []

    def draw(pipe, prompts, seeds, cfg, device, pad_to=None):
        drawn.extend(seeds)
        return [Image.frombytes("RGB", (16, 16), random.Random(s).randbytes(768)) for s in seeds]

    monkeypatch.setattr(selma_core.models.loading, "load_diffusion_pipeline", lambda *a, **k: Pipeline())
    monkeypatch.setattr(images_phase, "draw_images", draw)
    monkeypatch.setattr(selma_core.tracking, "open_tracker", lambda *a, **k: Tracker())
    previous = signal.getsignal(signal.SIGTERM)
    argv = ["--phase", "images", "--skill", "counting", "--config", config]
    try:
        monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")  # process 1 of images.num_jobs: shards 1 and 3
        assert job_run.main([*argv, "--num-shards", "2"]) == 0
        first = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert (first["status"], first["shard_index"], first["num_shards"], first["committed"]) == (
            "ran",
            1,
            2,
            False,
        )
        assert first["result"]["own_shards"] == ["shard-00001.tar", "shard-00003.tar"] and len(drawn) == 4 + 3
        assert first["result"]["missing_shards"] == ["shard-00000.tar", "shard-00002.tar"]
        assert not store.is_committed(key)

        monkeypatch.delenv("JOB_COMPLETION_INDEX")
        assert job_run.main([*argv, "--shard-index", "0", "--num-shards", "2"]) == 0
        second = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert second["committed"] is True and second["result"]["images"] == 15 and len(drawn) == 15
        assert store.is_committed(key) and not store.list_keys(f"{key}/_shards")
        assert not [k for k in store.list_keys(key) if k.endswith("_inflight.json")]  # leases released

        assert job_run.main([*argv, "--shard-index", "1", "--num-shards", "2"]) == 0  # committed: skipped
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == "skipped"
        for bad, message in [
            (["--shard-index", "2", "--num-shards", "2"], "--shard-index 2: expected 0 to 1"),
            (["--shard-index", "1"], "needs --num-shards"),
        ]:
            assert job_run.main([*argv, *bad]) == 2
            assert message in capsys.readouterr().err
        prompts = ["--phase", "prompts", "--skill", "counting", "--num-shards", "2", "--config", config]
        assert job_run.main(prompts) == 2
        assert "--num-shards: only --phase images" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_job_a_controller_started_waits_out_a_service_that_is_down_at_its_start(monkeypatch, capsys):
    """The controller reached the store and MLflow before it started the job: an outage now is
    waited out (for the service's budget), as one in the middle of the job is. Run by hand, a job
    fails at once."""
    import pytest

    from jobs.run import ENV_PARENT_RUN, open_patiently
    from selma_core.errors import EndpointError

    attempts, slept = [], []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise EndpointError("cannot reach S3 endpoint http://s3:9000")
        return "store"

    monkeypatch.delenv(ENV_PARENT_RUN, raising=False)
    with pytest.raises(EndpointError):
        open_patiently(flaky, 300, "storage", sleep=slept.append)
    assert len(attempts) == 1 and slept == []

    monkeypatch.setenv(ENV_PARENT_RUN, "run-1")
    attempts.clear()
    assert open_patiently(flaky, 300, "storage", sleep=slept.append) == "store"
    assert len(attempts) == 3 and slept == [2.0, 4.0]
    assert (
        "storage: cannot reach S3 endpoint http://s3:9000; trying again for up to" in capsys.readouterr().err
    )

    def down():
        raise EndpointError("MLflow tracking server http://mlflow:5000 unreachable")

    with pytest.raises(EndpointError):  # past its budget: fails as before
        open_patiently(down, 0, "tracking", sleep=slept.append)


def test_flags_are_whole_names_only():
    """launch_torchrun strips its flags by name; an abbreviation would start torchrun again inside."""
    from jobs.run import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--phase", "train", "--skill", "a", "--config", "c.yaml", "--nproc", "2"])


def test_a_multi_node_group_waits_for_its_nodes_as_long_as_it_is_told(tiny_config):
    """Node 0 of two, the other never coming (its pod unscheduled): torchrun waits the rendezvous
    timeout the launcher gives it (RENDEZVOUS_TIMEOUT_S, 30 minutes, for a node the cluster must
    first add), here shortened to 3 s, then the job fails as worth a retry, with its JSON line."""
    import os
    import time

    from conftest import free_port

    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.run",
            "--phase",
            "train",
            "--skill",
            "counting",
            "--nproc-per-node",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            "0",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "--config",
            str(tiny_config()),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "SELMA_RENDEZVOUS_TIMEOUT_S": "3"},
    )
    assert time.monotonic() - started < 60  # torch's own default would be 600 s
    assert result.returncode not in (0, 2), result.stderr[-2000:]
    assert "1/2 clients joined" in result.stderr or "Timed out" in result.stderr, result.stderr[-2000:]
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["status"] == "failed" and last["job"] == "train:counting"
