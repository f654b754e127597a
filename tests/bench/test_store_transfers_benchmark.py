"""bench/store_transfers.py runs here (a local folder, and a moto_server it starts) and reports the
ratio of the two timings it measured; never how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "store_transfers.py"


@pytest.mark.parametrize("store", ["local", "s3"])
def test_the_store_benchmark_times_one_thread_against_several(store, tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH), "--store", store, "--files", "12", "--kib", "2", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["files"] == 13 and record["threads"] == 8
    assert record["store"] == ("local folder" if store == "local" else "moto_server on 127.0.0.1")
    for phase in ("commit", "fetch"):
        reference, project = record[f"reference_{phase}_s"], record[f"project_{phase}_s"]
        assert reference > 0 and project > 0
        assert record[f"{phase}_speedup"] == pytest.approx(reference / project, rel=0.03)
    assert list(tmp_path.glob("bench-store-*")) == []  # its work folder is cleaned up
