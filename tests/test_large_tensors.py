"""Tensors with more than 2^31 elements: every element offset past 2^31 must be computed in 64 bits.

bf16 ``[2^15 + 1, 2^16]`` holds 2^31 + 2^16 elements (4.3 GB): its last row starts at offset 2^31, so a
kernel that forms ``row * row_stride`` in 32 bits reads or writes the wrong row (or out of bounds) for
it. Its transposed view has the class dim strided by 2^16 with ``(C - 1) * stride = 2^31``. The
float64 reference is computed on a sample of rows only (a full fp64 copy would take 17 GB).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import alchemy_ops as ao

ROWS, COLS = 2**15 + 1, 2**16
# The first and last rows of the buffer and of its transposed view, and a few between: the last row
# (transposed: every row) touches offsets >= 2^31.
SAMPLE_ROWS = [0, 1, 12345, ROWS - 2, ROWS - 1]
SAMPLE_COLS = [0, 1, 40000, COLS - 2, COLS - 1]

# The CPU interpreter would take hours on 2^31 elements: Triton runs here on a GPU only.
DEVICE_BACKENDS = [
    ("cpu", "cpp"),
    pytest.param("cuda", "cpp", marks=pytest.mark.cuda),
    pytest.param("cuda", "triton", marks=pytest.mark.cuda),
]


@pytest.fixture(scope="module")
def huge_logits():
    """``huge_logits(device)``: bf16 [2^15 + 1, 2^16] random logits (spread 3), made once per device;
    only one device's buffer is kept at a time."""
    made: dict[str, torch.Tensor] = {}

    def get(device: str) -> torch.Tensor:
        if device not in made:
            made.clear()
            gen = torch.Generator(device=device).manual_seed(0)
            made[device] = torch.randn(ROWS, COLS, dtype=torch.bfloat16, device=device, generator=gen).mul_(3)
        return made[device]

    yield get
    made.clear()


def _targets(positions: int, classes: int, device) -> torch.Tensor:
    return torch.randint(0, classes, (positions,), generator=torch.Generator().manual_seed(1)).to(device)


def _check_cross_entropy(x: torch.Tensor, target: torch.Tensor, sample: list[int]) -> None:
    """Loss per position and gradient of the summed loss on the sampled positions, against float64."""
    logits = x.detach().requires_grad_()  # a new leaf sharing x's storage: the buffer is not copied
    loss = ao.cross_entropy(logits, target, reduction="none")
    loss.backward(torch.ones_like(loss))  # gradient of the sum: p - onehot, values of order 1
    rows = x[sample].double().requires_grad_()
    expected = F.cross_entropy(rows, target[sample], reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), rows)
    assert_close(loss[sample], expected, torch.bfloat16, scale=expected.abs().max().item())
    assert_close(logits.grad[sample], expected_grad, torch.bfloat16)


@pytest.mark.parametrize(("device", "backend_name"), DEVICE_BACKENDS)
def test_cross_entropy_past_2_to_the_31_elements(huge_logits, device, backend_name):
    with ao.backend(backend_name):
        _check_cross_entropy(huge_logits(device), _targets(ROWS, COLS, device), SAMPLE_ROWS)


@pytest.mark.parametrize(("device", "backend_name"), DEVICE_BACKENDS)
def test_cross_entropy_with_class_stride_past_2_to_the_31(huge_logits, device, backend_name):
    transposed = huge_logits(device).t()  # [2^16, 2^15 + 1], class stride 2^16
    with ao.backend(backend_name):
        _check_cross_entropy(transposed, _targets(COLS, ROWS, device), SAMPLE_COLS)


@pytest.mark.parametrize(("device", "backend_name"), DEVICE_BACKENDS)
@pytest.mark.parametrize("log", [True, False], ids=["log_softmax", "softmax"])
def test_softmax_with_class_stride_past_2_to_the_31(huge_logits, device, backend_name, log):
    transposed = huge_logits(device).t()  # [2^16, 2^15 + 1], class stride 2^16
    fn, reference = (ao.log_softmax, torch.log_softmax) if log else (ao.softmax, torch.softmax)
    with ao.backend(backend_name):
        y = fn(transposed, -1)
    expected = reference(transposed[SAMPLE_COLS].double(), -1)
    assert_close(y[SAMPLE_COLS], expected, torch.bfloat16, scale=expected.abs().max().item())
