"""log_softmax / softmax: every backend x dtype x shape against a float64 PyTorch reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    TOLERANCES,
    RecordedTensor,
    RecordingMode,
    assert_close,
    backward_under_compiled_autograd,
    gradcheck,
    gradgradcheck,
)

import alchemy_ops as ao

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _make(shape, dtype, device="cpu", seed=0, layout="contiguous"):
    """Random logits (spread ~3) with the requested layout; never constant."""
    g = torch.Generator().manual_seed(seed)

    def buffer(*size):  # drawn on CPU (the same values on every device), the view taken after the move
        return torch.randn(size, generator=g).mul(3).to(device=device, dtype=dtype)

    if layout == "transposed":  # class dim with a large stride, rows with unit stride
        x = buffer(*reversed(shape)).t()
    elif layout == "sliced":  # unit class stride, rows further apart than their length
        x = buffer(*shape[:-1], shape[-1] + 5)[..., 2 : 2 + shape[-1]]
    elif layout == "permuted":  # dims around `dim` that cannot be collapsed without a copy
        x = buffer(shape[2], shape[0], shape[1]).permute(1, 2, 0)
    else:
        x = buffer(*shape)
    return x


# (shape, dim, layout): C=1, C=3, odd, >1 block, large; K-dim with dim=1; non-contiguous; empty; 0-d.
CASES = [
    ((4, 1), -1, "contiguous"),
    ((5, 3), -1, "contiguous"),
    ((7, 37), -1, "contiguous"),
    ((3, 1025), -1, "contiguous"),
    ((2, 70000), -1, "contiguous"),
    ((2, 5, 3, 4), 1, "contiguous"),
    ((3, 19, 33), 1, "contiguous"),
    ((6, 37), 0, "contiguous"),
    ((6, 37), -1, "transposed"),
    ((6, 37), -1, "sliced"),
    ((3, 4, 21), 1, "permuted"),
    ((0, 5), -1, "contiguous"),
    ((4, 0), -1, "contiguous"),
    ((), 0, "contiguous"),
]
CASE_IDS = [f"{'x'.join(map(str, s)) or 'scalar'}-dim{d}-{lay}" for s, d, lay in CASES]


def _reference(x, dim, temperature, log, dtype=None):
    z = (x if dtype is None else x.to(dtype)).double() / temperature
    return torch.log_softmax(z, dim) if log else torch.softmax(z, dim)


@pytest.mark.parametrize("log", [True, False], ids=["log_softmax", "softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "dim", "layout"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.37])
def test_forward_backward_match_float64(backend, device, shape, dim, layout, dtype, log, temperature):
    x = _make(shape, dtype, device, layout=layout).requires_grad_()
    fn = ao.log_softmax if log else ao.softmax
    y = fn(x, dim, temperature=temperature)
    assert y.dtype == dtype and y.shape == x.shape
    expected = _reference(x.detach(), dim, temperature, log)
    assert_close(y, expected, dtype, scale=max(1.0, expected.abs().max().item() if expected.numel() else 1.0))

    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    (dx,) = torch.autograd.grad(y, x, grad)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(_reference(x64, dim, temperature, log), x64, grad.double())
    assert dx.dtype == dtype
    scale = max(1.0, dx64.abs().max().item() if dx64.numel() else 1.0)
    # The saved output is rounded to the dtype before backward: one more rounding than forward.
    assert_close(dx, dx64, dtype, scale=2 * scale)


@pytest.mark.parametrize("log", [True, False], ids=["log_softmax", "softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 300), (2, 67, 300)], ids=["C5", "C67"])
def test_cpp_lanes_block_widths_match_float64(shape, dtype, log):
    """The C++ kernel's class-dim-1 blocks: 300 positions run as 4- or 16-wide (forward, by C) and
    32-wide (backward) vector blocks, then single vectors, then scalar rows. Only the cpp backend
    has these paths (the general cases above run every backend on class dim 1)."""
    x = _make(shape, dtype).requires_grad_()
    fn = ao.log_softmax if log else ao.softmax
    with ao.backend("cpp"):
        y = fn(x, 1, temperature=0.8)
        g = torch.randn(shape, dtype=torch.float64).to(dtype)
        (dx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    expected = _reference(x64, 1, 0.8, log)
    (expected_dx,) = torch.autograd.grad(expected, x64, g.double())
    assert_close(y, expected.detach(), dtype, scale=max(1.0, expected.abs().max().item()))
    assert_close(dx, expected_dx, dtype, scale=max(1.0, expected_dx.abs().max().item()))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_softmax_rows_sum_to_one(backend, device, temperature):
    x = _make((9, 1000), torch.float32, device)
    p = ao.softmax(x, temperature=temperature)
    torch.testing.assert_close(p.sum(-1).double(), torch.ones(9, dtype=torch.float64, device=device), atol=1e-5, rtol=0)
    assert (p >= 0).all()
    # log-softmax agrees with the log of softmax
    torch.testing.assert_close(ao.log_softmax(x, temperature=temperature), p.log(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_rows_match_pytorch(backend, device, dtype, log):
    """-inf entries are fine; a row with NaN, +inf or only -inf is NaN everywhere, as in PyTorch."""
    inf, nan = math.inf, math.nan
    C = 70  # longer than one vector, with a tail
    rows = torch.randn(6, C, generator=torch.Generator().manual_seed(3))
    rows[0, ::3] = -inf  # some -inf
    rows[0, 40:] = -inf  # a -inf tail
    rows[1, :] = -inf  # fully -inf
    rows[2, 17] = nan
    rows[3, 65] = inf
    rows[4, :50] = -inf  # max first seen late
    rows[5] *= 1e4  # extreme but finite
    x = rows.to(device=device, dtype=dtype)
    fn, tfn = (ao.log_softmax, torch.log_softmax) if log else (ao.softmax, torch.softmax)
    y = fn(x, -1)
    expected = tfn(x.double(), -1)
    assert torch.equal(y.isnan(), expected.isnan()), "NaN pattern differs from PyTorch"
    assert_close(y, expected, dtype, scale=max(1.0, expected[torch.isfinite(expected)].abs().max().item()))
    # The same rows along dim=1 of a K-dim tensor (lanes path on CPU).
    x3 = x.t().unsqueeze(0).contiguous().transpose(1, 2).transpose(1, 2)  # [1, C, 6], inner stride 1
    y3 = fn(x3, 1)
    assert torch.equal(y3.isnan(), expected.t().unsqueeze(0).isnan())


def test_backward_propagates_nan(backend, device):
    x = torch.randn(3, 40, dtype=torch.float64).to(device)
    x[1, 5] = math.nan
    x.requires_grad_()
    for fn in (ao.log_softmax, ao.softmax):
        (dx,) = torch.autograd.grad(fn(x, -1), x, torch.randn(3, 40, dtype=torch.float64).to(device))
        assert dx[1].isnan().all() and not dx[[0, 2]].isnan().any()


def test_dtype_argument_casts_first(backend, device):
    x = _make((4, 33), torch.bfloat16, device)
    y = ao.log_softmax(x, dtype=torch.float32)  # fused widening
    assert y.dtype == torch.float32
    assert_close(y, torch.log_softmax(x.double(), -1), torch.float32, scale=10)
    y64 = ao.softmax(_make((4, 33), torch.float32, device), dtype=torch.float64)
    assert y64.dtype == torch.float64
    assert_close(y64, torch.softmax(_make((4, 33), torch.float32, device).double(), -1), torch.float64)
    # integer logits are accepted when dtype= makes them floating, as in torch.log_softmax
    ints = torch.arange(12, device=device).reshape(3, 4)
    torch.testing.assert_close(
        ao.log_softmax(ints, dtype=torch.float32), torch.log_softmax(ints, -1, dtype=torch.float32)
    )
    # gradient flows back to the original dtype
    xb = x.clone().requires_grad_()
    ao.log_softmax(xb, dtype=torch.float32).sum().backward()
    assert xb.grad.dtype == torch.bfloat16


def test_deterministic(backend, device):
    x = _make((16, 3000), torch.float32, device)
    g = torch.randn(16, 3000).to(device)
    outs = []
    for _ in range(2):
        xr = x.clone().requires_grad_()
        y = ao.log_softmax(xr, temperature=0.7)
        y.backward(g)
        outs.append((y.detach(), xr.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("log", [True, False])
@pytest.mark.parametrize(
    ("shape", "dim", "layout"), [((3, 7), -1, "contiguous"), ((2, 4, 3), 1, "contiguous"), ((4, 5), -1, "transposed")]
)
def test_gradcheck_and_gradgradcheck(backend, device, shape, dim, layout, log):
    x = _make(shape, torch.float64, device, layout=layout).requires_grad_()
    fn = ao.log_softmax if log else ao.softmax
    assert gradcheck(lambda t: fn(t, dim, temperature=0.6), (x,))
    assert gradgradcheck(lambda t: fn(t, dim, temperature=0.6), (x,))


def _op_samples(device):
    for layout, shape, dim in [("contiguous", (3, 17), 1), ("contiguous", (2, 5, 3), 1), ("transposed", (4, 6), 1)]:
        for dtype in (torch.float32, torch.float64):
            yield _make(shape, dtype, device, layout=layout).requires_grad_(), dim


@pytest.mark.parametrize("prefix", ["", "triton_"])
def test_opcheck(prefix, device):
    if prefix and "triton" not in ao.available_backends():
        pytest.skip("the triton package is not installed")
    forward = getattr(torch.ops.alchemy_ops, f"{prefix}softmax_forward")
    backward = getattr(torch.ops.alchemy_ops, f"{prefix}softmax_backward")
    for x, dim in _op_samples(device):
        for log in (True, False):
            torch.library.opcheck(forward, (x, dim, 0.8, log, None))
            y = forward(x.detach(), dim, 0.8, log, None)
            torch.library.opcheck(backward, (torch.randn_like(y), y, dim, 0.8, log))
    xb = _make((3, 17), torch.bfloat16, device)
    torch.library.opcheck(forward, (xb, 1, 1.0, True, torch.float32))


def test_torch_compile_fullgraph(backend, device):
    def step(t):
        return (ao.log_softmax(t, temperature=0.5) * 0.3 + ao.softmax(t, 0)).sum()

    x = _make((6, 129), torch.float32, device)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager_out, compiled_out = step(xe), compiled(xc)
    eager_out.backward()
    compiled_out.backward()
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("log", [False, True])
def test_compiled_autograd_traces_the_softmax_node(backend, log):
    """Compiled autograd records the C++ node as one call of its backward, with PyTorch's gradient
    (fp16 input with dtype=float32: the gradient comes back in fp16)."""
    x = _make((5, 7), torch.float16, "cpu").requires_grad_()
    fn = ao.log_softmax if log else ao.softmax
    weights = torch.randn(5, 7, dtype=torch.float64)
    graphs = backward_under_compiled_autograd(lambda: (fn(x, 1, dtype=torch.float32, temperature=0.7) * weights).sum())
    x64 = x.detach().double().requires_grad_()
    ((torch.log_softmax if log else torch.softmax)(x64 / 0.7, 1) * weights).sum().backward()
    assert x.grad.dtype == torch.float16
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-3, rtol=2e-3)
    if backend != "reference":
        node = "AlchemyTritonSoftmaxBackward" if backend == "triton" else "AlchemySoftmaxBackward"
        assert len(graphs) == 1 and node in graphs[0]


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan, 1e-40])
def test_bad_temperature(backend, device, temperature):
    with pytest.raises(ValueError, match="temperature"):
        ao.log_softmax(torch.randn(2, 3, device=device), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        ao.softmax(torch.randn(2, 3, device=device), temperature=temperature)


def test_bad_arguments(backend, device):
    x = torch.randn(2, 3, device=device)
    for dim in (2, -3):
        with pytest.raises(IndexError, match="out of range"):
            ao.log_softmax(x, dim)
        with pytest.raises(ValueError, match="out of range"):  # DimensionError is both
            ao.softmax(x, dim)
    with pytest.raises(TypeError, match="dim must be an int"):
        ao.log_softmax(x, 1.0)
    with pytest.raises(TypeError, match="cast with .float"):
        ao.log_softmax(torch.arange(6, device=device).reshape(2, 3))
    with pytest.raises(TypeError, match="floating-point"):
        ao.softmax(x, dtype=torch.int32)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ao.softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="temperature must be a Python number"):
        ao.softmax(x, temperature=torch.tensor(1.0))


def test_backend_selection(monkeypatch):
    assert ao.available_backends()[0] == "cpp" and "reference" in ao.available_backends()
    with pytest.raises(ValueError, match="unknown backend"):
        ao.backend("cuda")
    from alchemy_ops import _backend

    with ao.backend("reference"):
        assert _backend.resolve(torch.empty(1)) == "reference"
        with ao.backend("cpp"):
            assert _backend.resolve(torch.empty(1)) == "cpp"
        assert _backend.resolve(torch.empty(1)) == "reference"
    assert _backend.resolve(torch.empty(1)) == "cpp"  # auto on CPU


def test_backend_env_default():
    import subprocess
    import sys

    code = "import alchemy_ops, alchemy_ops._backend as b; print(b.current_backend())"
    env = {**__import__("os").environ, "ALCHEMY_OPS_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["ALCHEMY_OPS_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown backend" in bad.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [1, 37, 1024, 1025, 70000])
def test_cuda_matches_cpu(dtype, classes):
    x = _make((33, classes), dtype)
    for log in (True, False):
        fn = ao.log_softmax if log else ao.softmax
        expected = _reference(x, -1, 0.7, log)
        assert_close(fn(x.cuda(), temperature=0.7).cpu(), expected, dtype, scale=20)


def test_tolerance_table_covers_dtypes():
    assert set(TOLERANCES) == set(DTYPES)


def test_torch_compile_recompiles_when_backend_changes():
    """The backend is read at trace time; a change must be guarded, not baked into the graph."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.code))
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda t: ao.log_softmax(t, temperature=2.0), backend=record, fullgraph=True)
    x = _make((4, 9), torch.float32)
    with ao.backend("cpp"):
        y_cpp = fn(x)
    with ao.backend("reference"):
        y_ref = fn(x)
    assert len(graphs) == 2
    assert "alchemy_ops.softmax_forward" in graphs[0] and "alchemy_ops" not in graphs[1]
    torch.testing.assert_close(y_cpp, y_ref)


def test_direct_call_matches_the_operator_declines_and_raises():
    """ao._C.softmax (the common call's entry) gives the operator's result; it returns None (the
    wrapper's checked path then runs) for what needs Python's handling, and raises the operator's
    errors, after which the public functions give their checked messages."""
    x = torch.randn(6, 13, generator=torch.Generator().manual_seed(8))
    for dim, temperature, log in [(-1, 1.0, True), (0, 0.7, False), (1, 2, False)]:
        direct = ao._C.softmax(x, dim, temperature, log)
        assert torch.equal(direct, torch.ops.alchemy_ops.softmax_forward(x, dim, temperature, log, None))
    with pytest.raises(TypeError, match="expected 4 arguments"):
        ao._C.softmax(x, -1, 1.0)
    declined = [
        (x.tolist(), -1, 1.0, True),
        (x.as_subclass(RecordedTensor), -1, 1.0, True),
        (x, True, 1.0, True),  # a bool dim
        (x, -1, True, True),  # a bool temperature
        (x, -1, 1.0, 1),  # log must be a bool
        (x, -1, 2**1100, True),  # an int beyond double
        (x.to("meta"), -1, 1.0, True),
    ]
    for args in declined:
        assert ao._C.softmax(*args) is None
    with RecordingMode():
        assert ao._C.softmax(x, -1, 1.0, True) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ao._C.softmax(x, -1, 1.0, True) is None
    with pytest.raises(IndexError):
        ao._C.softmax(x, 2, 1.0, True)
    with pytest.raises(RuntimeError, match="temperature"):
        ao._C.softmax(x, -1, 1e-40, True)
    with pytest.raises(IndexError, match="alchemy_ops: dim 2 is out of range"):
        ao.log_softmax(x, 2)
    with pytest.raises(TypeError, match="temperature must be a Python number"):
        ao.log_softmax(x, -1, temperature=True)


@pytest.mark.parametrize("fn", [ao.softmax, ao.log_softmax], ids=["softmax", "log_softmax"])
def test_subclasses_and_torch_function_modes_see_the_softmax_operator(fn):
    """The direct call skips torch.ops' __torch_function__ handling, so it must not take these."""
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(9))
    expected = fn(x.double(), -1).float()

    def saw_op(calls):
        return any("alchemy_ops.softmax_forward" in str(f) for f in calls)

    RecordedTensor.calls = []
    y = fn(x.as_subclass(RecordedTensor), -1)
    assert saw_op(RecordedTensor.calls)
    torch.testing.assert_close(y.as_subclass(torch.Tensor), expected)
    with RecordingMode() as mode:
        y = fn(x, -1)
    assert saw_op(mode.calls)
    torch.testing.assert_close(y, expected)
