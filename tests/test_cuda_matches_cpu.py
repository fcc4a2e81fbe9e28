"""The CUDA backends (`cpp`'s CUDA kernels and `triton`) against the CPU kernels on the same inputs:
every op x dtype x layout, values and gradients. Each side is within its float64 tolerance (the other
test files check that per device), so here they must agree within twice it."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, to_device

import alchemy_ops as ao

pytestmark = pytest.mark.cuda
OPS = torch.ops.alchemy_ops
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CUDA_BACKENDS = ["cpp", "triton"]
# (shape, dim, layout): odd rows, more than one block, a K-dim class dim, a transposed view, a sliced one.
LAYOUTS = [
    ((37, 1030), -1, "contiguous"),
    ((3, 37, 5), 1, "contiguous"),
    ((33, 70), -1, "transposed"),
    ((9, 50), -1, "sliced"),
]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-dim{d}-{lay}" for s, d, lay in LAYOUTS]


def _logits(shape, layout, dtype, device, seed=0):
    """Random logits (spread 3) drawn on CPU, moved, then viewed in ``layout`` (kept on every device)."""
    g = torch.Generator().manual_seed(seed)

    def buffer(*size):
        return (torch.randn(size, generator=g) * 3).to(device=device, dtype=dtype)

    if layout == "transposed":
        return buffer(*reversed(shape)).t()
    if layout == "sliced":
        return buffer(*shape[:-1], shape[-1] + 3)[..., 1 : 1 + shape[-1]]
    return buffer(*shape)


def _forward_backward(backend_name, fn, x, *rest):
    """Outputs of fn(x, *rest) and the gradient of x for a fixed upstream gradient, moved to CPU."""
    with ao.backend(backend_name):
        x = x.detach().requires_grad_()
        out = fn(x, *rest)
        outs = out if isinstance(out, tuple) else (out,)
        floating = [o for o in outs if o.is_floating_point()]
        upstream = [torch.rand(o.shape, generator=torch.Generator().manual_seed(9)).to(o) + 0.5 for o in floating]
        (dx,) = torch.autograd.grad(floating, x, upstream)
    return [o.detach().cpu() for o in outs], dx.cpu()


def _check(backend_name, fn, x, *rest, dtype, out_dtype=None):
    cpu_outs, cpu_dx = _forward_backward("cpp", fn, x, *rest)
    cuda_outs, cuda_dx = _forward_backward(backend_name, fn, to_device(x, "cuda"), *to_device(rest, "cuda"))
    for got, want in zip(cuda_outs, cpu_outs, strict=True):
        if got.is_floating_point():
            scale = max(1.0, want.abs().nan_to_num(0).max().item()) if want.numel() else 1.0
            assert_close(got, want, out_dtype or dtype, scale=2 * scale)
        else:
            assert torch.equal(got, want)
    scale = max(1e-3, cpu_dx.abs().max().item()) if cpu_dx.numel() else 1.0
    assert_close(cuda_dx, cpu_dx, dtype, scale=4 * scale)


@pytest.mark.parametrize("backend_name", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "dim", "layout"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("log", [True, False], ids=["log_softmax", "softmax"])
def test_softmax(backend_name, shape, dim, layout, dtype, log):
    fn = ao.log_softmax if log else ao.softmax
    _check(backend_name, lambda t: fn(t, dim, temperature=0.7), _logits(shape, layout, dtype, "cpu"), dtype=dtype)


@pytest.mark.parametrize("backend_name", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "dim", "layout"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
def test_cross_entropy(backend_name, shape, dim, layout, dtype, probs):
    x = _logits(shape, layout, dtype, "cpu")  # class dim 1: the last of [N, C], the middle of [N, C, d]
    classes, target_shape = x.shape[1], (x.shape[0], *x.shape[2:])
    g = torch.Generator().manual_seed(1)
    if probs:
        target = torch.softmax(torch.randn(x.shape, generator=g), 1).to(dtype)
    else:
        target = torch.randint(0, classes, target_shape, generator=g)
        target.view(-1)[::4] = -100
    weight = torch.rand(classes, generator=g) + 0.5
    kw = {"reduction": "none", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 20.0}
    _check(backend_name, lambda t, y, w: ao.cross_entropy(t, y, w, **kw), x, target, weight, dtype=dtype)


@pytest.mark.parametrize("backend_name", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "dim", "layout"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full"])
def test_topk_softmax(backend_name, shape, dim, layout, dtype, renormalize):
    def fn(t):
        return ao.topk_softmax(t, 5, dim, renormalize=renormalize, temperature=0.7)

    acc = torch.float64 if dtype == torch.float64 else torch.float32  # weights are fp32 (fp64 for fp64)
    _check(backend_name, fn, _logits(shape, layout, dtype, "cpu"), dtype=dtype, out_dtype=acc)


@pytest.mark.parametrize("backend_name", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy(backend_name, dtype, reduction):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 16, generator=g).to(dtype)
    weight = (torch.randn(1030, 16, generator=g) * 0.5).to(dtype)
    target = torch.randint(0, 1030, (37,), generator=g)
    target[::5] = -100

    def fn(t, w, y):
        return ao.linear_cross_entropy(t, w, y, reduction=reduction, label_smoothing=0.1, chunk_size=8)

    _check(backend_name, fn, x, weight, target, dtype=dtype)


@pytest.mark.parametrize("backend_name", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "dim", "layout"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_gumbel_softmax_draws_the_cpu_sample(backend_name, shape, dim, layout, dtype, hard):
    """The same seed tensor and offset: the CUDA kernels draw the CPU's noise (one-hots identical)."""
    op = OPS.gumbel_softmax_forward if backend_name == "cpp" else OPS.triton_gumbel_softmax_forward
    x, seed = _logits(shape, layout, dtype, "cpu"), torch.tensor([2**40 + 77])
    cpu = OPS.gumbel_softmax_forward(x, seed, 3, 0.5, hard, False, dim)[0]
    cuda = op(x.cuda(), seed.cuda(), 3, 0.5, hard, False, dim)[0].cpu()
    if hard:
        assert torch.equal(cuda, cpu)
    else:
        assert_close(cuda, cpu, torch.float32 if dtype == torch.float64 else dtype, scale=2)
