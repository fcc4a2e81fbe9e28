"""The shape sweep (``python -m benchmarks --preset sweep``; ``--preset full`` runs it too).

Each op, forward and forward+backward in fp32, over a grid of rows x classes and the class-dim-1
layout, alchemy_ops against PyTorch eager and ``torch.compile`` (static shapes, as a fixed-shape
training loop gets them). Writes ``sweep.json`` (rows as the other presets write them), a heat map of
ours / the faster baseline per cell (``sweep-heatmap.png``, red where we lose) and a markdown table of
every cell where we lose (``sweep-losses.md``), and prints a summary.

The grid: rows 4, 64, 512, 4096 x classes 3, 10, 21, 256, 1000, 32000, 50257, 262144, without the
cells of more than ``MAX_ELEMENTS`` (2^25 elements, 128 MiB in fp32): larger ones ([4096, 32000] up
to [4096, 262144], 4 GiB) are the quick and full presets' job, and eager's three logits-sized buffers
would need several GiB of this shared machine. Plus ``[8, C, 64, 64]`` with the classes at dim 1,
C = 2, 10, 21, 100. torch.compile compiles one graph per cell and mode; that is most of the run time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import cases as case_defs
from .harness import copy_bandwidth, machine, measure_cases

ROWS = (4, 64, 512, 4096)
CLASSES = (3, 10, 21, 256, 1000, 32000, 50257, 262144)
MAX_ELEMENTS = 1 << 25
CLASS_DIM_1 = tuple((8, c, 64, 64) for c in (2, 10, 21, 100))
OPS = ("log_softmax", "softmax", "cross_entropy")  # also possible: topk_softmax, gumbel_softmax
PROVIDERS = ("alchemy_ops", "torch eager", "torch.compile")
BASELINES = PROVIDERS[1:]
LOSS_MARGIN = 1.05  # a loss by more than this is beyond the noise of one run (issue 13's bar)
# Cells compare each provider's 20th-percentile call, not its median: on a shared machine interference
# only adds time, and to the providers unevenly (under load, 40-150 ms calls of a 10 µs eager op were
# measured at cpu/wall 0.15: waiting, not computing). The JSON keeps the medians too.
STAT = "p20_ms"
# A cell in which some provider's process used less CPU than this per wall second mostly waited (for a
# core, a thread): its times say more about the machine's load than about the kernels.
WAITED = 0.5


def sweep_shapes() -> list[tuple[int, ...]]:
    """The grid's 2-d shapes (rows x classes, at most ``MAX_ELEMENTS``), then the class-dim-1 shapes."""
    grid = [(n, c) for n in ROWS for c in CLASSES if n * c <= MAX_ELEMENTS]
    return grid + list(CLASS_DIM_1)


def sweep_cases(shape: tuple[int, ...], ops, device: str, compile_baseline: bool) -> list[case_defs.Case]:
    """The fp32 cases of ``ops`` at one shape (class dim last for 2-d shapes, at dim 1 otherwise),
    with the sweep's providers only."""
    f32 = [torch.float32]
    cases = []
    if {"log_softmax", "softmax"} & set(ops):
        cases += case_defs.softmax_cases([shape], f32, device, compile_baseline, dim=-1 if len(shape) == 2 else 1)
    if "cross_entropy" in ops:
        cases += case_defs.cross_entropy_cases([shape], f32, device, compile_baseline)
    if len(shape) == 2 and "topk_softmax" in ops:
        cases += case_defs.topk_softmax_cases([(shape, min(8, shape[1]))], f32, device, compile_baseline)
    if len(shape) == 2 and "gumbel_softmax" in ops:
        cases += case_defs.gumbel_softmax_cases([shape], f32, device, compile_baseline)
    cases = [c for c in cases if c.op in ops]
    for case in cases:
        case.providers = {p: fn for p, fn in case.providers.items() if p in PROVIDERS}
    return cases


def cells(rows: list[dict]) -> list[dict]:
    """One entry per (op, mode, dtype, shape): each provider's ``STAT`` in ms, ``ratio``, ours over
    the faster baseline (> 1: we lose), and ``cpu_per_wall``, the lowest of the providers'; sorted
    worst first. Cells without a baseline are left out."""
    by_cell: dict[tuple, dict] = {}
    for r in rows:
        key = (r["op"], r["mode"], r["dtype"], tuple(r["shape"]))
        cell = by_cell.setdefault(key, {"op": key[0], "mode": key[1], "dtype": key[2], "shape": list(key[3])})
        cell[r["provider"]] = r[STAT]
        cell["cpu_per_wall"] = min(cell.get("cpu_per_wall", r["cpu_per_wall"]), r["cpu_per_wall"])
    out = []
    for cell in by_cell.values():
        baselines = [cell[p] for p in BASELINES if p in cell]
        if "alchemy_ops" in cell and baselines:
            cell["ratio"] = cell["alchemy_ops"] / min(baselines)
            out.append(cell)
    return sorted(out, key=lambda c: -c["ratio"])


def _ms(cell: dict, provider: str) -> str:
    return f"{cell[provider]:.4g}" if provider in cell else "-"


def losses_markdown(data: dict) -> str:
    """The markdown table of every cell where alchemy_ops is slower than the faster baseline."""
    all_cells = cells(data["results"])
    losing = [c for c in all_cells if c["ratio"] > 1]
    m = data["machine"]
    lines = [
        "# Shape sweep: cells where alchemy_ops is slower than the faster of eager and torch.compile\n",
        f"{len(losing)} of {len(all_cells)} cells; {sum(c['ratio'] > LOSS_MARGIN for c in losing)} by more than"
        f" {LOSS_MARGIN - 1:.0%}. 20th-percentile wall times per call (interference only adds time) of one run of"
        f" `python -m benchmarks --preset sweep` ({data.get('date', 'undated')}) on"
        f" {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}; a shared machine is noisy,"
        " so rerun a cell before believing a small loss.\n",
        f'A low "min cpu/wall" (below {WAITED}) marks a cell where some provider mostly waited: rerun it.\n',
        "| op | mode | shape | alchemy_ops ms | eager ms | compile ms | ours / best | min cpu/wall |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in losing:
        shape = "x".join(map(str, c["shape"]))
        lines.append(
            f"| {c['op']} | {c['mode']} | {shape} | {_ms(c, 'alchemy_ops')} | {_ms(c, 'torch eager')}"
            f" | {_ms(c, 'torch.compile')} | {c['ratio']:.2f} | {c['cpu_per_wall']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def print_summary(data: dict, worst: int = 10) -> None:
    """N cells, M losing, and the ``worst`` cells with ours / eager / compile times."""
    all_cells = cells(data["results"])
    losing = [c for c in all_cells if c["ratio"] > 1]
    print(
        f"sweep: {len(all_cells)} cells, {len(losing)} where alchemy_ops is slower than the faster baseline"
        f" ({sum(c['ratio'] > LOSS_MARGIN for c in losing)} by more than {LOSS_MARGIN - 1:.0%}),"
        f" {data['seconds']:.0f} s; in {sum(c['cpu_per_wall'] < WAITED for c in all_cells)} cells a provider"
        f" mostly waited (cpu/wall < {WAITED}): rerun those on a quiet machine"
    )
    print(f"{'worst cells (p20 ms)':<52} {'ours':>9} {'eager':>9} {'compile':>10} {'ours/best':>9} {'cpu/wall':>8}")
    for c in all_cells[:worst]:
        name = f"{c['op']} {c['mode']} {'x'.join(map(str, c['shape']))}"
        print(
            f"{name:<52} {_ms(c, 'alchemy_ops'):>9} {_ms(c, 'torch eager'):>9} {_ms(c, 'torch.compile'):>10}"
            f" {c['ratio']:>9.2f} {c['cpu_per_wall']:>8.2f}"
        )


def write_outputs(output: Path) -> list[Path]:
    """Draws the heat map and writes the table of losing cells beside the sweep JSON."""
    data = json.loads(output.read_text())
    table = output.with_name(output.stem + "-losses.md")
    table.write_text(losses_markdown(data))
    written = [table]
    try:
        from .plots import plot_sweep_heatmap

        written.append(plot_sweep_heatmap(output))
    except ImportError as e:  # matplotlib is a bench dependency, not a test one
        print(f"heat map skipped ({e})")
    return written


def run_sweep(
    output: Path,
    device: str,
    *,
    ops=OPS,
    compile_baseline: bool = True,
    shapes: list[tuple[int, ...]] | None = None,
    reps: int = 5,
    min_seconds: float = 0.3,
) -> dict:
    """Times every cell (``shapes``: default the grid of ``sweep_shapes``), writes ``output`` and the
    table and heat map beside it, prints the summary; returns what it wrote to ``output``."""
    shapes = sweep_shapes() if shapes is None else shapes
    started = time.perf_counter()
    bandwidth = copy_bandwidth(1 << 26, device)
    data = {
        "machine": machine(),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "preset": "sweep",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "max_elements": MAX_ELEMENTS,
        "seconds": 0.0,
        "results": [],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    for i, shape in enumerate(shapes, 1):
        print(f"[{i}/{len(shapes)}] {'x'.join(map(str, shape))}", flush=True)
        cases = sweep_cases(shape, ops, device, compile_baseline)
        data["results"] += measure_cases(
            cases, device, 1, reps, max_seconds=4.0, bandwidth=bandwidth, min_seconds=min_seconds
        )
        data["seconds"] = time.perf_counter() - started
        output.write_text(json.dumps(data, indent=1))  # after every cell: an interrupted sweep keeps its cells
    print(f"results: {output}")
    for path in write_outputs(output):
        print(f"wrote: {path}")
    print_summary(data)
    return data
