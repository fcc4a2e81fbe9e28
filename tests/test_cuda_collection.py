"""The CUDA test set is collected on every machine (and skipped only without a GPU), so it is checked
here that it exists and cannot silently shrink: every device-parametrized test has its CUDA twin,
marked `cuda` (what `make gpu-check` selects), and each op's file keeps at least today's count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# CUDA test items per file when this check was written (2026-11-30); more is fine, fewer is a regression.
MIN_CUDA_ITEMS = {
    "tests/test_softmax.py": 772,
    "tests/test_softmax_properties.py": 6,
    "tests/test_cross_entropy.py": 2358,
    "tests/test_cross_entropy_properties.py": 3,
    "tests/test_cross_entropy_shard.py": 345,
    "tests/test_gumbel_softmax.py": 320,
    "tests/test_topk_softmax.py": 368,
    "tests/test_linear_cross_entropy.py": 291,
    "tests/test_large_tensors.py": 8,
    "tests/test_cuda_matches_cpu.py": 268,
}

# Collects in a fresh interpreter and prints [node id, marked cuda] for every item.
_COLLECT = """
import json, sys
import pytest

class Items:
    def pytest_collection_finish(self, session):
        self.items = [[i.nodeid, i.get_closest_marker("cuda") is not None] for i in session.items]

items = Items()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]], plugins=[items])
print("ITEMS" + json.dumps(items.items))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def collected() -> dict[str, bool]:
    proc = subprocess.run(
        [sys.executable, "-c", _COLLECT, *MIN_CUDA_ITEMS], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("ITEMS"))
    return dict(json.loads(line.removeprefix("ITEMS")))


def _params(node_id: str) -> list[str]:
    return node_id[node_id.index("[") + 1 : -1].split("-") if node_id.endswith("]") else []


def test_each_op_file_keeps_its_cuda_tests(collected):
    counts = {
        path: sum(cuda for node, cuda in collected.items() if node.startswith(path + "::")) for path in MIN_CUDA_ITEMS
    }
    shrunk = {path: (counts[path], least) for path, least in MIN_CUDA_ITEMS.items() if counts[path] < least}
    assert not shrunk, f"CUDA tests lost (collected, expected at least): {shrunk}"


def test_every_device_parametrized_test_has_a_cuda_twin_marked_cuda(collected):
    cpu_items = [node for node in collected if "cpu" in _params(node)]
    assert len(cpu_items) > 1000  # the device parameter is threaded through the op tests
    for node in cpu_items:
        params = _params(node)
        params[params.index("cpu")] = "cuda"
        twin = node[: node.index("[") + 1] + "-".join(params) + "]"
        assert collected.get(twin) is True, f"{node} has no CUDA twin marked cuda ({twin})"


def test_cuda_params_are_marked_cuda(collected):
    unmarked = [node for node, cuda in collected.items() if "cuda" in _params(node) and not cuda]
    assert not unmarked, f"CUDA variants without the cuda marker (not run by make gpu-check): {unmarked[:5]}"
