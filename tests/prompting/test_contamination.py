"""Benchmark prompts are read from the shared benchmark files (never copied) and block close candidates."""

from __future__ import annotations

import json

import pytest
from conftest import BENCHMARKS, needs_benchmarks

from selma_core.errors import ConfigError
from selma_core.prompting.contamination import benchmark_index, read_benchmark_prompts

BENCH = BENCHMARKS
pytestmark = needs_benchmarks


def test_each_benchmark_format_is_read():
    dsg = read_benchmark_prompts(BENCH / "dsg" / "dsg-1k-anns.csv")
    assert len(dsg) == len(set(dsg)) and 1000 <= len(dsg) <= 1060  # 1,060 items, a few share a text
    assert "A rubix cube with ten squares of purple" in dsg
    tifa = read_benchmark_prompts(BENCH / "tifa" / "tifa_v1.0_text_inputs.json")
    assert 4000 <= len(tifa) <= 4081
    geneval = read_benchmark_prompts(BENCH / "geneval" / "evaluation_metadata.jsonl")
    assert "a photo of a bench" in geneval and len(geneval) <= 553
    compbench = read_benchmark_prompts(BENCH / "t2i-compbench" / "spatial_val.txt")
    assert "a giraffe next to a lamp" in compbench


def test_close_candidates_are_caught_and_others_pass():
    index = benchmark_index(
        [str(BENCH / "dsg" / "dsg-1k-anns.csv"), str(BENCH / "t2i-compbench" / "spatial_val.txt")], 0.7
    )
    assert index.is_near_duplicate("a giraffe next to a lamp")
    assert index.is_near_duplicate("A giraffe right next to a lamp.")
    assert not index.is_near_duplicate("four lanterns hanging above a quiet mountain lake at dawn")


def test_bad_benchmark_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_benchmark_prompts(tmp_path / "missing.csv")
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(ConfigError, match="unknown format"):
        read_benchmark_prompts(tmp_path / "x.parquet")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_benchmark_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="bad.json"):
        read_benchmark_prompts(tmp_path / "bad.json")
    (tmp_path / "nocol.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="no column"):
        read_benchmark_prompts(tmp_path / "nocol.csv")
