"""cross_entropy: every backend x dtype x shape x mode against float64 PyTorch, plus invariants,
gradcheck, opcheck, torch.compile, in-place backward, nn.CrossEntropyLoss and every bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, backward_under_compiled_autograd, gradcheck, to_device

import alchemy_ops as ao
from alchemy_ops import reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
OPS = torch.ops.alchemy_ops


def _logits(shape, dtype=torch.float32, seed=0, layout="contiguous", spread=3.0, device="cpu"):
    """Random logits (never constant) in the requested layout; class dim 1 (0 for 1-d)."""
    g = torch.Generator().manual_seed(seed)

    def buffer(*size):  # drawn on CPU (the same values on every device), the view taken after the move
        return (torch.randn(size, generator=g) * spread).to(device=device, dtype=dtype)

    if layout == "transposed":  # [N, C] whose class dim has the large stride
        x = buffer(*reversed(shape)).t()
    elif layout == "sliced":  # rows further apart than their length
        x = buffer(*shape[:-1], shape[-1] + 3)[..., 1 : 1 + shape[-1]]
    elif layout == "permuted":  # [N, C, H, W] from a [C, H, N, W] buffer: outer dims do not collapse
        n, c, h, w = shape
        x = buffer(c, h, n, w).permute(2, 0, 1, 3)
    else:
        x = buffer(*shape)
    return x


def _class_dim(x):
    return 1 if x.dim() > 1 else 0


def _targets(x, seed=1, ignore_index=-100, ignore_every=4):
    """Class indices for x, every `ignore_every`-th position set to ignore_index."""
    classes = x.shape[_class_dim(x)]
    shape = x.shape[:1] + x.shape[2:] if x.dim() > 1 else ()
    t = torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(seed))
    if ignore_every and t.numel() > 1:
        t.view(-1)[::ignore_every] = ignore_index
    return t.to(x.device)


def _probabilities(x, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(x.shape, generator=g) * 2, _class_dim(x)).to(device=x.device, dtype=x.dtype)


def _oracle(x, target, **kw):
    """float64 PyTorch: F.cross_entropy itself, composed with the extras when they are used."""
    x64 = x.double()
    t = target.double() if target.is_floating_point() else target
    w = kw.get("weight")
    kw = dict(kw, weight=None if w is None else w.double())
    if kw.get("z_loss") or kw.get("softcap") is not None:
        return reference.cross_entropy(
            x64, t, kw["weight"], kw.get("ignore_index", -100), kw.get("reduction", "mean"),
            kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0), kw.get("softcap"),
        )  # fmt: skip
    return F.cross_entropy(x64, t, **kw)


# (shape, layout): C=1, C=3, odd, more than one Triton block, K-dim, transposed, sliced, permuted, 1-d, empty.
SHAPES = [
    ((4, 1), "contiguous"),
    ((5, 3), "contiguous"),
    ((9, 37), "contiguous"),
    ((3, 4500), "contiguous"),
    ((2, 5, 3, 4), "contiguous"),
    ((3, 7, 5), "contiguous"),
    ((2, 5, 2, 9), "contiguous"),  # 18 positions per sample: CPU lanes of 16 (8 for fp64) and a remainder
    ((6, 37), "transposed"),
    ((6, 37), "sliced"),
    ((2, 5, 3, 4), "permuted"),
    ((11,), "contiguous"),
    ((0, 5), "contiguous"),
    ((2, 5, 0), "contiguous"),
]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-{lay}" for s, lay in SHAPES]

# Keyword sets covering every PyTorch combination; "probs" switches to probability targets.
MODES = {
    "plain": {},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "weight": {"weight": True},
    "ignore7-none": {"ignore_index": 0, "reduction": "none"},
    "smooth": {"label_smoothing": 0.15},
    "smooth-weight": {"label_smoothing": 0.3, "weight": True},
    "smooth-weight-none": {"label_smoothing": 0.3, "weight": True, "reduction": "none"},
    "probs": {"probs": True},
    "probs-smooth-weight": {"probs": True, "label_smoothing": 0.2, "weight": True},
    "probs-none": {"probs": True, "reduction": "none"},
    "zloss-softcap": {"z_loss": 1e-2, "softcap": 2.5},
    "zloss-smooth-weight-sum": {"z_loss": 1e-3, "label_smoothing": 0.1, "weight": True, "reduction": "sum"},
    "probs-softcap-zloss": {"probs": True, "softcap": 4.0, "z_loss": 1e-2},
}


def _build(x, mode):
    kw = dict(MODES[mode])
    probs = kw.pop("probs", False)
    if kw.pop("weight", False):
        w = torch.rand(x.shape[_class_dim(x)], generator=torch.Generator().manual_seed(3)) + 0.2
        kw["weight"] = w.to(x.device)
    target = _probabilities(x) if probs else _targets(x, ignore_index=kw.get("ignore_index", -100))
    return target, kw


def _check_against_oracle(x, target, kw, dtype, grad_scale=2.0):
    x = x.detach().requires_grad_()
    loss = ao.cross_entropy(x, target, **kw)
    expected = _oracle(x.detach(), target, **kw)
    assert loss.dtype == x.dtype and loss.shape == expected.shape
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    assert_close(loss, expected, dtype, scale=scale)

    g = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(4)) + 0.5).to(x.device)
    (dx,) = torch.autograd.grad(loss, x, g.to(loss.dtype))
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(_oracle(x64, target, **kw), x64, g.double())
    assert dx.dtype == x.dtype and dx.shape == x.shape
    # Gradients are O(1/N) for the mean: compare on the scale of the largest one.
    assert_close(dx, dx64, dtype, scale=grad_scale * max(dx64.abs().max().item() if dx64.numel() else 1.0, 1e-3))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), SHAPES, ids=SHAPE_IDS)
def test_loss_and_gradient_match_float64_pytorch(backend, device, shape, layout, dtype, mode):
    x = _logits(shape, dtype, layout=layout, device=device)
    target, kw = _build(x, mode)
    if target.is_floating_point() and target.dtype != dtype:
        target = target.to(dtype)
    _check_against_oracle(x, target, kw, dtype)


@pytest.mark.parametrize("mode", ["plain", "smooth-weight", "probs-smooth-weight", "zloss-softcap"])
def test_large_vocabulary_rows(device, mode):
    """A 2^18-class row: the CPU kernel has no per-row buffer limit and no extra memory."""
    x = _logits((2, 262144), torch.float32, seed=5, device=device)
    target, kw = _build(x, mode)
    _check_against_oracle(x, target, kw, torch.float32)


def test_gradient_rows_sum_to_zero_and_target_term_is_p_minus_one(backend, device):
    x = _logits((8, 300), device=device).requires_grad_()
    t = _targets(x, ignore_every=0)
    ao.cross_entropy(x, t, reduction="sum").backward()
    torch.testing.assert_close(x.grad.sum(1), torch.zeros(8, device=device), atol=1e-5, rtol=0)
    p = torch.softmax(x.detach().double(), 1)
    picked = x.grad.gather(1, t[:, None]).squeeze(1).double()
    torch.testing.assert_close(picked, p.gather(1, t[:, None]).squeeze(1) - 1, atol=1e-6, rtol=1e-6)


def test_bf16_target_term_formed_in_fp32(backend, device):
    """p_y - 1 with p_y close to 1: rounding p_y to bf16 first would give exactly 0 or -2^-8 steps."""
    if backend == "reference":
        # PyTorch's own fp32 log_softmax backward forms exp(log p_y) - 1 after rounding exp to fp32
        # (up to 13% off here with AVX2's exp): the property is our kernels', not PyTorch's.
        pytest.skip("the reference backend is PyTorch's composition, which does not form p_y - 1 exactly")
    x = torch.full((4, 64), -12.0, device=device)
    x[:, 5] = 6.0
    x += torch.linspace(0, 0.01, 64, device=device)
    xb = x.bfloat16().requires_grad_()
    t = torch.full((4,), 5, device=device)
    ao.cross_entropy(xb, t, reduction="sum").backward()
    expected = torch.softmax(xb.detach().double(), 1)[:, 5] - 1
    assert (xb.grad[:, 5] != 0).all()
    torch.testing.assert_close(xb.grad[:, 5].double(), expected, rtol=1e-2, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_extreme_logits_follow_pytorch(backend, device, reduction):
    """-inf entries, a fully -inf row, +inf, NaN, +-1e4: the same values and NaN pattern as PyTorch."""
    x = _logits((7, 9), device=device)
    x[0, 2] = -math.inf  # not the target: finite loss
    x[1] = -math.inf  # fully -inf row: NaN
    x[2, 4] = math.inf  # NaN row, as PyTorch
    x[3, 1] = math.nan
    x[4] = torch.linspace(-1e4, 1e4, 9)
    x[5, 3] = -math.inf  # the target's logit: +inf loss
    t = torch.tensor([1, 0, 0, 2, 8, 3, 4], device=device)
    cases = [{}, {"label_smoothing": 0.1}, {"weight": torch.rand(9, device=device) + 0.5}]
    for kw in cases:
        x1 = x.clone().requires_grad_()
        x2 = x.clone().double().requires_grad_()
        loss = ao.cross_entropy(x1, t, reduction=reduction, **kw)
        kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
        expected = F.cross_entropy(x2, t, reduction=reduction, **kw64)
        torch.testing.assert_close(loss.double(), expected, equal_nan=True, rtol=1e-5, atol=1e-5)
        if reduction == "none":
            g = torch.ones(7, device=device)
            g[[1, 2, 3]] = 0  # keep NaN rows out so the finite rows' gradients are compared
            loss.backward(g)
            expected.backward(g.double())
            ok = [0, 4, 5, 6]
            torch.testing.assert_close(x1.grad[ok].double(), x2.grad[ok], rtol=1e-5, atol=1e-6)


def test_all_ignored_mean_is_nan_like_pytorch(backend, device):
    x = _logits((4, 6), device=device).requires_grad_()
    t = torch.full((4,), -100, device=device)
    loss = ao.cross_entropy(x, t)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x.detach(), t))
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))  # PyTorch's gradient here is zero too
    assert ao.cross_entropy(x.detach(), t, reduction="sum").item() == 0.0


def test_empty_batch_mean_is_nan_like_pytorch(backend, device):
    x = torch.empty(0, 5, device=device)
    assert torch.isnan(ao.cross_entropy(x, torch.empty(0, dtype=torch.long, device=device)))
    assert torch.isnan(ao.cross_entropy(x, torch.empty(0, 5, device=device)))
    assert torch.isnan(F.cross_entropy(x, torch.empty(0, 5, device=device)))


def test_deprecated_size_average_and_reduce(backend, device):
    x, t = _logits((6, 10), device=device), _targets(_logits((6, 10), device=device))
    for size_average, reduce in [(False, None), (None, False), (True, True), (False, True)]:
        with pytest.warns(UserWarning):
            got = ao.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning):
            expected = F.cross_entropy(x, t, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_deterministic(backend, device):
    x = _logits((64, 3000), device=device).requires_grad_()
    t = _targets(x)
    runs = []
    for _ in range(2):
        x.grad = None
        loss = ao.cross_entropy(x, t, label_smoothing=0.1)
        loss.backward()
        runs.append((loss.detach().clone(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(2, 2, 147), (2, 5, 3, 49), (2, 17, 147), (2, 33, 147)], ids=["C2", "C5", "C17", "C33"]
)
def test_cpp_lanes_blocks_match_float64(shape, dtype, mode):
    """The C++ kernel's class-dim-1 blocks: 147 positions per sample run as blocks of 4 vectors (2 from
    16 classes; from 32 classes 512 bytes of each class: 128 fp32 positions), then single vectors, then
    scalar rows (for every vector width: fp32 and fp64, AVX2 and AVX-512). Only the cpp backend has
    these paths (the general cases above run every backend on class dim 1).
    The in-place variant runs the same blocks, its gradient written over the logits."""
    x = _logits(shape, dtype)
    target, kw = _build(x, mode)
    with ao.backend("cpp"):
        _check_against_oracle(x, target, kw, dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss1 = ao.cross_entropy(x1, target, **kw)
        loss2 = ao.cross_entropy(x2 * 1.0, target, inplace_backward=True, **kw)
        torch.testing.assert_close(loss2, loss1)
        g = torch.rand(loss1.shape) + 0.5
        loss1.backward(g.to(loss1.dtype))
        loss2.backward(g.to(loss2.dtype))
        torch.testing.assert_close(x2.grad, x1.grad)  # within rounding: the reductions and lse splits differ


@pytest.mark.parametrize("mode", ["plain", "none", "smooth-weight", "probs-smooth-weight", "zloss-softcap"])
@pytest.mark.parametrize(
    ("shape", "layout"), [((5, 7), "contiguous"), ((2, 4, 3), "contiguous"), ((6, 5), "transposed")]
)
def test_inplace_backward_gives_the_same_gradient(backend, device, mode, shape, layout):
    x = _logits(shape, layout=layout, device=device)
    target, kw = _build(x, mode)
    x1 = x.clone().requires_grad_()
    loss1 = ao.cross_entropy(x1, target, **kw)
    leaf = x.clone().requires_grad_()
    x2 = leaf * 1.0  # logits as a network makes them: a non-leaf (a leaf's .grad would be a copy)
    seen = []
    x2.register_hook(lambda grad: seen.append(grad.data_ptr()))
    loss2 = ao.cross_entropy(x2, target, inplace_backward=True, **kw)
    torch.testing.assert_close(loss2, loss1, atol=1e-6, rtol=1e-6)
    g = torch.rand(loss1.shape, device=device) + 0.5
    loss1.backward(g)
    loss2.backward(g)
    torch.testing.assert_close(leaf.grad, x1.grad, atol=1e-6, rtol=1e-5)
    if backend != "reference":  # the gradient lives in the logits' own buffer
        assert seen == [x2.data_ptr()]


def test_inplace_backward_with_bad_target_loses_nothing(backend, device):
    x = _logits((4, 5), device=device).requires_grad_()
    before = x.detach().clone()
    with pytest.raises(IndexError):
        ao.cross_entropy(x, torch.tensor([0, 1, 5, 2], device=device), inplace_backward=True)
    assert torch.equal(x.detach(), before)


def test_inplace_backward_of_a_saved_tensor_is_an_error_not_a_wrong_gradient(backend, device):
    if backend == "reference":
        pytest.skip("the reference backend computes out of place")
    w = torch.randn(8, 5, device=device, requires_grad=True)
    logits = torch.tanh(w)  # tanh saves its output for backward
    loss = ao.cross_entropy(logits, torch.arange(8, device=device) % 5, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_forward_saves_only_logits_and_per_position_values(backend, device):
    """No N x C intermediate is kept for backward: only the logits and per-position tensors."""
    if backend == "reference":
        pytest.skip("the reference backend is PyTorch's own composition")
    x = _logits((16, 100), device=device).requires_grad_()
    t = _targets(x)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        loss = ao.cross_entropy(x, t, label_smoothing=0.1, weight=torch.rand(100, device=device))
    logits_sized = [s for s in saved if s.numel() == x.numel()]
    assert len(logits_sized) == 1 and logits_sized[0].data_ptr() == x.data_ptr()
    assert all(s.numel() <= x.shape[0] or s.numel() == 100 for s in saved if s.numel() != x.numel())
    loss.backward()


@pytest.mark.parametrize("mode", ["plain", "none", "smooth-weight", "probs-smooth-weight", "zloss-softcap"])
def test_gradcheck(backend, device, mode):
    x = _logits((3, 5, 2), torch.float64, device=device).requires_grad_()
    target, kw = _build(x, mode)
    target = target.double() if target.is_floating_point() else target
    assert gradcheck(lambda x: ao.cross_entropy(x, target, **kw), (x,))


def test_gradcheck_probability_target_gradient(backend, device):
    x = _logits((3, 6), torch.float64, device=device).requires_grad_()
    t = _probabilities(x).double().requires_grad_()
    w = torch.rand(6, dtype=torch.float64, device=device) + 0.5
    assert gradcheck(lambda x, t: ao.cross_entropy(x, t, weight=w, label_smoothing=0.2), (x, t))


def _opcheck_samples(prefix, device):
    x = _logits((4, 6), device=device)
    t = _targets(x)
    w = torch.rand(6, device=device) + 0.5
    p = _probabilities(x)
    fwd = getattr(OPS, f"{prefix}cross_entropy_forward")
    bwd = getattr(OPS, f"{prefix}cross_entropy_backward")
    inplace = getattr(OPS, f"{prefix}cross_entropy_forward_inplace")
    k = _logits((2, 5, 3), device=device)
    kt = _targets(k)
    samples = [
        (fwd, (x.requires_grad_(), t, None, -100, 0.0, 0.0, 0.0, True)),
        (fwd, (x, t, w, -100, 0.1, 1e-3, 3.0, True)),
        (fwd, (x, p.requires_grad_(), w, -100, 0.1, 0.0, 0.0, True)),
        (fwd, (k.requires_grad_(), kt, None, -100, 0.0, 0.0, 0.0, True)),
        (bwd, (torch.rand(4, device=device), x.detach(), t, w, torch.rand(4, device=device) + 2, -100, 0.1, 0.0, 0.0)),
        (inplace, (x.detach().clone(), t, None, torch.full((4,), 0.25, device=device), -100, 0.0, 0.0, 0.0, True)),
    ]
    return samples


@pytest.mark.parametrize("prefix", ["", "triton_"], ids=["cpp", "triton"])
def test_opcheck(prefix, device):
    if prefix and "triton" not in ao.available_backends():
        pytest.fail("triton backend unavailable: conftest sets TRITON_INTERPRET=1 on CPU machines")
    for op, args in _opcheck_samples(prefix, device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
def test_torch_compile_training_step_fullgraph(backend_name, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).to(device)
    criterion = ao.nn.CrossEntropyLoss(label_smoothing=0.1)
    x, y = torch.randn(16, 12).to(device), torch.randint(0, 10, (16,)).to(device)

    def step(x, y):
        return criterion(model(x), y)

    with ao.backend(backend_name):
        eager_loss = step(x, y)
        eager_loss.backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled_loss = torch.compile(step, fullgraph=True)(x, y)
        compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
def test_compiled_autograd_traces_the_loss_node(backend_name):
    """Compiled autograd records the loss's C++ node as one call of its backward (class weights,
    label smoothing, z-loss, a probability target that requires grad) and gets PyTorch's gradients."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.double, requires_grad=True)
    t = torch.randint(0, 5, (6,))
    p = torch.softmax(torch.randn(6, 5, dtype=torch.double), 1).requires_grad_()
    w = torch.rand(5, dtype=torch.double) + 0.5
    for target in (t, p):
        with ao.backend(backend_name):
            graphs = backward_under_compiled_autograd(
                lambda target=target: ao.cross_entropy(x * 1.5, target, weight=w, label_smoothing=0.1)
            )
        ours = (x.grad.clone(), p.grad.clone() if target is p else None)
        x.grad = p.grad = None
        F.cross_entropy(x * 1.5, target, weight=w, label_smoothing=0.1).backward()
        node = (
            "AlchemyTritonCrossEntropyLossBackward" if backend_name == "triton" else "AlchemyCrossEntropyLossBackward"
        )
        assert len(graphs) == 1 and node in graphs[0]
        torch.testing.assert_close(ours[0], x.grad)
        if target is p:
            torch.testing.assert_close(ours[1], p.grad)
        x.grad = p.grad = None


# ---- nn.CrossEntropyLoss ----------------------------------------------------------------------


def test_module_is_a_drop_in():
    w = torch.rand(10)
    ours = ao.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.05)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.05)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert repr(ao.nn.CrossEntropyLoss()) == repr(torch.nn.CrossEntropyLoss()) == "CrossEntropyLoss()"
    assert (ours.ignore_index, ours.reduction, ours.label_smoothing) == (3, "sum", 0.05)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    fresh = ao.nn.CrossEntropyLoss(weight=torch.zeros(10))
    fresh.load_state_dict(theirs.state_dict())
    assert torch.equal(fresh.weight, w)
    x = _logits((8, 10))
    t = _targets(x, ignore_every=0)
    torch.testing.assert_close(ours(x, t), theirs(x, t), atol=1e-5, rtol=1e-5)
    assert "z_loss=0.1" in repr(ao.nn.CrossEntropyLoss(z_loss=0.1))


def test_module_training_on_digits_gives_the_same_loss_curve():
    """A small MLP on scikit-learn's bundled digits (no download): swapping the loss module keeps the curve."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)

    def train(criterion):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(15):
            for i in range(0, len(x), 256):
                opt.zero_grad()
                loss = criterion(model(x[i : i + 256]), y[i : i + 256])
                loss.backward()
                opt.step()
            losses.append(loss.item())
        return losses

    ours = train(ao.nn.CrossEntropyLoss(label_smoothing=0.05))
    theirs = train(torch.nn.CrossEntropyLoss(label_smoothing=0.05))
    assert ours[-1] < 0.5 * ours[0]  # it learns
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), atol=1e-4, rtol=1e-3)


# ---- bad input: a clear Python exception, on every backend, before anything is written --------


def test_out_of_range_target_names_value_and_position(backend, device):
    x = _logits((2, 5, 3), device=device)
    t = torch.zeros(2, 3, dtype=torch.long, device=device)
    t[1, 2] = 5
    with pytest.raises(IndexError, match=r"Target 5 is out of bounds \(position \(1, 2\), 5 classes"):
        ao.cross_entropy(x, t)
    t[1, 2] = -3
    with pytest.raises(IndexError, match=r"Target -3 is out of bounds \(position \(1, 2\)"):
        ao.cross_entropy(x, t)
    t[1, 2] = -100  # ignore_index is fine
    ao.cross_entropy(x, t)
    with pytest.raises(IndexError, match=r"Target 11 is out of bounds \(position \(\)"):
        ao.cross_entropy(torch.randn(11, device=device), torch.tensor(11, device=device))


def test_unchecked_bad_target_gives_nan_not_a_crash(backend, device):
    if backend == "reference":
        pytest.skip("the reference backend is PyTorch, which raises by itself")
    # (3, 4): rows; (2, 4, 20): K-dim positions taken a vector at a time by the CPU kernel
    # (2, 4, 147): a bad and an ignored position inside blocks of 4 vectors (and in a single vector)
    cases = [((3, 4), (1,), (2,)), ((2, 4, 20), (0, 3), (1, 5)), ((2, 4, 147), (0, 40), (1, 130))]
    for shape, bad, ignored in cases:
        x = _logits(shape, device=device).requires_grad_()
        t = _targets(x, ignore_every=0)
        t[bad], t[ignored] = 4, -100
        loss = ao.cross_entropy(x, t, reduction="none", check_target=False)
        assert torch.isnan(loss[bad]) and loss[ignored] == 0
        assert torch.isfinite(loss).sum() == loss.numel() - 1
        loss.backward(torch.ones_like(loss))
        grad_bad, grad_ignored = (x.grad[(pos[0], slice(None), *pos[1:])] for pos in (bad, ignored))
        assert torch.isnan(grad_bad).all() and (grad_ignored == 0).all()
        assert torch.isfinite(x.grad).sum() == x.numel() - x.shape[1]


def _x(*shape):
    return torch.randn(*(shape or (4, 5)))


def _t(*shape, **kw):
    return torch.zeros(*(shape or (4,)), dtype=torch.long, **kw)


# (name, positional args, keyword args, error, message pattern)
BAD_INPUTS = [
    ("float class-index target", (_x(), torch.tensor([1.0, 2, 3, 0])), {}, TypeError, r"\.long\(\)"),
    ("bool target", (_x(), torch.ones(4, dtype=torch.bool)), {}, TypeError, r"\.long\(\)"),
    ("integer logits", (torch.ones(4, 5, dtype=torch.long), _t()), {}, TypeError, r"\.float\(\)"),
    ("target shape", (_x(), _t(3)), {}, ValueError, "shape"),
    ("K-dim target shape", (_x(2, 5, 3), _t(2, 4)), {}, ValueError, r"\(2, 3\)"),
    ("probability target shape", (_x(), torch.rand(4, 6)), {}, TypeError, "shape"),
    ("weight length", (_x(), _t()), {"weight": torch.ones(4)}, ValueError, r"\(5,\)"),
    ("integer weight", (_x(), _t()), {"weight": torch.ones(5, dtype=torch.long)}, TypeError, "weight"),
    ("reduction", (_x(), _t()), {"reduction": "avg"}, ValueError, "reduction"),
    ("negative smoothing", (_x(), _t()), {"label_smoothing": -0.1}, ValueError, "label_smoothing"),
    ("smoothing above 1", (_x(), _t()), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
    ("negative z_loss", (_x(), _t()), {"z_loss": -1.0}, ValueError, "z_loss"),
    ("zero softcap", (_x(), _t()), {"softcap": 0.0}, ValueError, "softcap"),
    ("nan softcap", (_x(), _t()), {"softcap": math.nan}, ValueError, "softcap"),
    ("0-d input", (torch.tensor(1.0), torch.tensor(0)), {}, ValueError, "class dim"),
    ("no classes", (_x(4, 0), _t()), {}, ValueError, "at least one class"),
    ("device mismatch", (_x(), _t(device="meta")), {}, ValueError, "meta"),
    ("weight device", (_x(), _t()), {"weight": torch.ones(5, device="meta")}, ValueError, "meta"),
    ("not a tensor", ([[1.0, 2.0]], _t(1)), {}, TypeError, "Tensor"),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "error", "match"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clearly(backend, device, name, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ao.cross_entropy(*to_device(args, device), **to_device(kwargs, device))


def test_inplace_backward_of_an_expanded_input_is_refused(backend, device):
    """Positions that share their logits' memory would race writing their gradients."""
    if backend == "reference":
        pytest.skip("the reference backend computes out of place")
    x = _logits((1, 40), device=device).expand(4, 40).requires_grad_()
    with pytest.raises((RuntimeError, ValueError), match="share memory"):
        ao.cross_entropy(x, torch.ones(4, dtype=torch.long, device=device), inplace_backward=True)


def test_ops_reject_bad_arguments_directly(device):
    """The operators check too (they are public through torch.ops): no crash, no silent result."""
    x, t = _logits((4, 5), device=device), torch.tensor([0, 1, 2, 3], device=device)
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        OPS.cross_entropy_forward(x, torch.tensor([0, 9, 2, 3], device=device), None, -100, 0.0, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="int64"):
        OPS.cross_entropy_forward(x, t.int(), None, -100, 0.0, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="weight"):
        OPS.cross_entropy_forward(x, t, torch.ones(3, device=device), -100, 0.0, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        OPS.cross_entropy_forward(x, t, None, -100, 2.0, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="one value per position"):
        OPS.cross_entropy_backward(
            torch.ones(3, device=device), x, t, None, torch.ones(4, device=device), -100, 0.0, 0.0, 0.0
        )
