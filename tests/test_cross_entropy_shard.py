"""The vocab-parallel shard operators on every backend: statistics and gradient of one slice of the
classes, against a float64 evaluation of their definition (csrc/include/alchemy/cross_entropy_shard.h)
and against cross-entropy of the whole vocabulary, plus opcheck. The collective around them is
tested in test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS, assert_close

from alchemy_ops import reference
from alchemy_ops._ops import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _op(backend: str, name: str):
    if backend == "reference":
        return getattr(reference, name)
    return getattr(ops, ("triton_" if backend == "triton" else "") + name)


def _stats64(x, target, weight, start, ignore_index, softcap, smoothing):
    """The six columns, in float64 from the (rounded) logits."""
    z = x.double()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    n, c = z.shape
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    rows = []
    for r in range(n):
        y = int(target[r])
        if y == ignore_index:
            rows.append([0, 0, 0, 0, 0, float(w.sum())])
            continue
        top = float(z[r].max())
        shift = 0.0 if top == -math.inf else top
        total = float((z[r] - shift).exp().sum())
        log_sum = -math.inf if top == -math.inf else math.log(total)
        col = y - start
        own = 0 <= col < c
        rows.append(
            [
                top,
                log_sum,
                float(z[r, col]) if own else 0.0,
                float(w[col]) if own else 0.0,
                float((w * (z[r] - shift)).sum()) if smoothing else 0.0,
                float(w.sum()),
            ]
        )
    return torch.tensor(rows, dtype=torch.float64).reshape(n, 6)


def _to(t, device):
    return None if t is None else t.to(device)


def _inputs(n, c, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    return x, g


SHAPES = [(1, 1), (3, 1), (5, 3), (4, 17), (7, 300), (0, 5), (2, 1030)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "weighted,softcap,smoothing",
    [(False, 0.0, False), (True, 0.0, True), (False, 2.5, True), (True, 4.0, False)],
    ids=["plain", "weight+smooth", "softcap+smooth", "weight+softcap"],
)
def test_shard_stats_and_backward(backend, device, dtype, shape, weighted, softcap, smoothing):
    n, c = shape
    x, g = _inputs(n, c, dtype)
    if n >= 4:  # -inf entries, and a row of this shard that is all -inf
        x[1, 0] = -math.inf
        x[2, :] = -math.inf
    start = 10
    # targets before, inside and after this shard's classes [10, 10 + c), and ignored ones
    target = torch.randint(0, 2 * c + 20, (n,), generator=g)
    if n >= 3:
        target[0], target[-1] = start + c - 1, -100
    weight = torch.rand(c, generator=g, dtype=torch.float64).to(reference.acc_dtype(dtype)) + 0.1 if weighted else None

    stats = _op(backend, "cross_entropy_shard_stats")(
        x.to(device), target.to(device), _to(weight, device), start, -100, softcap, smoothing
    ).cpu()
    assert stats.shape == (n, 6) and stats.dtype == reference.acc_dtype(dtype)
    expected = _stats64(x, target, weight, start, -100, softcap, smoothing)
    # the log-sum of fp16/bf16 rows is accumulated in fp32: the fp32 tolerance, scaled by the row
    tol_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(stats, expected, tol_dtype, scale=max(1.0, c / 8))

    lse = torch.logsumexp(x.double() if softcap == 0 else softcap * torch.tanh(x.double() / softcap), 1)
    coeffs = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5).to(reference.acc_dtype(dtype))
    grad = _op(backend, "cross_entropy_shard_backward")(
        x.to(device), target.to(device), _to(weight, device), lse.to(device), coeffs.to(device), start, -100, softcap
    ).cpu()
    assert grad.shape == x.shape and grad.dtype == dtype
    expected = reference.cross_entropy_shard_backward(
        x.double(), target, weight, lse, coeffs.double(), start, -100, softcap
    )
    assert_close(grad, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_compose_to_cross_entropy(backend, device):
    """Cross-entropy of the whole vocabulary from the statistics of three uneven shards (the
    combination alchemy_ops.distributed does after its all-gather), and its gradient from the
    shard backward: against F.cross_entropy in float64."""
    from alchemy_ops.distributed import _combine, _Shard

    n, sizes, eps = 6, [5, 1, 9], 0.2
    x, g = _inputs(n, sum(sizes), torch.float32, seed=3)
    target = torch.randint(0, sum(sizes), (n,), generator=g)
    target[2] = -100
    weight = torch.rand(sum(sizes), generator=g) + 0.5
    x, target, weight = x.to(device), target.to(device), weight.to(device)
    starts = [0, 5, 6]
    stats = torch.stack(
        [
            _op(backend, "cross_entropy_shard_stats")(x[:, s : s + c], target, weight[s : s + c], s, -100, 0.0, True)
            for s, c in zip(starts, sizes, strict=True)
        ]
    )
    shard = _Shard(None, 3, 0, sum(sizes), -100, eps, 0.0, 0.0, backend)
    loss, z_term, lse, w_y, weight_sum = _combine(stats, target, shard)
    assert (z_term == 0).all()  # z_loss=0: the separate z term (its own mean) is exactly zero
    x64 = x.double().requires_grad_()
    expected = torch.nn.functional.cross_entropy(
        x64, target, weight.double(), ignore_index=-100, reduction="none", label_smoothing=eps
    )
    torch.testing.assert_close(loss, expected.detach(), atol=2e-5, rtol=2e-5)
    upstream = torch.rand(n, generator=g, dtype=torch.float64).to(device)
    expected.backward(upstream)
    a = (1 - eps) * w_y + eps / shard.vocab * weight_sum
    coeffs = torch.stack([upstream * a, upstream * (eps / shard.vocab), upstream * (1 - eps) * w_y], 1)
    grads = [
        _op(backend, "cross_entropy_shard_backward")(
            x[:, s : s + c], target, weight[s : s + c], lse, coeffs.float(), s, -100, 0.0
        )
        for s, c in zip(starts, sizes, strict=True)
    ]
    torch.testing.assert_close(torch.cat(grads, 1).double(), x64.grad, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_shard_noncontiguous_and_nan(backend, device):
    x, g = _inputs(5, 40, torch.float32, seed=5)
    view = x.to(device)[:, ::2]  # class stride 2
    view_nan = view.clone()
    view_nan[3, 4] = math.nan
    target = torch.tensor([0, 25, 7, 3, -100])
    for logits in (view, view_nan):
        stats = _op(backend, "cross_entropy_shard_stats")(logits, target.to(device), None, 0, -100, 0.0, True).cpu()
        expected = _stats64(logits.cpu(), target, None, 0, -100, 0.0, True)
        assert_close(stats, expected, torch.float32, scale=4)
    assert torch.isnan(stats[3, :2]).all() and not torch.isnan(stats[[0, 1, 2]]).any()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_shard_bad_arguments(backend, device):
    stats_op = _op(backend, "cross_entropy_shard_stats")
    backward_op = _op(backend, "cross_entropy_shard_backward")
    x, t = torch.randn(3, 4, device=device), torch.tensor([0, 1, 2], device=device)
    with pytest.raises(RuntimeError, match="input must be"):
        stats_op(x[0], t, None, 0, -100, 0.0, False)
    with pytest.raises(RuntimeError, match="target must be"):
        stats_op(x, t.float(), None, 0, -100, 0.0, False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        stats_op(x, t, torch.ones(5, device=device), 0, -100, 0.0, False)
    lse = torch.zeros(2, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="lse must be"):
        backward_op(x, t, None, lse, torch.zeros(3, 3, device=device), 0, -100, 0.0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_shard_opcheck(backend, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, generator=g).to(device)
    target = torch.tensor([1, 12, -100, 8], device=device)
    w = torch.rand(9, generator=g).to(device)
    lse = torch.logsumexp(x.double(), 1)
    coeffs = torch.randn(4, 3, generator=g).to(device)
    torch.library.opcheck(_op(backend, "cross_entropy_shard_stats"), (x, target, w, 3, -100, 1.5, True))
    torch.library.opcheck(_op(backend, "cross_entropy_shard_backward"), (x, target, w, lse, coeffs, 3, -100, 1.5))
