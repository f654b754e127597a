"""CI-triggered retraining: the workflow file is valid, and its logic runs here on the local executor."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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

    # As if the first run had stopped before its gate (a failed eval, an MLflow outage at the
    # promotion): the rerun finds every job done, and still judges the candidate nobody judged.
    cfg = load_config(config)
    tracker = open_tracker(cfg.tracking)
    champion = tracker.model_version(cfg.name, alias="champion")
    tracker.client.delete_registered_model_alias(cfg.name, "champion")
    for tag in ("selma.promotion.verdict", "selma.promotion.judged"):
        tracker.client.delete_model_version_tag(cfg.name, champion.version, tag)
    again = retrain(config, summary)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    text = summary.read_text()
    assert text.count("**Promoted** v1 to champion.") == 2 and "| train:counting | skipped |" in text

    # A champion that scores far higher (as if it had been trained longer): the next candidate loses.
    strong = {k: "1000" for k in champion.tags if k.startswith("selma.eval.clip_score.")}
    tracker.set_model_version_tags(cfg.name, champion.version, strong)
    changed = tiny_config(skills=["counting"], eval={"compare_experts": False}, train={"steps": 4})
    third = retrain(changed, summary)
    assert third.returncode == 3  # refused
    text = summary.read_text()
    assert "**Refused** v2: " in text and "below the champion's 1000.000" in text
    assert tracker.model_version(cfg.name, alias="champion").version == champion.version

    unchanged = retrain(changed, summary)  # nothing changed since: nothing new to judge, CI stays green
    assert unchanged.returncode == 0, unchanged.stdout[-3000:] + unchanged.stderr[-3000:]
    assert "Nothing new to promote: v2 was refused before, on the same scores, against champion v1" in (
        summary.read_text()
    )


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_an_interrupt_stops_the_pipeline_and_its_running_job(tiny_config, tmp_path, signum):
    """SIGTERM to jobs.retrain (a CI runner cancelling), SIGINT to it alone (kill -INT), or SIGHUP
    (its terminal closed): its pipeline's controller is told, cancels its running job, and nothing is
    left running."""
    import os
    import signal
    import socket

    llm = socket.create_server(("127.0.0.1", 0))  # an LLM endpoint that takes requests, never answers
    llm.settimeout(120)
    openai = {
        "base_url": f"http://127.0.0.1:{llm.getsockname()[1]}/v1",
        "model": "fake-llm",
        "api_key_env": "",
        "max_retries": 0,
    }
    config = tiny_config(
        skills=["counting"],
        executor={"fork_server": False},
        prompts={"backend": "openai", "concurrency": 1, "openai": openai},
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs.retrain", "--config", str(config), "--summary", str(tmp_path / "s.md")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    connection, _ = llm.accept()  # the prompts job waits for the LLM
    process.send_signal(getattr(signal, signum))
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out[-3000:] + err[-3000:]
    assert '"error": "interrupted"' in out and "interrupted: retraining stopped" in err
    connection.settimeout(60)
    while connection.recv(65536):  # the request, then the end of the connection: the job ended
        pass
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(config) in cmdline.read_text():
                left.append(cmdline.parent.name)
        except OSError:
            continue  # ended while we looked
    assert left == [] or left == [str(os.getpid())], left


def test_the_summary_shows_a_skill_the_candidate_lacks():
    """The gate's rows may hold no candidate score (a skill the champion has and the candidate
    lacks): the summary shows '-', as jobs.promote's table does, rather than failing."""
    from jobs.retrain import report
    from selma_core.promotion import decide

    decision = decide({"mean": 12.0, "a": 12.0}, {"mean": 10.0, "a": 10.0, "b": 10.0}, 0.5)
    promotion = {"promoted": False, "candidate": "2", "reasons": decision.reasons, "rows": decision.rows}
    text = report("pipeline.yaml", {"jobs": []}, promotion)
    assert "| b | 10.000 | - | - | REGRESSION |" in text and "**Refused** v2: skill b: the champion" in text


def test_the_summary_says_when_the_gate_did_not_judge():
    from jobs.retrain import report

    text = report("pipeline.yaml", {"jobs": []}, {"promoted": False, "error": "different eval settings"})
    assert "**Gate error:** different eval settings" in text and "Refused" not in text
    assert "**Gate error:** jobs.promote printed no result" in report("pipeline.yaml", {"jobs": []}, {})
