"""``python -m benchmarks.short_rows [--only SUBSTR] [--no-compile] [--dtype float32] [--threads 2]``

Kernel-against-kernel grid for short rows and the class-dim-1 layout (issue 13, item 2): the raw
``torch.ops.alchemy_ops`` CPU kernels against the ATen kernels eager PyTorch calls and a
``torch.compile``d function of the same math, each case's providers interleaved call by call in one
process, medians over many reps. Python per-call overhead of the public wrappers is not timed; a
compiled function still pays its guard and wrapper cost, printed once as "compile floor" (a compiled
one-element op) and subtracted in the ``compile-net`` column the ratio is taken against.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import alchemy_ops  # noqa: F401  (loads the extension: registers torch.ops.alchemy_ops)

ops = torch.ops.alchemy_ops
aten = torch.ops.aten

CLASSES = (2, 3, 10, 21, 100, 256, 1000)
ROWS = (64, 512, 4096)
# [N, C] rows of the issue beyond the grid, then class-dim-1 [N, C, d...] layouts.
EXTRA_ROW_SHAPES = ((4096, 256), (32, 32000))
CLASS_DIM1_SHAPES = ((8, 21, 64, 64), (8, 21, 256, 256), (64, 2, 32, 32), (64, 10, 32, 32), (16, 100, 32, 32))


def interleaved_medians(
    fns: dict[str, Callable[[], object]], budget_s: float, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median seconds per call of each fn, calling them round-robin so load drifts hit all alike."""
    for fn in fns.values():  # warm up (first compiled call, page faults of fresh outputs)
        fn()
        fn()
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    per_round = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(3000, max(15, budget_s / per_round)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = clock()
            fn()
            samples[name].append(clock() - t)
    return {name: statistics.median(s) for name, s in samples.items()}


def below_autograd(fn: Callable[[], object]) -> Callable[[], object]:
    """fn called past the Autograd dispatch key: our ops' autograd is a Python kernel whose cost is the
    per-call path (issue 13 item 1), not the kernel; ATen's is C++, skipped alike for a fair pair."""

    def call():
        with torch._C._AutoDispatchBelowAutograd():
            return fn()

    return call


def _class_iota(shape: tuple[int, ...], device) -> torch.Tensor:
    """0..C-1 along dim 1, broadcastable against [N, C, d...]."""
    return torch.arange(shape[1], device=device).view((1, shape[1]) + (1,) * (len(shape) - 2))


# The same math for torch.compile, along dim 1 (the class dim of every case).
def _softmax_math(t):
    return torch.softmax(t, 1)


def _log_softmax_math(t):
    return torch.log_softmax(t, 1)


def _softmax_backward_math(g, y):
    return y * (g - (g * y).sum(1, keepdim=True))


def _log_softmax_backward_math(g, y):
    return g - torch.exp(y) * g.sum(1, keepdim=True)


def _cross_entropy_math(t, y):
    return F.cross_entropy(t, y, reduction="none")


def softmax_providers(shape, dtype, log: bool, backward: bool, compile_fns: bool):
    dim = 1
    x = torch.randn(shape, dtype=dtype)
    out = ops.softmax_forward(x, dim, 1.0, log, None)
    grad = torch.randn(shape, dtype=dtype)
    if not backward:
        eager = aten._log_softmax if log else aten._softmax
        providers = {
            "ours": lambda: ops.softmax_forward(x, dim, 1.0, log, None),
            "eager": lambda: eager(x, dim, False),
        }
        math = _log_softmax_math if log else _softmax_math
        args = (x,)
    else:
        eager = aten._log_softmax_backward_data if log else aten._softmax_backward_data
        providers = {
            "ours": lambda: ops.softmax_backward(grad, out, dim, 1.0, log),
            "eager": lambda: eager(grad, out, dim, dtype),
        }
        math = _log_softmax_backward_math if log else _softmax_backward_math
        args = (grad, out)
    if compile_fns:
        compiled = torch.compile(math, dynamic=False)
        providers["compile"] = lambda: compiled(*args)
    return providers


def cross_entropy_providers(shape, dtype, backward: bool, compile_fns: bool):
    x = torch.randn(shape, dtype=dtype)
    positions = shape[:1] + shape[2:]
    target = torch.randint(0, shape[1], positions, generator=torch.Generator().manual_seed(0))
    loss, lse = ops.cross_entropy_forward(x, target, None, -100, 0.0, 0.0, 0.0, True)
    logp = aten._log_softmax(x, 1, False)
    nll_forward = aten.nll_loss_forward if len(shape) == 2 else aten.nll_loss2d_forward
    nll_backward = aten.nll_loss_backward if len(shape) == 2 else aten.nll_loss2d_backward
    if not backward:
        # reduction none (0): per-position losses, as our kernel returns
        providers = {
            "ours": lambda: ops.cross_entropy_forward(x, target, None, -100, 0.0, 0.0, 0.0, True),
            "eager": lambda: nll_forward(aten._log_softmax(x, 1, False), target, None, 0, -100),
        }
        math = _cross_entropy_math
        args = (x, target)
    else:
        g = torch.randn(positions, dtype=torch.float32)
        g_in = g.to(dtype)
        total_weight = torch.tensor(float(target.numel()), dtype=dtype)
        providers = {
            "ours": lambda: ops.cross_entropy_backward(g, x, target, None, lse, -100, 0.0, 0.0, 0.0),
            "eager": lambda: aten._log_softmax_backward_data(
                nll_backward(g_in, logp, target, None, 0, -100, total_weight), logp, 1, dtype
            ),
        }
        iota = _class_iota(shape, x.device)

        def math(t, y, s, gr):  # d loss / d x = g * (softmax(x) - onehot(target)), from the saved lse like ours
            return (torch.exp(t - s.unsqueeze(1)) - (iota == y.unsqueeze(1)).to(t.dtype)) * gr.unsqueeze(1)

        args = (x, target, lse.float(), g_in)
    if compile_fns:
        compiled = torch.compile(math, dynamic=False)
        providers["compile"] = lambda: compiled(*args)
    return providers


def compile_floor(budget_s: float, clock: Callable[[], float]) -> float:
    one = torch.ones(1)
    compiled = torch.compile(lambda t: t.neg(), dynamic=False)
    return interleaved_medians({"floor": lambda: compiled(one)}, budget_s, clock)["floor"]


def cases(only: str | None):
    grid = [(r, c) for c in CLASSES for r in ROWS] + list(EXTRA_ROW_SHAPES)
    for shape in grid + list(CLASS_DIM1_SHAPES):
        for op in ("softmax", "log_softmax", "cross_entropy"):
            for backward in (False, True):
                name = f"{op:13s} {'bwd' if backward else 'fwd'} {list(shape)}"
                if only is None or only in name:
                    yield name, op, tuple(shape), backward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run the cases whose name contains this, e.g. 'cross_entropy fwd'")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "thread"],
        help="thread: CPU time of the calling thread (with --threads 1, immune to time slices lost on a busy machine)",
    )
    ap.add_argument("--budget", type=float, default=0.4, help="seconds of timing per case")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    compile_fns = not args.no_compile
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    floor = compile_floor(args.budget, clock) if compile_fns else 0.0
    print(
        f"# {args.dtype}, {args.threads} threads, {args.clock} clock, medians in us; compile floor {floor * 1e6:.1f} us"
    )
    header = f"{'case':42s} {'ours':>9s} {'eager':>9s}" + (f" {'compile':>9s} {'cmp-net':>9s}" if compile_fns else "")
    print(header + f" {'ours/best':>9s}")
    for name, op, shape, backward in cases(args.only):
        if op == "cross_entropy":
            providers = cross_entropy_providers(shape, dtype, backward, compile_fns)
        else:
            providers = softmax_providers(shape, dtype, op == "log_softmax", backward, compile_fns)
        providers["ours"] = below_autograd(providers["ours"])
        providers["eager"] = below_autograd(providers["eager"])
        t = interleaved_medians(providers, args.budget, clock)
        best = t["eager"]
        row = f"{name:42s} {t['ours'] * 1e6:9.1f} {t['eager'] * 1e6:9.1f}"
        if compile_fns:
            net = max(t["compile"] - floor, 1e-7)
            best = min(best, net)
            row += f" {t['compile'] * 1e6:9.1f} {net * 1e6:9.1f}"
        ratio = t["ours"] / best
        print(row + f" {ratio:8.2f}{' <' if ratio > 1.05 else ''}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
