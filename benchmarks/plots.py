"""PNG plots drawn from a results JSON of ``python -m benchmarks``."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(results_json: Path) -> Path:
    """Bar chart of median time per case and provider (fraction of the copy roofline annotated)."""
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
            ax.bar_label(bar, labels=[f"{r['roofline']:.0%}"], fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, fontsize=7)
    ax.set_ylabel("median wall time (ms), lower is better")
    m = data["machine"]
    ax.set_title(
        f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']} (labels: fraction of copy roofline)", fontsize=8
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(results_json).with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
