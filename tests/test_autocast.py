"""torch.autocast with the softmax-family ops: each follows PyTorch's policy for the op it replaces.

CPU autocast has no rule for softmax, log_softmax or gumbel_softmax (they run in the input's dtype);
CUDA autocast runs softmax and log_softmax in fp32 ("fp32_set_opt_dtype"). The expected dtype of every
case is what PyTorch's own op gives under the same autocast, found by running it, not written down.
The fp32 path is also run on CPU (every backend) by switching CPU to CUDA's policy: the mechanism is
the same, only the device decides whether it is taken. CUDA cases are skipped without a GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, TOLERANCES

import alchemy_ops as ao

softmax_module = importlib.import_module("alchemy_ops.softmax")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
LOW = [torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (2, 5, 33)]


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request.param


@pytest.fixture
def fp32_policy_on_cpu(monkeypatch):
    """CPU autocast with CUDA's softmax policy, so the fp32 path runs here too."""
    monkeypatch.setattr(softmax_module, "FP32_AUTOCAST_DEVICES", ("cpu", "cuda"))


def _logits(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).to(device)


def _assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def _upstream(shape, device, seed=9):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _check_softmax(op, ref_op, x, out_dtype, dim):
    """ours(x) under the caller's autocast: dtype out_dtype, values and the gradient (in x's dtype)
    against float64 from the same rounded input."""
    leaf = x.detach().requires_grad_()
    y = op(leaf, dim)
    assert y.dtype == out_dtype
    x64 = x.detach().double().requires_grad_()
    expected = ref_op(x64, dim)
    _assert_close(y, expected, out_dtype)
    grad_out = _upstream(y.shape, y.device).to(out_dtype)
    (grad,) = torch.autograd.grad(y, leaf, grad_out)
    (grad64,) = torch.autograd.grad(expected, x64, grad_out.double())
    assert grad.dtype == x.dtype
    _assert_close(grad, grad64, x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("input_dtype", ["low", torch.float32])
@pytest.mark.parametrize("log", [True, False], ids=["log_softmax", "softmax"])
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_follows_torch_policy(backend_name, device, low, input_dtype, log, shape):
    dtype = low if input_dtype == "low" else input_dtype
    x = _logits(shape, dtype, device)
    ours, theirs = (ao.log_softmax, F.log_softmax) if log else (ao.softmax, F.softmax)
    with torch.autocast(device, dtype=low), ao.backend(backend_name):
        expected_dtype = theirs(x, -1).dtype
        _check_softmax(ours, theirs, x, expected_dtype, dim=-1)
        _check_softmax(ours, theirs, x, theirs(x, 0).dtype, dim=0)  # a strided dim
        # dtype= is the caller's choice under every policy
        assert ours(x, -1, dtype=torch.float64).dtype == theirs(x, -1, dtype=torch.float64).dtype


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("log", [True, False], ids=["log_softmax", "softmax"])
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_fp32_policy_path(backend_name, fp32_policy_on_cpu, low, log, shape):
    """The CUDA policy's path on CPU: fp32 from the low-precision input, gradient in its dtype."""
    x = _logits(shape, low, "cpu", seed=1)
    ours, theirs = (ao.log_softmax, F.log_softmax) if log else (ao.softmax, F.softmax)
    with torch.autocast("cpu", dtype=low), ao.backend(backend_name):
        _check_softmax(ours, theirs, x, torch.float32, dim=-1)
        _check_softmax(ours, theirs, x.transpose(0, -1), torch.float32, dim=0)  # non-contiguous
        assert ours(x, -1, dtype=low).dtype == low  # an explicit dtype= wins, as in PyTorch
        assert ours(x.float(), -1).dtype == torch.float32
        assert ours(x.double(), -1).dtype == torch.float64
    assert ours(x, -1).dtype == low  # autocast off: the input's dtype


def test_autocast_disabled_for_another_device_changes_nothing(fp32_policy_on_cpu):
    x = _logits((3, 5), torch.bfloat16, "cpu")
    with torch.autocast("cuda", dtype=torch.float16, enabled=False):
        assert ao.log_softmax(x).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert ao.softmax(x).dtype == torch.bfloat16


def _gumbel_pair(x, hard, seed=11):
    """ours(x) under the caller's autocast, its gradient, with a seeded generator."""
    leaf = x.detach().requires_grad_()
    y = ao.gumbel_softmax(leaf, tau=0.7, hard=hard, generator=torch.Generator(x.device).manual_seed(seed))
    (grad,) = torch.autograd.grad(y, leaf, _upstream(y.shape, y.device).to(y.dtype))
    return y, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_follows_torch_policy(backend_name, device, low, hard):
    """Dtype as F.gumbel_softmax's under the same autocast; the sample is the one of the same
    generator state without autocast, from the logits in the expected dtype (widening is exact)."""
    x = _logits((4, 9), low, device, seed=2)
    with torch.autocast(device, dtype=low), ao.backend(backend_name):
        expected_dtype = F.gumbel_softmax(x, tau=0.7, hard=hard).dtype
        y, grad = _gumbel_pair(x, hard)
    assert y.dtype == expected_dtype and grad.dtype == low
    with ao.backend(backend_name):
        y_plain, grad_plain = _gumbel_pair(x.to(expected_dtype), hard)
    torch.testing.assert_close(y, y_plain, atol=0, rtol=0)
    torch.testing.assert_close(grad, grad_plain.to(low), atol=0, rtol=0)
    assert torch.allclose(y.double().sum(-1), torch.ones(4, dtype=torch.float64), atol=1e-2)


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_fp32_policy_path(backend_name, fp32_policy_on_cpu, low, hard):
    x = _logits((3, 17), low, "cpu", seed=3)
    with torch.autocast("cpu", dtype=low), ao.backend(backend_name):
        y, grad = _gumbel_pair(x, hard)
    assert y.dtype == torch.float32 and grad.dtype == low
    with ao.backend(backend_name):
        y_plain, grad_plain = _gumbel_pair(x.float(), hard)
    torch.testing.assert_close(y, y_plain, atol=0, rtol=0)
    torch.testing.assert_close(grad, grad_plain.to(low), atol=0, rtol=0)
    with ao.backend(backend_name):
        assert _gumbel_pair(x, hard)[0].dtype == low  # autocast off: the logits' dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax_under_autocast(backend_name, device, low, renormalize):
    """fp32 weights from fp16/bf16 logits with or without autocast (what CUDA autocast gives the
    softmax of torch.topk's values), values against float64, the gradient in the logits' dtype."""
    x = _logits((5, 23), low, device, seed=4)
    leaf = x.detach().requires_grad_()
    with torch.autocast(device, dtype=low), ao.backend(backend_name):
        weights, indices = ao.topk_softmax(leaf, 4, renormalize=renormalize, temperature=0.8)
        (grad,) = torch.autograd.grad(weights, leaf, _upstream(weights.shape, device))
    assert weights.dtype == torch.float32 and indices.dtype == torch.int64 and grad.dtype == low
    x64 = x.detach().double().requires_grad_()
    z = x64 / 0.8
    want_idx = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[:, :4]
    want = torch.softmax(z.gather(-1, want_idx), -1) if renormalize else torch.softmax(z, -1).gather(-1, want_idx)
    (grad64,) = torch.autograd.grad(want, x64, _upstream(weights.shape, device).double())
    assert torch.equal(indices, want_idx)
    _assert_close(weights, want, torch.float32)
    _assert_close(grad, grad64, low)


def test_log_softmax_compiles_under_autocast(fp32_policy_on_cpu):
    """torch.compile traces the autocast check (no graph break), forward and backward."""
    x = _logits((3, 10), torch.bfloat16, "cpu", seed=5)

    def step(t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ao.log_softmax(t, -1)

    eager_leaf, compiled_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, compiled = step(eager_leaf), torch.compile(step, fullgraph=True)(compiled_leaf)
    assert compiled.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager)
    grad_out = _upstream(x.shape, "cpu")
    eager.backward(grad_out)
    compiled.backward(grad_out)
    assert compiled_leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad)
