"""linear_cross_entropy: loss and the input, weight and bias gradients of every backend x dtype x mode
against float64 F.cross_entropy(F.linear(...)); chunking, odd shapes, memory, PyTorch's own
F.linear_cross_entropy, and every bad input. (conftest junk-fills every CPU allocation, so a
gradient row the chunk loop forgets to write cannot pass.)"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, gradcheck, to_device
from torch.utils._python_dispatch import TorchDispatchMode

import alchemy_ops as ao
from alchemy_ops import reference

# the module (ao.linear_cross_entropy is the function of the same name)
lce = importlib.import_module("alchemy_ops.linear_cross_entropy")

# (atol, rtol) against float64 from the same rounded inputs; atol is scaled by the largest expected
# value. bf16 rounds the logits (as F.linear in bf16 does) and their gradient once per element.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
}
TOKENS, HIDDEN, VOCAB = 11, 8, 37


def _assert_close(actual, expected, dtype, tol_scale=1.0):
    atol, rtol = TOLERANCES[dtype]
    scale = max(expected.abs().nan_to_num(0).max().item(), 1e-3) if expected.numel() else 1.0
    assert actual.dtype == dtype and actual.shape == expected.shape
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol * scale * tol_scale, rtol=rtol * tol_scale, equal_nan=True
    )


def _problem(n=TOKENS, h=HIDDEN, v=VOCAB, dtype=torch.float32, seed=0, bias=True, layout="contiguous", device="cpu"):
    """Random hidden states (in ``layout``), LM-head weight and bias, never constant, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":  # the features dim has the large stride
        x = torch.randn(h, n, generator=g).to(device=device, dtype=dtype).t()
    elif layout == "sliced":  # rows further apart than their length
        x = torch.randn(n, h + 3, generator=g).to(device=device, dtype=dtype)[:, 2 : 2 + h]
    else:
        x = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(v, h, generator=g) * 0.6).to(device=device, dtype=dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(device=device, dtype=dtype) if bias else None
    return x, w, b


def _targets(n, v, ignore_index=-100, ignore_every=4, seed=1, device="cpu"):
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    if ignore_every and n > 1:
        t[::ignore_every] = ignore_index
    return t.to(device)


def _probabilities(n, v, dtype, seed=2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, v, generator=g) * 2, -1).to(device=device, dtype=dtype)


def _oracle(x, w, b, target, class_weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
            z_loss=0.0, softcap=None):  # fmt: skip
    """float64 PyTorch: F.cross_entropy(F.linear(...)), composed with the extras when they are used."""
    logits = F.linear(x, w, b)
    t = target.double() if target.is_floating_point() else target
    cw = None if class_weight is None else class_weight.double()
    if z_loss or softcap is not None:
        return reference.cross_entropy(logits, t, cw, ignore_index, reduction, label_smoothing, z_loss, softcap)
    return F.cross_entropy(
        logits, t, weight=cw, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )


def _upstream(loss):
    """A non-unit upstream gradient: 1.7 for a scalar loss, random per token for reduction="none"."""
    if loss.dim() == 0:
        return torch.tensor(1.7, dtype=loss.dtype, device=loss.device)
    return (torch.rand(loss.shape, generator=torch.Generator().manual_seed(4)) + 0.5).to(loss.device, loss.dtype)


def _check(x, w, b, target, dtype, tol_scale=1.0, **kw):
    """Loss and all gradients against float64, with a non-unit upstream gradient."""
    params = [p.detach().requires_grad_() for p in (x, w, b) if p is not None]
    xr, wr, br = params[0], params[1], params[2] if b is not None else None
    loss = ao.linear_cross_entropy(xr, wr, target, br, **kw)
    p64 = [p.detach().double().requires_grad_() for p in params]
    kw64 = {k: v for k, v in kw.items() if k not in ("chunk_size", "accumulate_fp32", "check_target")}
    expected = _oracle(p64[0], p64[1], p64[2] if b is not None else None, target, **kw64)
    _assert_close(loss, expected, dtype, tol_scale)
    grad = _upstream(loss)
    got = torch.autograd.grad(loss, params, grad)
    want = torch.autograd.grad(expected, p64, grad.double())
    for g, e, p in zip(got, want, params, strict=True):
        assert g.dtype == p.dtype
        _assert_close(g, e, dtype, tol_scale)
    return loss, got


# Keyword sets; "probs" switches to probability targets, "no-bias" drops the bias. Every class-index
# target set has every 4th token at ignore_index.
MODES = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "weight": {"class_weight": True},
    "ignore0": {"ignore_index": 0},
    "smooth": {"label_smoothing": 0.15},
    "smooth-weight-none": {"label_smoothing": 0.3, "class_weight": True, "reduction": "none"},
    "zloss": {"z_loss": 1e-2},
    "softcap-sum": {"softcap": 2.0, "reduction": "sum"},
    "probs": {"probs": True},
    "probs-smooth-weight-none": {"probs": True, "label_smoothing": 0.2, "class_weight": True, "reduction": "none"},
    "no-bias": {"no-bias": True},
}


def _build(mode, n, v, dtype, device="cpu"):
    kw = dict(MODES[mode])
    probs = kw.pop("probs", False)
    if kw.pop("class_weight", False):
        kw["class_weight"] = (torch.rand(v, generator=torch.Generator().manual_seed(3)) + 0.2).to(device, dtype)
    bias = not kw.pop("no-bias", False)
    if probs:
        target = _probabilities(n, v, dtype, device=device)
    else:
        target = _targets(n, v, kw.get("ignore_index", -100), device=device)
    return target, bias, kw


# fp32 and bf16 on every backend; fp64 on cpp only (the interpreter's time is better spent elsewhere).
BACKEND_DTYPES = [(b, d) for b in BACKENDS for d in (torch.float32, torch.bfloat16)] + [("cpp", torch.float64)]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("backend_name", "dtype"), BACKEND_DTYPES, ids=[f"{b}-{d}" for b, d in BACKEND_DTYPES])
def test_loss_and_gradients_match_float64_pytorch(backend_name, device, dtype, mode):
    target, bias, kw = _build(mode, TOKENS, VOCAB, dtype, device)
    x, w, b = _problem(dtype=dtype, bias=bias, device=device)
    with ao.backend(backend_name):
        _check(x, w, b, target, dtype, chunk_size=3, **kw)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, None, 100])
@pytest.mark.parametrize("mode", ["plain", "probs-smooth-weight-none"])
def test_chunk_sizes(backend, device, chunk_size, mode):
    """Chunks that do and do not divide N, the default (one chunk at this N) and one larger than N."""
    target, bias, kw = _build(mode, TOKENS, VOCAB, torch.float32, device)
    _check(*_problem(bias=bias, device=device), target, torch.float32, chunk_size=chunk_size, **kw)


def test_default_chunk_size_rule():
    assert lce.default_chunk_size(8192, 1024, 32000) == 256  # ceil(32000 / 1024) = 32: 8192 / 32
    assert lce.default_chunk_size(65536, 4096, 128256) == 2048  # ceil(V / H) = 32
    assert lce.default_chunk_size(5000, 1000, 3000) == 2048  # next power of two of ceil(5000 / 3)
    assert lce.default_chunk_size(2048, 1024, 128000) == 256  # at least MIN_CHUNK_ROWS = 256...
    assert lce.default_chunk_size(100, 1024, 128000) == 100  # ...but never more than N
    assert lce.default_chunk_size(300, 64, 10) == 300  # V <= H: one chunk
    assert lce.default_chunk_size(0, 8, 8) == 1


# (N, H, V): one token, one class, three classes, one feature, no tokens.
ODD_SHAPES = [(1, 5, 7), (6, 4, 1), (6, 4, 3), (6, 1, 9), (0, 4, 5)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_odd_shapes(backend, device, shape, reduction):
    n, h, v = shape
    x, w, b = _problem(n, h, v, device=device)
    loss, grads = _check(x, w, b, _targets(n, v, device=device), torch.float32, reduction=reduction, chunk_size=4)
    if n == 0:  # what F.cross_entropy(F.linear(...)) gives: NaN mean, 0 sum, empty none; zero gradients
        assert {"mean": math.isnan, "sum": lambda v: v == 0}.get(reduction, lambda v: True)(loss.sum().item())
        assert all(not g.any() for g in grads[1:])


@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_single_token_input(backend, device, reduction, probs):
    """(H) input with a () class index or a (V) probability target, like F.linear_cross_entropy."""
    x, w, b = _problem(1, 6, 9, device=device)
    target = _probabilities(1, 9, torch.float32, device=device)[0] if probs else torch.tensor(4, device=device)
    loss, _ = _check(x[0], w, b, target, torch.float32, reduction=reduction)
    assert loss.shape == ()


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_non_contiguous_input_and_weight(backend, device, layout):
    x, _, b = _problem(layout=layout, device=device)
    # e.g. a tied, transposed weight
    w = torch.randn(HIDDEN, VOCAB, generator=torch.Generator().manual_seed(7)).to(device).t()
    assert not x.is_contiguous() and not w.is_contiguous()
    _check(x, w, b, _targets(TOKENS, VOCAB, device=device), torch.float32, chunk_size=4, label_smoothing=0.1)


def test_accumulate_fp32_false():
    """Accumulating the weight/bias gradients in bf16 still matches (looser), but rounds per chunk:
    with 64 one-row chunks it is less accurate than the fp32 accumulation. (The accumulation is the
    same code on every backend: tested on the default one.)"""
    x, w, b = _problem(64, 8, 37, torch.bfloat16)
    t = _targets(64, 37)
    errors = {}
    for acc in (True, False):
        _, (_, dw, _) = _check(x, w, b, t, torch.bfloat16, tol_scale=3, chunk_size=1, accumulate_fp32=acc)
        w64 = w.double().requires_grad_()
        (exact,) = torch.autograd.grad(_oracle(x.double(), w64, b.double(), t) * 1.7, w64)
        errors[acc] = (dw.double() - exact).abs().max().item()
    assert errors[True] < errors[False]
    # fp32 parameters: the option changes nothing
    x, w, b = _problem()
    runs = [_check(x, w, b, t[:TOKENS], torch.float32, chunk_size=3, accumulate_fp32=acc)[1] for acc in (True, False)]
    assert all(torch.equal(a, c) for a, c in zip(*runs, strict=True))


def test_no_grad_path_makes_no_gradient_buffers(backend, monkeypatch):
    x, w, b = _problem()
    t = _targets(TOKENS, VOCAB)
    with_grad = ao.linear_cross_entropy(x.requires_grad_(), w, t, b, chunk_size=3)

    def refuse(*args, **kwargs):
        raise AssertionError("a gradient buffer was made without a gradient to compute")

    monkeypatch.setattr(lce, "_Gradients", refuse)
    with torch.no_grad():
        loss = ao.linear_cross_entropy(x, w, t, b, chunk_size=3)
    assert not loss.requires_grad
    plain = ao.linear_cross_entropy(x.detach(), w, t, b, chunk_size=3, reduction="none")
    assert not plain.requires_grad and plain.shape == (TOKENS,)
    torch.testing.assert_close(loss, with_grad.detach(), atol=0, rtol=0)


def test_weight_only_gradient(backend, device):
    """Frozen hidden states: only the weight and bias gradients are formed."""
    x, w, b = _problem(device=device)
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = ao.linear_cross_entropy(x, wr, _targets(TOKENS, VOCAB, device=device), br, chunk_size=4)
    loss.backward()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    _oracle(x.double(), w64, b64, _targets(TOKENS, VOCAB, device=device)).backward()
    _assert_close(wr.grad, w64.grad, torch.float32)
    _assert_close(br.grad, b64.grad, torch.float32)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_materializes_the_logits(backend, reduction):
    """No [N, V] tensor in forward or backward: the largest is a chunk of logits or d weight."""
    n, h, v, rows = 48, 4, 50, 8
    x, w, b = (p.requires_grad_() for p in _problem(n, h, v))
    mode = _LargestTensor()
    with mode:
        loss = ao.linear_cross_entropy(x, w, _targets(n, v), b, reduction=reduction, chunk_size=rows)
        loss.backward(torch.ones_like(loss))
    assert mode.largest == max(rows * v, v * h, n * h) < n * v


def test_mean_saves_only_the_gradients(backend):
    """reduction mean: backward needs no logits, no input, nothing but the three gradients."""
    if backend == "reference":
        pytest.skip("the reference backend's forward runs autograd on each chunk, which saves tensors too")
    x, w, b = (p.requires_grad_() for p in _problem())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        loss = ao.linear_cross_entropy(x, w, _targets(TOKENS, VOCAB), b, chunk_size=3)
    assert sorted(s.shape for s in saved) == sorted([x.shape, w.shape, b.shape])
    loss.backward()


def test_backward_twice(backend):
    """retain_graph: unit upstream gradients accumulate; after a non-unit one has scaled the saved
    gradients in place, another backward raises instead of returning them scaled twice."""
    x, w, b = (p.requires_grad_() for p in _problem())
    t = _targets(TOKENS, VOCAB)
    loss = ao.linear_cross_entropy(x, w, t, b, chunk_size=5)
    loss.backward(retain_graph=True)
    once = w.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(w.grad, 2 * once)
    loss.backward(torch.tensor(3.0), retain_graph=True)
    torch.testing.assert_close(w.grad, 5 * once)
    for again in (2.0, 1.0):
        with pytest.raises(RuntimeError, match="once"):
            loss.backward(torch.tensor(again), retain_graph=True)
    none = ao.linear_cross_entropy(x, w, t, b, reduction="none", chunk_size=5)  # recomputes: any number of times
    g = torch.rand(TOKENS)
    first = torch.autograd.grad(none, w, g, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(none, w, g)[0], first, atol=0, rtol=0)


def test_deterministic(backend, device):
    x, w, b = (p.requires_grad_() for p in _problem(20, 8, 37, device=device))
    t = _targets(20, 37, device=device)
    runs = []
    for _ in range(2):
        x.grad = w.grad = b.grad = None
        loss = ao.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, chunk_size=6)
        loss.backward()
        runs.append([loss.detach().clone(), x.grad.clone(), w.grad.clone(), b.grad.clone()])
    assert all(torch.equal(a, c) for a, c in zip(*runs, strict=True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend, device, reduction):
    x, w, b = (p.requires_grad_() for p in _problem(4, 3, 5, torch.float64, device=device))
    t = _targets(4, 5, ignore_every=3, device=device)
    cw = torch.rand(5, dtype=torch.float64, device=device) + 0.5
    kw = {"class_weight": cw, "label_smoothing": 0.1, "z_loss": 1e-2, "reduction": reduction, "chunk_size": 3}

    def fn(x, w, b):
        return ao.linear_cross_entropy(x, w, t, b, **kw)

    assert gradcheck(fn, (x, w, b))


# ---- torch.nn.functional.linear_cross_entropy (torch >= 2.13) --------------------------------------


def _torch_options(chunked):
    if not chunked:
        return None
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None:
        pytest.skip("torch.nn.LinearCrossEntropyOptions needs torch >= 2.13")
    return options(batch_chunk_size=4, acc_policy="accurate")


# (keyword arguments, PyTorch's chunked path or its reference one); the chunked one has no label smoothing.
TORCH_CASES = [
    pytest.param({}, False, id="mean-reference"),
    pytest.param({}, True, id="mean-chunked"),
    pytest.param({"reduction": "sum", "ignore_index": 3}, False, id="sum-ignore-reference"),
    pytest.param({"reduction": "sum", "ignore_index": 3}, True, id="sum-ignore-chunked"),
    pytest.param({"reduction": "none", "weight": True}, False, id="none-weight-reference"),
    pytest.param({"reduction": "none", "weight": True}, True, id="none-weight-chunked"),
    pytest.param({"label_smoothing": 0.1}, False, id="smooth-reference"),
]


@pytest.mark.parametrize(("kw", "chunked"), TORCH_CASES)
def test_matches_torch_linear_cross_entropy(kw, chunked):
    """PyTorch's own op, options=None (its reference composition) and chunked, where its arguments apply
    (its ``weight`` is our ``class_weight``, ``linear_bias`` our ``bias``)."""
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("F.linear_cross_entropy needs torch >= 2.13")
    x, w, b = _problem()
    t = _targets(TOKENS, VOCAB, kw.get("ignore_index", -100))
    cw = torch.rand(VOCAB) + 0.5 if kw.get("weight") else None
    theirs_kw = dict(kw, weight=cw, options=_torch_options(chunked))
    ours_kw = {k: v for k, v in kw.items() if k != "weight"}
    results = []
    for fn in (
        lambda x, w, b: ao.linear_cross_entropy(x, w, t, b, class_weight=cw, chunk_size=4, **ours_kw),
        lambda x, w, b: F.linear_cross_entropy(x, w, t, linear_bias=b, **theirs_kw),
    ):
        params = [p.clone().requires_grad_() for p in (x, w, b)]
        loss = fn(*params)
        loss.backward(torch.ones_like(loss))
        results.append([loss.detach(), *(p.grad for p in params)])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- bad input: a clear Python exception, before any work ------------------------------------------


def _x(*shape):
    return torch.randn(*(shape or (4, 3)))


def _w(*shape, **kw):
    return torch.randn(*(shape or (5, 3)), **kw)


def _t(*shape, **kw):
    return torch.zeros(*(shape or (4,)), dtype=torch.long, **kw)


# (name, positional args, keyword args, error, message pattern)
BAD_INPUTS = [
    ("3-d input", (_x(2, 4, 3), _w(), _t(2, 4)), {}, ValueError, r"flatten\(0, -2\).*target\.flatten\(\)"),
    ("0-d input", (torch.tensor(1.0), _w(5, 1), torch.tensor(0)), {}, ValueError, "flatten"),
    ("integer input", (torch.ones(4, 3, dtype=torch.long), _w(), _t()), {}, TypeError, "floating-point"),
    ("1-d weight", (_x(), _w(3), _t()), {}, ValueError, r"\(V, H\).*class_weight"),
    ("hidden size", (_x(), _w(5, 4), _t()), {}, ValueError, r"hidden size.*3 features.*\(V, 3\)"),
    ("no classes", (_x(), _w(0, 3), _t()), {}, ValueError, "at least one class"),
    ("bias shape", (_x(), _w(), _t(), torch.ones(4)), {}, ValueError, r"bias must have shape \(5,\)"),
    ("weight dtype", (_x(), _w(dtype=torch.float64), _t()), {}, TypeError, r"weight is torch.float64.*\.to\(\)"),
    ("bias dtype", (_x(), _w(), _t(), torch.ones(5, dtype=torch.bfloat16)), {}, TypeError, "bias is torch.bfloat16"),
    ("weight device", (_x(), _w(device="meta"), _t()), {}, ValueError, "weight is on meta"),
    ("bias device", (_x(), _w(), _t(), torch.ones(5, device="meta")), {}, ValueError, "bias is on meta"),
    ("target device", (_x(), _w(), _t(device="meta")), {}, ValueError, "target is on meta"),
    ("target shape", (_x(), _w(), _t(3)), {}, ValueError, r"target must have shape \(4,\)"),
    ("probability target shape", (_x(), _w(), torch.rand(4, 6)), {}, TypeError, r"shape \(4, 5\)"),
    ("float class-index target", (_x(), _w(), torch.zeros(4)), {}, TypeError, r"\.long\(\)"),
    ("bool target", (_x(), _w(), torch.ones(4, dtype=torch.bool)), {}, TypeError, r"\.long\(\)"),
    ("class_weight shape", (_x(), _w(), _t()), {"class_weight": torch.ones(3)}, ValueError, r"class_weight.*\(5,\)"),
    ("class_weight device", (_x(), _w(), _t()), {"class_weight": torch.ones(5, device="meta")}, ValueError, "meta"),
    ("zero chunk_size", (_x(), _w(), _t()), {"chunk_size": 0}, ValueError, "chunk_size"),
    ("negative chunk_size", (_x(), _w(), _t()), {"chunk_size": -2}, ValueError, "chunk_size"),
    ("float chunk_size", (_x(), _w(), _t()), {"chunk_size": 2.5}, TypeError, "chunk_size"),
    ("bool chunk_size", (_x(), _w(), _t()), {"chunk_size": True}, TypeError, "chunk_size"),
    ("accumulate_fp32", (_x(), _w(), _t()), {"accumulate_fp32": "yes"}, TypeError, "accumulate_fp32"),
    ("reduction", (_x(), _w(), _t()), {"reduction": "avg"}, ValueError, "reduction"),
    ("label_smoothing", (_x(), _w(), _t()), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ("z_loss", (_x(), _w(), _t()), {"z_loss": -1.0}, ValueError, "z_loss"),
    ("softcap", (_x(), _w(), _t()), {"softcap": 0.0}, ValueError, "softcap"),
    ("ignore_index", (_x(), _w(), _t()), {"ignore_index": 1.0}, TypeError, "ignore_index"),
    ("not a tensor", ([[1.0, 2.0, 3.0]], _w(), _t(1)), {}, TypeError, "input must be a torch.Tensor"),
    ("weight not a tensor", (_x(), [[1.0] * 3] * 5, _t()), {}, TypeError, "weight must be a torch.Tensor"),
    (
        "out-of-range target",
        (_x(9, 3), _w(), torch.tensor([0, 1, 2, 3, 4, 4, 3, 5, 0])),
        {"chunk_size": 2},
        IndexError,
        r"Target 5 is out of bounds \(position \(7,\), 5 classes",
    ),  # fmt: skip
    ("negative target", (_x(), _w(), torch.tensor([0, -3, 1, 2])), {}, IndexError, r"Target -3 .*\(position \(1,\)"),
    ("probability target with grad", (_x(), _w(), torch.rand(4, 5, requires_grad=True)), {}, ValueError, "detach"),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "error", "match"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clearly_before_any_work(backend, device, monkeypatch, name, args, kwargs, error, match):
    def no_work(*a, **k):
        raise AssertionError("a matmul ran before the arguments were checked")

    monkeypatch.setattr(lce, "_logits", no_work)
    with pytest.raises(error, match=match):
        ao.linear_cross_entropy(*to_device(args, device), **to_device(kwargs, device))


def test_unchecked_bad_target_gives_nan_not_a_crash(backend, device):
    if backend == "reference":
        pytest.skip("the reference backend is PyTorch, which raises by itself")
    x, w, b = _problem(device=device)
    t = _targets(TOKENS, VOCAB, device=device)
    t[5] = VOCAB + 2
    loss = ao.linear_cross_entropy(x, w, t, b, reduction="none", check_target=False, chunk_size=4)
    assert torch.isnan(loss[5]) and torch.isfinite(loss[torch.arange(TOKENS, device=device) != 5]).all()
