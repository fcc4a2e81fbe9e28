"""What ``import alchemy_ops`` says when the compiled extension cannot load: each cause on disk
(source tree without a build, an installed copy hidden by it, no build at all, a build for another
Python, a build against another torch) gets its own message naming the fix. Each case imports a
temporary copy of the package in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import alchemy_ops

PACKAGE = Path(alchemy_ops.__file__).parent
# The part of the name Python looks for, e.g. .cpython-311-x86_64-linux-gnu.so
THIS_PYTHON_SUFFIX = next(name for name in os.listdir(PACKAGE) if name.startswith("_C."))[2:]


def copy_package(root: Path, source_tree: bool) -> Path:
    """alchemy_ops without its compiled extension under ``root``; with setup.py and csrc/ beside it
    when ``source_tree``."""
    root.mkdir(parents=True)
    shutil.copytree(PACKAGE, root / "alchemy_ops", ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    if source_tree:
        (root / "setup.py").write_text("")
        (root / "csrc").mkdir()
    return root / "alchemy_ops"


def import_error(cwd: Path, pythonpath: str | None = None) -> str:
    """The last line of stderr of ``import alchemy_ops`` run in ``cwd`` (first on sys.path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run(
        [sys.executable, "-c", "import alchemy_ops"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0, "the import was expected to fail"
    return result.stderr.strip().splitlines()[-1]


def test_source_tree_without_build(tmp_path):
    copy_package(tmp_path / "src", source_tree=True)
    message = import_error(tmp_path / "src")
    assert f"from the source tree at {tmp_path / 'src'}, which has no compiled extension" in message
    assert "make build" in message and "build_ext --inplace" in message and "another directory" in message
    assert "hidden" not in message and "another torch" not in message


def test_source_tree_hiding_an_installed_copy(tmp_path):
    copy_package(tmp_path / "src", source_tree=True)
    installed = copy_package(tmp_path / "site", source_tree=False)
    (installed / f"_C{THIS_PYTHON_SUFFIX}").write_bytes(b"")
    message = import_error(tmp_path / "src", pythonpath=str(tmp_path / "site"))
    assert f"An installed alchemy_ops at {installed} is hidden by this folder" in message
    assert "build_ext --inplace" in message


def test_installed_without_extension(tmp_path):
    package = copy_package(tmp_path / "site", source_tree=False)
    message = import_error(tmp_path / "site")
    assert f"alchemy_ops._C is missing from {package}" in message
    assert "pip install --no-build-isolation" in message


def test_extension_built_for_another_python(tmp_path):
    package = copy_package(tmp_path / "site", source_tree=False)
    (package / "_C.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")
    message = import_error(tmp_path / "site")
    assert "was built for another Python" in message
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in message


def test_extension_built_against_another_torch(tmp_path):
    """A library with an unresolved symbol fails to load exactly as a build against another torch
    does (``undefined symbol``)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a library with an unresolved symbol")
    package = copy_package(tmp_path / "site", source_tree=False)
    source = tmp_path / "stub.c"
    source.write_text(
        "extern void c10_symbol_of_another_torch(void);\nvoid PyInit__C(void) { c10_symbol_of_another_torch(); }\n"
    )
    subprocess.run(
        [compiler, "-shared", "-fPIC", str(source), "-o", str(package / f"_C{THIS_PYTHON_SUFFIX}")], check=True
    )
    message = import_error(tmp_path / "site")
    assert f"was built against another torch than the torch {torch.__version__} imported here" in message
    assert "undefined symbol: c10_symbol_of_another_torch" in message
    assert "source tree" not in message
