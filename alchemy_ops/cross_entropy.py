"""``cross_entropy``: PyTorch's cross-entropy with the target gather fused in, in one pass per row.

No log-probabilities, one-hot targets or other N x C intermediates: forward reads the logits once
and keeps one fp32 log-sum-exp per position; backward reads them once more and writes the gradient.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch.nn import _reduction

from . import _backend, _checks, reference
from ._backend import resolve
from ._extension import _C
from ._ops import ops

REDUCTIONS = ("none", "mean", "sum")


class CrossEntropyOutput(NamedTuple):
    """What the cross-entropy functions return when any ``return_*`` flag is set.

    Fields not asked for are None. ``loss`` is what the call returns without flags. ``z_loss`` is the
    z-loss term alone (``z_loss * lse**2`` per non-ignored position, reduced as the loss: summed, or
    divided by the number of non-ignored positions for ``"mean"``, whatever the class weights).
    ``lse`` is the per-position log-sum-exp of the (softcapped) logits in fp32, shape of the targets
    (0 at ignored positions, whose logits the kernels do not read).
    ``token_accuracy`` is the fraction of non-ignored positions whose argmax (ties to the lowest
    index, as ``torch.argmax``) is the target; per position (1.0 or 0.0, 0.0 where ignored) for
    ``reduction="none"``. ``z_loss``, ``lse`` and ``token_accuracy`` carry no gradient.
    """

    loss: torch.Tensor
    z_loss: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    token_accuracy: torch.Tensor | None = None


def _class_dim(input: torch.Tensor) -> int:
    return 1 if input.dim() > 1 else 0


def _check_number(name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"alchemy_ops: {name} must be a Python number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and low <= v <= high):
        bounds = f"in [{low}, {high}]" if math.isfinite(high) else f"finite and >= {low}"
        raise ValueError(f"alchemy_ops: {name} must be {bounds}, got {value}")
    return v


def _check_arguments(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """Every check that needs no look at the values, with the message that says what to do."""
    input = _checks.check_tensor("input", input)
    if not input.is_floating_point():
        raise TypeError(
            f"alchemy_ops: cross_entropy input must be floating-point, got {input.dtype}; cast with .float()"
        )
    if input.dim() == 0:
        raise ValueError("alchemy_ops: cross_entropy input must have a class dim: shape (C), (N, C) or (N, C, d1, ...)")
    checked = check_loss_arguments(
        input.shape, input.dtype, input.device, target, weight, ignore_index, reduction, label_smoothing, z_loss,
        softcap,
    )  # fmt: skip
    return (input, *checked)


def check_loss_arguments(
    shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    target,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    weight_name: str = "weight",
):
    """The checks of every argument but the logits, against logits of this shape, dtype and device
    (``linear_cross_entropy`` runs them before its logits exist). Returns (target, weight,
    ignore_index, label_smoothing, z_loss, softcap) normalized: a probability target in ``dtype``,
    class indices as int64, numbers as Python floats and ints."""
    target = _checks.check_tensor("target", target)
    classes = shape[1 if len(shape) > 1 else 0]
    if classes == 0:
        raise ValueError(f"alchemy_ops: cross_entropy needs at least one class; the logits have shape {tuple(shape)}")
    if target.device != device:
        raise ValueError(f"alchemy_ops: target is on {target.device} but input is on {device}; move it with .to()")
    positions = shape[:1] + shape[2:] if len(shape) > 1 else torch.Size([])
    if target.is_floating_point():
        if target.shape != shape:
            raise TypeError(
                f"alchemy_ops: a floating-point target is read as class probabilities and must have the logits' "
                f"shape {tuple(shape)}, got {tuple(target.shape)}; for class indices cast target with .long()"
            )
        target = target.to(dtype)
    elif target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"alchemy_ops: target must hold class indices (int64), got {target.dtype}; cast with .long()")
    else:
        if target.shape != positions:
            hint = ""
            if len(shape) == 3 and target.shape == shape[:2]:  # (B, T, V) logits of a language model
                hint = (
                    "; the class dim is 1, so (B, T, V) logits read as B x V positions of T classes: flatten "
                    "them, cross_entropy(logits.reshape(-1, V), target.reshape(-1)), or pass logits.transpose(1, 2)"
                )
            raise ValueError(
                f"alchemy_ops: for logits of shape {tuple(shape)} the class-index target must have shape "
                f"{tuple(positions)}, got {tuple(target.shape)}{hint}"
            )
        target = target.long()
    if weight is not None:
        weight = _checks.check_tensor(weight_name, weight)
        if not weight.is_floating_point():
            raise TypeError(f"alchemy_ops: {weight_name} must be floating-point, got {weight.dtype}")
        if weight.shape != (classes,):
            raise ValueError(
                f"alchemy_ops: {weight_name} must have shape ({classes},) (one per class), got {tuple(weight.shape)}"
            )
        if weight.device != device:
            raise ValueError(f"alchemy_ops: {weight_name} is on {weight.device} but input is on {device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"alchemy_ops: ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"alchemy_ops: reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    label_smoothing = _check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    z_loss = _check_number("z_loss", z_loss, 0.0)
    if softcap is not None:
        softcap = _check_number("softcap", softcap, 0.0)
        if softcap == 0:
            raise ValueError("alchemy_ops: softcap must be > 0 (or None for no softcap)")
    return target, weight, int(ignore_index), label_smoothing, z_loss, softcap


def check_class_targets(target: torch.Tensor, classes: int, ignore_index: int) -> None:
    """Raises IndexError naming the first class index outside [0, classes) that is not ignore_index."""
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bad.any():
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise IndexError(
            f"alchemy_ops: Target {int(target[where])} is out of bounds (position {where}, {classes} classes; "
            f"expected 0 <= target < {classes} or ignore_index={ignore_index})"
        )


def reduce_loss(loss: torch.Tensor, target, weight, ignore_index: int, classes: int, reduction: str, dtype):
    if reduction == "none":
        return loss.to(dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / reference.cross_entropy_mean_denominator(target, weight, ignore_index, classes, loss.dtype)
    return total.to(dtype)


def z_loss_class_weight(
    z_loss: float, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, classes: int, reduction: str
) -> torch.Tensor | None:
    """The class weights to give kernels that add ``z * lse**2`` per position (unweighted) and divide
    everything by the summed weight W, so that a weighted mean follows the z-loss definition
    (Liger's): the z term divided by the number n of non-ignored positions. Scaled by ``n / W``, the
    weighted part keeps its ``1 / W`` and the z part gets ``1 / n``, in the loss and its gradient
    alike. Tensor arithmetic only (no host read: a compiled graph keeps it); W = 0 keeps the weights
    (a NaN mean, as PyTorch's)."""
    if not z_loss or weight is None or reduction != "mean" or target.is_floating_point():
        return weight
    valid = reference.cross_entropy_valid_count(target, ignore_index, classes, weight.dtype)
    total = reference.cross_entropy_mean_denominator(target, weight, ignore_index, classes, weight.dtype)
    return weight * torch.where(total != 0, valid / total, torch.ones_like(total))


class _CrossEntropyInplaceBackward(torch.autograd.Function):
    """Forward writes the gradient (for a unit upstream gradient) into the logits; backward only
    scales it by the upstream gradient, in place, when that is not exactly 1."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, check, op):
        classes = input.shape[_class_dim(input)]
        acc = reference.acc_dtype(input.dtype)
        positions = target.shape if not target.is_floating_point() else input.sum(_class_dim(input)).shape
        if reduction == "mean":
            weight = z_loss_class_weight(z_loss, target, weight, ignore_index, classes, reduction)
            scale = 1.0 / reference.cross_entropy_mean_denominator(target, weight, ignore_index, classes, acc)
        else:
            scale = torch.ones((), dtype=acc, device=input.device)
        grad_scale = scale.expand(positions).contiguous()
        loss, lse = op(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap, check)
        # The op mutates input behind autograd's back: bump its version so that any node which
        # saved the logits for its own backward raises instead of reading the gradient.
        torch.autograd.graph.increment_version(input)
        ctx.save_for_backward(input)  # now the gradient
        ctx.reduction = reduction
        ctx.mark_non_differentiable(lse)
        return reduce_loss(loss, target, weight, ignore_index, classes, reduction, acc), lse

    @staticmethod
    def backward(ctx, grad_output, _grad_lse):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_output.unsqueeze(_class_dim(grad)) if grad.dim() > 1 else grad_output)
        elif torch.compiler.is_compiling() or not bool((grad_output == 1).all()):  # a graph cannot branch on it
            grad.mul_(grad_output)
        return grad, None, None, None, None, None, None, None, None, None


_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}  # at::Reduction, as the cross_entropy_loss op takes it


def _extra_outputs(loss, lse, correct, target, ignore_index, classes, reduction, z_loss, want_z, want_lse):
    """The CrossEntropyOutput of the return_* flags, from the per-position lse (and argmax hits)."""
    valid = None if target.is_floating_point() else target != ignore_index
    lse = lse.float() if valid is None else lse.float().masked_fill(~valid, 0)  # ignored rows are not read
    count = reference.cross_entropy_valid_count(target, ignore_index, classes, torch.float32)

    def over_valid(per_position, mean):  # 0 where ignored; summed, or averaged over the non-ignored
        if valid is not None:
            per_position = per_position.masked_fill(~valid, 0)
        if reduction == "none":
            return per_position
        return per_position.sum() / count if mean else per_position.sum()

    z_term = over_valid(z_loss * lse.square(), reduction == "mean") if want_z else None
    accuracy = None if correct is None else over_valid(correct.float(), True)
    return CrossEntropyOutput(loss, z_term, lse if want_lse else None, accuracy)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    check_target: bool = True,
    return_z_loss: bool = False,
    return_lse: bool = False,
    return_token_accuracy: bool = False,
) -> torch.Tensor | CrossEntropyOutput:
    """Cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    Args:
        input: logits, shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` (class dim 1, read in place
            at any strides); fp32, bf16, fp16 or fp64.
        target: class indices, int64 of shape ``()``, ``(N)`` or ``(N, d1, ..., dk)`` (values in
            ``[0, C)`` or ``ignore_index``); or class probabilities, floating-point of the input's shape.
        weight: optional per-class weights, shape ``(C)``.
        size_average, reduce: deprecated, mapped to ``reduction`` as PyTorch does.
        ignore_index: class-index value whose positions add no loss and no gradient.
        reduction: ``"none"`` (loss per position), ``"mean"`` (divided by the summed weight of the
            non-ignored targets; by the number of positions for probabilities) or ``"sum"``.
        label_smoothing: in ``[0, 1]``, PyTorch's formula (including its interplay with ``weight``).
        z_loss: keyword-only extra; adds ``z_loss * logsumexp(z)**2`` per non-ignored position. With
            ``reduction="mean"`` this term is divided by the number of non-ignored positions, not by
            the summed class weights (Liger-Kernel's and PaLM's per-token definition; without
            ``weight`` the two agree).
        softcap: keyword-only extra; the logits become ``softcap * tanh(input / softcap)`` first.
        inplace_backward: keyword-only extra; forward writes the gradient into ``input``'s memory (no
            logits-sized allocation for it). ``input`` is consumed: its values are the gradient
            afterwards, and autograd raises if something else saved it for backward.
        check_target: raise ``IndexError`` (value and position) for a class index outside ``[0, C)``
            that is not ``ignore_index``. On a GPU the check synchronizes; pass False to skip it (e.g.
            under CUDA graph capture): such a position then gets a NaN loss, never a device assert.
        return_z_loss, return_lse, return_token_accuracy: keyword-only; when any is set the result is
            a :class:`CrossEntropyOutput` ``(loss, z_loss, lse, token_accuracy)`` with the fields not
            asked for None: the z-loss term alone (reduced like the loss), the fp32 log-sum-exp per
            position, and the fraction of non-ignored positions whose argmax is the target (class
            indices only). These extras carry no gradient.

    Returns:
        The loss in the input's dtype (fp32 under ``torch.autocast``, as PyTorch's): a scalar, or per
        position for ``reduction="none"``. It is accumulated in fp32 (fp64 for fp64 input) whatever
        the input dtype.
    """
    if (
        softcap is None
        and not (inplace_backward or return_z_loss or return_lse or return_token_accuracy)
        and size_average is None
        and reduce is None
        and type(reduction) is str
        and reduction in _REDUCTION_ENUM
        and _backend.direct_calls()
        and not torch.compiler.is_compiling()
    ):
        try:  # the common call, as cheap as PyTorch's own (see _backend.direct_calls)
            loss = _C.cross_entropy_loss(input, target, weight, _REDUCTION_ENUM[reduction], ignore_index,
                                         label_smoothing, z_loss, check_target)  # fmt: skip
        except (RuntimeError, TypeError, ValueError, IndexError):
            loss = None  # the checked path below casts what it can and raises what it must, with its message
        if loss is not None:
            return loss
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    input, target, weight, ignore_index, label_smoothing, z_loss, softcap = _check_arguments(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap
    )
    classes = input.shape[_class_dim(input)]
    which = resolve(input)
    # torch.autocast runs PyTorch's losses in fp32: keep the fp32 loss the kernels accumulate anyway.
    out_dtype = reference.acc_dtype(input.dtype) if torch.is_autocast_enabled(input.device.type) else input.dtype
    extras = return_z_loss or return_lse or return_token_accuracy
    correct = None
    if return_token_accuracy:  # before the kernels: inplace_backward overwrites the logits
        if target.is_floating_point():
            raise ValueError("alchemy_ops: return_token_accuracy needs class-index targets, not probabilities")
        correct = input.detach().argmax(_class_dim(input)) == target
    cap = 0.0 if softcap is None else softcap
    if which == "reference":
        if check_target and not target.is_floating_point():
            check_class_targets(target, classes, ignore_index)
        loss = reference.cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, out_dtype
        )
        if not extras:
            return loss
        with torch.no_grad():
            lse = torch.logsumexp(reference.capped(input, cap), _class_dim(input))
    elif inplace_backward and input.requires_grad and torch.is_grad_enabled():
        op = ops.cross_entropy_forward_inplace if which == "cpp" else ops.triton_cross_entropy_forward_inplace
        acc_weight = None if weight is None else weight.to(reference.acc_dtype(input.dtype))
        loss, lse = _CrossEntropyInplaceBackward.apply(
            input, target, acc_weight, ignore_index, reduction, label_smoothing, z_loss, cap, check_target, op
        )
        loss = loss.to(out_dtype)
    else:
        op = ops.cross_entropy_loss if which == "cpp" else ops.triton_cross_entropy_loss
        loss, lse, _ = op(input, target, weight, _REDUCTION_ENUM[reduction], ignore_index, label_smoothing, z_loss,
                          cap, check_target)  # fmt: skip
        if loss.dtype != out_dtype:
            loss = loss.to(out_dtype)
    if not extras:
        return loss
    return _extra_outputs(loss, lse, correct, target, ignore_index, classes, reduction, z_loss, return_z_loss,
                          return_lse)  # fmt: skip
