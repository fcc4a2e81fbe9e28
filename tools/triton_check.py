"""Compile every Triton kernel of ``alchemy_ops/triton/`` for real GPUs (sm_80, sm_90), no GPU needed.

Run in the CUDA-torch venv: ``.venv-cuda/bin/python tools/triton_check.py`` (``make cuda-check`` runs it
after the CUDA build). Fails on a compile error, a register spill or stack frame, a launch grid over
CUDA's limits, or a kernel / dtype / constexpr flag that the sweep below never reached.

Where the configurations come from: the launch code itself, not a list of signatures.

1. The package is imported as is. Only the compiled extension is replaced, as it may not be built
   for this torch: the operator schemas are defined from ``csrc/alchemy_ops.cpp`` (the one table of
   contents) and a stand-in ``alchemy_ops._C`` module takes its place, so the Python launchers
   registered with ``torch.library.register_kernel`` import unchanged and are collected by name.
2. ``JITFunction.run`` (what ``kernel[grid](...)`` calls) records instead of launching, and every
   launcher is called on meta tensors (no memory, so any size or stride: 2^31-element spans for the
   int64 offset paths) over a sweep of dtypes x op options x shapes x layouts. Triton's own binder
   (as in ``JITFunction.run``: ``create_function_from_signature`` then ``_pack_args``) turns each
   recorded call into the signature, constexprs, alignment attributes and options (num_warps ...)
   that a real launch compiles, so BLOCK, num_warps, WIDE and every flag are whatever the launcher
   chose.
3. Coverage: every ``*_kernel`` of ``alchemy_ops.triton`` must have been launched with every
   floating dtype it takes, and each of its bool constexprs with both values (LIBDEVICE excepted:
   False is the interpreter's path, never compiled). A new kernel or flag the sweep misses fails here.
4. The distinct specializations are reduced, per kernel x dtype, to a subset in which every flag
   value, unit and non-unit stride and int32/int64 scalar occurs, with the heaviest (most flags
   on, largest BLOCK) and the smallest BLOCK; ``--all`` compiles every distinct one. By the
   tiling rule (_tiling.py) a thread holds at most 64 bytes per block-wide value at any BLOCK, so
   the largest BLOCK is the register-heaviest. Compiles run in 2 processes; ptxas' ``-v`` log gives
   registers, spills and stack, the compiled metadata the shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import multiprocessing
import os
import re
import sys
import time
import types
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16", "float16", "float64")
# CUDA's grid limits: x < 2^31, y and z <= 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)
# Bool constexprs not required to take both values: LIBDEVICE is False only under the interpreter.
ONE_VALUED_FLAGS = {"LIBDEVICE"}


# ----------------------------------------------------------------------------------------
# 1. Import the package with the schemas defined from the C++ schema file
# ----------------------------------------------------------------------------------------


def import_launchers() -> dict:
    """{op name: launcher} of every ``triton_*`` op, the package imported without its extension."""
    os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, not the interpreter's
    import torch

    schemas = re.findall(r'm\.def\(\s*"([^"]+)"\s*\)', (ROOT / "csrc" / "alchemy_ops.cpp").read_text())
    if not schemas:
        sys.exit("triton-check: no m.def(...) schema found in csrc/alchemy_ops.cpp")
    library = torch.library.Library("alchemy_ops", "DEF")
    for schema in schemas:
        library.define(schema)
    stand_in = types.ModuleType("alchemy_ops._C")
    stand_in.cpu_capability, stand_in.with_cuda = "DEFAULT", False
    sys.modules["alchemy_ops._C"] = stand_in

    launchers: dict = {}
    register_kernel = torch.library.register_kernel

    def collect(op, device_types, func=None, **kwargs):
        def register(f):
            launchers[op.split("::")[-1]] = f
            return register_kernel(op, device_types, f, **kwargs)

        return register if func is None else register(func)

    torch.library.register_kernel = collect
    sys.path.insert(0, str(ROOT))
    try:
        import alchemy_ops  # noqa: F401
    finally:
        torch.library.register_kernel = register_kernel
    import_launchers.library = library  # keeps the schemas alive
    return launchers


# ----------------------------------------------------------------------------------------
# 2. Record the launches of a sweep of op calls on meta tensors
# ----------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: object  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    case: str  # the op call that launched it


@dataclass
class Spec:
    """One specialization of one kernel, as Triton compiles it for a target."""

    name: str
    dtype: str
    features: dict  # param -> signature type (with alignment) or constexpr value, plus launch options
    covered: frozenset  # what the covering subset must reach: bool flags, scalar types, unit strides
    block: int  # the largest BLOCK / TILE constexpr
    launch: Launch
    key: tuple = field(init=False)

    def __post_init__(self):
        self.key = (self.name, tuple(sorted(self.features.items(), key=lambda kv: kv[0])))


def record(launchers: dict) -> list[Launch]:
    import torch
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    current = [""]

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, tuple(grid), args, kwargs, current[0]))

    original, JITFunction.run = JITFunction.run, run
    try:
        for case, call in sweep(launchers, torch):
            current[0] = case
            call()
    finally:
        JITFunction.run = original
    return launches


def _meta(shape, dtype, *, transpose: bool = False):
    import torch

    if transpose:  # the last dim strided by the first: a class dim of stride shape[0]
        return torch.empty(list(reversed(shape)), dtype=dtype, device="meta").t()
    return torch.empty(shape, dtype=dtype, device="meta")


def sweep(launchers: dict, torch):
    """(case name, call) for every op call of the sweep. Shapes: a tiny odd row, GPT-2's and
    Llama 3's vocabularies (50257, 128256), a strided class dim (dim 1 of [N, C, T]), and a class
    span over 2^31 elements (the int64 offset paths). Options: every flag of every op."""
    op = launchers.__getitem__
    dtypes = [getattr(torch, d) for d in DTYPES]
    flags = (False, True)
    wide = 20000  # (128256 - 1) * 20000 > 2^31

    row_layouts = {  # name -> (shape, dim, transpose)
        "[4,3]": ((4, 3), -1, False),
        "[4,50257]": ((4, 50257), -1, False),
        "[2,128256,3] dim1": ((2, 128256, 3), 1, False),
        "[128256,T]^T wide": ((wide, 128256), -1, True),
    }
    for (name, (shape, dim, transpose)), dtype, log in itertools.product(row_layouts.items(), dtypes, flags):
        for out in [None, torch.float32] if dtype in (torch.float16, torch.bfloat16) else [None]:
            x, y = _meta(shape, dtype, transpose=transpose), _meta(shape, out or dtype, transpose=transpose)
            case = f"softmax {name} {dtype} log={log} dtype={out}"
            yield case, partial(op("triton_softmax_forward"), x, dim, 2.0, log, out)
            yield case, partial(op("triton_softmax_backward"), y, y, dim, 2.0, log)

    ce_layouts = {"[4,3]": (4, 3), "[4,50257]": (4, 50257), "[2,128256,3]": (2, 128256, 3)}
    ce_layouts["[1,128256,T] wide"] = (1, 128256, wide)  # class stride T
    options = itertools.product(dtypes, flags, flags, (0.0, 0.1), (0.0, 30.0))
    for (name, shape), (dtype, soft, weighted, smoothing, softcap) in itertools.product(ce_layouts.items(), options):
        x = _meta(shape, dtype)
        positions = (shape[0], *shape[2:])
        target = _meta(shape, dtype) if soft else _meta(positions, torch.int64)
        weight = _meta((shape[1],), dtype) if weighted else None
        scale, grad, lse = (
            _meta(positions, torch.float32),
            _meta(positions, torch.float32),
            _meta(positions, torch.float64),
        )
        case = f"cross_entropy {name} {dtype} soft={soft} weight={weighted} smoothing={smoothing} softcap={softcap}"
        options = (-100, smoothing, 1e-4, softcap)
        yield case, partial(op("triton_cross_entropy_forward"), x, target, weight, *options, False)
        yield (
            case + " inplace",
            partial(op("triton_cross_entropy_forward_inplace"), x, target, weight, scale, *options, False),
        )
        yield case, partial(op("triton_cross_entropy_backward"), grad, x, target, weight, lse, *options)

    shard_shapes = {"[4,3]": (4, 3), "[4,50257]": (4, 50257), "[2,128256]": (2, 128256), "[1,2^31] wide": (1, 2**31)}
    options = itertools.product(dtypes, flags, (0.0, 30.0), flags)
    for (name, shape), (dtype, weighted, softcap, smoothing) in itertools.product(shard_shapes.items(), options):
        x, target = _meta(shape, dtype), _meta((shape[0],), torch.int64)
        weight = _meta((shape[1],), dtype) if weighted else None
        lse, coeffs = _meta((shape[0],), torch.float64), _meta((shape[0], 3), torch.float64)
        case = f"shard {name} {dtype} weight={weighted} softcap={softcap} smoothing={smoothing}"
        yield case, partial(op("triton_cross_entropy_shard_stats"), x, target, weight, 0, -100, softcap, smoothing)
        yield case, partial(op("triton_cross_entropy_shard_backward"), x, target, weight, lse, coeffs, 0, -100, softcap)

    seed = _meta((1,), torch.int64)
    gumbel_layouts = {"[4,3]": ((4, 3), -1), "[4,50257]": ((4, 50257), -1), "[2,128256,3] dim1": ((2, 128256, 3), 1)}
    gumbel_layouts["[1,2^31] wide"] = ((1, 2**31), -1)
    options = itertools.product(dtypes, flags, flags, (0, 2**40))  # Philox offsets as i32 and i64
    for (name, (shape, dim)), (dtype, hard, keep_soft, offset) in itertools.product(gumbel_layouts.items(), options):
        case = f"gumbel {name} {dtype} hard={hard} keep_soft={keep_soft} offset={offset}"
        yield (
            case,
            partial(op("triton_gumbel_softmax_forward"), _meta(shape, dtype), seed, offset, 0.5, hard, keep_soft, dim),
        )
    for offset in (0, 2**40):
        yield f"philox offset={offset}", partial(op("triton_philox_uniform"), seed, offset, 5000)

    topk_shapes = {"[4,3] k=2": ((4, 3), 2), "[8,64] k=8": ((8, 64), 8), "[4,50257] k=200": ((4, 50257), 200)}
    topk_shapes["[2,128256] k=2048"] = ((2, 128256), 2048)
    topk_shapes["[1,2^31] k=4 wide"] = ((1, 2**31), 4)
    topk_shapes["[1,2^23] k=2^23"] = ((1, 2**23), 2**23)  # more tiles of k than grid y could take
    for (name, (shape, k)), dtype, renorm in itertools.product(topk_shapes.items(), dtypes, flags):
        x = _meta(shape, dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        w, idx, lse = _meta((shape[0], k), acc), _meta((shape[0], k), torch.int64), _meta((shape[0],), acc)
        case = f"topk {name} {dtype} renormalize={renorm}"
        yield case, partial(op("triton_topk_softmax_forward"), x, k, renorm, 2.0)
        yield case, partial(op("triton_topk_softmax_backward"), w, x, w, idx, lse, renorm, 2.0)


# ----------------------------------------------------------------------------------------
# 3. Specializations, coverage and the covering subset
# ----------------------------------------------------------------------------------------


def _binder(kernel, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    return target, backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def pack(launch: Launch, arch: int):
    """What ``JITFunction.run`` would compile for this launch on ``arch``: (target, source, options)."""
    from triton.compiler import ASTSource

    target, backend, binder = _binder(launch.kernel, arch)
    kwargs = dict(launch.kwargs, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, kwargs, bound, specialization, options)
    return target, ASTSource(launch.kernel, signature, constexprs, attrs), options


def specialize(launch: Launch) -> Spec:
    _, backend, binder = _binder(launch.kernel, ARCHS[-1])
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    features, covered, blocks = {}, set(), [0]
    for param, (kind, value) in zip(launch.kernel.params, specialization, strict=True):
        if kind != "constexpr":
            features[param.name] = f"{kind}{'/16' if value == 'D' else ''}"
            covered.add((param.name, kind))  # i32 or i64
        else:
            features[param.name] = repr(value)
            if not param.is_constexpr or isinstance(value, bool):
                covered.add((param.name, repr(value)))  # a flag, or an int argument equal to 1 (a unit stride)
            elif re.search("BLOCK|TILE", param.name):
                blocks.append(value)
    for option in ("num_warps", "num_stages"):
        features[option] = launch.kwargs.get(option, "default")
    # The dtype a kernel works on: its logits' (x), else its gradient's (dx), else its first float pointer.
    pointers = {p.name: kind[1:] for p, (kind, _) in zip(launch.kernel.params, specialization, strict=True)}
    floats = [name for name, t in pointers.items() if t in ("fp32", "bf16", "fp16", "fp64")]
    main = next((name for name in ("x_ptr", "dx_ptr") if name in floats), floats[0] if floats else None)
    dtype = pointers[main] if main else "-"
    return Spec(launch.kernel.fn.__name__, dtype, features, frozenset(covered), max(blocks), launch)


def kernels_defined() -> dict:
    """{name: JITFunction} of every launchable kernel (``*_kernel``) in alchemy_ops.triton."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    package = importlib.import_module("alchemy_ops.triton")
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"alchemy_ops.triton.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                found[name] = value
    return found


def coverage_errors(specs: list[Spec], launches: list[Launch]) -> list[str]:
    errors = []
    by_kernel = defaultdict(list)
    for spec in specs:
        by_kernel[spec.name].append(spec)
    for name in sorted(set(kernels_defined()) - set(by_kernel)):
        errors.append(f"{name}: never launched by the sweep")
    for name, group in sorted(by_kernel.items()):
        flags = {p.name for p in group[0].launch.kernel.params if p.is_constexpr}
        for flag in sorted(flags - ONE_VALUED_FLAGS):
            values = {s.features[flag] for s in group}
            if values & {"True", "False"} and values != {"True", "False"}:
                errors.append(f"{name}: constexpr {flag} only ever {values.pop()}")
        dtypes = {s.dtype for s in group}
        if name != "_philox_uniform_kernel" and dtypes != {"fp32", "bf16", "fp16", "fp64"}:
            errors.append(f"{name}: launched only for {sorted(dtypes)}")
    for launch in launches:
        grid = launch.grid + (1,) * (3 - len(launch.grid))
        if any(g > limit for g, limit in zip(grid, GRID_LIMITS, strict=True)):
            errors.append(f"{launch.kernel.fn.__name__}: grid {launch.grid} over CUDA's limits ({launch.case})")
    return errors


def covering_subset(specs: list[Spec]) -> list[Spec]:
    """Per kernel x dtype: the heaviest specialization (most flags on, then the largest BLOCK) and
    the one with the smallest BLOCK, then greedily the one covering most features not yet covered
    (each flag value, unit or strided stride, int32 or int64 scalar), until all that occur are."""
    groups = defaultdict(list)
    for spec in specs:
        groups[(spec.name, spec.dtype)].append(spec)
    chosen = []
    for group in groups.values():

        def weight(spec: Spec) -> tuple:
            return (sum(value == "True" for _, value in spec.covered), spec.block)

        picks = [max(group, key=weight), min(group, key=lambda s: (s.block, weight(s)))]
        todo = set().union(*(s.covered for s in group)) - picks[0].covered - picks[1].covered
        while todo:
            picks.append(max(group, key=lambda s: (len(s.covered & todo), weight(s))))
            todo -= picks[-1].covered
        chosen.extend({id(p): p for p in picks}.values())
    return chosen


# ----------------------------------------------------------------------------------------
# 4. Compile, in 2 processes
# ----------------------------------------------------------------------------------------

_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_JOBS: list = []  # (spec, arch), set before the pool forks


def compile_one(index: int) -> dict:
    from triton import knobs
    from triton.compiler import compile

    spec, arch = _JOBS[index]
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report goes to stdout
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
    result = {"kernel": spec.name, "dtype": spec.dtype, "arch": f"sm_{arch}", "case": spec.launch.case}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        target, source, options = pack(spec.launch, arch)
        with contextlib.redirect_stdout(log):
            compiled = compile(source, target=target, options=options.__dict__)
    except Exception as e:  # a compile error is a result here, reported in the table
        lines = [line for line in str(e).splitlines() if line.strip()]  # Triton's ends with the cause
        result["error"] = f"{type(e).__name__}: {lines[0] if lines else ''} {lines[-1] if len(lines) > 1 else ''}"
        return result
    report = log.getvalue()
    props, regs = _PROPS.search(report), _REGS.search(report)
    if props is None or regs is None:
        result["error"] = "no ptxas -v report"
        return result
    result.update(
        registers=int(regs.group(1)),
        stack=int(props.group(1)),
        spills=int(props.group(2)) + int(props.group(3)),
        shared=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
        seconds=time.perf_counter() - start,
    )
    return result


def compile_all(specs: list[Spec], jobs: int) -> list[dict]:
    _JOBS[:] = [(spec, arch) for spec in specs for arch in ARCHS]
    results = []
    with multiprocessing.get_context("fork").Pool(max(jobs, 1)) as pool:
        for result in pool.imap_unordered(compile_one, range(len(_JOBS))):
            results.append(result)
            if len(results) % 20 == 0 or len(results) == len(_JOBS):
                print(f"triton-check: {len(results)}/{len(_JOBS)} compiled", flush=True)
    return results


def print_table(results: list[dict]) -> None:
    rows = defaultdict(list)
    for r in results:
        rows[(r["kernel"], r["arch"])].append(r)
    print(f"{'arch':6} {'configs':>7} {'errors':>6} {'max regs':>8} {'spill B':>7} {'stack':>5} {'smem B':>6}  kernel")
    for (kernel, arch), group in sorted(rows.items()):
        ok = [r for r in group if "error" not in r]
        print(
            f"{arch:6} {len(group):>7} {len(group) - len(ok):>6} {max((r['registers'] for r in ok), default=0):>8} "
            f"{max((r['spills'] for r in ok), default=0):>7} {max((r['stack'] for r in ok), default=0):>5} "
            f"{max((r['shared'] for r in ok), default=0):>6}  {kernel}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="compile every distinct specialization, not a cover")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--kernel", default="", help="only compile kernels whose name matches this regex")
    parser.add_argument("--list", action="store_true", help="only list the configurations to compile")
    parser.add_argument("--verbose", action="store_true", help="print every compiled configuration")
    args = parser.parse_args()
    start = time.perf_counter()

    launches = record(import_launchers())
    distinct = list({spec.key: spec for spec in map(specialize, launches)}.values())
    errors = coverage_errors(distinct, launches)
    specs = [s for s in (distinct if args.all else covering_subset(distinct)) if re.search(args.kernel, s.name)]
    print(
        f"triton-check: {len(launches)} launches recorded, {len(distinct)} distinct specializations, "
        f"compiling {len(specs)} for {', '.join(f'sm_{a}' for a in ARCHS)} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    if args.list:
        for spec in specs:
            print(f"  {spec.name} [{spec.dtype}] <- {spec.launch.case}")
        for error in errors:
            print(f"  coverage: {error}")
        return
    results = compile_all(specs, args.jobs)
    print_table(results)
    bad = [r for r in results if "error" in r or r["spills"] or r["stack"]]
    for r in results if args.verbose else bad:
        what = r.get("error") or f"{r['registers']} regs, {r['spills']} B spilled, {r['stack']} B stack"
        print(f"  {r['arch']} {r['kernel']} [{r['dtype']}] {r.get('num_warps', '?')} warps: {what}  <- {r['case']}")
    for error in errors:
        print(f"  coverage: {error}")
    elapsed = time.perf_counter() - start
    print(f"triton-check: {len(results)} compiles in {elapsed:.0f} s")
    if bad or errors:
        sys.exit(f"triton-check: {len(bad)} compile errors or spills, {len(errors)} coverage errors (see above)")
    print("triton-check: ok")


if __name__ == "__main__":
    main()
