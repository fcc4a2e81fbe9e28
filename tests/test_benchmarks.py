"""Smoke test of the benchmark suite (tiny preset) so it cannot rot; not a timing test."""

import json

import torch
import torch.nn.functional as F

from benchmarks.__main__ import main


def test_benchmark_suite_runs(tmp_path):
    out = tmp_path / "tiny.json"
    assert main(["--preset", "tiny", "--no-compile", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    providers = {r["provider"] for r in data["results"]}
    torch_lce = {"F.lce"} if hasattr(F, "linear_cross_entropy") else set()
    torch_lce |= {"F.lce chunked"} if hasattr(torch.nn, "LinearCrossEntropyOptions") else set()
    assert providers == {"alchemy_ops", "ao inplace_bw", "torch eager"} | torch_lce
    assert {r["op"] for r in data["results"]} == {
        "log_softmax",
        "softmax",
        "cross_entropy",
        "gumbel_softmax",
        "topk_softmax",
        "linear_cross_entropy",
    }
    for r in data["results"]:
        assert r["median_ms"] > 0 and r["cpu_ms"] >= 0 and r["gb_per_s"] > 0 and r["peak_extra_mb"] >= 0
        # the matmul-bound LM head reports its arithmetic rate; the memory-bound ops do not
        assert (r["gflop_per_s"] is not None and r["gflop_per_s"] > 0) == (r["op"] == "linear_cross_entropy")
    assert data["machine"]["torch"] and data["copy_bandwidth_gb_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert out.with_name("tiny-roofline.png").stat().st_size > 0
    steps = data["training_steps"]
    assert {s["provider"] for s in steps} == {"alchemy_ops", "torch"}
    assert all(s["step_ms"] > 0 and 0 < s["loss_share"] for s in steps)
    parallel = data["distributed"]
    assert {r["provider"] for r in parallel} == {"alchemy_ops", "Megatron-style"}
    assert all(r["median_ms"] > 0 and r["world"] == 2 for r in parallel)
