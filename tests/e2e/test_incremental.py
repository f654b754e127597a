"""Incremental pipelines: a change redoes exactly its downstream; --force reruns on purpose; the
status table tells what happened."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, submit_all

pytestmark = pytest.mark.slow


def run(module: str, *args: str) -> tuple[int, dict]:
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=900, cwd=REPO
    )
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def statuses(config, *extra: str) -> dict[str, str]:
    return {j["job"]: j["status"] for j in submit_all(config, *extra)[0]["jobs"]}


def states(config) -> dict[str, str]:
    code, out = run("jobs.status", "--config", str(config))
    assert code == 0, out
    return {row["job"]: row["state"] for row in out["jobs"]}


def test_edit_a_skill_add_a_skill_force_a_job(tiny_config, tmp_path):
    skills = tmp_path / "skills"
    shutil.copytree(REPO / "skills", skills)
    config = tiny_config(skills_dir=str(skills), eval={"compare_experts": False})
    assert set(statuses(config).values()) == {"ran"}
    assert set(states(config).values()) == {"done"}

    # Editing one skill's seeds and adding another (in one submission, which spares a second merge
    # and eval) redoes the edited skill's chain, runs the new one's, then merge and eval; nothing else.
    path = skills / "spatial.yaml"
    path.write_text(
        path.read_text().replace("a red ball to the left of a blue box", "a red ball left of a box")
    )
    added = tiny_config(
        skills_dir=str(skills), skills=["counting", "spatial", "everyday"], eval={"compare_experts": False}
    )
    after = statuses(added)
    redone = {
        f"{phase}:{skill}" for phase in ("prompts", "images", "train") for skill in ("spatial", "everyday")
    }
    redone |= {"merge", "eval"}
    assert {j for j, s in after.items() if s == "ran"} == redone
    assert {j for j, s in after.items() if s == "skipped"} == set(after) - redone
    table = states(added)
    assert table["train:spatial"] == "done" and table["train:counting"] == "skipped"

    # --force reruns a finished job and everything downstream of it, on purpose.
    forced = statuses(added, "--force", "train:counting")
    assert {j for j, s in forced.items() if s == "ran"} == {"train:counting", "merge", "eval"}
