"""The benchmark scripts' own logic: loss_drift.py's and ab_options.py's flows on the CPU,
profile_step.py's kernel sums."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_drift_trains_every_path_from_the_same_start_and_compares_with_fp32(tmp_path):
    """Every path from the same start, each compared with fp32's curve and the baseline's; a path
    named twice runs again and is compared with its first run."""
    pytest.importorskip("peft")
    out = tmp_path / "drift.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    args = [
        "--smoke",
        "--layers",
        "2",
        "--steps",
        "4",
        "--paths",
        "fp32,baseline,plain,fast,fast",
        "--out",
        str(out),
    ]
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/loss_drift.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    paths = report["paths"]
    assert list(paths) == ["fp32", "baseline", "plain", "fast", "fast again"]
    ref = paths["fp32"]["losses"]
    assert len(ref) == 4 and abs(ref[-1] - ref[0]) / ref[0] > 3e-3  # it trained
    assert paths["fp32"]["vs_fp32"]["max"] == 0.0
    for name, path in paths.items():
        assert path["losses"][0] == pytest.approx(ref[0], rel=1e-2), name  # the same start
        worst = max(abs(a - b) / b for a, b in zip(path["losses"], ref, strict=True))
        assert path["vs_fp32"]["max"] == pytest.approx(worst)
        assert worst < 1e-3, name  # bf16 rounding, not a different (or no) training
    assert paths["baseline"]["vs_baseline"]["max"] == 0.0
    again = [
        abs(a - b) / b for a, b in zip(paths["fast again"]["losses"], paths["fast"]["losses"], strict=True)
    ]
    assert paths["fast again"]["vs_its_first_run"]["max"] == pytest.approx(max(again))
    assert max(again) < 1e-5  # the CPU repeats itself
    assert "vs_its_first_run" not in paths["fast"]
    assert "vs fp32" in run.stdout and report["environment"]["torch"]


def test_ab_options_runs_each_variant_every_round_from_the_same_start(tmp_path):
    pytest.importorskip("peft")
    ab = _script("ab_options")
    from danlu.fast import ALL, Options

    assert ab.options("split=False,offload=True") == Options(split=False)
    assert ab.options("all") == ALL
    with pytest.raises(SystemExit, match="field=True"):
        ab.options("splt=False")
    out = tmp_path / "ab.json"
    args = ["split=False", "varlen=False", "--smoke", "--steps", "3", "--rounds", "2", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/ab_options.py"), *args],
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["variant"], r["round"]) for r in report["runs"]] == [
        ("split=False", 0), ("varlen=False", 0), ("split=False", 1), ("varlen=False", 1),
    ]  # fmt: skip
    assert report["variants"]["varlen=False"]["varlen"] is False
    first, other = report["summary"]["split=False"], report["summary"]["varlen=False"]
    assert first["speed_vs_first"] == 1.0 and first["loss_max_rel_diff_from_first"] == 0.0
    assert len(first["losses"]) == 3 + 3 and first["tokens_per_s_median"] > 0  # warmup steps too
    assert first["loss_max_rel_diff_between_rounds"] < 1e-5  # a fresh model each round, the same start
    # a different path (transformers' forward) learns the same: near, not equal
    assert 0 < other["loss_max_rel_diff_from_first"] < 1e-2


def _kernel(name: str, start: float, end: float) -> SimpleNamespace:
    span = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, time_range=span)


def test_profile_kinds_and_gaps_leave_out_copies_to_and_from_the_cpu(capsys):
    profile_step = _script("profile_step")
    assert profile_step.kind("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT") == "matmul"
    assert profile_step.kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert profile_step.kind("triton_poi_fused_add_mul_silu_11") == "triton"
    assert profile_step.kind("Memcpy DtoH (Device -> Pinned)") == "copy"
    assert profile_step.kind("void at::native::reduce_kernel<512, 1>") == "other"
    kernels = [
        _kernel("gemm", 0, 100),
        _kernel("Memcpy DtoH (Device -> Pinned)", 100, 900),  # overlaps: compute still idles
        _kernel("triton_a", 300, 400),
        _kernel("gemm", 350, 500),  # overlaps the one before: no gap
        _kernel("gemm", 1000, 1100),
    ]
    profile_step.gaps(kernels, 5)
    out = capsys.readouterr().out
    assert "first to last compute kernel 1.1 ms, no compute kernel running for 0.7 ms (2 gaps" in out
    lines = [line.split() for line in out.splitlines()[1:]]
    assert [line[0] for line in lines] == ["0.500", "0.200"]  # longest first
    assert lines[0][2:] == ["after", "gemm", "before", "gemm"]
    assert lines[1][2:] == ["after", "gemm", "before", "triton_a"]


def test_profile_phases_split_compute_kernels_at_the_loss(capsys):
    profile_step = _script("profile_step")
    kernels = [
        _kernel("gemm", 0, 1000),
        _kernel("triton_a", 1000, 1500),
        _kernel("Memcpy DtoH (Device -> Pinned)", 1000, 3000),  # a copy: no phase counts it
        _kernel("triton_red_fused_logsumexp_0", 2000, 2200),
        _kernel("gemm", 2200, 2500),  # the head's matmul, between the loss's kernels
        _kernel("triton_red_fused_logsumexp_0", 2500, 2750),
        _kernel("gemm", 3000, 5000),
        _kernel("cudnn_sdpa_bprop", 5000, 5400),
    ]
    table = profile_step.phases(kernels)
    assert table == {
        "forward": {"matmul": 1.0, "triton": 0.5},
        "loss": {"triton": 0.45, "matmul": 0.3},
        "backward": {"matmul": 2.0, "attention": 0.4},
    }
    assert "forward      1.5 ms of compute kernels: matmul 1.0, triton 0.5" in capsys.readouterr().out


def test_gpu_tests_bundle_pins_and_records_outcomes(tmp_path):
    """benchmarks/gpu_tests.py: every wheel it bundles is pinned, and a JUnit report becomes the
    record's rows (a failure and a skip counted as such)."""
    gpu = _script("gpu_tests")
    for name in gpu.MISSING:
        assert gpu.pinned(name).split("==")[1][0].isdigit()
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a" time="1.5"/>'
        '<testcase classname="tests.test_gpu" name="test_b" time="2"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c" time="0"><skipped message="y"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert gpu.outcomes(junit) == [
        {"test": "tests.test_gpu::test_a", "seconds": 1.5, "outcome": "passed"},
        {"test": "tests.test_gpu::test_b", "seconds": 2.0, "outcome": "failed"},
        {"test": "tests.test_gpu::test_c", "seconds": 0.0, "outcome": "skipped"},
    ]


def test_the_gpu_record_holds_a_run_of_the_one_command():
    runs = json.loads((ROOT / "benchmarks/results/gpu_tests.json").read_text())["runs"]
    ours = [r for r in runs if r.get("command", "").startswith("python3 benchmarks/gpu_tests.py run")]
    whole = [r for r in ours if r["command"].strip() == "python3 benchmarks/gpu_tests.py run"]
    assert whole and whole[-1]["failed"] == whole[-1]["error"] == 0 and whole[-1]["passed"] >= 22
    assert all(r["failed"] == r["error"] == 0 for r in ours[-2:])
    assert whole[-1]["device"].startswith("NVIDIA") and whole[-1]["stack"]["bitsandbytes"]
