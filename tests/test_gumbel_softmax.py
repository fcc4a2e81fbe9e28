"""gumbel_softmax: the Philox stream against tl.rand, every backend against the reference with the same
noise, statistics of the samples (chi-square, small tau), finiteness under extreme logits, gradients
(gradcheck with the noise held fixed, straight-through), opcheck, torch.compile, generators, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKENDS, assert_close, gradcheck, gradgradcheck

import alchemy_ops as ao
from alchemy_ops import reference

OPS = torch.ops.alchemy_ops
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable")


def _gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _logits(shape, dtype=torch.float32, seed=0, spread=3.0, device="cpu"):
    return (torch.randn(shape, generator=_gen(seed)) * spread).to(device=device, dtype=dtype)


def _sample(backend, x, seed=7, **kw):
    with ao.backend(backend):
        return ao.gumbel_softmax(x, generator=_gen(seed, x.device), **kw)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi2 >= observed) for the counts of a categorical with these probabilities (no scipy)."""
    n = counts.sum().double()
    expected = probs.double() * n
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    df = torch.tensor((counts.numel() - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


# ---- the noise stream ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "offset"), [(0, 0), (1, 7), (2**63 - 2, 2**32 - 300), (987654321987, 2**40 + 3), (42, 2**31 - 5)]
)
def test_uniforms_are_triton_tl_rand_bit_for_bit(device, seed, offset):
    """cpp, triton (tl.rand itself) and the reference's tensor Philox: the same float32 bits,
    including counters that carry into the high word."""
    s = torch.tensor([seed], device=device)
    expected = reference.philox_uniform(seed, torch.arange(offset, offset + 1000))
    cpp = OPS.philox_uniform(s, offset, 1000).cpu()
    assert torch.equal(cpp, expected)
    assert float(cpp.min()) >= 0 and float(cpp.max()) < 1
    if "triton" in BACKENDS:
        assert torch.equal(OPS.triton_philox_uniform(s, offset, 1000).cpu(), expected)


@pytest.mark.cuda
def test_cuda_uniforms_match_cpu():
    s = torch.tensor([2**62 + 12345])
    cpu = OPS.philox_uniform(s, 2**32 - 1000, 5000)
    assert torch.equal(OPS.philox_uniform(s.cuda(), 2**32 - 1000, 5000).cpu(), cpu)
    if "triton" in BACKENDS:
        assert torch.equal(OPS.triton_philox_uniform(s.cuda(), 2**32 - 1000, 5000).cpu(), cpu)


@pytest.mark.cuda
@pytest.mark.parametrize(("shape", "dim"), [((5, 2000), -1), ((3, 700), -1), ((300, 4), 0)])
def test_cuda_samples_match_cpu(shape, dim):
    """The same seed tensor and offset: the warp, block and strided CUDA kernels draw the CPU's sample."""
    x, s = _logits(shape, seed=22), torch.tensor([77])
    for hard in (False, True):
        cpu = OPS.gumbel_softmax_forward(x, s, 3, 0.5, hard, False, dim)[0]
        cuda = OPS.gumbel_softmax_forward(x.cuda(), s.cuda(), 3, 0.5, hard, False, dim)[0].cpu()
        if hard:
            assert torch.equal(cuda, cpu)
        else:
            torch.testing.assert_close(cuda, cpu, atol=1e-6, rtol=1e-5)


def test_uniforms_are_uniform(device):
    u = OPS.philox_uniform(torch.tensor([5], device=device), 0, 200_000).cpu()
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert chi_square_p_value(counts, torch.full((20,), 0.05)) > 1e-3
    assert abs(float(u.double().mean()) - 0.5) < 5e-3


@needs_triton
@pytest.mark.parametrize("hard", [False, True])
def test_cpp_and_triton_draw_the_same_sample(device, hard):
    """The same generator state gives the same noise on both backends: identical one-hots, and soft
    samples equal up to the last bits of the logs and exps."""
    x = _logits((6, 300), seed=3, device=device)
    a, b = _sample("cpp", x, hard=hard, tau=0.7), _sample("triton", x, hard=hard, tau=0.7)
    if hard:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---- values against the reference (same noise) -----------------------------------------------------

# (shape, dim): C=1, odd C, more than one Triton block, dims other than the last, 1-d, 0-d, empty.
SHAPES = [
    ((4, 1), -1),
    ((5, 37), -1),
    ((3, 4500), -1),
    ((2, 5, 3), 1),
    ((6, 4, 3), 0),
    ((11,), 0),
    ((), 0),
    ((0, 5), -1),
    ((3, 0), 0),
]


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "dim"), SHAPES, ids=[f"{'x'.join(map(str, s)) or 'scalar'}-d{d}" for s, d in SHAPES])
def test_matches_reference_with_the_same_noise(backend, device, shape, dim, dtype, hard):
    x = _logits(shape, dtype, device=device)
    tau = 0.6
    y = _sample(backend, x, tau=tau, hard=hard, dim=dim)
    expected = _sample("reference", x, tau=tau, hard=hard, dim=dim)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    if hard:
        assert torch.equal(y, expected)
        if y.numel():
            assert torch.equal(y.sum(dim), torch.ones_like(y.sum(dim)))
    else:
        # The noise is fp32 on every backend and its logs may differ by an ulp: fp32 tolerances for fp64.
        assert_close(y, expected, torch.float32 if dtype == torch.float64 else dtype)


def test_result_does_not_depend_on_memory_layout(backend, device):
    """Noise is keyed by the logical index: a transposed or sliced view samples as its contiguous copy."""
    base = _logits((37, 6), seed=4, device=device)
    for x in (base.t(), _logits((6, 40), seed=5, device=device)[:, 2:39]):
        assert not x.is_contiguous()
        for hard in (False, True):
            assert torch.equal(_sample(backend, x, hard=hard), _sample(backend, x.contiguous(), hard=hard))


def test_degenerate_rows_are_nan_and_minus_inf_is_never_drawn(backend, device):
    x = _logits((5, 9), seed=6, device=device)
    x[0, 3] = float("nan")
    x[1] = float("-inf")
    x[2, 4] = float("inf")
    x[3, ::2] = float("-inf")  # only odd classes can be drawn
    for hard in (False, True):
        y = _sample(backend, x, hard=hard)
        assert y[:3].isnan().all()
        assert y[3:].isfinite().all() and torch.equal(y[3, ::2], torch.zeros(5, device=device))
        torch.testing.assert_close(y[3:].sum(-1), torch.ones(2, device=device))


# ---- statistics --------------------------------------------------------------------------------------

# False-alarm rate of each chi-square test: 1e-3 (the seeds are fixed, so a run is deterministic).
ALPHA = 1e-3


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_hard_class_frequencies_match_softmax(backend_name, device):
    """Gumbel-max: argmax(logits + g) ~ Categorical(softmax(logits)), whatever tau."""
    if backend_name == "triton" and device == "cpu":  # one interpreted program (~20 ms) per draw: a small test
        logits, draws = torch.tensor([0.5, 0.0, -0.5]), 300
    else:
        logits, draws = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5, -2.0]), 200_000
    x = logits.to(device).expand(draws, -1)
    y = _sample(backend_name, x, seed=11, hard=True, tau=0.3)
    assert torch.equal(y.sum(-1), torch.ones(draws, device=device))
    counts = y.sum(0).cpu()
    probs = torch.softmax(logits.double(), -1)
    assert float(probs.min()) * draws >= 5  # the chi-square approximation holds
    assert chi_square_p_value(counts, probs) > ALPHA


@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b != "triton"])
def test_soft_sample_mean_approaches_softmax_as_tau_shrinks(backend_name, device):
    """E[soft sample] -> softmax(logits) as tau -> 0 (the samples become one-hots); at tau = 1 it
    is visibly flatter. (Triton: its samples are the cpp ones, see test_cpp_and_triton_draw_the_same_sample;
    the interpreter is too slow for 50k rows.)"""
    logits = torch.tensor([1.5, 0.0, -1.0, 0.5])
    probs = torch.softmax(logits, -1)
    draws = 50_000
    x = logits.to(device).expand(draws, -1)
    errors = {}
    for tau in (1.0, 0.05):
        y = _sample(backend_name, x, seed=3, tau=tau).cpu()
        errors[tau] = float((y.double().mean(0) - probs).abs().max())
        if tau == 0.05:  # almost one-hot, at the same class as the hard sample of the same noise
            assert float(y.max(-1).values.double().mean()) > 0.97
            hard = _sample(backend_name, x, seed=3, tau=tau, hard=True).cpu()
            assert torch.equal(y.argmax(-1), hard.argmax(-1))
    # 4 standard errors of a mean of one-hots (<= 0.5 / sqrt(draws)), plus the tau bias.
    assert errors[0.05] < 4 * 0.5 / math.sqrt(draws) + 0.01
    assert errors[1.0] > errors[0.05]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_never_nan_or_inf_with_extreme_logits(backend, device, dtype):
    """>= 10^7 noise draws on cpp (4 x 2.5e6 per dtype) with logits of +-1e4 and -inf entries, tiny and
    large tau: every output finite, soft rows summing to 1, hard rows exact one-hots."""
    rows, classes = (2_500, 1_000) if backend == "cpp" or device == "cuda" else (8, 257)
    g = _gen(9)
    x = torch.randn(rows, classes, generator=g) * 3
    x[torch.rand(rows, classes, generator=g) < 0.2] = 1e4
    x[torch.rand(rows, classes, generator=g) < 0.2] = -1e4
    x[torch.rand(rows, classes, generator=g) < 0.2] = float("-inf")
    x[:, 0] = 0.0  # no row is all -inf
    x = x.to(device=device, dtype=dtype)
    g = _gen(10, device)
    with ao.backend(backend):
        for tau, hard in ((1e-3, False), (1.0, False), (1e3, False), (1.0, True)):
            y = ao.gumbel_softmax(x, tau=tau, hard=hard, generator=g)
            assert y.isfinite().all()
            assert ((y >= 0) & (y <= 1)).all()
            sums = y.float().sum(-1)
            if hard:
                assert torch.equal(sums, torch.ones(rows, device=device))
            else:
                atol = 1e-4 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(sums, torch.ones(rows, device=device), atol=atol, rtol=0)
            assert (y[x == float("-inf")] == 0).all()


# ---- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tau", "dim"), [(1.0, -1), (0.4, 0)])
def test_gradcheck_with_fixed_noise(backend, device, tau, dim):
    x = _logits((3, 7), torch.float64, seed=12, device=device).requires_grad_()

    def fn(t):  # the same generator state on every call: the noise is held fixed
        return ao.gumbel_softmax(t, tau=tau, dim=dim, generator=_gen(5, device))

    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_hard_gradient_is_the_straight_through_formula(backend, device, tau):
    """dx = y (dy - sum(dy y)) / tau with y the soft sample of the same noise, in fp64."""
    x = _logits((4, 9), torch.float64, seed=13, device=device).requires_grad_()
    dy = torch.randn(4, 9, generator=_gen(14), dtype=torch.float64).to(device)
    hard = ao.gumbel_softmax(x, tau=tau, hard=True, generator=_gen(8, device))
    (dx,) = torch.autograd.grad(hard, x, dy)
    with torch.no_grad():
        y = ao.gumbel_softmax(x, tau=tau, generator=_gen(8, device))
    assert torch.equal(hard, torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0))
    expected = y * (dy - (dy * y).sum(-1, keepdim=True)) / tau
    torch.testing.assert_close(dx, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_half_gradients_match_fp64(backend, device, dtype):
    x = _logits((5, 33), dtype, seed=15, device=device).requires_grad_()
    dy = torch.randn(5, 33, generator=_gen(16)).to(device)
    for hard in (False, True):
        (dx,) = torch.autograd.grad(ao.gumbel_softmax(x, 0.8, hard, generator=_gen(2, device)), x, dy.to(dtype))
        x64 = x.detach().double().requires_grad_()
        with ao.backend("reference"):
            sample64 = ao.gumbel_softmax(x64, 0.8, hard, generator=_gen(2, device))
            (dx64,) = torch.autograd.grad(sample64, x64, dy.double())
        assert dx.dtype == dtype
        assert_close(dx, dx64, dtype, scale=4.0)


# ---- operator checks, compile, generators ------------------------------------------------------------


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize(("hard", "keep_soft"), [(False, False), (True, True), (True, False)])
def test_opcheck(backend_name, device, hard, keep_soft):
    op = OPS.gumbel_softmax_forward if backend_name == "cpp" else OPS.triton_gumbel_softmax_forward
    x = _logits((3, 10), torch.float64, seed=17, device=device).requires_grad_(not hard or keep_soft)
    seed = torch.tensor([99], device=device)
    torch.library.opcheck(op, (x, seed, 5, 0.7, hard, keep_soft, -1))
    uniform = OPS.philox_uniform if backend_name == "cpp" else OPS.triton_philox_uniform
    torch.library.opcheck(uniform, (seed, 5, 17))


@pytest.mark.parametrize("hard", [False, True])
def test_torch_compile_fullgraph(backend, device, hard):
    x = _logits((4, 50), seed=18, device=device).requires_grad_()

    def fn(t):
        return ao.gumbel_softmax(t, tau=0.5, hard=hard)

    compiled = torch.compile(fn, fullgraph=True)
    torch.manual_seed(123)
    a = compiled(x)
    torch.manual_seed(123)
    b = compiled(x)
    assert torch.equal(a, b)
    torch.manual_seed(123)
    torch.testing.assert_close(a, fn(x))  # the compiled seed draw is the eager one (same noise)
    c = compiled(x)
    assert not torch.equal(a, c)
    torch.testing.assert_close(a.detach().sum(-1), torch.ones(4, device=device), atol=1e-5, rtol=0)
    (dx,) = torch.autograd.grad(a, x, torch.ones_like(a))
    torch.testing.assert_close(dx, torch.zeros_like(dx), atol=1e-5, rtol=0)  # softmax: d(sum y)/dx = 0


def test_generator_reproduces_advances_and_default_generator_follows_manual_seed(backend, device):
    x = _logits((3, 20), seed=19, device=device)
    g = _gen(77, device)
    first, second = ao.gumbel_softmax(x, generator=g), ao.gumbel_softmax(x, generator=g)
    assert not torch.equal(first, second)  # the generator advanced
    g.manual_seed(77)
    assert torch.equal(ao.gumbel_softmax(x, generator=g), first)
    torch.manual_seed(3)
    a, b = ao.gumbel_softmax(x), ao.gumbel_softmax(x)
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    assert torch.equal(ao.gumbel_softmax(x), a)
    assert ao.gumbel_softmax(x, eps=0.5, generator=_gen(1, device)).equal(
        ao.gumbel_softmax(x, generator=_gen(1, device))
    )


def test_backends_agree_on_the_generator_protocol(device):
    """Every backend draws its seed the same way, so one generator state gives one sample."""
    x = _logits((2, 30), seed=20, device=device)
    samples = [_sample(b, x, seed=21, hard=True) for b in BACKENDS]
    for s in samples[1:]:
        assert torch.equal(s, samples[0])


# ---- bad inputs ------------------------------------------------------------------------------------

BAD = [
    ({"tau": 0.0}, ValueError, "tau"),
    ({"tau": -1.0}, ValueError, "tau"),
    ({"tau": float("nan")}, ValueError, "tau"),
    ({"tau": float("inf")}, ValueError, "tau"),
    ({"tau": 1e-300}, ValueError, "too small"),
    ({"tau": "1"}, TypeError, "tau"),
    ({"tau": True}, TypeError, "tau"),
    ({"dim": 2}, ao.DimensionError, "out of range"),
    ({"dim": -3}, ValueError, "out of range"),
    ({"dim": 1.0}, TypeError, "dim"),
    ({"generator": 5}, TypeError, "generator"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments(backend, device, kwargs, error, message):
    with pytest.raises(error, match=message):
        ao.gumbel_softmax(_logits((2, 3), device=device), **kwargs)


def test_bad_logits(backend, device):
    with pytest.raises(TypeError, match="float"):
        ao.gumbel_softmax(torch.ones(2, 3, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ao.gumbel_softmax([1.0, 2.0])
    with pytest.raises(ValueError, match="generator is for cpu"):  # a generator of another device
        ao.gumbel_softmax(torch.zeros(2, 3, device="meta"), generator=torch.Generator())


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_ops_reject_bad_arguments(backend_name, device):
    op = OPS.gumbel_softmax_forward if backend_name == "cpp" else OPS.triton_gumbel_softmax_forward
    x = _logits((2, 3), device=device)
    for args in [
        (x, torch.tensor([1], device=device), 0, 0.0, False, False, -1),  # tau
        (x, torch.tensor([1.0], device=device), 0, 1.0, False, False, -1),  # seed dtype
        (x, torch.tensor([1, 2], device=device), 0, 1.0, False, False, -1),  # seed size
        (x, torch.tensor([1], device=device), -1, 1.0, False, False, -1),  # offset
    ]:
        with pytest.raises((RuntimeError, ValueError)):
            op(*args)
    x_grad = x.clone().requires_grad_()
    y, _ = op(x_grad, torch.tensor([1], device=device), 0, 1.0, True, False, -1)
    with pytest.raises(RuntimeError, match="keep_soft"):
        y.sum().backward()
