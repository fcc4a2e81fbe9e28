"""`make gpu-check`: the one command for a GPU box (torch with CUDA, nvcc, a visible GPU).

Stages, each with its time budget (8 minutes in all on 16 cores and one H200):

1. build  (<= 3 min): alchemy_ops._C with its CUDA kernels, in place, for this GPU's arch only,
   MAX_JOBS = the core count.
2. tests  (<= 3 min): every CUDA test and the slow CPU ones (`pytest -m "cuda or slow"`: each op x dtype x
   layout x backend, against float64 and the CPU kernels, gradcheck, opcheck, torch.compile, bad inputs,
   the >2^31-element cases), spread over pytest-xdist workers when installed; a JUnit XML report.
3. bench  (<= 2 min): `python -m benchmarks --device cuda --preset quick`, one op at a time so a
   stage that runs out of time keeps what it measured (Liger-Kernel is a cross-entropy provider
   when it is installed).

Then one summary: tests passed/failed per op and backend, and each benchmark case's time and fraction
of the measured device copy bandwidth. Everything goes to benchmarks/results/gpu-<stamp>.json (the
JUnit XML and the per-op benchmark JSON beside it). Exit status 0 only if every stage passed.

`python tools/gpu_check.py --preflight` only checks, without torch, that a GPU and nvcc are visible:
the Makefile runs it before setting up the venv, so a box without a GPU fails at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BUDGET_S = {"build": 180, "tests": 180, "bench": 120}
# Benchmark ops in order of interest: the stage stops starting new ones when its budget is spent.
BENCH_OPS = ["cross_entropy", "softmax", "log_softmax", "topk_softmax", "gumbel_softmax", "linear_cross_entropy"]
BACKENDS = ("cpp", "triton", "reference")


class GpuCheckError(RuntimeError):
    """A stage cannot run; the message says why and what to do."""


# ---- preflight ---------------------------------------------------------------------------------------


def nvcc_path() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def visible_gpus() -> list[str]:
    """GPU names from `nvidia-smi -L` (empty when there is no driver, no GPU, or none is visible)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0 or os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return []
    return [line for line in out.stdout.splitlines() if line.startswith("GPU ")]


def preflight() -> None:
    gpus = visible_gpus()
    if not gpus:
        raise GpuCheckError(
            "no GPU is visible (nvidia-smi -L lists none): run `make gpu-check` on a machine with an NVIDIA GPU "
            "and its driver; on a CPU-only machine use `make test` and `make cuda-check`"
        )
    if nvcc_path() is None:
        raise GpuCheckError("nvcc not found: install the CUDA toolkit or set CUDA_HOME (the CUDA kernels need it)")
    print(f"gpu-check: {len(gpus)} GPU(s): {gpus[0]}; nvcc: {nvcc_path()}", flush=True)


def check_torch() -> str:
    """The device's arch (e.g. "9.0") if this torch can run CUDA here; raises GpuCheckError otherwise."""
    import torch

    if torch.version.cuda is None:
        raise GpuCheckError(
            f"torch {torch.__version__} is a CPU build: run from the venv `make gpu-check` sets up (.venv-cuda)"
        )
    if not torch.cuda.is_available():
        raise GpuCheckError(
            "no CUDA GPU is visible to torch (torch.cuda.is_available() is False): check the driver and "
            "CUDA_VISIBLE_DEVICES; this check needs a GPU and does not skip without one"
        )
    nvcc = nvcc_path()
    release = nvcc_release(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout) if nvcc else None
    if release is None or release.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise GpuCheckError(
            f"nvcc {release or 'not found'} ({nvcc}) does not match torch's CUDA {torch.version.cuda}: torch's "
            f"extension builder refuses another major version; set CUDA_HOME to a CUDA {torch.version.cuda} toolkit"
        )
    major, minor = torch.cuda.get_device_capability()
    print(f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}")
    return f"{major}.{minor}"


def nvcc_release(version_text: str) -> str | None:
    """The release ("13.0") in the output of `nvcc --version`, None if there is none."""
    found = re.search(r"release (\d+\.\d+)", version_text)
    return found.group(1) if found else None


# ---- stages --------------------------------------------------------------------------------------------


def run_with_budget(cmd: list[str], budget_s: float, log: Path, env: dict | None = None) -> tuple[int, float, bool]:
    """Runs cmd with its output to log; past the budget sends SIGINT (pytest then still writes its report),
    then kills. Returns (exit code, seconds, whether it ran out of time)."""
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=budget_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    return code, time.monotonic() - started, timed_out


def build(arch: str, stamp: str) -> dict:
    import torch

    # nvcc 13's toolkit lacks the cuBLAS/cuSPARSE headers ATen's CUDA headers include; the CUDA torch
    # wheel's nvidia packages ship them (as in tools/cuda_check.py).
    nvidia = [str(p) for p in Path(torch.__file__).parent.parent.glob("nvidia/cu*/include")]
    env = dict(
        os.environ,
        FORCE_CUDA="1",
        MAX_JOBS=str(os.cpu_count() or 1),
        TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", arch),
        ALCHEMY_OPS_EXTRA_INCLUDE=os.pathsep.join(nvidia),
    )
    log = RESULTS / f"gpu-{stamp}-build.log"
    print(f"gpu-check: build for sm_{arch} with MAX_JOBS={env['MAX_JOBS']} (budget {BUDGET_S['build']} s)", flush=True)
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    code, seconds, timed_out = run_with_budget(cmd, BUDGET_S["build"], log, env)
    if code == 0:  # a fresh interpreter: this one may have imported the old build
        probe = "import alchemy_ops._extension as e, sys; sys.exit(0 if e.WITH_CUDA else 3)"
        if subprocess.run([sys.executable, "-c", probe], cwd=ROOT).returncode != 0:
            code = 3
            with open(log, "a") as out:
                out.write("\ngpu-check: the build has no CUDA kernels (alchemy_ops._extension.WITH_CUDA is False)\n")
    return {"ok": code == 0, "exit_code": code, "seconds": seconds, "timed_out": timed_out, "log": str(log)}


def run_tests(stamp: str, workers: int) -> dict:
    junit = RESULTS / f"gpu-{stamp}-tests.xml"
    log = RESULTS / f"gpu-{stamp}-tests.log"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda or slow",
        "-q",
        "-ra",
        "tests",
        f"--junitxml={junit}",
        "-p",
        "no:cacheprovider",
    ]
    if workers > 1:
        cmd += ["-n", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # Triton compiles for the GPU here
    print(f"gpu-check: CUDA and slow tests on {workers} worker(s) (budget {BUDGET_S['tests']} s)", flush=True)
    code, seconds, timed_out = run_with_budget(cmd, BUDGET_S["tests"], log, env)
    counts = summarize_junit(junit) if junit.exists() else {}
    return {
        "ok": code == 0 and not timed_out, "exit_code": code, "seconds": seconds, "timed_out": timed_out,
        "junit": str(junit), "log": str(log), "counts": counts,
    }  # fmt: skip


def run_bench(stamp: str) -> dict:
    started = time.monotonic()
    rows, files, not_run, failed = [], [], [], []
    bandwidth = None
    for op in BENCH_OPS:
        left = BUDGET_S["bench"] - (time.monotonic() - started)
        if left < 10:
            not_run.append(op)
            continue
        out = RESULTS / f"gpu-{stamp}-bench-{op}.json"
        log = RESULTS / f"gpu-{stamp}-bench-{op}.log"
        cmd = [sys.executable, "-m", "benchmarks", "--device", "cuda", "--preset", "quick", "--ops", op]
        print(f"gpu-check: benchmark {op} ({left:.0f} s of the bench budget left)", flush=True)
        code, _, timed_out = run_with_budget([*cmd, "--output", str(out)], left, log)
        if code != 0 or timed_out or not out.exists():
            failed.append(op)
            continue
        data = json.loads(out.read_text())
        bandwidth = data["copy_bandwidth_gb_s"]
        rows += data["results"]
        files.append(str(out))
    return {
        "ok": not failed and not not_run, "seconds": time.monotonic() - started, "copy_bandwidth_gb_s": bandwidth,
        "results": rows, "files": files, "failed": failed, "not_run": not_run,
    }  # fmt: skip


# ---- the summary ------------------------------------------------------------------------------------------


def op_and_backend(classname: str, name: str) -> tuple[str, str]:
    """("cross_entropy", "triton") from a JUnit test case, e.g. classname "tests.test_cross_entropy" and
    name "test_gradcheck[cuda-triton-plain]"; the backend is "-" for a test that takes none."""
    module = classname.rsplit(".", 1)[-1].removeprefix("test_")
    op = module.removesuffix("_properties")
    params = name[name.index("[") + 1 : -1].split("-") if "[" in name else []
    backend = next((p.rstrip("_") for p in params if p.rstrip("_") in BACKENDS), "-")
    return op, backend


def summarize_junit(path: Path) -> dict[str, dict[str, int]]:
    """{"<op> <backend>": {"passed": n, "failed": n, "skipped": n}} from a JUnit XML report
    (an error counts as failed)."""
    counts: dict[str, Counter] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        op, backend = op_and_backend(case.get("classname", ""), case.get("name", ""))
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        counts.setdefault(f"{op} {backend}", Counter())[outcome] += 1
    return {key: {k: c[k] for k in ("passed", "failed", "skipped")} for key, c in sorted(counts.items())}


def summary_lines(report: dict) -> list[str]:
    lines = ["", "gpu-check summary", ""]
    for stage in ("build", "tests", "bench"):
        r = report.get(stage)
        if r is None:
            lines.append(f"{stage:<6} not run")
            continue
        state = "ok" if r["ok"] else "FAILED"
        over = " (over budget: stopped)" if r.get("timed_out") else ""
        log = f"  log: {r['log']}" if not r["ok"] and "log" in r else ""
        lines.append(f"{stage:<6} {state:<7} {r['seconds']:6.0f} s of {BUDGET_S[stage]} s{over}{log}")
    tests = report.get("tests")
    if tests and tests["counts"]:
        lines += ["", f"{'tests: op':<28} {'backend':<10} {'passed':>7} {'failed':>7} {'skipped':>8}"]
        totals = Counter()
        for key, c in tests["counts"].items():
            op, backend = key.rsplit(" ", 1)
            lines.append(f"{op:<28} {backend:<10} {c['passed']:>7} {c['failed']:>7} {c['skipped']:>8}")
            totals.update(c)
        lines.append(f"{'total':<28} {'':<10} {totals['passed']:>7} {totals['failed']:>7} {totals['skipped']:>8}")
    bench = report.get("bench")
    if bench and bench["results"]:
        lines += ["", f"benchmark (device copy bandwidth {bench['copy_bandwidth_gb_s']:.0f} GB/s)"]
        lines.append(f"{'case':<52} {'provider':<14} {'median ms':>9} {'of copy bw':>10}")
        for r in bench["results"]:
            case = f"{r['op']} {r['mode']} {r['dtype']} {'x'.join(map(str, r['shape']))}"
            lines.append(f"{case:<52} {r['provider']:<14} {r['median_ms']:>9.3f} {r['roofline']:>10.0%}")
    if bench and (bench["failed"] or bench["not_run"]):
        failed, not_run = ", ".join(bench["failed"]) or "none", ", ".join(bench["not_run"]) or "none"
        lines.append(f"benchmark ops failed: {failed}; not run (out of time): {not_run}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preflight", action="store_true", help="only check that a GPU and nvcc are visible")
    parser.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    parser.add_argument("--workers", type=int, default=None, help="pytest-xdist workers (default: cores / 2, max 8)")
    args = parser.parse_args(argv)
    try:
        if args.preflight:
            preflight()
            return 0
        arch = check_torch()
    except GpuCheckError as e:
        print(f"gpu-check: FAILED: {e}", file=sys.stderr)
        return 2

    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict = {"stamp": stamp, "budget_s": BUDGET_S}
    if not args.skip_build:
        report["build"] = build(arch, stamp)
    if args.skip_build or report["build"]["ok"]:
        workers = args.workers or default_workers()
        report["tests"] = run_tests(stamp, workers)
        report["bench"] = run_bench(stamp)
    out = RESULTS / f"gpu-{stamp}.json"
    out.write_text(json.dumps(report, indent=1))
    print("\n".join(summary_lines(report)))
    print(f"\nresults: {out}")
    if not args.skip_build and not report["build"]["ok"]:
        print(f"gpu-check: FAILED: the build failed; see {report['build']['log']}", file=sys.stderr)
    stages = [report[s] for s in ("build", "tests", "bench") if s in report]
    return 0 if all(s["ok"] for s in stages) else 1


def default_workers() -> int:
    """Half the cores (Triton and inductor compile in each worker), at most 8; 1 without pytest-xdist."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 1
    return max(1, min(8, (os.cpu_count() or 2) // 2))


if __name__ == "__main__":
    raise SystemExit(main())
