"""``python -m benchmarks [--preset quick|full|sweep] [--ops ...] [--dtype ...] [--device ...]``

Times every provider of every case in this one process and environment, checks each provider's
output against the first (alchemy_ops) once before timing, and writes
benchmarks/results/<preset>.json and PNG charts drawn from it. ``--preset sweep`` (also run by
``--preset full``) times the shape sweep of ``benchmarks/sweep.py`` instead. ``--plot-only JSON``
redraws the charts of a results file; ``--summary JSON`` prints the README's summary table of it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import cases as case_defs
from . import sweep
from .distributed import print_distributed_table, run_distributed_cases
from .harness import copy_bandwidth, machine, measure_cases
from .summary import replace_between_markers, summary_markdown
from .training import print_training_table, run_training_cases

PRESETS = {
    # softmax shapes, cross-entropy shapes, dtypes, warmup, reps
    "tiny": ([(64, 1000)], [(64, 1000), (2, 5, 8, 8)], [torch.float32], 1, 3),
    # 4096x32000 (524 MB fp32): memory; [8, 21, 256, 256]: segmentation; 32x32000 (full) fits in cache.
    "quick": ([(4096, 32000)], [(4096, 32000), (8, 21, 256, 256)], [torch.float32, torch.bfloat16], 1, 5),
    "full": (
        [(32, 32000), (4096, 1024), (4096, 32000), (1024, 131072), (256, 262144)],
        [(4096, 1024), (4096, 32000), (1024, 131072), (256, 262144), (8, 21, 256, 256)],
        [torch.float32, torch.bfloat16],
        3,
        15,
    ),
}
# Timing stops at 3 calls for a provider whose calls would take longer than this in all (quick: every
# call over 0.4 s gets 3 timed calls, not 5, which keeps `make bench` within 5 minutes).
MAX_SECONDS = {"tiny": 8.0, "quick": 2.0, "full": 8.0}
# gumbel_softmax: shapes, dtypes (forward+backward, soft and hard). Eager takes 4.4 s (soft) and 5.7 s
# (hard) per call at [4096, 32000] here, a quarter of the quick preset's time, so the quick preset
# takes 1024 rows: its 131 MB logits are still far out of cache, and eager still ~1 s per call.
GUMBEL_PRESETS = {
    "tiny": ([(64, 1000)], [torch.float32]),
    "quick": ([(1024, 32000)], [torch.float32]),
    "full": ([(4096, 32000), (1024, 131072)], [torch.float32, torch.bfloat16]),
}
# Top-k softmax ((shape, k), ...) per preset, fp32 only: a MoE router and a top-k sampling row.
TOPK_PRESETS = {
    "tiny": [((64, 1000), 8)],
    "quick": [((65536, 256), 8), ((64, 131072), 50)],
    "full": [((65536, 256), 8), ((16384, 2304), 8), ((64, 131072), 50), ((256, 262144), 1000)],
}
# linear_cross_entropy: (tokens, hidden, vocabulary) shapes, dtypes. Compute-bound: 6 N H V flops per
# call (0.6 s for the quick shape at ~170 GFLOP/s on 2 AVX-512 cores, 1.7 s at the ~60 of 2 AVX2 ones):
# 8192 x 1024 tokens would take ~10-30 s per call, minutes per provider, so the quick preset has the LM
# head of the training step (its logits 2x its weight) and the full one the LLM-sized shapes.
LCE_PRESETS = {
    "tiny": ([(64, 32, 1000)], [torch.float32]),
    "quick": ([(1024, 512, 32000)], [torch.float32]),
    "full": ([(8192, 1024, 32000), (8192, 2048, 128000)], [torch.float32, torch.bfloat16]),
}
RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=[*sorted(PRESETS), "sweep"], default="quick")
    p.add_argument("--ops", nargs="*", default=None, help="e.g. log_softmax softmax distributed")
    p.add_argument("--dtype", nargs="*", default=None, help="e.g. float32 bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--output", type=Path, default=None, help="results JSON (default benchmarks/results/<preset>.json)")
    p.add_argument("--plot-only", type=Path, metavar="JSON", help="only redraw the charts of this results file")
    p.add_argument("--summary", type=Path, metavar="JSON", help="only print the README summary table of this file")
    p.add_argument(
        "--update-readme", type=Path, nargs="?", const=Path(__file__).parents[1] / "README.md", metavar="README",
        help="with --summary: write the table between the summary markers of README.md",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.plot_only:
        from .plots import plot

        print(f"plot: {plot(args.plot_only)}")
        if json.loads(args.plot_only.read_text()).get("preset") == "sweep":
            print(f"table: {sweep.write_outputs(args.plot_only)[0]}")
        return 0
    if args.summary:
        table = summary_markdown(json.loads(args.summary.read_text()))
        if args.update_readme:
            replace_between_markers(args.update_readme, table)
        print(table, end="")
        return 0
    if args.preset == "sweep":
        ops = [o for o in args.ops if o != "distributed"] if args.ops else sweep.OPS
        output = args.output or RESULTS / "sweep.json"
        sweep.run_sweep(output, args.device, ops=ops, compile_baseline=not args.no_compile)
        return 0

    started = time.perf_counter()
    shapes, ce_shapes, dtypes, warmup, reps = PRESETS[args.preset]
    if args.dtype:
        dtypes = [getattr(torch, d) for d in args.dtype]
    compile_baseline = not args.no_compile
    cases = case_defs.softmax_cases(shapes, dtypes, args.device, compile_baseline)
    # The quick preset times the segmentation shape in fp32 only (its time budget).
    kdim_dtypes = dtypes[:1] if args.preset == "quick" and not args.dtype else None
    cases += case_defs.cross_entropy_cases(ce_shapes, dtypes, args.device, compile_baseline, kdim_dtypes)
    gumbel_shapes, gumbel_dtypes = GUMBEL_PRESETS[args.preset]
    gumbel_dtypes = dtypes if args.dtype else gumbel_dtypes
    cases += case_defs.gumbel_softmax_cases(gumbel_shapes, gumbel_dtypes, args.device, compile_baseline)
    topk_dtypes = [d for d in dtypes if d == torch.float32]
    cases += case_defs.topk_softmax_cases(TOPK_PRESETS[args.preset], topk_dtypes, args.device, compile_baseline)
    lce_shapes, lce_dtypes = LCE_PRESETS[args.preset]
    lce_dtypes = dtypes if args.dtype else lce_dtypes
    cases += case_defs.linear_cross_entropy_cases(lce_shapes, lce_dtypes, args.device, compile_baseline)
    if args.ops:
        cases = [c for c in cases if c.op in args.ops]

    info = machine()
    largest = max(torch.Size(c.x_shape).numel() * c.dtype.itemsize for c in cases)
    bandwidth = copy_bandwidth(max(largest, 1 << 26), args.device)
    print(
        f"machine: {info['cpu']} | {info['cores']} cores, {info['torch_threads']} torch threads | torch {info['torch']}"
        f" | THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE']} | copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )

    rows = measure_cases(cases, args.device, warmup, reps, MAX_SECONDS[args.preset], bandwidth)
    _print_table(rows)
    steps = [] if args.ops else run_training_cases(args.preset, args.device, warmup, reps)
    print_training_table(steps)
    parallel = run_distributed_cases(args.preset, warmup, reps) if not args.ops or "distributed" in args.ops else []
    print_distributed_table(parallel)
    # Runs with and without PyTorch's huge-page allocations are kept apart: they differ a lot here.
    suffix = "-thp" if info["THP_MEM_ALLOC_ENABLE"] == "1" else ""
    out = args.output or RESULTS / f"{args.preset}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "copy_bandwidth_gb_s": bandwidth / 1e9,
                "preset": args.preset,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "seconds": time.perf_counter() - started,
                "results": rows,
                "training_steps": steps,
                "distributed": parallel,
            },
            indent=1,
        )
    )
    print(f"results: {out}")
    try:
        from .plots import plot

        print(f"plot: {plot(out)}")
    except ImportError as e:
        print(f"plot skipped ({e})")
    print(f"took {time.perf_counter() - started:.0f} s")
    if args.preset == "full":
        sweep_ops = [o for o in args.ops if o in sweep.OPS] if args.ops else sweep.OPS
        if sweep_ops:
            sweep.run_sweep(RESULTS / "sweep.json", args.device, ops=sweep_ops, compile_baseline=compile_baseline)
    return 0


def _print_table(rows: list[dict]) -> None:
    cases = [f"{r['op']} {r['mode']} {r['dtype']} {'x'.join(map(str, r['shape']))}" for r in rows]
    width = max([50, *map(len, cases)])
    header = (
        f"{'case':<{width}} {'provider':<14} {'median ms':>9} {'p20-p80 ms':>15} {'cpu/wall':>8} {'GB/s':>6} "
        f"{'roofline':>8} {'GFLOP/s':>7} {'mem x in':>8} {'ours x faster':>13}"
    )
    last = None
    for r, case in zip(rows, cases, strict=True):
        if case != last:
            print("\n" + header if last is None else "")
            last = case
        speed = "" if r["provider"] == "alchemy_ops" else f"{r['alchemy_speedup']:.2f}x"
        gflops = "" if r["gflop_per_s"] is None else f"{r['gflop_per_s']:.0f}"
        print(
            f"{case:<{width}} {r['provider']:<14} {r['median_ms']:>9.1f} {r['p20_ms']:>7.1f}-{r['p80_ms']:<7.1f} "
            f"{r['cpu_per_wall']:>8.2f} {r['gb_per_s']:>6.1f} {r['roofline']:>8.0%} {gflops:>7} "
            f"{r['peak_extra_x_input']:>8.2f} {speed:>13}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
