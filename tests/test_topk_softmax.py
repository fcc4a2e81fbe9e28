"""topk_softmax: every backend x dtype x shape x mode against float64 torch.softmax + torch.topk,
the tie, NaN and -inf rules, gradients, gradcheck, opcheck, torch.compile and every bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOLERANCES, assert_close, gradcheck

import alchemy_ops as ao

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
OPS = torch.ops.alchemy_ops


def _logits(shape, dtype=torch.float32, seed=0, layout="contiguous", spread=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        x = torch.randn(tuple(reversed(shape)), generator=g).t()
    else:
        x = torch.randn(shape, generator=g)
    return (x * spread).to(device=device, dtype=dtype)


def _oracle(x, k, dim=-1, renormalize=True, temperature=1.0):
    """float64 PyTorch: softmax -> topk (-> renormalise), with the stable-sort order for the indices
    (torch.topk leaves the order of equal values unspecified)."""
    x64 = x.double().movedim(dim, -1)
    idx = torch.sort(x64.detach(), dim=-1, descending=True, stable=True).indices[..., :k]
    values, _ = torch.topk(x64.detach(), k, -1)
    torch.testing.assert_close(x64.detach().gather(-1, idx), values, equal_nan=True, rtol=0, atol=0)
    p = torch.softmax(x64 / temperature, -1)
    w = p.gather(-1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w.movedim(-1, dim), idx.movedim(-1, dim)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# (shape, k, dim, layout): k=1, k=row, odd rows, several Triton blocks, CPU small-k and large-k
# selection, a middle dim, a transposed view, 1-d, empty.
CASES = [
    ((4, 1), 1, -1, "contiguous"),
    ((5, 37), 1, -1, "contiguous"),
    ((5, 37), 5, -1, "contiguous"),
    ((5, 37), 37, -1, "contiguous"),
    ((3, 4500), 50, -1, "contiguous"),
    ((3, 300), 100, -1, "contiguous"),
    ((2, 17, 3), 4, 1, "contiguous"),
    ((6, 37), 8, -1, "transposed"),
    ((6, 13), 3, 0, "contiguous"),
    ((11,), 3, 0, "contiguous"),
    ((0, 5), 2, -1, "contiguous"),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-k{k}-dim{d}-{lay}" for s, k, d, lay in CASES]


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "k", "dim", "layout"), CASES, ids=CASE_IDS)
def test_matches_float64_pytorch(backend, device, shape, k, dim, layout, dtype, renormalize):
    x = _logits(shape, dtype, layout=layout, device=device).requires_grad_()
    temperature = 0.7
    w, idx = ao.topk_softmax(x, k, dim, renormalize=renormalize, temperature=temperature)
    x64 = x.detach().double().requires_grad_()
    w64, idx64 = _oracle(x64, k, dim, renormalize, temperature)
    assert w.dtype == _acc(dtype) and idx.dtype == torch.int64
    assert w.shape == idx.shape == w64.shape
    assert torch.equal(idx, idx64)
    assert_close(w, w64, _acc(dtype))

    g = (torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) + 0.5).to(device)
    (dx,) = torch.autograd.grad(w, x, g.to(w.dtype))
    (dx64,) = torch.autograd.grad(w64, x64, g.double())
    assert dx.dtype == x.dtype and dx.shape == x.shape
    scale = max(dx64.abs().max().item(), 1e-3) if dx64.numel() else 1.0
    assert_close(dx, dx64, dtype, scale=2 * scale)
    if renormalize:  # only the selected logits get gradient
        unselected = torch.ones_like(x, dtype=torch.bool).scatter(dim, idx, False)
        assert (dx[unselected] == 0).all()


def test_zero_dim_logits(backend, device):
    w, idx = ao.topk_softmax(torch.tensor(2.5, device=device), 1)
    assert w.shape == idx.shape == () and w.item() == 1.0 and idx.item() == 0


def test_large_row_sampling_shape(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("a 2^17-long row is too slow for Triton's interpreter")
    x = _logits((2, 131072), seed=5, device=device)
    for renormalize in (True, False):
        w, idx = ao.topk_softmax(x, 50, renormalize=renormalize)
        w64, idx64 = _oracle(x, 50, renormalize=renormalize)
        assert torch.equal(idx, idx64)
        assert_close(w, w64, torch.float32)


@pytest.mark.parametrize("k", [2, 4, 50, 100])
def test_ties_go_to_the_lowest_index(backend, device, k):
    """Logits from {0, 1, 2}: most selected values tie. Checked directly, not against torch.topk."""
    x = torch.randint(0, 3, (4, 300), generator=torch.Generator().manual_seed(7)).float()
    x[1] = 1.0  # one value everywhere: indices 0..k-1
    x[2, ::2] = -0.0  # -0 and +0 are equal
    x[2, 1::2] = 0.0
    w, idx = (t.cpu() for t in ao.topk_softmax(x.to(device), k))
    for r in range(4):
        v = x[r, idx[r]]
        assert (v[:-1] >= v[1:]).all()
        for j in range(k - 1):  # equal values by ascending index
            if v[j] == v[j + 1]:
                assert idx[r, j] < idx[r, j + 1]
        last = v[-1]
        left_out = set(range(300)) - set(idx[r].tolist())
        assert all(x[r, c] < last or (x[r, c] == last and c > idx[r, -1]) for c in left_out)
    assert torch.equal(idx[1], torch.arange(k))
    assert torch.equal(idx[2], torch.arange(k))
    torch.testing.assert_close(w[1], torch.full((k,), 1.0 / k))


def test_small_tie_example(backend, device):
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]], device=device)
    assert ao.topk_softmax(x, 2)[1].tolist() == [[1, 2]]
    assert ao.topk_softmax(x, 4)[1].tolist() == [[1, 2, 4, 5]]
    assert ao.topk_softmax(torch.tensor([[-0.0, 0.0]], device=device), 1)[1].tolist() == [[0]]


@pytest.mark.parametrize("k", [3, 70])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full"])
def test_nan_sorts_first_and_makes_its_row_nan(backend, device, renormalize, k):
    """NaN counts as larger than +inf (torch.topk's order): selected first, lowest index first; a
    row holding a NaN (or +inf) has NaN weights and gradients; the other rows are untouched."""
    x = _logits((4, 80), seed=3, device=device)
    x[1, 7] = math.nan
    x[1, 2] = math.nan
    x[2, 5] = math.inf
    x = x.requires_grad_()
    w, idx = ao.topk_softmax(x, k, renormalize=renormalize)
    assert idx[1, :2].tolist() == [2, 7]
    assert idx[2, 0].item() == 5
    assert torch.isnan(w[1]).all() and torch.isnan(w[2]).all()
    ok = [0, 3]
    w64, idx64 = _oracle(x.detach()[ok], k, renormalize=renormalize)
    assert torch.equal(idx[ok], idx64)
    assert_close(w[ok], w64, torch.float32)
    # The order of the rest of a NaN row is the order of its non-NaN values.
    rest = x.detach()[1].clone()
    rest[[2, 7]] = math.inf
    assert torch.equal(idx[1], _oracle(rest[None], k)[1][0])
    (dx,) = torch.autograd.grad(w, x, torch.ones_like(w))
    assert torch.isfinite(dx[ok]).all()
    assert torch.isnan(dx[1]).any()


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full"])
def test_minus_inf_and_rows_with_fewer_than_k_finite_values(backend, device, renormalize):
    x = torch.tensor(
        [
            [-math.inf, 2.0, -math.inf, 1.0, -math.inf],  # 2 finite values, k = 3
            [-math.inf] * 5,  # fully -inf: NaN, as torch.softmax
            [0.5, -math.inf, 3.0, -1.0, 2.0],
        ],
        device=device,
    ).requires_grad_()
    w, idx = ao.topk_softmax(x, 3, renormalize=renormalize)
    assert idx.tolist() == [[1, 3, 0], [0, 1, 2], [2, 4, 0]]
    w64, _ = _oracle(x.detach(), 3, renormalize=renormalize)
    assert_close(w[[0, 2]], w64[[0, 2]], torch.float32)
    assert w[0, 2].item() == 0.0
    assert torch.isnan(w[1]).all()
    g = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [1.0, -1.0, 0.5]], device=device)
    (dx,) = torch.autograd.grad(w, x, g)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(_oracle(x64, 3, renormalize=renormalize)[0], x64, g.double())
    torch.testing.assert_close(dx[[0, 2]].double(), dx64[[0, 2]], atol=1e-6, rtol=1e-5)
    assert (dx[0, [0, 2, 4]] == 0).all()

    # Rows long enough for the vectorized CPU selection: 2 finite values, and -inf among finite ones.
    wide = torch.full((3, 40), -math.inf, device=device)
    wide[0, [5, 33]] = torch.tensor([1.0, 2.0], device=device)
    wide[1] = _logits((40,), seed=8, device=device)
    wide[1, [7, 20]] = -math.inf
    wide[2, 3:] = _logits((37,), seed=9, device=device)
    for k in (3, 20, 40):
        w, idx = ao.topk_softmax(wide, k, renormalize=renormalize)
        w64, idx64 = _oracle(wide, k, renormalize=renormalize)
        assert torch.equal(idx, idx64)
        assert_close(w, w64, torch.float32)


def test_invariants(backend, device):
    x = _logits((16, 40), seed=11, device=device)
    w, idx = ao.topk_softmax(x, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(16, device=device), atol=1e-6, rtol=0)
    assert (w[:, :-1] >= w[:, 1:]).all()
    full, idx_full = ao.topk_softmax(x, 6, renormalize=False)
    assert torch.equal(idx, idx_full)
    assert (full.sum(-1) <= 1 + 1e-6).all()
    torch.testing.assert_close(full, torch.softmax(x, -1).gather(-1, idx))
    # renormalising the full-row weights gives the renormalised ones
    torch.testing.assert_close(full / full.sum(-1, keepdim=True), w)
    # temperature does not change the selection
    assert torch.equal(ao.topk_softmax(x, 6, temperature=0.1)[1], idx)
    # k = row length: the whole softmax, sorted
    w_all, idx_all = ao.topk_softmax(x, 40)
    torch.testing.assert_close(w_all, torch.softmax(x, -1).gather(-1, idx_all))


def test_deterministic(backend, device):
    x = _logits((9, 130), seed=2, device=device).requires_grad_()
    runs = []
    for _ in range(2):
        w, idx = ao.topk_softmax(x, 7, renormalize=False)
        (dx,) = torch.autograd.grad(w, x, torch.ones_like(w))
        runs.append((w, idx, dx))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full"])
def test_gradcheck(backend, device, renormalize):
    x = _logits((2, 4, 2), torch.float64, seed=9, device=device).requires_grad_()  # small: Triton's interpreter is slow
    assert gradcheck(lambda x: ao.topk_softmax(x, 3, 1, renormalize=renormalize, temperature=1.3)[0], (x,))


def _opcheck_samples(prefix, device):
    fwd = getattr(OPS, f"{prefix}topk_softmax_forward")
    bwd = getattr(OPS, f"{prefix}topk_softmax_backward")
    x = _logits((4, 9), device=device)
    samples = [
        (fwd, (x.clone().requires_grad_(), 3, True, 1.0)),
        (fwd, (x.clone().requires_grad_(), 9, False, 0.5)),
        (fwd, (_logits((2, 3, 5), torch.bfloat16, device=device).requires_grad_(), 2, False, 1.0)),
    ]
    for renormalize in (True, False):
        w, idx, lse = fwd(x, 3, renormalize, 1.0)
        samples.append((bwd, (torch.rand(4, 3, device=device), x, w, idx, lse, renormalize, 1.0)))
    return samples


@pytest.mark.parametrize("prefix", ["", "triton_"], ids=["cpp", "triton"])
def test_opcheck(prefix, device):
    if prefix and "triton" not in ao.available_backends():
        pytest.fail("triton backend unavailable: conftest sets TRITON_INTERPRET=1 on CPU machines")
    for op, args in _opcheck_samples(prefix, device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "full"])
def test_torch_compile_fullgraph(backend, device, renormalize):
    """A router: logits -> topk_softmax -> weighted sum of expert outputs, compiled with fullgraph."""
    torch.manual_seed(0)
    router = torch.nn.Linear(12, 10).to(device)
    experts = torch.randn(10, 5).to(device)

    def step(h):
        w, idx = ao.topk_softmax(router(h), 3, renormalize=renormalize)
        return (w.unsqueeze(-1) * experts[idx]).sum()

    h = torch.randn(8, 12).to(device)
    eager = step(h)
    eager.backward()
    eager_grad = router.weight.grad.clone()
    router.zero_grad()
    compiled = torch.compile(step, fullgraph=True)(h)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(router.weight.grad, eager_grad)


BAD_INPUTS = [
    ({"k": 0}, ValueError, "k must be in"),
    ({"k": 11}, ValueError, r"k must be in \[1, 10\]"),
    ({"k": -2}, ValueError, "k must be in"),
    ({"k": 2.0}, ValueError, "k must be an int"),
    ({"k": "3"}, ValueError, "k must be an int"),
    ({"k": True}, ValueError, "k must be an int"),
    ({"k": torch.tensor(2)}, ValueError, "k must be an int"),
    ({"dim": 2}, ao.DimensionError, "dim 2 is out of range"),
    ({"dim": -3}, ao.DimensionError, "dim -3 is out of range"),
    ({"temperature": 0.0}, ValueError, "temperature must be finite and > 0"),
    ({"temperature": -1.0}, ValueError, "temperature must be finite and > 0"),
    ({"temperature": math.inf}, ValueError, "temperature must be finite and > 0"),
    ({"temperature": math.nan}, ValueError, "temperature must be finite and > 0"),
    ({"renormalize": "yes"}, ValueError, "renormalize must be True or False"),
]


@pytest.mark.parametrize(("kw", "error", "match"), BAD_INPUTS, ids=[str(b[0]) for b in BAD_INPUTS])
def test_bad_input(backend, device, kw, error, match):
    x = _logits((3, 10), device=device)
    kw = {"k": 2, **kw}
    with pytest.raises(error, match=match):
        ao.topk_softmax(x, **kw)


def test_bad_logits(backend, device):
    with pytest.raises(TypeError, match=r"cast with \.float\(\)"):
        ao.topk_softmax(torch.arange(6, device=device).view(2, 3), 1)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ao.topk_softmax([1.0, 2.0], 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 0\]"):
        ao.topk_softmax(torch.empty(3, 0, device=device), 1)


def test_tolerance_table_is_shared():
    assert set(TOLERANCES) == set(DTYPES)
