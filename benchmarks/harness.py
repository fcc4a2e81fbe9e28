"""Timing, bandwidth and machine description shared by the benchmark cases."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cases import Case


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    cpu_s: float  # process user+sys per call, over the same calls
    cpu_per_wall: float  # total CPU time / total wall time of those calls: ~1 one busy core, >1 parallel


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], object],
    device: str,
    warmup: int,
    reps: int,
    min_seconds: float = 0.3,
    max_seconds: float = 8.0,
    per_call_s: float | None = None,
) -> Timing:
    """Wall time per call (median, p20, p80) and the process CPU time over the same calls.

    ``reps`` calls, more for fast calls so that about ``min_seconds`` is measured, fewer (at least 3)
    for calls so slow that ``reps`` of them would take over ``max_seconds``. ``warmup`` calls come
    first (fewer when slow); the first of them sizes ``reps``. A caller that has just made a warm call
    passes its duration as ``per_call_s``: that call counts as the first warm-up, so none is repeated."""
    if per_call_s is None:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        per_call_s = time.perf_counter() - t0
    for _ in range(warmup - 1 if per_call_s * reps < max_seconds else 0):
        fn()
    _sync(device)
    reps = min(max(reps, int(min_seconds / max(per_call_s, 1e-6))), 1000)
    reps = max(3, min(reps, int(max_seconds / max(per_call_s, 1e-6))))
    walls = []
    cpu0 = time.process_time()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    q = statistics.quantiles(walls, n=5, method="inclusive") if len(walls) >= 2 else [walls[0]] * 4
    return Timing(statistics.median(walls), q[0], q[3], cpu / reps, cpu / sum(walls))


def copy_bandwidth(nbytes: int, device: str, reps: int = 5) -> float:
    """Bytes/s of a large copy (read + write) into an existing buffer: the roofline of this run."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=reps)
    return 2 * src.nbytes / t.median_s


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(fn: Callable[[], object], device: str) -> float:
    """Peak memory above the starting level during one call, in bytes: CUDA allocator statistics on
    a GPU; on CPU the resident set size, sampled every ~0.2 ms by a thread (large tensors are mmapped
    and returned to the OS when freed, so RSS follows them; glibc keeps freed blocks under its adaptive
    mmap threshold, up to 32 MiB, in the heap, where a buffer reused call after call does not show:
    ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment makes every tensor over 1 MB count)."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - start)
    start = _rss_bytes()
    peak = start
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return float(max(peak, _rss_bytes()) - start)


def machine() -> dict:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            info["transparent_hugepage"] = f.read().strip()
    except OSError:
        pass
    return info


def check_outputs(reference, candidate, dtype: torch.dtype) -> None:
    """Each provider's outputs must equal the first provider's (alchemy_ops') within the dtype's tolerance."""
    tol = {torch.float32: 1e-4, torch.float64: 1e-8}.get(dtype, 3e-2)
    for a, b in zip(reference, candidate, strict=True):
        if a is not None and b is not None:
            torch.testing.assert_close(
                b.float(), a.float(), atol=tol * max(1.0, a.float().abs().max().item()), rtol=tol
            )


def measure_cases(
    cases: list[Case],
    device: str,
    warmup: int,
    reps: int,
    max_seconds: float,
    bandwidth: float,
    min_seconds: float = 0.3,
) -> list[dict]:
    """One result row per case and provider: times, rates against ``bandwidth`` (bytes/s), peak memory,
    and ``alchemy_speedup`` (the provider's time over alchemy_ops'). Every provider's output is checked
    against the first provider's before it is timed; progress goes to stderr."""
    rows = []
    for i, case in enumerate(cases, 1):
        # Dynamo keeps compiled code per Python code object, and the cases' torch.compile baselines share
        # theirs across shapes and dtypes: past recompile_limit (8) compiles of one code object it runs
        # that function eagerly, silently. A reset lets every case's baseline compile its own graph.
        torch._dynamo.reset()
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(case.x_shape, device=device, dtype=case.dtype, generator=gen) * 3
        memory_unit = torch.Size(case.memory_unit_shape or case.x_shape).numel() * x.element_size()
        must_move = case.passes * x.numel() * x.element_size()
        reference = None
        for provider, fn in case.providers.items():
            print(f"\r[{i}/{len(cases)}] {case.name}: {provider:<14}", end="", file=sys.stderr, flush=True)
            provider_started = time.perf_counter()
            out = fn(x)  # the first call (torch.compile compiles here) is checked, not timed
            if reference is None:
                reference = out
            else:
                check_outputs(reference, out, case.dtype)
            del out
            # The second call measures memory and is the first warm-up: time_fn does not repeat it.
            call_started = time.perf_counter()
            extra = peak_extra_memory(lambda fn=fn, x=x: fn(x), device)
            per_call = time.perf_counter() - call_started
            t = time_fn(
                lambda fn=fn, x=x: fn(x), device, warmup, reps,
                min_seconds=min_seconds, max_seconds=max_seconds, per_call_s=per_call,
            )  # fmt: skip
            rows.append({
                "op": case.op, "mode": case.mode, "dtype": str(case.dtype).removeprefix("torch."),
                "shape": list(case.shape), "provider": provider,
                "median_ms": t.median_s * 1e3, "p20_ms": t.p20_s * 1e3, "p80_ms": t.p80_s * 1e3,
                "cpu_ms": t.cpu_s * 1e3, "cpu_per_wall": t.cpu_per_wall,
                "gb_per_s": must_move / t.median_s / 1e9, "roofline": must_move / t.median_s / bandwidth,
                "gflop_per_s": case.flops / t.median_s / 1e9 if case.flops else None,
                "peak_extra_mb": extra / 1e6, "peak_extra_x_input": extra / memory_unit,
                "seconds": time.perf_counter() - provider_started,  # compile, check, memory and timing
            })  # fmt: skip
    print(f"\r{' ' * 80}\r", end="", file=sys.stderr)
    for r in rows:
        ours = next(
            o
            for o in rows
            if o["provider"] == "alchemy_ops" and all(o[k] == r[k] for k in ("op", "mode", "dtype", "shape"))
        )
        r["alchemy_speedup"] = r["median_ms"] / ours["median_ms"]
    return rows
