"""Fake kernels and autograd for the operators of ``csrc/alchemy_ops.cpp``.

Each op has a ``cpp`` schema (kernels in csrc/) and a ``triton_`` twin (kernels in
alchemy_ops/triton/); both share the fake kernel and the autograd formula here, except where the
formula is a C++ autograd node (csrc/autograd/: softmax_forward and cross_entropy_loss), which
costs no Python per call.
"""

from __future__ import annotations

import torch

from . import _extension  # noqa: F401  (loads the schemas)

ops = torch.ops.alchemy_ops


def _softmax_like(input: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    # Same layout rule as the kernels: empty_like keeps a dense input's strides.
    return torch.empty_like(input, dtype=dtype or input.dtype)


def _softmax_forward_fake(input, dim, temperature, log, dtype):
    return _softmax_like(input, dtype)


def _softmax_backward_fake(grad_output, output, dim, temperature, log):
    return torch.empty_like(output)


def _softmax_double_backward(ctx, grad_grad_input):
    """Derivatives of softmax_backward, so gradgradcheck and Hessian-vector products work.

    With s = 1/T, backward is dx = s (dy - e^y sum(dy)) for log-softmax and
    dx = s y (dy - sum(dy y)) for softmax; u below is the incoming gradient of dx.
    """
    grad_output, output = ctx.saved_tensors
    dim, temperature, log = ctx.args
    u, s = grad_grad_input, 1.0 / temperature
    if log:
        p = output.exp()
        d_grad = s * (u - (u * p).sum(dim, keepdim=True))
        d_out = -s * u * p * grad_output.sum(dim, keepdim=True)
    else:
        uy = (u * output).sum(dim, keepdim=True)
        d_grad = s * output * (u - uy)
        d_out = s * (u * (grad_output - (grad_output * output).sum(dim, keepdim=True)) - grad_output * uy)
    return d_grad, d_out, None, None, None


def _softmax_backward_setup_context(ctx, inputs, output):
    grad_output, output_, dim, temperature, log = inputs
    ctx.save_for_backward(grad_output, output_)
    ctx.args = (dim, temperature, log)


def _register_softmax(forward, backward) -> None:
    # The forward's autograd is a C++ node (csrc/autograd/softmax.cpp): no Python per call. Its
    # backward calls the backward op with autograd on, so this formula gives double backward.
    torch.library.register_fake(forward, _softmax_forward_fake)
    torch.library.register_fake(backward, _softmax_backward_fake)
    torch.library.register_autograd(backward, _softmax_double_backward, setup_context=_softmax_backward_setup_context)


_register_softmax("alchemy_ops::softmax_forward", "alchemy_ops::softmax_backward")
_register_softmax("alchemy_ops::triton_softmax_forward", "alchemy_ops::triton_softmax_backward")


def _positions_shape(input: torch.Tensor) -> list[int]:
    """The shape of a per-position cross-entropy result: the input's without its class dim."""
    shape = list(input.shape)
    del shape[1 if input.dim() > 1 else 0]
    return shape


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cross_entropy_forward_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, check):
    # loss in the accumulation dtype; lse in fp64 (max + log-sum unrounded, for an exact backward)
    shape = _positions_shape(input)
    return input.new_empty(shape, dtype=_acc_dtype(input.dtype)), input.new_empty(shape, dtype=torch.float64)


def _cross_entropy_inplace_fake(
    input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap, check
):
    return _cross_entropy_forward_fake(input, target, weight, ignore_index, label_smoothing, z_loss, softcap, check)


def _cross_entropy_backward_fake(grad_loss, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap):
    return torch.empty_like(input)


def _cross_entropy_loss_fake(input, target, weight, reduction, ignore_index, label_smoothing, z_loss, softcap, check):
    positions = _positions_shape(input)
    loss_shape = positions if reduction == 0 else []
    return (
        input.new_empty(loss_shape, dtype=_acc_dtype(input.dtype)),
        input.new_empty(positions, dtype=torch.float64),
        input.new_empty([2], dtype=torch.float64),
    )


def _cross_entropy_loss_backward_fake(grad, input, *args):
    return torch.empty_like(input)


# Autograd of cross_entropy_loss is a C++ node (csrc/autograd/cross_entropy_loss.cpp): no Python per call.
for _prefix in ("", "triton_"):
    torch.library.register_fake(f"alchemy_ops::{_prefix}cross_entropy_loss", _cross_entropy_loss_fake)
    torch.library.register_fake(f"alchemy_ops::{_prefix}cross_entropy_loss_backward", _cross_entropy_loss_backward_fake)


def _cross_entropy_setup_context(ctx, inputs, output):
    input, target, weight, ignore_index, label_smoothing, z_loss, softcap, _ = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(input, target, weight, lse)
    ctx.args = (ignore_index, label_smoothing, z_loss, softcap)


def _prob_target_grad(input, weight, lse, grad_loss, label_smoothing, softcap, target_dtype):
    """d loss / d probability target: (1 - eps) w_c (lse - z_c), only built when the target needs it."""
    cls = 1 if input.dim() > 1 else 0
    z = input.to(_acc_dtype(input.dtype))
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    grad = (lse.unsqueeze(cls) - z) * (grad_loss.unsqueeze(cls) * (1 - label_smoothing))
    if weight is not None:
        grad = grad * weight.view([-1] + [1] * (input.dim() - cls - 1))
    return grad.to(target_dtype)


def _register_cross_entropy(forward, backward, inplace) -> None:
    torch.library.register_fake(forward, _cross_entropy_forward_fake)
    torch.library.register_fake(backward, _cross_entropy_backward_fake)
    torch.library.register_fake(inplace, _cross_entropy_inplace_fake)
    backward_op = getattr(ops, backward.split("::")[1])

    def grad(ctx, grad_loss, _grad_lse):
        input, target, weight, lse = ctx.saved_tensors
        ignore_index, label_smoothing, z_loss, softcap = ctx.args
        grad_input = grad_target = None
        if ctx.needs_input_grad[0]:
            g = grad_loss.to(_acc_dtype(input.dtype)).contiguous()
            grad_input = backward_op(g, input, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap)
        if ctx.needs_input_grad[1]:  # a probability target that requires grad
            grad_target = _prob_target_grad(input, weight, lse, grad_loss, label_smoothing, softcap, target.dtype)
        return grad_input, grad_target, None, None, None, None, None, None

    torch.library.register_autograd(forward, grad, setup_context=_cross_entropy_setup_context)


_register_cross_entropy(
    "alchemy_ops::cross_entropy_forward",
    "alchemy_ops::cross_entropy_backward",
    "alchemy_ops::cross_entropy_forward_inplace",
)
_register_cross_entropy(
    "alchemy_ops::triton_cross_entropy_forward",
    "alchemy_ops::triton_cross_entropy_backward",
    "alchemy_ops::triton_cross_entropy_forward_inplace",
)


def _shard_stats_fake(input, target, weight, class_start, ignore_index, softcap, smoothing):
    return input.new_empty((input.shape[0], 6), dtype=_acc_dtype(input.dtype))


def _shard_backward_fake(input, target, weight, lse, coeffs, class_start, ignore_index, softcap):
    return input.new_empty(input.shape)


# No autograd formula: alchemy_ops.distributed differentiates through the collective itself.
for _prefix in ("", "triton_"):
    torch.library.register_fake(f"alchemy_ops::{_prefix}cross_entropy_shard_stats", _shard_stats_fake)
    torch.library.register_fake(f"alchemy_ops::{_prefix}cross_entropy_shard_backward", _shard_backward_fake)
