"""Property-based check of log_softmax / softmax: random shapes, strides, dtypes, temperatures and
extreme values against a float64 PyTorch reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS, assert_close, to_device
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alchemy_ops as ao

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# The Triton interpreter runs each program in Python: fewer, smaller draws.
EXAMPLES = {"cpp": 300, "reference": 60, "triton": 40}


@st.composite
def logits(draw, max_side: int):
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(0 if ndim > 1 else 1, max_side), min_size=ndim, max_size=ndim))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 3.0, 30.0]))
    if x.numel() and draw(st.booleans()):  # sprinkle extremes: +-1e4, -inf (never NaN: tested elsewhere)
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=g)
        flat[idx] = torch.tensor([1e4, -1e4, -math.inf], dtype=torch.float64)[idx % 3]
    # layouts: permuted dims, a strided slice, or contiguous
    layout = draw(st.sampled_from(["contiguous", "permuted", "sliced"]))
    if layout == "permuted" and ndim > 1:
        perm = draw(st.permutations(range(ndim)))
        x = x.permute(*perm)
    elif layout == "sliced":  # every other element along d: a non-dense view
        d = draw(st.integers(0, ndim - 1))
        spread = torch.cat([x, x.flip(d) * 0.5], dim=d)
        index = [slice(None)] * ndim
        index[d] = slice(None, None, 2)
        x = spread[tuple(index)]
    dim = draw(st.integers(-x.dim(), x.dim() - 1))
    temperature = draw(st.sampled_from([1.0, 0.05, 0.7, 20.0]))
    return x.to(dtype), dim, temperature


def _check(x, dim, temperature, log):
    fn, ref = (ao.log_softmax, torch.log_softmax) if log else (ao.softmax, torch.softmax)
    y = fn(x, dim, temperature=temperature)
    # Rounded to the output dtype: a log-probability beyond fp16's range is -inf there, rightly.
    expected = ref(x.double() / temperature, dim).to(x.dtype).double()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y.isnan(), expected.isnan())
    finite = expected[torch.isfinite(expected)]
    assert_close(y, expected, x.dtype, scale=max(1.0, finite.abs().max().item() if finite.numel() else 1.0))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("log", [True, False], ids=["log_softmax", "softmax"])
def test_matches_pytorch_on_random_inputs(backend_name, device, log):
    side = 9 if backend_name == "triton" else 40

    @settings(
        max_examples=EXAMPLES[backend_name],
        deadline=None,
        derandomize=True,  # the same draws every run: CI stays reproducible
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(logits(side))
    def check(case):
        x, dim, temperature = case
        with ao.backend(backend_name):
            _check(to_device(x, device), dim, temperature, log)

    check()
