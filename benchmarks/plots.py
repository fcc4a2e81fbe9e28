"""PNG charts drawn from a results JSON of ``python -m benchmarks`` (a pure function of the JSON:
``python -m benchmarks --plot-only <json>`` redraws them without running anything)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

# One colour per provider in every chart; providers not listed get the next free colours.
PROVIDER_COLORS = {
    "alchemy_ops": "C0",
    "ao inplace_bw": "C9",
    "ao triton": "C4",
    "torch eager": "C1",
    "torch.compile": "C2",
    "F.lce": "C3",
    "F.lce chunked": "C5",
    "liger": "C6",
}


def _shape(r: dict) -> str:
    return "x".join(map(str, r["shape"]))


def _colors(providers: list[str]) -> dict[str, str]:
    spare = iter(f"C{i}" for i in range(10) if f"C{i}" not in PROVIDER_COLORS.values())
    return {p: PROVIDER_COLORS.get(p) or next(spare, "gray") for p in providers}


def _machine_line(data: dict) -> str:
    m = data["machine"]
    thp = ", THP_MEM_ALLOC_ENABLE=1" if m.get("THP_MEM_ALLOC_ENABLE") == "1" else ""
    date = f", {data['date']}" if "date" in data else ""
    return f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}{thp} ({data['preset']} preset{date})"


def _panel_grid(rows: list[dict], value, label, xlabel: str, log: bool, title: str, out: Path) -> Path:
    """One small panel per (op, mode); in each, a group of horizontal bars per (dtype, shape), one bar
    per provider, ``value(r)`` long and labelled ``label(r)``."""
    panels: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        panels.setdefault((r["op"], r["mode"]), []).append(r)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = _colors(providers)
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    heights = []
    for group in panels.values():
        n_cases = len({(r["dtype"], _shape(r)) for r in group})
        heights.append(0.6 + 0.32 * len(group) + 0.15 * n_cases)
    row_heights = [max(heights[i * cols : (i + 1) * cols]) for i in range(nrows)]
    fig, axes = plt.subplots(
        nrows, cols, figsize=(5.2 * cols, sum(row_heights) + 1.0), squeeze=False, layout="constrained",
        gridspec_kw={"height_ratios": row_heights},
    )  # fmt: skip
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, ((op, mode), group) in zip(axes.flat, panels.items(), strict=False):
        cases = list(dict.fromkeys((r["dtype"], _shape(r)) for r in group))
        y, ticks, tick_labels = 0.0, [], []
        for dtype, shape in cases:
            members = [r for r in group if (r["dtype"], _shape(r)) == (dtype, shape)]
            ticks.append(y + (len(members) - 1) / 2)
            tick_labels.append(f"{dtype}\n{shape}")
            for r in members:
                bar = ax.barh(y, value(r), 0.85, color=colors[r["provider"]])
                ax.bar_label(bar, labels=[label(r)], fontsize=7, padding=2)
                y += 1
            y += 0.6
        ax.set_yticks(ticks, tick_labels, fontsize=7)
        ax.invert_yaxis()
        largest = max(value(r) for r in group)
        if log:  # bars start a decade below the shortest, so the shortest is visible
            ax.set_xscale("log")
            ax.set_xlim(10 ** math.floor(math.log10(min(value(r) for r in group) / 2)), largest * 6)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_xlim(0, largest * 1.3)  # room for the bar labels
        ax.set_title(f"{op} — {mode}", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in providers]
    fig.legend(
        handles, providers, loc="outside upper center", ncol=len(providers), fontsize=8, frameon=False,
        title=title, title_fontsize=9,
    )  # fmt: skip
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.3g} ms"


def _times(ratio: float) -> str:
    return f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.1f}×" if ratio >= 1 else f"{ratio:.2f}×"


def plot_times(results_json: Path) -> Path:
    """``<stem>.png``: median wall time per case and provider on a log scale, one panel per op and mode,
    each baseline labelled with how many times alchemy_ops' time it takes."""
    data = json.loads(Path(results_json).read_text())

    def label(r: dict) -> str:
        ms = _ms(r["median_ms"])
        return ms if r["provider"] == "alchemy_ops" else f"{ms}  {_times(r['alchemy_speedup'])}"

    return _panel_grid(
        data["results"], lambda r: r["median_ms"], label, "median wall time, ms (log scale; lower is better)",
        log=True, title=f"time per call; ×: that provider's time over alchemy_ops' — {_machine_line(data)}",
        out=Path(results_json).with_suffix(".png"),
    )  # fmt: skip


def plot_roofline(results_json: Path) -> Path | None:
    """``<stem>-roofline.png``: each provider's fraction of the copy roofline, per memory-bound case
    (compute-bound cases, which report GFLOP/s, are left out: the copy bandwidth does not bound them);
    None when there is no memory-bound case."""
    data = json.loads(Path(results_json).read_text())
    rows = [r for r in data["results"] if not r.get("gflop_per_s")]
    if not rows:
        return None
    return _panel_grid(
        rows, lambda r: 100 * r["roofline"], lambda r: f"{r['roofline']:.0%}",
        "% of copy bandwidth (bytes that must move / time)", log=False,
        title=f"fraction of the roofline ({data['copy_bandwidth_gb_s']:.1f} GB/s copy) — {_machine_line(data)}",
        out=Path(results_json).with_name(Path(results_json).stem + "-roofline.png"),
    )  # fmt: skip


def _vocabulary_series(rows: list[dict]) -> dict[tuple, tuple[list[dict], str]]:
    """Per (op, mode, dtype) of 2-d cases: the rows to draw against the class count and the y label.
    The row count measured at the most class counts (at least 3) gives a fixed-rows series in ms (the
    sweep); failing that, one shape per class count (the full preset) gives µs per row."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if len(r["shape"]) == 2:
            groups.setdefault((r["op"], r["mode"], r["dtype"]), []).append(r)
    series = {}
    for key, group in groups.items():
        by_rows: dict[int, set[int]] = {}
        for r in group:
            by_rows.setdefault(r["shape"][0], set()).add(r["shape"][1])
        n = max(by_rows, key=lambda k: (len(by_rows[k]), k))
        if len(by_rows[n]) >= 3:
            series[key + (f"{n} rows",)] = ([r for r in group if r["shape"][0] == n], "median ms")
        elif len({r["shape"][1] for r in group}) >= 3 and len({tuple(r["shape"]) for r in group}) == len(
            {r["shape"][1] for r in group}
        ):
            series[key + ("rows vary",)] = (group, "µs per row")
    return series


def plot_vocabulary_sweep(results_json: Path) -> Path | None:
    """``<stem>-vocab.png``: time against the number of classes, one line per provider, one panel per
    (op, mode, dtype), as Liger-Kernel's benchmarks draw it; None when no series has 3 class counts."""
    data = json.loads(Path(results_json).read_text())
    series = _vocabulary_series(data["results"])
    if not series:
        return None
    providers = list(dict.fromkeys(r["provider"] for group, _ in series.values() for r in group))
    colors = _colors(providers)
    cols = min(3, len(series))
    nrows = -(-len(series) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows + 0.8), squeeze=False, layout="constrained")
    for ax in axes.flat[len(series) :]:
        ax.set_visible(False)
    for ax, ((op, mode, dtype, rows_label), (group, unit)) in zip(axes.flat, series.items(), strict=False):
        for prov in dict.fromkeys(r["provider"] for r in group):
            pts = sorted(
                (r["shape"][1], r["median_ms"] if unit == "median ms" else r["median_ms"] / r["shape"][0] * 1e3)
                for r in group
                if r["provider"] == prov
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, color=colors[prov])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes (vocabulary size)", fontsize=7)
        ax.set_ylabel(unit, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"{op} — {mode}\n{dtype}, {rows_label}", fontsize=8)
    handles = [plt.Line2D([], [], color=colors[p], marker="o") for p in providers]
    fig.legend(
        handles, providers, loc="outside upper center", ncol=len(providers), fontsize=8, frameon=False,
        title=f"time against vocabulary size — {_machine_line(data)}", title_fontsize=9,
    )  # fmt: skip
    out = Path(results_json).with_name(Path(results_json).stem + "-vocab.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_sweep_heatmap(results_json: Path) -> Path:
    """``<stem>-heatmap.png`` of a shape sweep: per (op, mode) panel, alchemy_ops' time over the faster
    of eager and torch.compile in every cell (rows x classes, and the class-dim-1 shapes as one more
    row), on a log colour scale centred on 1: blue where we win, red where we lose."""
    from .sweep import cells

    data = json.loads(Path(results_json).read_text())
    all_cells = cells(data["results"])
    # panels in the order the ops and modes were run: one row per op, forward then forward+backward
    panels: dict[tuple[str, str], list[dict]] = {(r["op"], r["mode"]): [] for r in data["results"]}
    for c in all_cells:
        panels[(c["op"], c["mode"])].append(c)
    panels = {k: v for k, v in panels.items() if v}

    def row_key(c: dict):
        return c["shape"][0] if len(c["shape"]) == 2 else "x".join(map(str, [c["shape"][0], "C", *c["shape"][2:]]))

    def col_key(c: dict) -> int:
        return c["shape"][1]

    row_keys = sorted(
        {row_key(c) for c in all_cells}, key=lambda k: (isinstance(k, str), k if isinstance(k, int) else 0)
    )
    col_keys = sorted({col_key(c) for c in all_cells})
    worst = max((abs(math.log2(c["ratio"])) for c in all_cells), default=1.0)
    bound = min(max(worst, 0.25), 3.0)  # the colour scale saturates at 8x either way
    norm = TwoSlopeNorm(vmin=-bound, vcenter=0.0, vmax=bound)
    cols = 2
    nrows = -(-len(panels) // cols)
    width = max(10.0, 2.0 + 2 * 0.6 * len(col_keys))
    fig, axes = plt.subplots(
        nrows, cols, figsize=(width, 1.0 + nrows * (1.0 + 0.4 * len(row_keys))), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    image = None
    for ax, ((op, mode), group) in zip(axes.flat, panels.items(), strict=False):
        grid = [[math.nan] * len(col_keys) for _ in row_keys]
        for c in group:
            i, j = row_keys.index(row_key(c)), col_keys.index(col_key(c))
            grid[i][j] = math.log2(c["ratio"])
            dark = abs(grid[i][j]) > 0.6 * bound  # white text on the saturated colours
            ax.text(j, i, f"{c['ratio']:.3g}", ha="center", va="center", fontsize=6.5, color="w" if dark else "k")
        image = ax.imshow(grid, cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(col_keys)), [str(k) for k in col_keys], fontsize=7, rotation=45)
        ax.set_yticks(range(len(row_keys)), [str(k) for k in row_keys], fontsize=7)
        ax.set_xlabel("classes (C)", fontsize=7)
        ax.set_ylabel("rows", fontsize=7)
        ax.set_title(f"{op} — {mode}", fontsize=9)
    losing = sum(c["ratio"] > 1 for c in all_cells)
    fig.suptitle(
        f"alchemy_ops time / faster of eager and torch.compile, 20th-percentile calls (> 1, red: we lose;"
        f" {losing} of {len(all_cells)} cells)\n{_machine_line(data)}",
        fontsize=8.5,
    )
    bar = fig.colorbar(image, ax=axes, shrink=0.5, label="ours / best baseline")
    ticks = [t for t in (-3, -2, -1, 0, 1, 2, 3) if -bound <= t <= bound] or [0]
    bar.set_ticks(ticks, labels=[f"{2.0**t:g}" for t in ticks])
    bar.ax.tick_params(labelsize=7)
    out = Path(results_json).with_name(Path(results_json).stem + "-heatmap.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot(results_json: Path) -> Path:
    """Draws every chart the JSON has data for (times, roofline, vocabulary sweep; a sweep's heat map)
    and returns the main one."""
    data = json.loads(Path(results_json).read_text())
    if data.get("preset") == "sweep":
        plot_vocabulary_sweep(results_json)
        return plot_sweep_heatmap(results_json)
    plot_roofline(results_json)
    plot_vocabulary_sweep(results_json)
    return plot_times(results_json)
