"""linear_cross_entropy beyond the plain loss: torch.autocast training steps against the unfused
F.linear + F.cross_entropy under the same autocast, torch.compile(fullgraph=True), the z-loss
definition (Liger's: a weighted mean divides the z term by the non-ignored count), the return_z_loss /
return_lse / return_token_accuracy flags against float64, and ao.nn.LinearCrossEntropyLoss.
Every backend; CUDA cases are skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS

import alchemy_ops as ao

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOKENS, HIDDEN, VOCAB = 11, 8, 37


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    return request.param


def _problem(n=TOKENS, h=HIDDEN, v=VOCAB, seed=0, device="cpu", bias=True):
    """fp32 hidden states, LM-head weight and bias: random, never constant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.6
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    return [None if t is None else t.to(device) for t in (x, w, b)]


def _targets(n=TOKENS, v=VOCAB, ignore_index=-100, seed=1, device="cpu"):
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    t[::4] = ignore_index
    return t.to(device)


def _class_weight(v=VOCAB, device="cpu"):
    return (torch.rand(v, generator=torch.Generator().manual_seed(3)) + 0.2).to(device)


def _close(actual, expected, atol, rtol):
    """actual vs expected in float64, atol scaled by the largest expected magnitude."""
    scale = max(expected.abs().nan_to_num(0).max().item(), 1e-3) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, equal_nan=True)


def _upstream(loss):
    if loss.dim() == 0:
        return torch.tensor(1.7, dtype=loss.dtype, device=loss.device)
    g = torch.rand(loss.shape, generator=torch.Generator().manual_seed(4)) + 0.5
    return g.to(loss.dtype).to(loss.device)


# ---- torch.autocast --------------------------------------------------------------------------------

# (input dtype, parameter dtype, bias, loss options): fp32 master weights (the usual mixed-precision
# step), bf16 activations from a bf16 layer with fp32 weights, and no bias with the loss options.
AUTOCAST_CASES = {
    "fp32": (torch.float32, torch.float32, True, {}),
    "bf16-input": (torch.bfloat16, torch.float32, True, {"label_smoothing": 0.1}),
    "no-bias-options": (torch.float32, torch.float32, False, {"class_weight": True, "softcap": 3.0}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(AUTOCAST_CASES))
def test_training_step_under_autocast(backend_name, device, reduction, case):
    """Loss (fp32, as F.cross_entropy under autocast) and every gradient (in its operand's dtype)
    against F.cross_entropy(F.linear(x, w, b).float(), y) under the same bf16 autocast."""
    input_dtype, param_dtype, bias, options = AUTOCAST_CASES[case]
    x, w, b = _problem(device=device, bias=bias)
    x, w = x.to(input_dtype), w.to(param_dtype)
    target = _targets(device=device)
    options = dict(options, reduction=reduction)
    if options.pop("class_weight", False):
        options["weight"] = _class_weight(device=device)
    softcap = options.pop("softcap", None)
    results = []
    for fused in (True, False):
        params = [p.clone().requires_grad_() for p in (x, w, b) if p is not None]
        xr, wr, br = params[0], params[1], params[2] if bias else None
        with torch.autocast(device, dtype=torch.bfloat16), ao.backend(backend_name):
            if fused:
                kw = {k: v for k, v in options.items() if k != "weight"}
                loss = ao.linear_cross_entropy(
                    xr, wr, target, br, class_weight=options.get("weight"), softcap=softcap, chunk_size=4, **kw
                )
            else:
                logits = F.linear(xr, wr, br).float()
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                loss = F.cross_entropy(logits, target, **options)
            grads = torch.autograd.grad(loss, params, _upstream(loss))
        results.append((loss, grads, params))
    (loss, grads, params), (want, want_grads, _) = results
    assert loss.dtype == want.dtype == torch.float32
    _close(loss, want, 1e-2, 1e-2)
    for g, e, p in zip(grads, want_grads, params, strict=True):
        assert g.dtype == e.dtype == p.dtype
        _close(g, e, 2e-2, 2e-2)  # bf16 matmuls on both sides, rounded differently
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16), ao.backend(backend_name):
        kw = {k: v for k, v in options.items() if k != "weight"}
        plain = ao.linear_cross_entropy(x, w, target, b, class_weight=options.get("weight"), softcap=softcap, **kw)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, loss.detach(), atol=1e-5, rtol=1e-5)


def test_autocast_matmul_is_in_the_autocast_dtype(backend_name):
    """The logits are rounded to bf16 (as F.linear's are under autocast): the loss equals the fp32
    cross-entropy of the bf16 logits, not that of the fp32 logits."""
    x, w, b = _problem(n=40, v=50)
    target = _targets(40, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16), ao.backend(backend_name):
        loss = ao.linear_cross_entropy(x, w, target, b, reduction="none")
        bf16_logits = F.linear(x, w, b)
    assert bf16_logits.dtype == torch.bfloat16
    want = F.cross_entropy(bf16_logits.double(), target, reduction="none")
    exact = F.cross_entropy(F.linear(x.double(), w.double(), b.double()), target, reduction="none")
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    assert (loss.double() - exact).abs().max() > 1e-4  # so the test above can tell the two apart


def test_autocast_leaves_fp64_alone():
    x, w, b = (t.double().requires_grad_() for t in _problem())
    target = _targets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ao.linear_cross_entropy(x, w, target, b)
        want = F.cross_entropy(F.linear(x, w, b), target)
    assert loss.dtype == want.dtype == torch.float64
    torch.testing.assert_close(loss, want, atol=1e-10, rtol=1e-10)


def test_mixed_dtypes_still_raise_without_autocast():
    x, w, b = _problem()
    with pytest.raises(TypeError, match=r"weight is torch.float32 but input is torch.bfloat16"):
        ao.linear_cross_entropy(x.bfloat16(), w, _targets(), b)


# ---- torch.compile -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_forward_and_backward(backend_name, reduction):
    """Default arguments (the target check on) compile without a graph break, forward and backward,
    and give eager's loss and gradients."""
    x, w, b = _problem()
    target = _targets()

    def step(x, w, b):
        loss = ao.linear_cross_entropy(x, w, target, b, reduction=reduction)
        return loss if reduction == "mean" else (loss * torch.linspace(0.5, 1.5, TOKENS)).sum()

    results = []
    torch._dynamo.reset()
    with ao.backend(backend_name):
        for fn in (step, torch.compile(step, fullgraph=True)):
            params = [p.clone().requires_grad_() for p in (x, w, b)]
            loss = fn(*params)
            (loss * 1.3).backward()  # a non-unit upstream gradient
            results.append([loss.detach(), *(p.grad for p in params)])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_under_autocast():
    """An autocast training step compiles whole: the autocast check and the casts are traced."""
    x, w, b = _problem()
    target = _targets()

    def step(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ao.linear_cross_entropy(x, w, target, b)

    results = []
    torch._dynamo.reset()
    for fn in (step, torch.compile(step, fullgraph=True)):
        params = [p.clone().requires_grad_() for p in (x, w, b)]
        loss = fn(*params)
        loss.backward()
        results.append([loss.detach(), *(p.grad for p in params)])
    assert results[1][0].dtype == torch.float32
    for eager, compiled in zip(*results, strict=True):
        assert compiled.dtype == eager.dtype
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_weighted_z_loss_mean(backend_name):
    """The non-default combination that rescales the class weights (weighted mean with z_loss, label
    smoothing, ignored positions) also compiles whole, and matches float64 with Liger's z-loss."""
    x, w, b = _problem()
    target = _targets(ignore_index=0)
    kw = {"class_weight": _class_weight(), "ignore_index": 0, "label_smoothing": 0.1, "z_loss": 0.05}

    def step(x, w, b):
        return ao.linear_cross_entropy(x, w, target, b, chunk_size=4, **kw)

    p64 = [p.double().requires_grad_() for p in (x, w, b)]
    want = _expected(*p64, target, **kw)[0]
    expected = torch.autograd.grad(want * 1.3, p64)
    torch._dynamo.reset()
    params = [p.clone().requires_grad_() for p in (x, w, b)]
    with ao.backend(backend_name):
        loss = torch.compile(step, fullgraph=True)(*params)
    (loss * 1.3).backward()
    _close(loss, want, 2e-5, 2e-5)
    for p, e in zip(params, expected, strict=True):
        _close(p.grad, e, 2e-5, 2e-5)


def test_compiled_bad_target_raises_index_error(backend_name):
    """Under torch.compile the kernels check the targets: the same IndexError, no crash or NaN. (The
    reference backend is PyTorch's composition: inductor's bounds check raises for it, a RuntimeError.)"""
    x, w, b = _problem()
    target = _targets()
    target[6] = VOCAB + 3
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w, t, b: ao.linear_cross_entropy(x, w, t, b), fullgraph=True)
    error, match = (
        (IndexError, f"Target {VOCAB + 3} is out of bounds")
        if backend_name != "reference"
        else (RuntimeError, "out of bounds")
    )
    with ao.backend(backend_name), pytest.raises(error, match=match):
        compiled(x, w, target, b)


# ---- the z-loss definition and the return_* flags against float64 -----------------------------------


def _expected(x, w, b, target, class_weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
              z_loss=0.0, softcap=None):  # fmt: skip
    """float64: (loss, z term, lse per token (0 where ignored), hits per token) with Liger's z-loss:
    mean = sum_r w_{y_r} ce_r / sum_r w_{y_r} + z_loss * sum_r lse_r^2 / n_valid."""
    logits = F.linear(x.double(), w.double(), None if b is None else b.double())
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    cw = None if class_weight is None else class_weight.double()
    ce = F.cross_entropy(
        z, target, weight=cw, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    valid = target != ignore_index
    lse = torch.logsumexp(z, -1).masked_fill(~valid, 0)
    z_term = z_loss * lse.square()
    if reduction == "sum":
        z_term = z_term.sum()
    elif reduction == "mean":
        z_term = z_term.sum() / valid.sum()
    hits = (logits.argmax(-1) == target) & valid
    return ce + z_term, z_term, lse, hits


ZLOSS_CASES = {
    "weight-ignore": {"class_weight": True, "ignore_index": 0},
    "weight-smooth-softcap": {"class_weight": True, "label_smoothing": 0.2, "softcap": 2.5},
    "plain": {},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(ZLOSS_CASES))
def test_z_loss_definition_loss_and_gradients(backend_name, reduction, case):
    kw = dict(ZLOSS_CASES[case], reduction=reduction, z_loss=0.05)
    if kw.pop("class_weight", False):
        kw["class_weight"] = _class_weight()
    x, w, b = _problem()
    target = _targets(ignore_index=kw.get("ignore_index", -100))
    params = [p.clone().requires_grad_() for p in (x, w, b)]
    with ao.backend(backend_name):
        loss = ao.linear_cross_entropy(*params[:2], target, params[2], chunk_size=4, **kw)
    p64 = [p.double().requires_grad_() for p in (x, w, b)]
    want = _expected(*p64, target, **kw)[0]
    _close(loss, want, 2e-5, 2e-5)
    grad = _upstream(loss)
    got, expected = torch.autograd.grad(loss, params, grad), torch.autograd.grad(want, p64, grad.double())
    for g, e in zip(got, expected, strict=True):
        _close(g, e, 2e-5, 2e-5)


def test_z_loss_mean_is_not_scaled_by_class_weights():
    """Scaling every class weight by 10 leaves a weighted mean unchanged, z term included (the old
    definition divided the z term by the summed weights)."""
    x, w, b = _problem()
    target = _targets()
    cw = _class_weight()
    one = ao.linear_cross_entropy(x, w, target, b, class_weight=cw, z_loss=0.1)
    ten = ao.linear_cross_entropy(x, w, target, b, class_weight=cw * 10, z_loss=0.1)
    torch.testing.assert_close(one, ten, atol=1e-5, rtol=1e-5)


FLAGS = ["return_z_loss", "return_lse", "return_token_accuracy"]


@pytest.mark.parametrize("with_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_flags_match_float64(backend_name, reduction, with_grad):
    kw = {"class_weight": _class_weight(), "ignore_index": 0, "z_loss": 0.03, "softcap": 4.0, "reduction": reduction}
    x, w, b = _problem(n=13)
    target = _targets(13, ignore_index=0)
    target[1::3] = F.linear(x, w, b).argmax(-1)[1::3]  # some hits, not all
    params = [p.clone().requires_grad_(with_grad) for p in (x, w, b)]
    with ao.backend(backend_name):
        out = ao.linear_cross_entropy(*params[:2], target, params[2], chunk_size=4, **kw, **dict.fromkeys(FLAGS, True))
        plain = ao.linear_cross_entropy(x, w, target, b, chunk_size=4, **kw)
    want_loss, want_z, want_lse, want_hits = _expected(x, w, b, target, **kw)
    assert isinstance(out, ao.CrossEntropyOutput)
    torch.testing.assert_close(out.loss.detach(), plain, atol=0, rtol=0)  # the flags change nothing
    _close(out.loss, want_loss, 2e-5, 2e-5)
    assert out.z_loss.dtype == torch.float32 and out.z_loss.shape == want_z.shape
    _close(out.z_loss, want_z, 2e-5, 2e-5)
    assert out.lse.dtype == torch.float32 and out.lse.shape == (13,)
    _close(out.lse, want_lse, 2e-6, 2e-6)
    valid = target != 0
    want_accuracy = want_hits.double() if reduction == "none" else want_hits.sum().double() / valid.sum()
    assert out.token_accuracy.dtype == torch.float32 and out.token_accuracy.shape == want_accuracy.shape
    torch.testing.assert_close(out.token_accuracy.double(), want_accuracy, atol=1e-7, rtol=0)
    assert 0 < want_hits.sum() < valid.sum() or reduction == "none"  # not all or nothing
    assert not any(t.requires_grad for t in out[1:])
    if with_grad:
        out.loss.backward(_upstream(out.loss))
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("flag", FLAGS)
def test_each_flag_alone(backend_name, flag):
    """One flag: that field set, the others None; no flag: the loss tensor itself."""
    x, w, b = _problem()
    target = _targets()
    with ao.backend(backend_name):
        out = ao.linear_cross_entropy(x, w, target, b, z_loss=0.01, **{flag: True})
        plain = ao.linear_cross_entropy(x, w, target, b, z_loss=0.01)
    assert isinstance(plain, torch.Tensor) and not isinstance(plain, tuple)
    fields = {"return_z_loss": "z_loss", "return_lse": "lse", "return_token_accuracy": "token_accuracy"}
    for name, field in fields.items():
        assert (getattr(out, field) is not None) == (name == flag)
    torch.testing.assert_close(out.loss, plain, atol=0, rtol=0)


def test_token_accuracy_ties_go_to_the_lowest_index(backend_name):
    """Classes 2 and 5 have identical weights and biases, far above the rest: every token's argmax is
    a tie, which torch.argmax resolves to 2. Targets 2 count as hits, targets 5 do not."""
    x, w, b = _problem(n=8, v=9)
    w = w * 0.01
    w[5] = w[2]
    b[2] = b[5] = 20.0
    target = torch.tensor([2, 5, 2, 2, 5, -100, 5, 2])
    with ao.backend(backend_name):
        mean = ao.linear_cross_entropy(x, w, target, b, return_token_accuracy=True, chunk_size=3)
        none = ao.linear_cross_entropy(x, w, target, b, reduction="none", return_token_accuracy=True)
    assert mean.token_accuracy.item() == pytest.approx(4 / 7)
    assert none.token_accuracy.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_flags_edge_cases(backend_name):
    """One token (0-d results), everything ignored (NaN accuracy and z mean), probability targets."""
    x, w, b = _problem()
    with ao.backend(backend_name):
        one = ao.linear_cross_entropy(x[0], w, torch.tensor(3), b, reduction="none", z_loss=0.1,
                                      return_lse=True, return_z_loss=True, return_token_accuracy=True)  # fmt: skip
        ignored = ao.linear_cross_entropy(x, w, torch.full((TOKENS,), -100), b, z_loss=0.1,
                                          return_z_loss=True, return_token_accuracy=True)  # fmt: skip
        probs = torch.softmax(torch.randn(TOKENS, VOCAB, generator=torch.Generator().manual_seed(5)), -1)
        soft = ao.linear_cross_entropy(x, w, probs, b, z_loss=0.1, return_z_loss=True, return_lse=True)
    want = _expected(x[:1], w, b, torch.tensor([3]), reduction="none", z_loss=0.1)
    assert one.loss.shape == one.lse.shape == one.z_loss.shape == one.token_accuracy.shape == ()
    _close(one.lse, want[2][0], 2e-6, 2e-6)
    _close(one.z_loss, want[1][0], 2e-5, 2e-5)
    assert one.token_accuracy.item() == float(want[3][0])
    assert ignored.loss.isnan() and ignored.token_accuracy.isnan() and ignored.z_loss.isnan()
    logits = F.linear(x.double(), w.double(), b.double())
    lse = torch.logsumexp(logits, -1)
    _close(soft.lse, lse, 2e-6, 2e-6)
    _close(soft.z_loss, 0.1 * lse.square().mean(), 2e-5, 2e-5)
    _close(soft.loss, F.cross_entropy(logits, probs.double()) + 0.1 * lse.square().mean(), 2e-5, 2e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
        ({"return_z_loss": "yes"}, TypeError, "return_z_loss must be a bool"),
        ({"return_token_accuracy": None}, TypeError, "return_token_accuracy must be a bool"),
        ({"return_token_accuracy": True, "probs": True}, ValueError, "class-index targets"),
    ],
)
def test_bad_flags_raise(kwargs, error, match):
    x, w, b = _problem()
    kwargs = dict(kwargs)
    target = torch.softmax(torch.randn(TOKENS, VOCAB), -1) if kwargs.pop("probs", False) else _targets()
    with pytest.raises(error, match=match):
        ao.linear_cross_entropy(x, w, target, b, **kwargs)


# ---- ao.nn.LinearCrossEntropyLoss ------------------------------------------------------------------


def test_module_matches_the_function(backend_name):
    cw = _class_weight()
    options = {"ignore_index": 0, "reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3, "chunk_size": 4}
    module = ao.nn.LinearCrossEntropyLoss(class_weight=cw, **options)
    x, w, b = _problem()
    target = _targets(ignore_index=0)
    results = []
    with ao.backend(backend_name):
        for fn in (lambda *a: module(*a), lambda *a: ao.linear_cross_entropy(*a, class_weight=cw, **options)):
            params = [p.clone().requires_grad_() for p in (x, w)]
            loss = fn(params[0], params[1], target, b)
            loss.backward()
            results.append([loss.detach(), *(p.grad for p in params)])
    for a, c in zip(*results, strict=True):
        torch.testing.assert_close(a, c, atol=0, rtol=0)
    _close(results[0][0], _expected(x, w, b, target, cw, 0, "sum", 0.1, 1e-3)[0], 2e-5, 2e-5)


def test_module_flags_repr_and_state():
    default = ao.nn.LinearCrossEntropyLoss()
    assert repr(default) == "LinearCrossEntropyLoss()"
    cw = _class_weight(5)
    module = ao.nn.LinearCrossEntropyLoss(class_weight=cw, reduction="none", z_loss=0.01, return_lse=True)
    assert repr(module) == (
        "LinearCrossEntropyLoss(class_weight=<tensor of shape (5,)>, reduction='none', z_loss=0.01, return_lse=True)"
    )
    assert list(module.state_dict()) == ["class_weight"] and list(default.state_dict()) == []
    assert module.double().class_weight.dtype == torch.float64  # a buffer: follows .to()
    x, w, b = _problem(v=5)
    out = module.float()(x, w, _targets(v=5), b)
    assert isinstance(out, ao.CrossEntropyOutput) and out.lse.shape == (TOKENS,) and out.z_loss is None
    module.reduction = "mean"  # options are plain attributes, read at each call
    assert module(x, w, _targets(v=5), b).loss.dim() == 0
    with pytest.raises(ValueError, match="reduction"):
        ao.nn.LinearCrossEntropyLoss(reduction="avg")(x, w, _targets(v=5), b)
    with pytest.raises(TypeError):
        ao.nn.LinearCrossEntropyLoss(0.1)  # keyword-only, like the function's options
