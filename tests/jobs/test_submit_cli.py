"""The controller's command line: help, dry runs, and bad input that gets a clear error and exit code."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port, skills_with_a_starved_one, untouched_mlflow_db


def submit(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.submit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_help_explains_the_phases_and_flags():
    result = submit("--help")
    assert result.returncode == 0
    for word in ("--phase", "--skill", "--config", "--backend", "--dry-run", "prompts", "eval", "all"):
        assert word in result.stdout


def test_missing_config_names_the_file():
    result = submit("--phase", "all", "--config", "no/such.yaml")
    assert result.returncode == 2
    assert "no/such.yaml: file not found" in result.stderr
    assert last_json(result.stdout) == {"jobs": [], "error": "no/such.yaml: file not found"}


def test_invalid_config_names_the_key(tiny_config):
    result = submit("--phase", "all", "--config", str(tiny_config(train={"rank": "big"})))
    assert result.returncode == 2
    assert "train.rank: expected an integer, got 'big'" in result.stderr


def test_unknown_skill_lists_the_known_ones(tiny_config):
    config = tiny_config()
    result = submit("--phase", "train", "--skill", "juggling", "--config", str(config))
    assert result.returncode == 2 and "--skill juggling: not a skill of" in result.stderr
    result = submit("--phase", "all", "--config", str(tiny_config(skills=["counting", "juggling"])))
    assert result.returncode == 2
    assert "unknown skill 'juggling'" in result.stderr and "counting" in result.stderr


def test_dry_run_prints_the_job_commands_and_submits_nothing(tiny_config, tmp_path):
    result = submit("--phase", "all", "--dry-run", "--config", str(tiny_config()))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "jobs.run" in line]
    assert len(lines) == 8
    assert "train:counting:" in result.stdout and "--phase train --skill counting --config" in result.stdout
    snapshot = Path(lines[0].split("--config ")[1].split()[0])  # the commands run as printed
    assert snapshot.is_file() and "counting" in snapshot.read_text()
    assert [j["status"] for j in last_json(result.stdout)["jobs"]] == ["planned"] * 8
    assert not (tmp_path / "store").exists() and untouched_mlflow_db(tmp_path / "mlflow.db")


def test_a_phase_whose_inputs_are_missing_says_what_to_run_first(tiny_config):
    config = tiny_config()
    result = submit("--phase", "train", "--skill", "counting", "--config", str(config))
    assert result.returncode == 2
    assert "train:counting needs the output of images:counting" in result.stderr
    assert f"--phase images --skill counting --config {config}` first" in result.stderr  # as it runs


def test_unreachable_s3_endpoint_is_named(tiny_config):
    endpoint = f"http://127.0.0.1:{free_port()}"
    config = tiny_config(storage={"uri": "s3://selma-test/x", "endpoint_url": endpoint, "connect_retries": 1})
    start = time.monotonic()
    result = submit("--phase", "all", "--config", str(config))
    assert result.returncode == 1
    assert endpoint in result.stderr
    assert time.monotonic() - start < 120  # bounded retries, not an endless wait


def test_unreachable_mlflow_server_is_named(tiny_config):
    url = f"http://127.0.0.1:{free_port()}"
    result = submit(
        "--phase", "all", "--config", str(tiny_config(tracking={"uri": url, "connect_retries": 1}))
    )
    assert result.returncode == 1
    assert f"MLflow tracking server {url} unreachable after 2 attempts" in result.stderr


def test_a_failed_job_is_named_with_its_log_and_other_skills_go_on(tiny_config, tmp_path):
    # A skill whose vocabulary cannot yield enough distinct prompts: its prompts job fails (exit 2).
    skills = skills_with_a_starved_one(tmp_path)
    config = tiny_config(
        skills=["counting", "tiny"],
        skills_dir=str(skills),
        prompts={"max_requests": 3, "max_useless_requests": 2},
    )
    result = submit("--phase", "prompts", "--config", str(config))
    assert result.returncode == 2  # the only failed job failed on its input: a retry cannot help
    jobs = {j["job"]: j for j in last_json(result.stdout)["jobs"]}
    assert jobs["prompts:counting"]["status"] == "ran"
    failed = jobs["prompts:tiny"]
    assert failed["status"] == "failed" and failed["exit_code"] == 2
    assert "FAILED prompts:tiny" in result.stderr and failed["log"] in result.stderr
    log = Path(failed["log"]).read_text()
    assert "prompts for skill 'tiny'" in log and "samples of what came back" in log


def test_the_pipelines_exit_code_is_2_only_when_every_failed_job_exited_2():
    from jobs.dag import JobOutcome
    from jobs.submit import _exit_code

    def outcome(status: str, code: int | None = None) -> JobOutcome:
        return JobOutcome("prompts", "a", status, exit_code=code)

    assert _exit_code(True, [outcome("ran", 0)]) == 0
    assert _exit_code(False, [outcome("ran", 0), outcome("failed", 2)]) == 2
    assert _exit_code(False, [outcome("failed", 2), outcome("failed", 1)]) == 1  # one worth a retry
    assert _exit_code(False, [outcome("failed", -9)]) == 1  # killed
    assert _exit_code(False, [outcome("ran", 0)]) == 1  # not every job ended (nothing failed)


def test_several_skills_after_one_flag(tiny_config):
    result = submit(
        "--phase", "prompts", "--skill", "counting", "spatial", "--dry-run", "--config", str(tiny_config())
    )
    assert result.returncode == 0, result.stderr
    assert [j["job"] for j in last_json(result.stdout)["jobs"]] == ["prompts:counting", "prompts:spatial"]


def test_a_usage_error_still_ends_with_the_json_line():
    result = submit("--phase", "nope")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert last_json(result.stdout)["jobs"] == []


def test_bad_merge_weights_fail_before_any_job_starts(tiny_config, tmp_path):
    config = tiny_config(merge={"weights": {"countng": 0.5, "spatial": 0.5}})
    result = submit("--phase", "all", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}: merge.weights: unknown skill 'countng'" in result.stderr  # which file, too
    assert not (tmp_path / "store").exists()


def test_an_interrupt_while_the_controller_closes_loses_nothing(tiny_config, tmp_path, monkeypatch, capsys):
    """Ctrl-C pressed again while the controller closes (after cancelling): the pipeline's MLflow
    run is still ended, and the JSON line still lists the jobs that had ended."""
    import os
    import signal

    import mlflow

    from jobs import submit as controller
    from jobs.dag import JobOutcome
    from jobs.executors.local import LocalExecutor

    def interrupted_dag(jobs, *args, ended, **kwargs):
        ended[jobs[0].id] = JobOutcome(jobs[0].phase, jobs[0].skill, "ran", job=jobs[0].id)
        raise KeyboardInterrupt  # the first Ctrl-C, once prompts:counting had ended

    def close_pressing_ctrl_c(self):
        os.kill(os.getpid(), signal.SIGINT)  # again, while closing
        time.sleep(0.05)

    monkeypatch.setattr(controller, "run_dag", interrupted_dag)
    monkeypatch.setattr(LocalExecutor, "close", close_pressing_ctrl_c)
    config = tiny_config()
    assert controller.main(["--phase", "prompts", "--config", str(config)]) == 130
    assert last_json(capsys.readouterr().out) == {
        "jobs": [{"phase": "prompts", "skill": "counting", "status": "ran", "job": "prompts:counting"}],
        "error": "interrupted",
    }
    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [
            e.experiment_id
            for e in mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
        ]
    )
    assert [r.info.status for r in runs if r.info.run_name == "pipeline-prompts"] == ["FAILED"]


def test_status_of_a_failed_pipeline(tiny_config, tmp_path):
    skills = skills_with_a_starved_one(tmp_path)
    config = tiny_config(
        skills=["counting", "tiny"], skills_dir=str(skills), prompts={"max_useless_requests": 2}
    )
    # Beats every 0.2 s: the pipeline (two jobs, each a Python process) runs for seconds.
    ran = submit("--phase", "prompts", "--config", str(config), env={"SELMA_CONTROLLER_HEARTBEAT_S": "0.2"})
    assert ran.returncode == 2
    status = subprocess.run(
        [sys.executable, "-m", "jobs.status", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert status.returncode == 0, status.stderr
    report = last_json(status.stdout)
    assert report["status"] == "failed"
    assert report["controller"].startswith(f"{socket.gethostname()}:")  # who ran it, where
    # Its heartbeat was renewed while the jobs ran, not only set as the run opened.
    from selma_core.config import load_config
    from selma_core.tracking import open_tracker
    from selma_core.tracking.base import TAG_CONTROLLER_HEARTBEAT

    cfg = load_config(config)
    run = open_tracker(cfg.tracking, create=False).pipeline_run(cfg.name, report["pipeline"])
    assert float(run.tags[TAG_CONTROLLER_HEARTBEAT]) - run.start_ms / 1000 >= 1
    assert {row["job"]: row["state"] for row in report["jobs"]} == {
        "prompts:counting": "done",
        "prompts:tiny": "failed",
    }
    assert "| prompts:tiny | failed |" in status.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "jobs.status", "--config", str(config), "--pipeline", "nope"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert missing.returncode == 2 and "no pipeline run nope" in missing.stderr


def test_a_phase_with_no_jobs_is_an_error(tiny_config):
    result = submit("--phase", "merge-search", "--config", str(tiny_config()))
    assert result.returncode == 2 and "--phase merge-search: no such jobs" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--phase", "train", "--benchmark", "dsg1k"], "apply to --phase eval"),
        (["--phase", "eval", "--model", "expert:juggling"], "expert:juggling: no such skill"),
        (["--phase", "eval", "--model", "best"], "'best' is not base, merged"),
        (["--phase", "eval", "--model", "models:/nope@champion"], "no alias 'champion' of 'nope'"),
        (["--phase", "eval", "--benchmark", "tifa"], "needs eval.tifa_questions"),
    ],
)
def test_bad_eval_flags_fail_before_any_job_naming_the_flag(tiny_config, capsys, flags, message):
    from jobs import submit as controller

    assert controller.main([*flags, "--config", str(tiny_config())]) == 2
    assert message in capsys.readouterr().err


def test_a_tifa_question_file_by_url_needs_its_checksum(tiny_config, capsys):
    from jobs import submit as controller

    url = "https://example.com/tifa_v1.0_question_answers.json"
    config = tiny_config(eval={"benchmark": "tifa", "tifa_questions": url})
    assert controller.main(["--phase", "eval", "--config", str(config)]) == 2
    assert f"eval: tifa_questions is a URL ({url}): give tifa_questions_sha256 too" in capsys.readouterr().err
    # The same for a job run by hand: the config is checked wherever it is read.
    import signal

    from jobs import run as job_run

    previous = signal.getsignal(signal.SIGTERM)  # jobs.run.main installs its SIGTERM handler
    try:
        assert job_run.main(["--phase", "eval", "--config", str(config)]) == 2
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(("section", "key"), [("images", "nsfw_checker"), ("train", "vae_model")])
def test_a_missing_local_model_folder_of_a_phase_is_named_before_any_job(tiny_config, tmp_path, section, key):
    from jobs import submit as controller

    config = tiny_config(**{section: {key: "./no-such-model"}})
    missing = str((Path.cwd() / "no-such-model").resolve())
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        assert controller.main(["--phase", "all", "--dry-run", "--config", str(config)]) == 2
    assert f"{section}.{key}: local model folder {missing} not found" in out.getvalue()


def test_folders_jobs_cannot_write_in_are_named_before_any_job(tiny_config, tmp_path, capsys):
    """The log folder (a traceback until now) and the model cache (a job failing with exit 1, as
    if a retry could help): found before anything starts, nothing created by the check."""
    from jobs import submit as controller

    (tmp_path / "a-file").write_text("")
    logs = tmp_path / "a-file" / "logs"
    config = tiny_config(executor={"log_dir": str(logs)})
    assert controller.main(["--phase", "all", "--dry-run", "--config", str(config)]) == 2
    assert (
        f"executor.log_dir: cannot make folder {logs}: {tmp_path / 'a-file'} is a file"
        in capsys.readouterr().err
    )
    # /proc takes no new folder, even from root (whom permission bits do not stop).
    config = tiny_config(cache_dir="/proc/selma-cache")
    assert controller.main(["--phase", "all", "--config", str(config)]) == 2
    assert (
        "cache_dir: cannot write in /proc (where /proc/selma-cache would be made)" in capsys.readouterr().err
    )
    # A folder still to be made is fine, and the write check leaves nothing behind.
    config = tiny_config(
        executor={"log_dir": str(tmp_path / "new" / "logs")}, cache_dir=str(tmp_path / "cache")
    )
    assert controller.main(["--phase", "all", "--dry-run", "--config", str(config)]) == 0
    assert list(tmp_path.rglob(".selma-check-*")) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"base_model": "random:tiny-sdx"},
            "base_model: unknown random test model 'random:tiny-sdx'; known: ",
        ),
        ({"base_model": "random:tiny-clip"}, "base_model: random:tiny-clip is not a text-to-image model"),
        (
            {"generator_model": "random:tiny-lm"},
            "generator_model: random:tiny-lm is not a text-to-image model",
        ),
        ({"eval": {"clip_model": "random:tiny-clp"}}, "eval: unknown random test model 'random:tiny-clp'"),
    ],
)
def test_an_unknown_random_test_model_is_named_before_any_job(tiny_config, capsys, override, message):
    from jobs import submit as controller

    assert controller.main(["--phase", "all", "--dry-run", "--config", str(tiny_config(**override))]) == 2
    assert message in capsys.readouterr().err


def test_a_seed_the_prompts_job_would_drop_is_named_before_any_job(tiny_config, tmp_path, capsys):
    """Seeds that are near-duplicates of each other, or are not plain text (markup), were dropped by
    the prompts job without a word."""
    import shutil

    import yaml

    skills = tmp_path / "skills"
    shutil.copytree(REPO / "skills", skills)
    counting = yaml.safe_load((skills / "counting.yaml").read_text())
    counting["seeds"] += [counting["seeds"][0].upper(), "two cats on a <b>red</b> sofa"]
    (skills / "counting.yaml").write_text(yaml.safe_dump(counting))
    from jobs import submit as controller

    assert (
        controller.main(["--phase", "all", "--dry-run", "--config", str(tiny_config(skills_dir=str(skills)))])
        == 2
    )
    err = capsys.readouterr().err
    n = len(counting["seeds"])
    assert f"skill 'counting' ({skills / 'counting.yaml'}): seeds[{n - 2}]" in err
    assert "a near-duplicate of an earlier seed" in err
    assert f"seeds[{n - 1}] 'two cats on a <b>red</b> sofa': not_text" in err


def test_the_merge_searchs_metric_model_is_checked_before_any_job(tiny_config, tmp_path):
    from jobs.submit import validate
    from selma_core.config import load_config
    from selma_core.errors import ConfigError
    from selma_core.skills import load_skills

    missing = str(tmp_path / "no-such-pickscore")
    config = tiny_config(
        merge_search={"enabled": True, "metric": "pickscore"}, eval={"pickscore_model": missing}
    )
    cfg = load_config(config)
    with pytest.raises(
        ConfigError,
        match=f"merge_search.metric pickscore's eval.pickscore_model: local model folder {missing} not found",
    ):
        validate(cfg, load_skills(cfg.skills_path, cfg.skills))


def test_the_llm_key_is_checked_where_the_jobs_run_locally_only(tiny_config, monkeypatch, capsys):
    """On Kubernetes the prompts pods read the key from their Secrets: the controller need not hold it."""
    from jobs.submit import validate
    from selma_core.config import load_config
    from selma_core.errors import ConfigError
    from selma_core.skills import load_skills

    monkeypatch.delenv("SELMA_TEST_LLM_KEY", raising=False)
    openai = {"base_url": "https://api.openai.com/v1", "api_key_env": "SELMA_TEST_LLM_KEY"}
    cfg = load_config(tiny_config(prompts={"backend": "openai", "openai": openai}))
    skills = load_skills(cfg.skills_path, cfg.skills)
    with pytest.raises(ConfigError, match="SELMA_TEST_LLM_KEY is not set"):
        validate(cfg, skills)
    validate(cfg, skills, dry_run=True)  # a dry run sends nothing: a warning
    assert "warning: prompts.openai.api_key_env: environment variable SELMA_TEST_LLM_KEY is not set" in (
        capsys.readouterr().err
    )
    cfg.executor.kind = "kubernetes"
    validate(cfg, skills)
