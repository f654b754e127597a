"""The job entry point: the contract's exit codes and its last JSON line."""

from __future__ import annotations

import json
import subprocess
import sys

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
