"""CPU kernels on short rows (issue 13 item 2): short rows (forward up to 32 classes, cross-entropy
backward up to 16) are worked on a vector's width of rows at a time, transposed into lanes, and the
class-dim-1 lanes paths read several vectors of positions per class and form the cross-entropy loss
epilogue on vectors. The raw operators against float64 PyTorch at the sizes those paths have edges:
C=1, C=2, C around the vector width and the limits, rows not a multiple of the vector width,
non-finite rows, non-contiguous rows, every dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from alchemy_ops import reference

OPS = torch.ops.alchemy_ops
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# classes: 1, 2, 3, vector widths -1/0/+1 (8 fp64 / 8 fp32 lanes under AVX2, 16 under AVX-512),
# 21, the last transposed sizes and the first ones past them.
CLASSES = [1, 2, 3, 7, 8, 9, 16, 17, 21, 32, 33, 129]
ROWS = [1, 7, 9, 33]  # never a multiple of 8 or 16


def _rows(rows, classes, dtype, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed * 1000 + classes)
    if layout == "sliced":  # rows further apart than their length
        x = torch.randn(rows, classes + 5, generator=g)[:, 2 : 2 + classes]
    elif layout == "kdim":  # [2, R, C] viewed along the last dim: outer dims collapsed
        x = torch.randn(2, rows, classes, generator=g)
    else:
        x = torch.randn(rows, classes, generator=g)
    return (x * 3).to(dtype)


def _softmax64(x, log, temperature):
    z = x.double() / temperature
    return torch.log_softmax(z, -1) if log else torch.softmax(z, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_short_rows_match_float64(dtype, classes, log):
    for rows in ROWS:
        for layout, temperature in [("contiguous", 1.0), ("sliced", 0.7), ("kdim", 1.0)]:
            x = _rows(rows, classes, dtype, layout=layout)
            y = OPS.softmax_forward(x, -1, temperature, log, None)
            assert y.dtype == dtype and y.shape == x.shape
            assert_close(y, _softmax64(x, log, temperature), dtype, scale=4.0 if log else 1.0)
            # backward from our rounded output, against the float64 gradient of the same math
            grad = _rows(rows, classes, dtype, seed=1, layout=layout)
            dx = OPS.softmax_backward(grad, y, -1, temperature, log)
            y64 = y.double()
            g64 = grad.double()
            expected = (
                (g64 - y64.exp() * g64.sum(-1, keepdim=True))
                if log
                else y64 * (g64 - (g64 * y64).sum(-1, keepdim=True))
            )
            assert_close(dx, expected / temperature, dtype, scale=4.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_short_rows_widened_to_fp32(dtype):
    x = _rows(9, 10, dtype)
    y = OPS.softmax_forward(x, -1, 1.0, True, torch.float32)
    assert y.dtype == torch.float32
    assert_close(y, _softmax64(x, True, 1.0), torch.float32)


def _nonfinite_rows(classes, dtype):
    """Ten rows (more than a vector's width of 8): finite, one -inf, all -inf, a NaN, a +inf, ..."""
    x = _rows(10, classes, torch.float32)
    x[1, 0] = float("-inf")
    x[2] = float("-inf")
    x[3, classes // 2] = float("nan")
    x[4, classes - 1] = float("inf")
    x[6, :] = float("-inf")
    x[6, classes - 1] = 5.0  # only the last class is finite
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [1, 2, 10, 21])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_short_rows_nonfinite_match_pytorch(dtype, classes, log):
    x = _nonfinite_rows(classes, dtype)
    expected = _softmax64(x, log, 1.0)
    y = OPS.softmax_forward(x, -1, 1.0, log, None)
    assert_close(y, expected, dtype, scale=4.0)
    # NaN rows in, NaN gradient rows out; -inf logits give zero probabilities, finite gradients
    grad = _rows(10, classes, dtype, seed=2)
    dx = OPS.softmax_backward(grad, y, -1, 1.0, log)
    y64, g64 = y.double(), grad.double()
    ref = (g64 - y64.exp() * g64.sum(-1, keepdim=True)) if log else y64 * (g64 - (g64 * y64).sum(-1, keepdim=True))
    assert_close(dx, ref, dtype, scale=4.0)


def test_softmax_short_rows_empty_batch_and_class_dim_1_of_one():
    x = torch.randn(0, 5)
    assert OPS.softmax_forward(x, -1, 1.0, False, None).shape == (0, 5)
    # C=1 at dim 1 of [N, 1, H, W]: unit class stride, rows at stride 1 along H*W
    x = torch.randn(3, 1, 4, 5)
    assert_close(OPS.softmax_forward(x, 1, 1.0, True, None), torch.zeros(3, 1, 4, 5), torch.float32)
    assert_close(OPS.softmax_forward(x, 1, 1.0, False, None), torch.ones(3, 1, 4, 5), torch.float32)


def _ce64(x, target, weight, ignore_index, smoothing, z_loss, softcap):
    """Per-position loss and lse in float64, with the z-loss and softcap extras."""
    loss = reference.cross_entropy(
        x.double(), target.double() if target.is_floating_point() else target,
        None if weight is None else weight.double(), ignore_index, "none", smoothing, z_loss, softcap or None,
    )  # fmt: skip
    z = x.double() if not softcap else softcap * torch.tanh(x.double() / softcap)
    return loss, torch.logsumexp(z, 1)


def _ce_grad64(x, target, weight, ignore_index, smoothing, z_loss, softcap, g):
    x64 = x.double().requires_grad_()
    t = target.double() if target.is_floating_point() else target
    loss = reference.cross_entropy(
        x64, t, None if weight is None else weight.double(), ignore_index, "none", smoothing, z_loss, softcap or None
    )
    (dx,) = torch.autograd.grad(loss, x64, g.double())
    return dx


# (weight, label_smoothing, z_loss, softcap, probability targets)
CE_MODES = [
    (False, 0.0, 0.0, 0.0, False),
    (True, 0.1, 0.0, 0.0, False),
    (False, 0.0, 1e-3, 4.0, False),
    (True, 0.2, 0.0, 0.0, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [1, 2, 3, 9, 16, 17, 21, 32, 33])
@pytest.mark.parametrize("mode", CE_MODES, ids=["plain", "weight-smooth", "zloss-softcap", "probs"])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_cross_entropy_short_rows_match_float64(dtype, classes, mode, layout):
    use_weight, smoothing, z_loss, softcap, soft = mode
    rows = 19
    x = _rows(rows, classes, dtype, layout=layout)
    g = torch.Generator().manual_seed(7)
    weight = torch.rand(classes, generator=g) + 0.5 if use_weight else None
    if soft:
        target = torch.softmax(torch.randn(rows, classes, generator=g) * 2, 1).to(dtype)
    else:
        target = torch.randint(0, classes, (rows,), generator=g)
        target[::5] = -100  # ignored positions in every block of 8
    loss, lse = OPS.cross_entropy_forward(x, target, weight, -100, smoothing, z_loss, softcap, True)
    loss64, lse64 = _ce64(x, target, weight, -100, smoothing, z_loss, softcap)
    assert_close(loss, loss64, torch.float32 if dtype == torch.float64 else dtype, scale=8.0)
    kept = torch.ones(rows, dtype=torch.bool) if soft else target != -100
    assert_close(lse[kept], lse64[kept], torch.float32 if dtype == torch.float64 else dtype, scale=8.0)
    grad_loss = torch.rand(rows, generator=g) + 0.5
    dx = OPS.cross_entropy_backward(grad_loss, x, target, weight, lse, -100, smoothing, z_loss, softcap)
    assert_close(dx, _ce_grad64(x, target, weight, -100, smoothing, z_loss, softcap, grad_loss), dtype, scale=2.0)
    if not soft:
        assert (dx[~kept] == 0).all()
    # the in-place variant writes the same gradient into (a copy of) the logits
    buf = x.clone()
    loss_ip, _ = OPS.cross_entropy_forward_inplace(
        buf, target, weight, grad_loss, -100, smoothing, z_loss, softcap, True
    )
    torch.testing.assert_close(loss_ip, loss, rtol=0, atol=0)
    assert_close(buf, dx, dtype, scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [2, 10])
def test_cross_entropy_short_rows_nonfinite_and_unchecked_bad_target(dtype, classes):
    x = _nonfinite_rows(classes, dtype)
    target = torch.arange(10) % classes
    target[5] = classes + 3  # out of range, unchecked (check_target=False): NaN loss and gradient
    target[7] = -100
    loss, lse = OPS.cross_entropy_forward(x, target, None, -100, 0.0, 0.0, 0.0, False)
    keep = torch.ones(10, dtype=torch.bool)
    keep[5] = False
    expected = F.cross_entropy(x.double()[keep], target[keep], reduction="none")
    assert_close(loss[keep], expected, torch.float32 if dtype == torch.float64 else dtype, scale=8.0)
    assert torch.isnan(loss[5]) and loss[7] == 0
    dx = OPS.cross_entropy_backward(torch.ones(10), x, target, None, lse, -100, 0.0, 0.0, 0.0)
    assert torch.isnan(dx[5]).all() and (dx[7] == 0).all()
    expected_dx = torch.softmax(x.double(), 1) - F.one_hot(target.clamp(0, classes - 1), classes).double()
    finite = torch.isfinite(expected_dx).all(1) & keep
    finite[7] = False
    assert_close(dx[finite], expected_dx[finite], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", CE_MODES, ids=["plain", "weight-smooth", "zloss-softcap", "probs"])
def test_cross_entropy_class_dim_1_lanes_epilogue(dtype, mode):
    """[N, C, d] with the positions as vector lanes: the loss epilogue formed on vectors, with an
    ignored position, a non-finite position and a remainder of positions past the last full vector."""
    use_weight, smoothing, z_loss, softcap, soft = mode
    n, classes, d = 2, 5, 21
    x = (torch.randn(n, classes, d, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    x[0, :, 4] = float("-inf")  # a fully -inf position: NaN, as PyTorch
    x[1, 2, 6] = float("nan")
    g = torch.Generator().manual_seed(4)
    weight = torch.rand(classes, generator=g) + 0.5 if use_weight else None
    if soft:
        target = torch.softmax(torch.randn(n, classes, d, generator=g), 1).to(dtype)
    else:
        target = torch.randint(0, classes, (n, d), generator=g)
        target[0, 1] = -100
    loss, lse = OPS.cross_entropy_forward(x, target, weight, -100, smoothing, z_loss, softcap, True)
    loss64, lse64 = _ce64(x, target, weight, -100, smoothing, z_loss, softcap)
    atol_dtype = torch.float32 if dtype == torch.float64 else dtype
    assert_close(loss, loss64, atol_dtype, scale=8.0)
    kept = torch.ones(n, d, dtype=torch.bool) if soft else target != -100
    if not softcap:  # (softcap maps -inf to -softcap)
        kept[0, 4] = False  # saved lse of a fully -inf position: NaN (PyTorch's logsumexp: -inf)
        assert torch.isnan(loss[0, 4]) and torch.isnan(lse[0, 4])
    assert_close(lse[kept], lse64[kept], atol_dtype, scale=8.0)
    assert torch.isnan(loss[1, 6])


@pytest.mark.parametrize("layout", ["rows", "class_dim_1"])
def test_cross_entropy_lanes_target_gradient_exact_near_one(layout):
    """p_y - 1 for a confident prediction is a few ulp of 1: the vector exp's error must not reach it,
    on the transposed rows and on the class-dim-1 lanes."""
    x = torch.full((4, 64), -12.0)
    x[:, 5] = 6.0
    x += torch.linspace(0, 0.01, 64)
    if layout == "class_dim_1":
        x = x.t().reshape(1, 64, 4).expand(2, 64, 4).repeat(1, 1, 3).contiguous()  # [2, 64, 12]
    target = torch.full(x.shape[:1] + x.shape[2:], 5)
    xb = x.bfloat16()
    _, lse = OPS.cross_entropy_forward(xb, target, None, -100, 0.0, 0.0, 0.0, True)
    dx = OPS.cross_entropy_backward(torch.ones(target.shape), xb, target, None, lse, -100, 0.0, 0.0, 0.0)
    expected = torch.softmax(xb.double(), 1).select(1, 5) - 1
    assert (dx.select(1, 5) != 0).all()
    torch.testing.assert_close(dx.select(1, 5).double(), expected, rtol=1e-2, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_class_dim_1_wide_lanes_and_remainders(dtype, log):
    """dim 1 of [N, C, d] with d = 45: blocks of 4 vectors of positions (4 x 8 under AVX2, fp32 and
    fp64), then one vector, then single positions; one fully -inf position and one NaN."""
    x = (torch.randn(2, 5, 45, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    x[0, :, 3] = float("-inf")
    x[1, 2, 40] = float("nan")
    y = OPS.softmax_forward(x, 1, 0.8, log, None)
    z = x.double() / 0.8
    assert_close(y, torch.log_softmax(z, 1) if log else torch.softmax(z, 1), dtype, scale=4.0)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    dx = OPS.softmax_backward(grad, y, 1, 0.8, log)
    y64, g64 = y.double(), grad.double()
    ref = (g64 - y64.exp() * g64.sum(1, keepdim=True)) if log else y64 * (g64 - (g64 * y64).sum(1, keepdim=True))
    assert_close(dx, ref / 0.8, dtype, scale=4.0)
