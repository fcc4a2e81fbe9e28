"""Timing, bandwidth and machine description shared by the benchmark cases."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


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
) -> Timing:
    """Wall time per call (median, p20, p80) and the process CPU time over the same calls.

    ``reps`` calls, more for fast calls so that about ``min_seconds`` is measured, fewer (at least 3)
    for calls so slow that ``reps`` of them would take over ``max_seconds``."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    per_call = time.perf_counter() - t0
    for _ in range(warmup - 1 if per_call * reps < max_seconds else 0):
        fn()
    _sync(device)
    reps = min(max(reps, int(min_seconds / max(per_call, 1e-6))), 1000)
    reps = max(3, min(reps, int(max_seconds / max(per_call, 1e-6))))
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
