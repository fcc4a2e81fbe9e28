"""Shared fixtures: backends available here, the per-dtype tolerance table, poisoned allocations."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which must be chosen
# before triton is imported: set it here so a plain `pytest` never silently drops the backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import alchemy_ops as ao  # noqa: E402
from alchemy_ops._backend import current_backend  # noqa: E402


def _poison_cpu_allocations() -> None:
    # c10's junk fill: every CPU allocation starts as NaN (fp32) or garbage (other dtypes),
    # so an output element a kernel forgets to write cannot pass as a stale right answer.
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_cpu_allocator_do_junk_fill").value = True


_poison_cpu_allocations()

BACKENDS = ao.available_backends()
# The CUDA variants are collected everywhere and skipped only where no GPU is visible, so a CPU-only
# machine still sees (and tests/test_cuda_collection.py counts) the CUDA test set.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

# (atol, rtol) against a float64 reference computed from the same (rounded) inputs. bf16's entry is
# several units in the last place, for results that pass through more than one rounding; that a
# single output is rounded to nearest (and where Triton's interpreter truncates) is
# tests/test_bf16_rounding.py's to check.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 1.6e-2),
    torch.float16: (4e-3, 2e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compares in float64; ``scale`` widens atol for values whose magnitude is ~scale."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, equal_nan=True)


def triton_interpreted() -> bool:
    """Whether the current backend is Triton run by its CPU interpreter (milliseconds per launch)."""
    return current_backend() == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def gradcheck(fn, inputs: tuple) -> bool:
    """torch.autograd.gradcheck; under Triton's interpreter in fast mode (v^T J u against the
    numerical one for random u, v: a few launches instead of two per input element)."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=triton_interpreted())


def gradgradcheck(fn, inputs: tuple) -> bool:
    """torch.autograd.gradgradcheck, in fast mode under Triton's interpreter (see gradcheck)."""
    return torch.autograd.gradgradcheck(fn, inputs, fast_mode=triton_interpreted())


def to_device(obj, device: str):
    """``obj`` with every CPU tensor in it (also inside tuples, lists and dicts) moved to ``device``;
    tensors elsewhere (the meta tensors of the device-mismatch cases) stay where they are."""
    if torch.is_tensor(obj):
        return obj.to(device) if obj.device.type == "cpu" else obj
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@pytest.fixture(params=BACKENDS)
def backend(request):
    with ao.backend(request.param):
        yield request.param


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _runs_triton_on_cpu(item: pytest.Item) -> bool:
    params = getattr(item, "callspec", None)
    params = params.params if params else {}
    backend_name = params.get("backend", params.get("backend_name"))
    return backend_name == "triton" and params.get("device", "cpu") == "cpu"


def pytest_collection_modifyitems(config, items):
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    # On a GPU box Triton compiles for the GPU; CPU tensors need its interpreter, chosen before import.
    interpreter = pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="Triton runs CPU tensors only under TRITON_INTERPRET=1 (make test sets it)",
    )
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(cuda)
        if _runs_triton_on_cpu(item):
            item.add_marker(interpreter)
    # Slow tests (minutes of CPU here) run only when a -m expression is given, e.g. `-m slow` or
    # make gpu-check's `-m "cuda or slow"`.
    if not config.option.markexpr:
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]


class RecordedTensor(torch.Tensor):
    """A tensor subclass that records the functions called on it: the direct _C entries skip
    torch.ops' __torch_function__ handling, so subclasses must not take them."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class RecordingMode(torch.overrides.TorchFunctionMode):
    """A torch-function mode that records the functions called under it (see RecordedTensor)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def backward_under_compiled_autograd(loss_fn) -> list[str]:
    """Runs ``loss_fn().backward()`` under compiled autograd (as
    ``torch._dynamo.config.compiled_autograd = True`` does in a compiled training step) and returns
    the code of the backward graphs it captured: a node that compiled autograd cannot trace shows
    up as a missing call or an error."""
    from torch._dynamo import compiled_autograd

    graphs = []

    def compiler(gm):
        graphs.append(gm.code)
        return torch.compile(gm, backend="eager", fullgraph=True)

    with compiled_autograd._enable(compiler):
        loss_fn().backward()
    return graphs
