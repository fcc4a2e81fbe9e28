"""`make cuda-check`: build the CUDA kernels without a GPU and check them statically.

1. Builds alchemy_ops._C with its CUDA kernels (FORCE_CUDA=1, sm_80 and sm_90,
   `-Xptxas -v`) into build/cuda-check/, apart from the in-place CPU build.
2. Parses ptxas' report: prints registers / spills / stack per kernel and arch, and
   fails on any spill store, spill load or stack frame.
3. Imports that build and checks every operator in the schema has a CUDA kernel.
4. Runs tools/triton_check.py: every Triton kernel compiled for sm_80 and sm_90 at the
   launchers' real specializations, its own table, failing on compile errors and spills.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "cuda-check"
PKG = OUT / "pkg"


def build() -> str:
    import torch

    if torch.version.cuda is None:
        sys.exit("cuda-check: this venv's torch is a CPU build; it needs the CUDA build (requirements/cuda-check.txt)")
    # nvcc 13's toolkit lacks the cuBLAS/cuSPARSE headers ATen/cuda/CUDAContext.h includes; the
    # CUDA torch wheel's nvidia packages ship them.
    nvidia = [str(p) for p in Path(torch.__file__).parent.parent.glob("nvidia/cu*/include")]
    env = dict(
        os.environ,
        FORCE_CUDA="1",
        TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"),
        ALCHEMY_OPS_NVCC_FLAGS="-Xptxas -v",
        ALCHEMY_OPS_EXTRA_INCLUDE=os.pathsep.join(nvidia),
    )
    for obj in (OUT / "tmp").rglob("*.o"):  # ptxas only reports on what it compiles
        if obj.parent.name == "cuda":
            obj.unlink()
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(PKG), "--build-temp", str(OUT / "tmp")]
    print("cuda-check: building CUDA kernels for", env["TORCH_CUDA_ARCH_LIST"], flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (OUT / "build.log").write_text(log)
    if proc.returncode != 0:
        print(log[-20000:])
        sys.exit(f"cuda-check: build failed (full log: {OUT / 'build.log'})")
    return log


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_table(log: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2)}
            rows.append(current)
        elif current is not None and (m := _PROPS.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _REGS.search(line)):
            current["registers"] = int(m.group(1))
    return rows


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def check_registrations() -> list[str]:
    """Imports the CUDA build and returns the operators without a CUDA kernel."""
    code = (
        "import torch, alchemy_ops\n"
        "names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith('alchemy_ops::')]\n"
        "assert names, 'no alchemy_ops operators registered'\n"
        "missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, 'CUDA')]\n"
        "print('\\n'.join(f'  {n}: CUDA kernel ' + ('MISSING' if n in missing else 'ok') for n in sorted(names)))\n"
        "assert alchemy_ops._extension.WITH_CUDA, 'extension reports it was built without CUDA'\n"
        "raise SystemExit(1 if missing else 0)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(PKG))
    return subprocess.run([sys.executable, "-c", code], cwd=OUT, env=env).returncode


def main() -> None:
    shutil.copytree(
        ROOT / "alchemy_ops",
        PKG / "alchemy_ops",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    rows = ptxas_table(build())
    if not rows:
        sys.exit("cuda-check: ptxas reported no kernels; was -Xptxas -v passed?")
    bad = [r for r in rows if r.get("spill_stores", 0) or r.get("spill_loads", 0) or r.get("stack", 0)]
    names = demangle([r["kernel"] for r in rows])
    print(f"{'arch':6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
    for r, name in sorted(zip(rows, names, strict=True), key=lambda p: (p[1], p[0]["arch"])):
        short = re.sub(r"\(.*", "", name.replace("alchemy::cuda::(anonymous namespace)::", ""))
        print(
            f"{r['arch']:6} {r.get('registers', 0):>4} {r.get('stack', 0):>5} {r.get('spill_stores', 0):>8} "
            f"{r.get('spill_loads', 0):>8}  {short}"
        )
    print(f"cuda-check: {len(rows)} kernel builds checked")
    print("cuda-check: operator registrations of the CUDA build:")
    status = check_registrations()
    print("cuda-check: the Triton kernels, compiled ahead of time:", flush=True)
    triton_status = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_check.py")], cwd=ROOT).returncode
    if bad:
        sys.exit(f"cuda-check: {len(bad)} kernel builds spill registers or use a stack frame (see table)")
    if status != 0:
        sys.exit("cuda-check: some operators have no CUDA kernel (see list)")
    if triton_status != 0:
        sys.exit("cuda-check: the Triton check failed (see its table)")
    print("cuda-check: ok")


if __name__ == "__main__":
    main()
