"""CI-triggered retraining: the workflow file is valid, and its logic runs here on the local executor."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import BIN, REPO


def test_the_workflow_validates_against_the_github_schema():
    result = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.github-workflows",
            str(REPO / ".github" / "workflows" / "retrain.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / ".github" / "workflows" / "retrain.yml").read_text()
    for needed in (
        "configs/**",
        "skills/**",
        "workflow_dispatch",
        "schedule",
        "python -m jobs.retrain",
        "kubernetes",
    ):
        assert needed in text


def retrain(config, summary) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.retrain",
            "--config",
            str(config),
            "--backend",
            "local",
            "--summary",
            str(summary),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )


@pytest.mark.slow
def test_retrain_promotes_then_skips_then_refuses(tiny_config, tmp_path):
    from selma_core.config import load_config
    from selma_core.tracking import open_tracker

    # One skill: a retrain's gate and summary do not depend on how many experts were merged.
    config = tiny_config(skills=["counting"], eval={"compare_experts": False})
    summary = tmp_path / "summary.md"
    first = retrain(config, summary)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "**Promoted** v1 to champion." in summary.read_text()

    again = retrain(config, summary)  # nothing changed: everything skipped, nothing new to promote
    assert again.returncode == 0
    assert "Nothing new to promote: nothing new: the merge was skipped." in summary.read_text()
    assert "| train:counting | skipped |" in summary.read_text()

    # A champion that scores far higher (as if it had been trained longer): the next candidate loses.
    cfg = load_config(config)
    tracker = open_tracker(cfg.tracking)
    champion = tracker.model_version(cfg.name, alias="champion")
    strong = {k: "1000" for k in champion.tags if k.startswith("selma.eval.clip_score.")}
    tracker.set_model_version_tags(cfg.name, champion.version, strong)
    changed = tiny_config(skills=["counting"], eval={"compare_experts": False}, train={"steps": 4})
    third = retrain(changed, summary)
    assert third.returncode == 3  # refused
    text = summary.read_text()
    assert "**Refused** v2: " in text and "below the champion's 1000.000" in text
    assert tracker.model_version(cfg.name, alias="champion").version == champion.version
