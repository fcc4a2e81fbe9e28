"""Property-based check of cross_entropy: random shapes, strides, dtypes, weights, smoothing, ignore
patterns, reductions, probability targets and extreme logits against float64 PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_close, to_device
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alchemy_ops as ao

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# The Triton interpreter runs each program in Python: fewer, smaller draws.
EXAMPLES = {"cpp": 300, "reference": 60, "triton": 40}


@st.composite
def problems(draw, max_side: int):
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, max_side), min_size=ndim, max_size=ndim))
    if ndim > 1 and draw(st.booleans()):
        shape[0] = draw(st.integers(0, 2))  # sometimes an empty or single batch
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 30.0]))
    if x.numel() and draw(st.booleans()):  # extremes: +-1e4 and -inf entries
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=g)
        flat[idx] = torch.tensor([1e4, -1e4, -math.inf], dtype=torch.float64)[idx % 3]
    layout = draw(st.sampled_from(["contiguous", "permuted", "sliced"]))
    if layout == "permuted" and ndim > 1:  # same shape, other memory order
        perm = draw(st.permutations(range(ndim)))
        x = x.permute(*perm).contiguous().permute(*[perm.index(d) for d in range(ndim)])
    elif layout == "sliced":
        d = draw(st.integers(0, ndim - 1))
        index = [slice(None)] * ndim
        index[d] = slice(None, None, 2)
        x = torch.cat([x, x.flip(d) * 0.5], dim=d)[tuple(index)]
    cls = 1 if ndim > 1 else 0
    classes = x.shape[cls]
    kw = {"reduction": draw(st.sampled_from(["mean", "sum", "none"]))}
    kw["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 0.7]))
    if draw(st.booleans()):
        kw["weight"] = torch.rand(classes, generator=g, dtype=torch.float64) + 0.1
    if draw(st.integers(0, 3)) == 0:
        target = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64), cls)
    else:
        kw["ignore_index"] = draw(st.sampled_from([-100, 0, classes - 1]))
        positions = x.shape[:1] + x.shape[2:] if ndim > 1 else ()
        target = torch.randint(0, classes, positions, generator=g)
        if target.numel() and draw(st.booleans()):
            target.view(-1)[torch.rand(target.numel(), generator=g) < 0.3] = kw["ignore_index"]
    return x.to(dtype), target, kw


def _check(x, target, kw):
    x = x.detach().requires_grad_()
    t = target.to(x.dtype) if target.is_floating_point() else target
    loss = ao.cross_entropy(x, t, **kw)
    x64 = x.detach().double().requires_grad_()
    kw64 = dict(kw, weight=kw["weight"].double()) if "weight" in kw else kw
    expected = F.cross_entropy(x64, t.double() if t.is_floating_point() else t, **kw64)
    assert loss.shape == expected.shape and loss.dtype == x.dtype
    rounded = expected.detach().to(x.dtype).double()  # beyond fp16's range is inf there, rightly
    assert torch.equal(loss.isnan(), rounded.isnan())
    finite = rounded[torch.isfinite(rounded)]
    assert_close(loss, rounded, x.dtype, scale=max(1.0, finite.abs().max().item() if finite.numel() else 1.0))
    if not x.numel() or expected.isnan().any():
        return
    g = torch.rand(loss.shape, dtype=torch.float64, device=x.device) + 0.5
    (dx,) = torch.autograd.grad(loss, x, g.to(loss.dtype))
    (dx64,) = torch.autograd.grad(expected, x64, g)
    assert_close(dx, dx64, x.dtype, scale=2 * max(dx64.abs().max().item(), 1e-3))


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_matches_pytorch_on_random_inputs(backend_name, device):
    side = 7 if backend_name == "triton" else 40

    @settings(
        max_examples=EXAMPLES[backend_name],
        deadline=None,
        derandomize=True,  # the same draws every run: CI stays reproducible
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(problems(side))
    def check(case):
        with ao.backend(backend_name):
            _check(*to_device(case, device))

    check()
