"""The GPU throughput benchmarks run anywhere: on CPU with the tiny random test models, each prints
its result as the last line, the ratio computed from the two recipes it measured in that run.

These check that the scripts run and report what they measured, never how fast anything is."""

from __future__ import annotations

import json
import re
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


def assert_profiled(record: dict, tmp_path: Path, steps: int) -> None:
    """The profile of the steps after the timed ones: in the JSON, and as a table beside it."""
    assert record["project_profile_steps"] == steps
    assert record["project_profile_busy_ms_per_step"] > 0
    assert 0 <= record["project_profile_idle_share"] <= 1
    assert record["project_profile_families"] == {"cpu operators": 1.0}  # kernel families: GPU only
    top = record["project_profile_top"]
    assert 0 < len(top) <= 8 and all(t["ms"] > 0 for t in top)
    assert [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
    assert any("conv" in t["name"] for t in top)  # the UNet's work, not the harness's
    table = Path(record["project_profile_table"])
    assert table.parent == tmp_path and f"{steps} profiled steps" in table.read_text()


def test_kernel_families_of_real_kernel_names():
    sys.path.insert(0, str(BENCH))
    from common import kernel_family

    names = {
        "pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_kernel0": "attention",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>)": "attention",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
        "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT": "matmul",
        "triton_red_fused_native_group_norm_silu_12": "inductor fused",
        "triton_per_fused_convolution_backward_3": "inductor fused",  # around a convolution, not one
        "triton_poi_fused__scaled_dot_product_attention_0": "inductor fused",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "other",
    }
    assert {name: kernel_family(name) for name in names} == names


@pytest.mark.slow
def test_train_benchmark_measures_both_recipes_on_a_tiny_model(tmp_path):
    record = run(
        "train_throughput.py",
        tmp_path,
        *("--batch", "2", "--steps", "2", "--warmup", "1", "--images", "4", "--profile", "2"),
    )
    assert set(record) >= REQUIRED and record["bench"] == "train_throughput"
    assert record["arch"] == "tiny" and record["batch"] == 2 and record["device"].startswith("cpu")
    assert record["project_img_per_s"] > 0 and record["reference_img_per_s"] > 0
    assert_speedup_is_the_ratio(record)
    assert record["peak_gib"] is None  # no per-recipe peak on CPU
    assert record["project_dtype"] == "float32"
    assert record["compile"] == "auto" and record["project_compile_mode"] == "off"  # auto: off on CPU
    assert record["attention_setting"] == "auto" and record["project_attention"] == "default"  # on CPU
    assert record["cuda_graph_setting"] is False and record["project_cuda_graph"] == "off"
    assert_profiled(record, tmp_path, steps=2)


@pytest.mark.slow
def test_generate_benchmark_measures_both_recipes_on_a_tiny_model(tmp_path):
    record = run(
        "generate_throughput.py",
        tmp_path,
        *(
            "--batch",
            "2",
            "--batches",
            "1",
            "--steps",
            "2",
            "--profile",
            "1",
            "--vae-contiguous",
            "--cuda-graph",
        ),
    )
    assert set(record) >= REQUIRED and record["bench"] == "generate_throughput"
    assert record["arch"] == "tiny" and record["steps"] == 2 and record["guidance"] == 7.5
    assert record["project_img_per_s"] > 0 and record["reference_img_per_s"] > 0
    assert_speedup_is_the_ratio(record)
    assert_profiled(record, tmp_path, steps=1)
    # Asked for, but the CPU has no CUDA graphs (nor compile, under "auto").
    assert record["cuda_graph_setting"] is True and record["project_cuda_graph"] is False
    assert record["project_cuda_graph_skips"] == 0
    # The VAE decode as the project runs it, and in the contiguous layout.
    assert record["project_vae_decode_ms"] > 0 and record["project_vae_decode_contiguous_ms"] > 0
    assert record["project_vae_compiled"] is False  # not asked for


def test_a_contiguous_vae_and_a_compiled_vae_are_not_asked_together(capsys):
    """--vae-contiguous times the eager decoder: with the decoder compiled there is none to time."""
    sys.path.insert(0, str(BENCH))
    from generate_throughput import parse_args

    assert parse_args(["--compile-vae"]).compile_vae and parse_args(["--vae-contiguous"]).vae_contiguous
    with pytest.raises(SystemExit):
        parse_args(["--compile-vae", "--vae-contiguous"])
    assert "not with --compile-vae" in capsys.readouterr().err


# A stand-in for a benchmark script run as the restart: its result last, after other output.
RESTARTED = """import json, sys
print("noise")
if "--fail" in sys.argv:
    sys.exit("restart: out of luck")
print(json.dumps({"project_warmup_s": 1.5, "project_compile_cache_load_s": 0.25,
                  "project_compile_cache_loaded": True}))
"""


def test_a_compiled_project_is_measured_again_restarting_from_the_store(tmp_path, monkeypatch, capsys):
    """Both throughput benchmarks: with the project compiled, the script runs again as a job on a
    fresh node would (the project alone, an empty inductor cache, the same work folder and its
    store), and its warm-up is reported; a failed restart is reported, not fatal."""
    import argparse

    sys.path.insert(0, str(BENCH))
    from common import report_with_restart

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "warm"))
    script = tmp_path / "bench.py"
    script.write_text(RESTARTED)
    args = argparse.Namespace(
        arch="tiny", batch=2, compile="full", attention="auto", device="cpu", work_dir=str(tmp_path)
    )
    args.no_restart_check, args.restart_timeout, args.out = False, 60, None
    project, reference = {"img_per_s": 3.0, "compile_mode": "full"}, {"img_per_s": 2.0}
    record = report_with_restart({"bench": "b"}, project, reference, args, str(script), ["--steps", "2"])
    assert record["speedup"] == 1.5 and record["compile_restart_warmup_s"] == 1.5
    assert record["compile_restart_cache_load_s"] == 0.25 and record["compile_restart_cache_loaded"] is True
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line) for line in lines[-2:]] == [
        {k: v for k, v in record.items() if "restart" not in k},
        record,
    ]

    failed = report_with_restart({"bench": "b"}, project, reference, args, str(script), ["--fail"])
    assert (
        failed["compile_restart_error"] == ["restart: out of luck"]
        and "compile_restart_warmup_s" not in failed
    )
    eager = report_with_restart(
        {"bench": "b"}, {**project, "compile_mode": "off"}, reference, args, str(script), []
    )
    assert not any("restart" in key for key in eager)
    args.no_restart_check = True
    assert not any(
        "restart" in key for key in report_with_restart({}, project, reference, args, str(script), [])
    )


def test_the_restart_runs_the_project_alone_on_an_empty_inductor_cache(tmp_path, monkeypatch):
    import argparse
    import subprocess as sp

    sys.path.insert(0, str(BENCH))
    import common

    seen = {}

    def run(command, env, **kwargs):
        seen.update(command=command, inductor=env["TORCHINDUCTOR_CACHE_DIR"])
        out = json.dumps({"project_warmup_s": 1.0, "project_compile_cache_loaded": True})
        return sp.CompletedProcess(command, 0, out + "\n", "")

    monkeypatch.setattr(common.subprocess, "run", run)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "warm"))
    args = argparse.Namespace(
        arch="sd15", batch=16, compile="full", attention="cudnn", device="cuda", work_dir=str(tmp_path)
    )
    args.no_restart_check, args.restart_timeout, args.out = False, 60, None
    common.report_with_restart({}, {"compile_mode": "full"}, None, args, "bench.py", ["--steps", "25"])
    assert seen["command"][1:] == [
        "bench.py",
        *("--only", "project", "--arch", "sd15", "--batch", "16", "--compile", "full"),
        *("--attention", "cudnn", "--device", "cuda", "--work-dir", str(tmp_path)),
        *("--steps", "25", "--no-restart-check"),
    ]
    fresh = Path(seen["inductor"])
    assert fresh.parent == tmp_path and fresh.name.startswith("inductor-fresh-") and not any(fresh.iterdir())


def test_attention_benchmark_times_each_kernel_on_each_shape_against_pytorchs_choice(tmp_path):
    record = run("attention.py", tmp_path, *("--repeats", "1"))
    assert record["bench"] == "attention" and record["device"].startswith("cpu")
    assert [(r["arch"], r["mode"]) for r in record["results"]] == [("tiny", "train"), ("tiny", "generate")]
    train, generate = record["results"]
    assert generate["batch"] == 2 * train["batch"]  # classifier-free guidance
    for result in record["results"]:
        assert set(result["measured_ms"]) == {"default", "flash", "math"}
        assert set(result["per_shape_ms"]) == set(result["calls"])
        # Each kernel's total is its shapes' times weighed by their calls.
        for name, total in result["measured_ms"].items():
            weighed = sum(result["per_shape_ms"][s][name] * n for s, n in result["calls"].items())
            assert total == pytest.approx(weighed, rel=1e-2, abs=1e-3)
        chosen = result["measured_ms"][result["choice"]]
        assert result["speedup"] == pytest.approx(result["measured_ms"]["default"] / chosen, abs=1e-3)


def test_the_fork_server_check_forks_jobs_that_compute_on_the_device(tmp_path):
    """bench/fork_server_cuda.py, on the CPU (a server that imports nothing: the check's logic)."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "fork_server_cuda.py"), "--device", "cpu", "--no-preload"]
        + ["--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCH.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and report["device"] == "cpu" and report["ready_s"] >= 0
    assert [job["exit"] for job in report["jobs"]] == [0, 0]
    # A CUDA build of torch counts the machine's GPUs even for a job on the CPU.
    assert all(re.search(r" cpu sees \d+ GPUs$", job["log"].strip()) for job in report["jobs"])
    assert [job["gpu"] for job in report["jobs"]] == [None, None]  # on the CPU: none placed
