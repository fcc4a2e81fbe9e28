"""cross_entropy's fused loss operator: the z-loss definition (Liger's), the return_* flags,
autocast, the one-node autograd graph, opcheck of cross_entropy_loss, and compile with the flags."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import RecordedTensor, RecordingMode, assert_close

import alchemy_ops as ao

OPS = torch.ops.alchemy_ops
REDUCTIONS = ["none", "mean", "sum"]


def _case(shape=(7, 11), dtype=torch.float32, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    classes = shape[1] if len(shape) > 1 else shape[0]
    t = torch.randint(0, classes, shape[:1] + shape[2:] if len(shape) > 1 else (), generator=g)
    if ignore_every and t.numel() > 1:
        t.view(-1)[::ignore_every] = -100
    return x, t


def _z_loss_oracle(x, t, weight, z_loss, reduction, softcap=None):
    """float64: PyTorch's cross-entropy plus z_loss * lse^2 per non-ignored position, whose mean is
    over the non-ignored positions (not the summed class weights)."""
    z = x.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    w = None if weight is None else weight.double()
    valid = t != -100
    ce = F.cross_entropy(z, t, weight=w, reduction=reduction)
    z_term = (z_loss * torch.logsumexp(z, 1).square()).masked_fill(~valid, 0)
    if reduction == "none":
        return ce + z_term
    if reduction == "sum":
        return ce + z_term.sum()
    return ce + z_term.sum() / valid.sum()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_z_loss_is_a_mean_over_non_ignored_positions(backend, reduction, weighted):
    x, t = _case()
    w = torch.rand(11, generator=torch.Generator().manual_seed(5)) * 3 + 0.1 if weighted else None
    xr = x.clone().requires_grad_()
    loss = ao.cross_entropy(xr, t, weight=w, reduction=reduction, z_loss=0.01)
    x64 = x.double().requires_grad_()
    expected = _z_loss_oracle(x64, t, w, 0.01, reduction)
    assert_close(loss, expected, torch.float32)
    upstream = torch.rand_like(expected) + 0.5
    loss.backward(upstream.float())
    expected.backward(upstream)
    assert_close(xr.grad, x64.grad, torch.float32)


def test_z_loss_in_place_gradient_follows_the_same_definition(backend):
    if backend == "reference":
        pytest.skip("the reference backend computes out of place")
    x, t = _case()
    w = torch.rand(11, generator=torch.Generator().manual_seed(5)) * 3 + 0.1
    xr = x.clone().requires_grad_()
    loss = ao.cross_entropy(xr * 1, t, weight=w, z_loss=0.02, inplace_backward=True)
    x64 = x.double().requires_grad_()
    expected = _z_loss_oracle(x64, t, w, 0.02, "mean")
    assert_close(loss, expected, torch.float32)
    loss.backward()
    expected.backward()
    assert_close(xr.grad, x64.grad, torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7, 11), (3, 5, 4), (9,)], ids=["2d", "k-dim", "1d"])
def test_return_flags(backend, reduction, shape):
    x, t = _case(shape, ignore_every=3 if len(shape) > 1 else 0)
    w = torch.rand(shape[1] if len(shape) > 1 else shape[0]) + 0.5
    kw = dict(weight=w, reduction=reduction, z_loss=0.003, softcap=4.0, label_smoothing=0.1)
    out = ao.cross_entropy(x, t, return_z_loss=True, return_lse=True, return_token_accuracy=True, **kw)
    assert isinstance(out, ao.CrossEntropyOutput)
    torch.testing.assert_close(out.loss, ao.cross_entropy(x, t, **kw))
    cls = 1 if x.dim() > 1 else 0
    z = 4.0 * torch.tanh(x.double() / 4.0)
    lse = torch.logsumexp(z, cls)
    valid = t != -100
    assert out.lse.dtype == torch.float32 and out.lse.shape == t.shape
    assert_close(out.lse, lse.masked_fill(~valid, 0), torch.float32)  # ignored rows are not read
    per_z = (0.003 * lse.square()).masked_fill(~valid, 0)
    hits = ((x.double().argmax(cls) == t) & valid).double()
    if reduction == "none":
        expected_z, expected_accuracy = per_z, hits
    else:
        expected_z = per_z.sum() / valid.sum() if reduction == "mean" else per_z.sum()
        expected_accuracy = hits.sum() / valid.sum()
    assert_close(out.z_loss, expected_z, torch.float32)
    assert_close(out.token_accuracy, expected_accuracy, torch.float32)
    for extra in (out.z_loss, out.lse, out.token_accuracy):
        assert not extra.requires_grad


def test_each_flag_alone_leaves_the_others_none(backend):
    x, t = _case()
    assert isinstance(ao.cross_entropy(x, t), torch.Tensor)
    only_lse = ao.cross_entropy(x, t, return_lse=True)
    assert only_lse.z_loss is None and only_lse.token_accuracy is None and only_lse.lse is not None
    only_z = ao.cross_entropy(x, t, return_z_loss=True)
    assert only_z.lse is None and only_z.token_accuracy is None
    assert float(only_z.z_loss) == 0.0  # z_loss=0: the term is exactly zero
    only_accuracy = ao.cross_entropy(x, t, return_token_accuracy=True)
    assert only_accuracy.z_loss is None and only_accuracy.lse is None


def test_token_accuracy_ties_go_to_the_lowest_index(backend):
    x = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([2, 0, 0])
    out = ao.cross_entropy(x, t, reduction="none", return_token_accuracy=True)
    torch.testing.assert_close(out.token_accuracy, torch.tensor([0.0, 1.0, 1.0]))


def test_token_accuracy_needs_class_indices(backend):
    x, _ = _case()
    with pytest.raises(ValueError, match="class-index targets"):
        ao.cross_entropy(x, torch.softmax(x, 1), return_token_accuracy=True)


def test_the_loss_keeps_its_gradient_with_flags(backend):
    x, t = _case()
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ao.cross_entropy(a, t, z_loss=0.01, return_lse=True, return_z_loss=True).loss.backward()
    ao.cross_entropy(b, t, z_loss=0.01).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_module_flags():
    x, t = _case(ignore_every=0)
    module = ao.nn.CrossEntropyLoss(return_token_accuracy=True, return_lse=True)
    assert "return_lse=True" in repr(module)
    out = module(x, t)
    torch.testing.assert_close(out.loss, F.cross_entropy(x, t))
    torch.testing.assert_close(out.lse, torch.logsumexp(x, 1))


# ---- autocast: PyTorch runs its losses in fp32 ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_autocast_follows_pytorch(backend, dtype):
    x, t = _case(dtype=dtype)
    ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ao.cross_entropy(ours_x, t, label_smoothing=0.1)
        theirs = F.cross_entropy(theirs_x, t, label_smoothing=0.1)
        module = ao.nn.CrossEntropyLoss()(x, t)
    assert ours.dtype == theirs.dtype == module.dtype
    assert_close(
        ours, F.cross_entropy(x.double(), t, label_smoothing=0.1), torch.float32 if dtype != torch.float64 else dtype
    )
    ours.backward()
    theirs.backward()
    assert ours_x.grad.dtype == theirs_x.grad.dtype == dtype
    torch.testing.assert_close(ours_x.grad, theirs_x.grad, atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


def test_bf16_outside_autocast_stays_bf16(backend):
    x, t = _case(dtype=torch.bfloat16)
    assert ao.cross_entropy(x, t).dtype == torch.bfloat16


# ---- the fused operator: one C++ autograd node, opcheck, compile -----------------------------


def test_one_autograd_node_per_call():
    """The loss comes straight from the operator's C++ node (no Python autograd.Function, no cast
    or reduction nodes): what keeps a small loss as cheap as PyTorch's."""
    x, t = _case()
    x.requires_grad_()
    loss = ao.cross_entropy(x, t)
    assert loss.grad_fn.name() == "AlchemyCrossEntropyLossBackward"
    (leaf, _), (target_edge, _) = loss.grad_fn.next_functions
    assert type(leaf).__name__ == "AccumulateGrad" and leaf.variable is x and target_edge is None


def _loss_op_samples(prefix):
    op = getattr(OPS, f"{prefix}cross_entropy_loss")
    x, t = _case()
    w = torch.rand(11) + 0.5
    k, kt = _case((2, 5, 3))
    p = torch.softmax(torch.randn(7, 11), 1)
    return [
        (op, (x.clone().requires_grad_(), t, None, 1, -100, 0.0, 0.0, 0.0, True)),
        (op, (x.clone().requires_grad_(), t, w, 1, -100, 0.1, 0.01, 3.0, True)),
        (op, (x.clone().requires_grad_(), t, w, 0, -100, 0.0, 0.0, 0.0, True)),
        (op, (x.clone().requires_grad_(), t, None, 2, -100, 0.0, 0.001, 0.0, False)),
        (op, (x.clone().requires_grad_(), p.requires_grad_(), w, 1, -100, 0.1, 0.0, 0.0, True)),
        (op, (k.clone().requires_grad_(), kt, None, 0, -100, 0.0, 0.0, 0.0, True)),
        (op, (torch.randn(9).requires_grad_(), torch.tensor(4), None, 1, -100, 0.0, 0.0, 0.0, True)),
    ]


@pytest.mark.parametrize("prefix", ["", "triton_"], ids=["cpp", "triton"])
def test_opcheck_loss_op(prefix):
    for op, args in _loss_op_samples(prefix):
        torch.library.opcheck(op, args)


def test_loss_op_rejects_bad_arguments_directly():
    x, t = _case()
    with pytest.raises(ValueError, match="reduction"):
        OPS.cross_entropy_loss(x, t, None, 3, -100, 0.0, 0.0, 0.0, True)
    with pytest.raises(TypeError, match="int64"):
        OPS.cross_entropy_loss(x, t.int(), None, 1, -100, 0.0, 0.0, 0.0, True)
    with pytest.raises(ValueError, match="weight"):
        OPS.cross_entropy_loss(x, t, torch.ones(3), 1, -100, 0.0, 0.0, 0.0, True)
    with pytest.raises(IndexError, match="Target 11 is out of bounds"):
        OPS.cross_entropy_loss(x, torch.full((7,), 11), None, 1, -100, 0.0, 0.0, 0.0, True)


@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
def test_compile_fullgraph_with_flags_and_weighted_mean(backend_name):
    x, t = _case()
    w = torch.rand(11) + 0.5

    def step(x):
        out = ao.cross_entropy(x, t, weight=w, label_smoothing=0.1, return_lse=True, return_token_accuracy=True)
        return out.loss, out.lse, out.token_accuracy

    with ao.backend(backend_name):
        a = x.clone().requires_grad_()
        eager = step(a)
        eager[0].backward()
        b = x.clone().requires_grad_()
        compiled = torch.compile(step, fullgraph=True)(b)
        compiled[0].backward()
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e)
    torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("backend_name", ["cpp", "triton"])
def test_compile_fullgraph_in_place_gradient_with_weighted_z_loss(backend_name):
    """inplace_backward with a weighted z-loss mean compiles whole (the weights are rescaled by tensor
    arithmetic, the saved gradient scaled without a branch) and matches float64."""
    x, t = _case()
    w = torch.rand(11, generator=torch.Generator().manual_seed(5)) * 3 + 0.1

    def step(x):
        return ao.cross_entropy(x * 1, t, weight=w, z_loss=0.02, inplace_backward=True)

    x64 = x.double().requires_grad_()
    expected = _z_loss_oracle(x64, t, w, 0.02, "mean")
    (expected * 1.3).backward()
    torch._dynamo.reset()
    xr = x.clone().requires_grad_()
    with ao.backend(backend_name):
        loss = torch.compile(step, fullgraph=True)(xr)
    (loss * 1.3).backward()
    assert_close(loss, expected, torch.float32)
    assert_close(xr.grad, x64.grad, torch.float32)


def test_bad_target_message_in_pytorchs_words(backend):
    x, t = _case()
    t[4] = 11
    with pytest.raises(IndexError, match=r"Target 11 is out of bounds \(position \(4,\), 11 classes"):
        ao.cross_entropy(x, t)


def test_language_model_logits_get_a_hint():
    with pytest.raises(ValueError, match=r"reshape\(-1, V\)"):
        ao.cross_entropy(torch.randn(2, 5, 30), torch.randint(0, 30, (2, 5)))


def test_direct_call_matches_the_operator_declines_and_raises():
    """ao._C.cross_entropy_loss gives the operator's loss; it returns None (the wrapper's checked
    path then runs) for what needs Python's handling, and raises the operator's errors."""
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(7, 11, generator=g), torch.randint(0, 11, (7,), generator=g)
    w = torch.rand(11, generator=g) + 0.5
    for args in [(x, t, None, 1, -100, 0.0, 0.0, True), (x, t, w, 2, 3, 0.1, 1e-3, False)]:
        direct = ao._C.cross_entropy_loss(*args)
        via_ops = OPS.cross_entropy_loss(*args[:7], 0.0, args[7])[0]
        assert torch.equal(direct, via_ops)
    assert ao._C.cross_entropy_loss(x.double(), t, None, 1, -100, 0, 0, True).dtype == torch.float64
    assert ao._C.cross_entropy_loss(x.bfloat16(), t, None, 1, -100, 0, 0, True).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="expected 8 arguments"):
        ao._C.cross_entropy_loss(x, t, None, 1, -100, 0.0, 0.0)
    declined = [
        (x, [0] * 7, None, 1, -100, 0.0, 0.0, True),  # not a tensor
        (x.as_subclass(RecordedTensor), t, None, 1, -100, 0.0, 0.0, True),  # a subclass
        (x, t, w.long(), 1, -100, 0.0, 0.0, True),  # integer class weights: the wrapper casts them
        (x, t, None, 1, True, 0.0, 0.0, True),  # a bool ignore_index: the wrapper refuses it
        (x, t, None, 1, 2**70, 0.0, 0.0, True),  # beyond int64
        (x, t, None, 1, -100, "0.1", 0.0, True),
        (x, t, None, 1, -100, 0.0, 0.0, 1),  # check_target must be a bool
        (x, t.to("meta"), None, 1, -100, 0.0, 0.0, True),  # another device type
    ]
    for args in declined:
        assert ao._C.cross_entropy_loss(*args) is None
    with RecordingMode():
        assert ao._C.cross_entropy_loss(x, t, None, 1, -100, 0.0, 0.0, True) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ao._C.cross_entropy_loss(x, t, None, 1, -100, 0.0, 0.0, True) is None
    with pytest.raises(ValueError, match="reduction"):
        ao._C.cross_entropy_loss(x, t, None, 3, -100, 0.0, 0.0, True)
    with pytest.raises(IndexError, match="Target 11 is out of bounds"):
        ao._C.cross_entropy_loss(x, torch.full((7,), 11), None, 1, -100, 0.0, 0.0, True)


def _saw_loss_op(calls) -> bool:
    return any("alchemy_ops.cross_entropy_loss" in str(f) for f in calls)


def test_subclasses_and_torch_function_modes_see_the_loss_operator():
    """The direct call skips torch.ops' __torch_function__ handling, so it must not take these."""
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(7, 11, generator=g), torch.randint(0, 11, (7,), generator=g)
    expected = F.cross_entropy(x.double(), t).float()
    RecordedTensor.calls = []
    loss = ao.cross_entropy(x.as_subclass(RecordedTensor), t)
    assert _saw_loss_op(RecordedTensor.calls)
    torch.testing.assert_close(loss.as_subclass(torch.Tensor), expected)
    with RecordingMode() as mode:
        loss = ao.cross_entropy(x, t)
    assert _saw_loss_op(mode.calls)
    torch.testing.assert_close(loss, expected)
