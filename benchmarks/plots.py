"""PNG plots drawn from a results JSON of ``python -m benchmarks``."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(r: dict) -> str:
    return f"{r['op']} {r['mode']} {r['dtype']}"


def plot_roofline(results_json: Path) -> Path | None:
    """Bar chart of each provider's fraction of the copy roofline, per memory-bound case (compute-bound
    cases, which report GFLOP/s, are left out: the copy bandwidth does not bound them); None when
    there is no memory-bound case."""
    data = json.loads(Path(results_json).read_text())
    rows = [r for r in data["results"] if not r.get("gflop_per_s")]
    if not rows:
        return None
    cases = list(dict.fromkeys(f"{_label(r)}\n{'x'.join(map(str, r['shape']))}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cases)), 4.5))
    width = 0.8 / len(providers)
    for k, prov in enumerate(providers):
        xs, ys = [], []
        for i, case in enumerate(cases):
            match = [
                r for r in rows if r["provider"] == prov and f"{_label(r)}\n{'x'.join(map(str, r['shape']))}" == case
            ]
            if match:
                xs.append(i + k * width)
                ys.append(100 * match[0]["roofline"])
        ax.bar(xs, ys, width, color=f"C{k}", label=prov)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, fontsize=6, rotation=90)
    ax.set_ylabel("% of copy bandwidth (bytes that must move / time)")
    ax.set_title(f"fraction of the roofline ({data['copy_bandwidth_gb_s']:.1f} GB/s copy)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(results_json).with_name(Path(results_json).stem + "-roofline.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_vocabulary_sweep(results_json: Path) -> Path | None:
    """Median time against the number of classes, one line per provider, for every 2-d case
    measured at two or more class counts (the full preset); None when there is no such sweep."""
    data = json.loads(Path(results_json).read_text())
    rows = [r for r in data["results"] if len(r["shape"]) == 2]
    groups = {}
    for r in rows:
        groups.setdefault(_label(r), []).append(r)
    groups = {k: v for k, v in groups.items() if len({r["shape"][1] for r in v}) >= 2}
    if not groups:
        return None
    cols = min(4, len(groups))
    rows_n = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.4 * rows_n), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, (label, group) in zip(axes.flat, groups.items(), strict=False):
        for k, prov in enumerate(dict.fromkeys(r["provider"] for r in group)):
            pts = sorted((r["shape"][1], r["median_ms"] / r["shape"][0] * 1e3) for r in group if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{k}", label=prov)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes (vocabulary)")
        ax.set_ylabel("µs per row")
        ax.set_title(label, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    out = Path(results_json).with_name(Path(results_json).stem + "-vocab.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(results_json: Path) -> Path:
    """Bar chart of median time per case and provider (fraction of the copy roofline annotated);
    also writes the roofline chart and, for a vocabulary sweep, time against vocabulary size."""
    plot_roofline(results_json)
    plot_vocabulary_sweep(results_json)
    data = json.loads(Path(results_json).read_text())
    rows = data["results"]
    cases = list(dict.fromkeys(f"{r['op']}\n{r['mode']}\n{r['dtype']} {'x'.join(map(str, r['shape']))}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4.5))
    width = 0.8 / len(providers)
    for k, prov in enumerate(providers):
        for i, case in enumerate(cases):
            match = [
                r
                for r in rows
                if r["provider"] == prov
                and f"{r['op']}\n{r['mode']}\n{r['dtype']} {'x'.join(map(str, r['shape']))}" == case
            ]
            if not match:
                continue
            r = match[0]
            bar = ax.bar(i + k * width, r["median_ms"], width, color=f"C{k}", label=prov if i == 0 else None)
            label = f"{r['gflop_per_s']:.0f} GFLOP/s" if r.get("gflop_per_s") else f"{r['roofline']:.0%}"
            ax.bar_label(bar, labels=[label], fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, fontsize=7)
    ax.set_ylabel("median wall time (ms), lower is better")
    m = data["machine"]
    ax.set_title(
        f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']} (labels: fraction of copy roofline, or GFLOP/s)",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(results_json).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
