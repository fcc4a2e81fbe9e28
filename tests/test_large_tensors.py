"""Tensors with more than 2^31 elements: every element offset past 2^31 must be computed in 64 bits.

bf16 ``[2^15 + 1, 2^16]`` holds 2^31 + 2^16 elements (4.3 GB): its last row starts at offset 2^31, so a
kernel that forms ``row * row_stride`` in 32 bits reads or writes the wrong row (or out of bounds) for
it. Its transposed view has the class dim strided by 2^16 with ``(C - 1) * stride = 2^31``. The
float64 reference is computed on a sample of rows only (a full fp64 copy would take 17 GB).

The rows of the buffer repeat with a period of 521 (random rows, copied: drawing 2^31 normals takes
20 CPU-seconds): row 2^15, the first past 2^31, is row 464 of the period, so a wrapped offset that
lands on row 0 reads different values.

On CPU the full transposed view is read one element per cache line (~100 ns an element here), so those
cases are marked slow (deselected unless `-m slow`; `make gpu-check` runs them); the thin strided views
reach the same offsets in a second and run by default.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import alchemy_ops as ao

ROWS, COLS, PERIOD = 2**15 + 1, 2**16, 521
# The first and last rows of the buffer and a few between: the last row lies past offset 2^31.
SAMPLE_ROWS = [0, 1, 12345, ROWS - 2, ROWS - 1]
# Every 8191st column: 9 positions of the transposed view (columns 0 to 65528), each spanning all rows.
THIN_STEP = 8191
SAMPLE_COLS = [0, 1, 40000, COLS - 2, COLS - 1]

# The CPU interpreter would take hours on 2^31 elements: Triton runs here on a GPU only.
DEVICE_BACKENDS = [
    ("cpu", "cpp"),
    pytest.param("cuda", "cpp", marks=pytest.mark.cuda),
    pytest.param("cuda", "triton", marks=pytest.mark.cuda),
]


@pytest.fixture(scope="module")
def huge_logits():
    """``huge_logits(device)``: bf16 [2^15 + 1, 2^16] random logits (spread 3, rows repeating every 521),
    made once per device; only one device's buffer is kept at a time."""
    made: dict[str, torch.Tensor] = {}

    def get(device: str) -> torch.Tensor:
        if device not in made:
            made.clear()
            gen = torch.Generator(device=device).manual_seed(0)
            period = torch.randn(PERIOD, COLS, device=device, generator=gen).mul_(3).to(torch.bfloat16)
            x = torch.empty(ROWS, COLS, dtype=torch.bfloat16, device=device)
            for start in range(0, ROWS, PERIOD):
                x[start : start + PERIOD] = period[: ROWS - start]
            assert x.numel() > 2**31 and not torch.equal(x[ROWS - 1], x[0])
            made[device] = x
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


def _check_softmax(x: torch.Tensor, sample: list[int], log: bool) -> None:
    """Forward on the sampled rows and, for a thin view, backward, against float64."""
    fn, reference = (ao.log_softmax, torch.log_softmax) if log else (ao.softmax, torch.softmax)
    xr = x.detach().requires_grad_()
    y = fn(xr, -1)
    rows = x[sample].double().requires_grad_()
    expected = reference(rows, -1)
    assert_close(y[sample], expected, torch.bfloat16, scale=expected.abs().max().item())
    if x.shape[0] <= 16:  # backward allocates logits-sized tensors: only on the thin views
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x)
        y.backward(upstream)
        (expected_grad,) = torch.autograd.grad(expected, rows, upstream[sample].double())
        assert_close(xr.grad[sample], expected_grad, torch.bfloat16, scale=expected_grad.abs().max().item())


@pytest.mark.parametrize(("device", "backend_name"), DEVICE_BACKENDS)
def test_cross_entropy_past_2_to_the_31_elements(huge_logits, device, backend_name):
    with ao.backend(backend_name):
        _check_cross_entropy(huge_logits(device), _targets(ROWS, COLS, device), SAMPLE_ROWS)


@pytest.mark.parametrize(("device", "backend_name"), DEVICE_BACKENDS)
def test_cross_entropy_with_class_stride_past_2_to_the_31(huge_logits, device, backend_name):
    thin = huge_logits(device).t()[::THIN_STEP]  # [9, 2^15 + 1]: class stride 2^16, position stride 8191
    assert (thin.shape[1] - 1) * thin.stride(1) >= 2**31
    with ao.backend(backend_name):
        _check_cross_entropy(thin, _targets(thin.shape[0], ROWS, device), list(range(thin.shape[0])))


@pytest.mark.parametrize(("device", "backend_name"), DEVICE_BACKENDS)
@pytest.mark.parametrize("log", [True, False], ids=["log_softmax", "softmax"])
def test_softmax_with_class_stride_past_2_to_the_31(huge_logits, device, backend_name, log):
    thin = huge_logits(device).t()[::THIN_STEP]
    with ao.backend(backend_name):
        _check_softmax(thin, list(range(thin.shape[0])), log)


@pytest.mark.slow
@pytest.mark.parametrize(("device", "backend_name"), DEVICE_BACKENDS)
def test_cross_entropy_of_the_whole_transposed_view(huge_logits, device, backend_name):
    """Every read and every gradient write at a class stride of 2^16, past offset 2^31."""
    with ao.backend(backend_name):
        _check_cross_entropy(huge_logits(device).t(), _targets(COLS, ROWS, device), SAMPLE_COLS)


@pytest.mark.slow
@pytest.mark.parametrize(("device", "backend_name"), DEVICE_BACKENDS)
@pytest.mark.parametrize("log", [True, False], ids=["log_softmax", "softmax"])
def test_softmax_of_the_whole_transposed_view(huge_logits, device, backend_name, log):
    """The output has the input's strided layout: writes past offset 2^31 too."""
    with ao.backend(backend_name):
        _check_softmax(huge_logits(device).t(), SAMPLE_COLS, log)
