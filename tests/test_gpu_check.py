"""tools/gpu_check.py on a CPU machine: it fails at once and clearly without a GPU, and its summary of a
JUnit report and of benchmark results (fed small fake ones here) counts and prints what they hold."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess:
    # No GPU whatever the machine: no nvidia-smi on PATH and none visible to CUDA.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_preflight_fails_at_once_without_a_gpu():
    proc = _run("--preflight")
    assert proc.returncode == 2
    assert "gpu-check: FAILED: no GPU is visible" in proc.stderr and "make test" in proc.stderr


def test_full_run_fails_before_building_without_a_gpu():
    before = set((ROOT / "benchmarks" / "results").glob("gpu-*"))
    proc = _run()
    assert proc.returncode == 2
    # This venv's torch is a CPU build; with a CUDA build the GPU is hidden by CUDA_VISIBLE_DEVICES.
    assert "torch" in proc.stderr and ("is a CPU build" in proc.stderr or "no CUDA GPU is visible" in proc.stderr)
    assert set((ROOT / "benchmarks" / "results").glob("gpu-*")) == before  # nothing built, run or written


@pytest.mark.parametrize(
    ("classname", "name", "expected"),
    [
        ("tests.test_cross_entropy", "test_gradcheck[cuda-triton-plain]", ("cross_entropy", "triton")),
        (
            "tests.test_cross_entropy_properties",
            "test_matches_pytorch_on_random_inputs[cuda-cpp]",
            ("cross_entropy", "cpp"),
        ),
        ("tests.test_softmax", "test_opcheck[cuda-triton_]", ("softmax", "triton")),  # the op prefix as the id
        ("tests.test_softmax", "test_opcheck[cuda-]", ("softmax", "-")),
        ("tests.test_topk_softmax", "test_bad_input[cuda-reference-{'k': 0}]", ("topk_softmax", "reference")),
        ("tests.test_gumbel_softmax", "test_cuda_uniforms_match_cpu", ("gumbel_softmax", "-")),
        ("tests.test_cross_entropy_shard", "test_shard_opcheck[cuda-cpp]", ("cross_entropy_shard", "cpp")),
    ],
)
def test_op_and_backend_of_a_test_id(gpu_check, classname, name, expected):
    assert gpu_check.op_and_backend(classname, name) == expected


FAKE_JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="6">
<testcase classname="tests.test_softmax" name="test_deterministic[cuda-cpp]" time="0.1"/>
<testcase classname="tests.test_softmax" name="test_deterministic[cuda-triton]" time="0.1"/>
<testcase classname="tests.test_softmax" name="test_gradcheck_and_gradgradcheck[cuda-triton-True]" time="0.1">
  <failure message="AssertionError">boom</failure></testcase>
<testcase classname="tests.test_cross_entropy" name="test_opcheck[cuda-cpp]" time="0.1">
  <error message="RuntimeError">setup failed</error></testcase>
<testcase classname="tests.test_cross_entropy" name="test_opcheck[cuda-triton]" time="0.1">
  <skipped message="needs a CUDA device"/></testcase>
<testcase classname="tests.test_cross_entropy_properties" name="test_matches_pytorch_on_random_inputs[cuda-cpp]"/>
</testsuite></testsuites>
"""


def test_summarize_junit_counts_each_outcome_per_op_and_backend(gpu_check, tmp_path):
    report = tmp_path / "tests.xml"
    report.write_text(FAKE_JUNIT)
    assert gpu_check.summarize_junit(report) == {
        "cross_entropy cpp": {"passed": 1, "failed": 1, "skipped": 0},  # an error counts as failed
        "cross_entropy triton": {"passed": 0, "failed": 0, "skipped": 1},
        "softmax cpp": {"passed": 1, "failed": 0, "skipped": 0},
        "softmax triton": {"passed": 1, "failed": 1, "skipped": 0},
    }


def test_summary_prints_stages_tests_and_benchmark_fractions(gpu_check, tmp_path):
    report_xml = tmp_path / "tests.xml"
    report_xml.write_text(FAKE_JUNIT)
    bench_row = {
        "op": "cross_entropy", "mode": "forward", "dtype": "bfloat16", "shape": [4096, 32000],
        "provider": "alchemy_ops", "median_ms": 0.1234, "roofline": 0.815,
    }  # fmt: skip
    report = {
        "build": {"ok": True, "seconds": 95.0, "timed_out": False},
        "tests": {"ok": False, "seconds": 200.0, "timed_out": True, "counts": gpu_check.summarize_junit(report_xml)},
        "bench": {
            "ok": False,
            "seconds": 100.0,
            "copy_bandwidth_gb_s": 3900.0,
            "results": [bench_row],
            "failed": [],
            "not_run": ["linear_cross_entropy"],
        },  # fmt: skip
    }
    text = "\n".join(gpu_check.summary_lines(report))
    assert "build  ok" in text and "95 s of 180 s" in text
    assert "tests  FAILED" in text and "over budget" in text
    assert "softmax                      triton           1       1        0" in text
    assert "total" in text and "      3       2        1" in text
    assert "copy bandwidth 3900 GB/s" in text
    assert "cross_entropy forward bfloat16 4096x32000" in text and "0.123" in text and "82%" in text
    assert "not run (out of time): linear_cross_entropy" in text


def test_nvcc_release_is_read_from_its_version_text(gpu_check):
    text = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
    assert gpu_check.nvcc_release(text) == "13.0"
    assert gpu_check.nvcc_release("bash: nvcc: command not found") is None


def test_default_workers_is_bounded(gpu_check):
    assert 1 <= gpu_check.default_workers() <= 8


def test_bench_stage_gathers_each_op_and_lists_failures(gpu_check, monkeypatch, tmp_path):
    """One benchmark process per op: their rows are gathered; an op whose run fails is listed, not lost."""
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)

    def fake_run(cmd, budget_s, log, env=None):
        op = cmd[cmd.index("--ops") + 1]
        if op == "gumbel_softmax":
            return 1, 0.5, False
        row = {"op": op, "mode": "forward", "dtype": "float32", "shape": [8, 8], "provider": "alchemy_ops"}
        Path(cmd[cmd.index("--output") + 1]).write_text(json.dumps({"copy_bandwidth_gb_s": 3000.0, "results": [row]}))
        return 0, 0.5, False

    monkeypatch.setattr(gpu_check, "run_with_budget", fake_run)
    bench = gpu_check.run_bench("stamp")
    assert [r["op"] for r in bench["results"]] == [op for op in gpu_check.BENCH_OPS if op != "gumbel_softmax"]
    assert bench["failed"] == ["gumbel_softmax"] and bench["not_run"] == [] and not bench["ok"]
    assert bench["copy_bandwidth_gb_s"] == 3000.0


def test_main_writes_the_report_and_fails_when_a_stage_fails(gpu_check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_check, "check_torch", lambda: "9.0")
    monkeypatch.setattr(gpu_check, "build", lambda arch, stamp: {"ok": True, "seconds": 1.0, "timed_out": False})
    tests = {
        "ok": False,
        "seconds": 2.0,
        "timed_out": False,
        "counts": {"softmax cpp": {"passed": 3, "failed": 1, "skipped": 0}},
    }
    monkeypatch.setattr(gpu_check, "run_tests", lambda stamp, workers: tests)
    bench = {"ok": True, "seconds": 3.0, "copy_bandwidth_gb_s": None, "results": [], "failed": [], "not_run": []}
    monkeypatch.setattr(gpu_check, "run_bench", lambda stamp: bench)
    assert gpu_check.main(["--workers", "2"]) == 1
    (report,) = tmp_path.glob("gpu-*.json")
    assert json.loads(report.read_text())["tests"]["counts"] == tests["counts"]
    out = capsys.readouterr().out
    assert "tests  FAILED" in out and "softmax" in out and str(report) in out
