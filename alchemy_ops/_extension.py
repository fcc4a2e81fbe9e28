"""Loads the compiled operator library ``alchemy_ops._C`` and checks it fits this CPU."""

from __future__ import annotations

import importlib.machinery
import os
import sys

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _extension_files(package_dir: str) -> list[str]:
    return sorted(name for name in os.listdir(package_dir) if name.startswith("_C.") and name.endswith((".so", ".pyd")))


def _installed_copies(source_root: str) -> list[str]:
    """Other directories on sys.path holding an alchemy_ops package with a compiled extension."""
    copies = []
    for entry in sys.path:
        root = os.path.abspath(entry or os.curdir)
        package = os.path.join(root, "alchemy_ops")
        if root != source_root and os.path.isdir(package) and _extension_files(package):
            copies.append(package)
    return copies


def _import_error_message(error: ImportError) -> str:
    """Why ``alchemy_ops._C`` did not load and what to do, told apart by what is on disk."""
    built = _extension_files(_PACKAGE_DIR)
    loadable = [name for name in built if name[len("_C") :] in importlib.machinery.EXTENSION_SUFFIXES]
    source_root = os.path.dirname(_PACKAGE_DIR)
    in_source_tree = os.path.isfile(os.path.join(source_root, "setup.py")) and os.path.isdir(
        os.path.join(source_root, "csrc")
    )
    if not built and in_source_tree:
        copies = _installed_copies(source_root)
        elsewhere = (
            f" An installed alchemy_ops at {copies[0]} is hidden by this folder, which comes first on sys.path."
            if copies
            else ""
        )
        return (
            f"alchemy_ops: you are importing alchemy_ops from the source tree at {source_root}, which has no "
            f"compiled extension (no alchemy_ops/_C*.so).{elsewhere} Build it in place with `make build` (or "
            "`python setup.py build_ext --inplace`), or run from another directory to use the installed package."
        )
    if not built:
        return (
            f"alchemy_ops: the compiled extension alchemy_ops._C is missing from {_PACKAGE_DIR}. Reinstall it "
            "from its source with `pip install --no-build-isolation .` in an environment that has torch."
        )
    if not loadable:
        return (
            f"alchemy_ops: the compiled extension in {_PACKAGE_DIR} ({', '.join(built)}) was built for another "
            f"Python; this is Python {sys.version_info.major}.{sys.version_info.minor}, which loads "
            f"{importlib.machinery.EXTENSION_SUFFIXES[0]}. Rebuild it with this Python (`make build`, or "
            "`pip install --no-build-isolation .`)."
        )
    if "undefined symbol" in str(error):
        return (
            f"alchemy_ops: the compiled extension {os.path.join(_PACKAGE_DIR, loadable[0])} was built against "
            f"another torch than the torch {torch.__version__} imported here ({error}). Rebuild it against this "
            "torch: `make build` (or `python setup.py build_ext --inplace`) in a checkout, else "
            "`pip install --no-build-isolation --force-reinstall .`."
        )
    return f"alchemy_ops: the compiled extension {os.path.join(_PACKAGE_DIR, loadable[0])} failed to load: {error}"


try:
    from . import _C  # registers the alchemy_ops::* operators
except ImportError as e:  # depends on the install; tests/test_transformers.py checks each message
    raise ImportError(_import_error_message(e)) from e

_CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")


def _cpu_supports(capability: str) -> bool:
    if capability == "AVX512":
        return bool(torch.cpu._is_avx512_supported())
    if capability == "AVX2":
        return bool(torch.cpu._is_avx2_supported())
    return True


if not _cpu_supports(_C.cpu_capability):
    raise ImportError(
        f"alchemy_ops was compiled for {_C.cpu_capability} but this CPU lacks it. Rebuild on this machine, or "
        "set ALCHEMY_OPS_CPU_CAPABILITY=AVX2 (or DEFAULT) when building for older CPUs."
    )

CPU_CAPABILITY: str = _C.cpu_capability
WITH_CUDA: bool = bool(_C.with_cuda)
