"""Fake kernels and autograd for the operators of ``csrc/alchemy_ops.cpp``.

Each op has a ``cpp`` schema (kernels in csrc/) and a ``triton_`` twin (kernels in
alchemy_ops/triton/); both share the fake kernel and the autograd formula here.
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


def _softmax_setup_context(ctx, inputs, output):
    input, dim, temperature, log, _ = inputs
    ctx.save_for_backward(output)
    ctx.args = (dim, temperature, log)
    ctx.input_dtype = input.dtype


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
    torch.library.register_fake(forward, _softmax_forward_fake)
    torch.library.register_fake(backward, _softmax_backward_fake)

    backward_op = getattr(ops, backward.split("::")[1])  # looked up once, not per backward call

    def grad(ctx, grad_output):
        (output,) = ctx.saved_tensors
        dim, temperature, log = ctx.args
        grad_input = backward_op(grad_output, output, dim, temperature, log)
        return grad_input.to(ctx.input_dtype), None, None, None, None

    torch.library.register_autograd(forward, grad, setup_context=_softmax_setup_context)
    torch.library.register_autograd(backward, _softmax_double_backward, setup_context=_softmax_backward_setup_context)


_register_softmax("alchemy_ops::softmax_forward", "alchemy_ops::softmax_backward")
_register_softmax("alchemy_ops::triton_softmax_forward", "alchemy_ops::triton_softmax_backward")
