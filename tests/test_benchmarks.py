"""Smoke tests of the benchmark suite (tiny sizes) so it cannot rot; no timing is asserted."""

import json

import torch
import torch.nn.functional as F

from benchmarks import sweep
from benchmarks.__main__ import main
from benchmarks.summary import BEGIN, END


def test_benchmark_suite_runs(tmp_path, capsys):
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
        assert r["seconds"] * 1e3 >= r["median_ms"]  # the provider's whole time includes its timed calls
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

    # The charts are a function of the JSON alone: --plot-only redraws them.
    out.with_suffix(".png").unlink()
    assert main(["--plot-only", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 0

    # The summary table: one line per forward+backward case of alchemy_ops, written between the markers.
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\nrest\n")
    capsys.readouterr()
    assert main(["--summary", str(out), "--update-readme", str(readme)]) == 0
    table = capsys.readouterr().out
    ours = [r for r in data["results"] if r["provider"] == "alchemy_ops" and r["mode"].startswith("forward+backward")]
    assert sum(line.startswith("| `") for line in table.splitlines()) == len(ours)
    assert readme.read_text() == f"intro\n{BEGIN}\n{table}{END}\nrest\n"


def test_shape_sweep_runs(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    shapes = [(4, 3), (2, 3, 4, 4)]  # a row-major cell and a class-dim-1 cell
    data = sweep.run_sweep(out, "cpu", shapes=shapes, reps=1, min_seconds=0.0, compile_baseline=False)
    assert json.loads(out.read_text()) == data
    assert {tuple(r["shape"]) for r in data["results"]} == set(shapes)
    assert {r["op"] for r in data["results"]} == set(sweep.OPS)
    assert {r["provider"] for r in data["results"]} == {"alchemy_ops", "torch eager"}
    assert all(r["median_ms"] > 0 for r in data["results"])
    cells = sweep.cells(data["results"])
    assert len(cells) == len(shapes) * len(sweep.OPS) * 2  # forward and forward+backward
    assert all(c["ratio"] == c["alchemy_ops"] / c["torch eager"] for c in cells)
    losing = [c for c in cells if c["ratio"] > 1]
    table = out.with_name("sweep-losses.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(losing)  # header + cells
    assert out.with_name("sweep-heatmap.png").stat().st_size > 0
    assert f"sweep: {len(cells)} cells, {len(losing)} where" in capsys.readouterr().out


def test_vocabulary_chart_series(tmp_path):
    """The vocabulary chart draws a fixed row count measured at 3+ class counts (the sweep) in ms, and
    one shape per class count (the full preset) per row; nothing when there is no such series."""
    from benchmarks.plots import _vocabulary_series, plot_vocabulary_sweep

    def row(shape, provider="alchemy_ops", op="softmax"):
        return {"op": op, "mode": "forward", "dtype": "float32", "shape": shape, "provider": provider, "median_ms": 1.0}

    sweep_rows = [row([n, c], p) for n in (4, 64) for c in (3, 10, 21) for p in ("alchemy_ops", "torch eager")]
    sweep_rows.append(row([512, 3]))
    full_rows = [row(s, op="log_softmax") for s in ([4096, 1024], [4096, 32000], [256, 262144])]
    series = _vocabulary_series(sweep_rows + full_rows)
    assert set(series) == {
        ("softmax", "forward", "float32", "64 rows"),  # the larger of the rows with the most class counts
        ("log_softmax", "forward", "float32", "rows vary"),
    }
    assert series[("softmax", "forward", "float32", "64 rows")] == (
        [r for r in sweep_rows if r["shape"][0] == 64],
        "median ms",
    )
    assert series[("log_softmax", "forward", "float32", "rows vary")] == (full_rows, "µs per row")
    assert _vocabulary_series([row([4, 3]), row([4, 10]), row([64, 10])]) == {}  # two class counts

    data = {"machine": {"cpu": "cpu", "torch_threads": 2, "torch": "x"}, "preset": "sweep", "results": sweep_rows}
    out = tmp_path / "s.json"
    out.write_text(json.dumps(data))
    assert plot_vocabulary_sweep(out).stat().st_size > 0
    out.write_text(json.dumps({**data, "results": sweep_rows[:2]}))
    assert plot_vocabulary_sweep(out) is None
