"""``topk_softmax``: the k largest logits of each row and their softmax weights, in one pass.

MoE routing (``renormalize=True``: the softmax of the k selected logits, Mixtral-style) and
top-k sampling/distillation (``renormalize=False``: the full-row softmax probabilities of the k
selected). Forward keeps the weights, the indices and one log-sum-exp per row; backward rebuilds
what it needs from them and the logits (no N x C probability matrix is ever stored).
"""

from __future__ import annotations

import numbers

import torch

from . import _checks, reference
from ._backend import resolve
from ._ops import ops


def _forward_fake(logits, k, renormalize, temperature):
    acc = reference.acc_dtype(logits.dtype)
    lead = list(logits.shape[:-1])
    return (
        logits.new_empty([*lead, k], dtype=acc),
        logits.new_empty([*lead, k], dtype=torch.int64),
        logits.new_empty(lead, dtype=acc),
    )


def _backward_fake(grad_weights, logits, weights, indices, lse, renormalize, temperature):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, _, renormalize, temperature = inputs
    weights, indices, lse = output
    ctx.mark_non_differentiable(indices, lse)
    ctx.save_for_backward(logits, weights, indices, lse)
    ctx.args = (renormalize, temperature)


def _register(forward: str, backward: str) -> None:
    torch.library.register_fake(forward, _forward_fake)
    torch.library.register_fake(backward, _backward_fake)
    backward_op = getattr(ops, backward.split("::")[1])

    def grad(ctx, grad_weights, _grad_indices, _grad_lse):
        logits, weights, indices, lse = ctx.saved_tensors
        renormalize, temperature = ctx.args
        g = grad_weights.to(weights.dtype).contiguous()
        return backward_op(g, logits, weights, indices, lse, renormalize, temperature), None, None, None

    torch.library.register_autograd(forward, grad, setup_context=_setup_context)


_register("alchemy_ops::topk_softmax_forward", "alchemy_ops::topk_softmax_backward")
_register("alchemy_ops::triton_topk_softmax_forward", "alchemy_ops::triton_topk_softmax_backward")


def _check_k(k: object, length: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"alchemy_ops: k must be an int, got {type(k).__name__} {k!r}")
    if not 1 <= k <= length:
        raise ValueError(f"alchemy_ops: k must be in [1, {length}] (the length of the row), got {k}")
    return int(k)


def topk_softmax(
    logits: torch.Tensor, k: int, dim: int = -1, *, renormalize: bool = True, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits along ``dim`` and their softmax weights.

    Args:
        logits: floating-point tensor of any shape and strides (fp32, bf16, fp16, fp64).
        k: how many to select, ``1 <= k <= logits.shape[dim]``.
        dim: the dimension selected along.
        renormalize: True: the weights are the softmax of the k selected logits (they sum to 1);
            False: the full-row softmax probabilities of the k selected.
        temperature: finite, > 0; divides the logits before the softmax (the selection is the same).

    Returns:
        ``(weights, indices)`` of ``logits``' shape with ``dim`` of size k: weights fp32 (fp64 for fp64
        logits), indices int64, sorted by descending logit; equal logits by lowest index; NaN counts as
        the largest value (as in ``torch.topk``). A row containing NaN or +inf, or all -inf, has NaN
        weights. Deterministic on every backend. ``weights`` is differentiable wrt ``logits``.

    Autocast: nothing changes. The weights are already fp32 for fp16/bf16 logits, which is what autocast
    gives the softmax of ``torch.topk``'s values on CUDA; the gradient is in the logits' dtype.
    """
    logits = _checks.check_tensor("logits", logits)
    if not logits.is_floating_point():
        raise TypeError(
            f"alchemy_ops: topk_softmax needs floating-point logits, got {logits.dtype}; cast with .float()"
        )
    dim = _checks.wrap_dim(dim, logits.dim())
    x = logits.reshape(1) if logits.dim() == 0 else logits
    k = _check_k(k, x.shape[dim])
    if not isinstance(renormalize, bool):
        raise ValueError(f"alchemy_ops: renormalize must be True or False, got {renormalize!r}")
    temperature = _checks.check_temperature(temperature)
    x = x.movedim(dim, -1)
    which = resolve(x)
    if which == "reference":
        weights, indices = reference.topk_softmax(x, k, renormalize, temperature)
    else:
        op = ops.topk_softmax_forward if which == "cpp" else ops.triton_topk_softmax_forward
        weights, indices, _ = op(x, k, renormalize, temperature)
    if logits.dim() == 0:
        return weights.reshape(()), indices.reshape(())
    return weights.movedim(-1, dim), indices.movedim(-1, dim)
