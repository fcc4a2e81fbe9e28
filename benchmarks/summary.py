"""The README's results summary, generated from a results JSON (``python -m benchmarks --summary JSON``)."""

from __future__ import annotations

from pathlib import Path

BEGIN = "<!-- summary:begin (python -m benchmarks --summary benchmarks/results/quick.json --update-readme) -->"
END = "<!-- summary:end -->"
# How each baseline is named in the table, in column order.
BASELINES = {"torch eager": "eager", "torch.compile": "torch.compile"}


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1f}×" if ratio < 10 else f"{ratio:.0f}×"


def summary_markdown(data: dict) -> str:
    """One line per forward+backward case: alchemy_ops' median time, how many times faster it is than
    each baseline, and the peak memory above the start of ours and of eager (in input-sized units: of
    the [N, V] logits for linear_cross_entropy); then the machine line."""
    rows = [r for r in data["results"] if r["mode"].startswith("forward+backward")]
    lines = [
        "| op (forward+backward) | dtype | shape | alchemy_ops time | "
        + " | ".join(f"× vs {name}" for name in BASELINES.values())
        + " | peak memory, ours / eager |",
        "|---|---|---|---:|" + "---:|" * len(BASELINES) + "---:|",
    ]
    for ours in (r for r in rows if r["provider"] == "alchemy_ops"):
        same = {
            r["provider"]: r
            for r in rows
            if (r["op"], r["mode"], r["dtype"], r["shape"]) == (ours["op"], ours["mode"], ours["dtype"], ours["shape"])
        }
        op = ours["op"] + (" (hard)" if ours["mode"].endswith("hard") else "")
        speedups = [_times(same[p]["alchemy_speedup"]) if p in same else "-" for p in BASELINES]
        eager = same.get("torch eager")
        memory = f"{ours['peak_extra_x_input']:.2f} / " + (f"{eager['peak_extra_x_input']:.2f}" if eager else "-")
        ms = ours["median_ms"]
        time = f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.3g} ms"
        lines.append(
            f"| `{op}` | {ours['dtype']} | {'×'.join(map(str, ours['shape']))} | {time} | {' | '.join(speedups)}"
            f" | {memory} |"
        )
    m = data["machine"]
    date = f", {data['date']}" if "date" in data else ""
    lines.append("")
    lines.append(
        f"`make bench` ({data['preset']} preset{date}) on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch"
        f" threads, {'GPU ' + m['gpu'] if m.get('gpu') else 'no GPU'}), torch {m['torch']}: median wall times;"
        " × = the baseline's time over ours; memory in units of the input (the logits for"
        " `linear_cross_entropy`)."
    )
    return "\n".join(lines) + "\n"


def replace_between_markers(readme: Path, table: str) -> None:
    """Writes ``table`` between the BEGIN and END marker lines of ``readme``."""
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no summary markers ({BEGIN} ... {END})")
    readme.write_text(text[: start + len(BEGIN)] + "\n" + table + text[end:])
