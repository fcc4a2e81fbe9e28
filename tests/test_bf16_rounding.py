"""bf16 outputs of our kernels are the exact result rounded once: within half a unit in the last place
(plus the fp32 arithmetic's error) of the float64 value computed from the same bf16 inputs.

Triton 3.8's CPU interpreter converts fp32 to bf16 by truncation, where a GPU (and our C++ and CUDA
kernels) round to nearest: under the interpreter, and only there, a whole unit is allowed. The loose
per-dtype table in conftest covers multi-step results; this file pins the conversion itself."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, triton_interpreted

import alchemy_ops as ao

# Our kernels; the reference backend composes PyTorch ops, which round bf16 at every step.
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    with ao.backend(request.param):
        yield request.param


SHAPES = [(5, 3), (7, 37), (4, 1000)]


def _bf16_ulp(value: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |value| (8 significant bits), for normal values."""
    exponent = torch.floor(torch.log2(value.abs().clamp_min(2.0**-126)))
    return torch.exp2(exponent - 7)


def assert_rounded_to_bf16(actual: torch.Tensor, expected: torch.Tensor, abs_slack: float) -> None:
    """``actual`` (bf16) is ``expected`` (float64) rounded to bf16: |error| <= 0.5 ulp, or 1 ulp under the
    Triton interpreter, plus ``abs_slack`` (the fp32 arithmetic before the rounding) and 2^-8 relative of
    that slack for a value next to a rounding boundary."""
    assert actual.dtype == torch.bfloat16
    a, e = actual.cpu().double(), expected.cpu().double()
    units = 1.0 if triton_interpreted() else 0.5
    allowed = units * _bf16_ulp(e) + abs_slack + 1e-6 * e.abs()
    err = (a - e).abs()
    worst = int(torch.argmax(err - allowed))
    assert bool((err <= allowed).all()), (
        f"bf16 output off by {float(err.flatten()[worst]):.3g} at {float(e.flatten()[worst]):.6g} "
        f"(allowed {float(allowed.flatten()[worst]):.3g}: {units} ulp)"
    )


def _logits(shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 4).to(torch.bfloat16).to(device)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_forward_rounds(kernel_backend, device, shape, log):
    x = _logits(shape, device, seed=1)
    y = (ao.log_softmax if log else ao.softmax)(x, dim=-1)
    expected = torch.log_softmax(x.double(), -1) if log else torch.softmax(x.double(), -1)
    # log_softmax is x - lse in fp32: its error is a few fp32 units of |x| and lse, not of the result.
    assert_rounded_to_bf16(y, expected, abs_slack=4e-6 * float(x.double().abs().max() + 10) if log else 1e-9)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softmax_backward_rounds(kernel_backend, device, shape):
    x = _logits(shape, device, seed=2).requires_grad_()
    y = ao.softmax(x, dim=-1)
    g = _logits(shape, device, seed=3)
    y.backward(g)
    yd, gd = y.detach().double(), g.double()  # backward reads the saved bf16 output
    expected = yd * (gd - (gd * yd).sum(-1, keepdim=True))
    assert_rounded_to_bf16(x.grad, expected, abs_slack=1e-6 * float(gd.abs().max()))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cross_entropy_gradient_rounds(kernel_backend, device, shape):
    x = _logits(shape, device, seed=4)
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, shape[1], (shape[0],), generator=g).to(device)
    xr = x.clone().requires_grad_()
    ao.cross_entropy(xr, target, reduction="sum").backward()
    expected = torch.softmax(x.double(), -1) - torch.nn.functional.one_hot(target, shape[1]).double()
    assert_rounded_to_bf16(xr.grad, expected, abs_slack=1e-7)
