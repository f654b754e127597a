"""The GPU throughput benchmarks run anywhere: on CPU with the tiny random test models, each prints
its result as the last line, the ratio computed from the two recipes it measured in that run.

These check that the scripts run and report what they measured, never how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
REQUIRED = {"device", "arch", "batch", "project_img_per_s", "reference_img_per_s", "speedup", "peak_gib"}


def run(script: str, tmp_path: Path, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), "--work-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "OUT": str(tmp_path),
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    # Also appended to $OUT, where the GPU machine's results are collected.
    saved = (tmp_path / f"{record['bench']}.jsonl").read_text().strip().splitlines()
    assert json.loads(saved[-1]) == record
    return record


def assert_speedup_is_the_ratio(record: dict) -> None:
    """The speedup is the ratio of the two rates, computed before either was rounded to 3 decimals
    (so the printed rates give it to within rounding)."""
    ratio = record["project_img_per_s"] / record["reference_img_per_s"]
    assert record["speedup"] == pytest.approx(ratio, abs=2e-3)


@pytest.mark.slow
def test_train_benchmark_measures_both_recipes_on_a_tiny_model(tmp_path):
    record = run(
        "train_throughput.py", tmp_path, "--batch", "2", "--steps", "2", "--warmup", "1", "--images", "4"
    )
    assert set(record) >= REQUIRED and record["bench"] == "train_throughput"
    assert record["arch"] == "tiny" and record["batch"] == 2 and record["device"].startswith("cpu")
    assert record["project_img_per_s"] > 0 and record["reference_img_per_s"] > 0
    assert_speedup_is_the_ratio(record)
    assert record["peak_gib"] is None  # no per-recipe peak on CPU
    assert record["project_dtype"] == "float32" and record["compile"] == "off"


@pytest.mark.slow
def test_generate_benchmark_measures_both_recipes_on_a_tiny_model(tmp_path):
    record = run("generate_throughput.py", tmp_path, "--batch", "2", "--batches", "1", "--steps", "2")
    assert set(record) >= REQUIRED and record["bench"] == "generate_throughput"
    assert record["arch"] == "tiny" and record["steps"] == 2 and record["guidance"] == 7.5
    assert record["project_img_per_s"] > 0 and record["reference_img_per_s"] > 0
    assert_speedup_is_the_ratio(record)
