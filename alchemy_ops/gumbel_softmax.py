"""``gumbel_softmax``: a Gumbel-softmax sample with the noise drawn inside the kernel.

The noise is never materialized: each kernel draws the uniform of element ``k`` (its logical,
row-major index) from the counter-based Philox4x32-10 stream of Triton's ``tl.rand(seed, offset + k)``,
turns it into Gumbel noise ``-log(-log(u))`` (``u`` clamped into ``[2^-32, 1 - 2^-24]``, so always
finite) and softmaxes ``(logits + g - max) / tau`` in fp32 (fp64 for fp64 logits).

The seed is one int64 drawn from the generator per call (``torch.randint`` on the logits' device),
and the Philox offset is 0: drawing it advances the generator, so consecutive calls differ,
``torch.manual_seed`` (or a seeded ``generator=``) reproduces a call, and under ``torch.compile`` the
draw is an ordinary traced random op (no graph break). On CUDA the seed stays on the device (no sync;
CUDA-graph safe, since the draw itself is).

Backward: ``dx = y * (dy - sum(dy * y)) / tau`` needs only the soft sample ``y``, which is the output
for ``hard=False``. For ``hard=True`` the forward also writes the soft sample (only when a gradient is
wanted) and saves it: recomputing it in backward from (seed, offset) would keep the logits alive
instead and pay for the Philox rounds and logs again, which cost more than the memory pass they save
on a CPU. Both backward formulas are ``softmax_backward`` on that sample, which also gives double backward.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _checks, reference
from ._backend import resolve
from ._ops import ops
from .softmax import autocast_to_fp32

_SEED_HIGH = 2**63 - 1  # seeds are drawn in [0, 2^63 - 1)


def draw_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """One int64 seed from ``generator`` (the default generator of ``device`` when None), as a
    one-element tensor on ``device``; advances the generator."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"alchemy_ops: generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(
                f"alchemy_ops: generator is for {generator.device.type} but logits are on {device}; pass "
                f"torch.Generator(device={device.type!r})"
            )
    return torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=device)


def _check_tau(tau: object) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"alchemy_ops: tau must be a Python number, got {type(tau).__name__}")
    t = float(tau)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"alchemy_ops: tau must be finite and > 0, got {tau}")
    if 1.0 / t > torch.finfo(torch.float32).max:
        raise ValueError(f"alchemy_ops: tau {tau} is too small: 1/tau overflows float32")
    return t


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float = 1.0,
    hard: bool = False,
    eps: float = 1e-10,
    dim: int = -1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A sample of the Gumbel-softmax distribution, as ``torch.nn.functional.gumbel_softmax``.

    Args:
        logits: unnormalized log-probabilities, any shape and strides; fp32, bf16, fp16 or fp64.
        tau: temperature, finite and > 0.
        hard: return an exact one-hot at ``argmax(logits + g)`` (ties: lowest index) whose gradient
            is the soft sample's (straight-through).
        eps: accepted and ignored, as in PyTorch.
        dim: the dimension the sample is drawn along.
        generator: keyword-only; the source of the seed (the default generator of the logits'
            device when None). It advances by one draw per call.

    Returns:
        A contiguous tensor of ``logits``' shape and dtype. A row whose max is NaN or +inf, or
        whose logits are all -inf, is NaN (as PyTorch's formula gives).

    Autocast: PyTorch's policy for ``F.gumbel_softmax``, whose softmax autocast runs in fp32 on CUDA:
    there fp16/bf16 logits give an fp32 sample (and a gradient in the logits' dtype); CPU autocast
    leaves it in the logits' dtype.
    """
    del eps  # accepted and ignored, as in PyTorch
    logits = _checks.check_tensor("logits", logits)
    if not logits.is_floating_point():
        raise TypeError(
            f"alchemy_ops: gumbel_softmax needs floating-point logits, got {logits.dtype}; cast with .float()"
        )
    tau = _check_tau(tau)
    dim = _checks.wrap_dim(dim, logits.dim())
    hard = bool(hard)
    if autocast_to_fp32(logits):
        # The kernel writes the logits' dtype, so fp32 under autocast means widening them first: exact,
        # but one cast pass (an output-dtype argument of the operator would save it).
        logits = logits.float()
    seed = draw_seed(logits.device, generator)
    which = resolve(logits)
    if which == "reference":
        return reference.gumbel_softmax(logits, seed, 0, tau, hard, dim)
    op = ops.gumbel_softmax_forward if which == "cpp" else ops.triton_gumbel_softmax_forward
    keep_soft = hard and logits.requires_grad and torch.is_grad_enabled()
    y, _ = op(logits, seed, 0, tau, hard, keep_soft, dim)
    return y


# ---- fake kernels and autograd of gumbel_softmax_forward / triton_gumbel_softmax_forward ----


def _gumbel_forward_fake(logits, seed, offset, tau, hard, keep_soft, dim):
    soft_shape = logits.shape if hard and keep_soft else (0,)
    return logits.new_empty(logits.shape), logits.new_empty(soft_shape)


def _gumbel_setup_context(ctx, inputs, output):
    _, _, _, tau, hard, keep_soft, dim = inputs
    y, y_soft = output
    ctx.save_for_backward(y_soft if hard else y)
    ctx.args = (tau, dim)
    ctx.missing_soft = hard and not keep_soft
    ctx.set_materialize_grads(False)  # no logits-sized zeros for the unused output's gradient


def _register_gumbel(forward: str, softmax_backward: str) -> None:
    torch.library.register_fake(forward, _gumbel_forward_fake)
    backward_op = getattr(ops, softmax_backward.split("::")[1])

    def grad(ctx, grad_y, grad_soft):
        if ctx.missing_soft:
            raise RuntimeError(
                "alchemy_ops: gumbel_softmax_forward(hard=True, keep_soft=False) has no soft sample to "
                "differentiate; pass keep_soft=True (alchemy_ops.gumbel_softmax does when a gradient is wanted)"
            )
        (soft,) = ctx.saved_tensors
        tau, dim = ctx.args
        # Straight-through: y and y_soft share the soft sample's Jacobian.
        if grad_soft is not None and grad_soft.shape == soft.shape:
            grad_y = grad_soft if grad_y is None else grad_y + grad_soft
        if grad_y is None:
            return None, None, None, None, None, None, None
        return backward_op(grad_y, soft, dim, tau, False), None, None, None, None, None, None

    torch.library.register_autograd(forward, grad, setup_context=_gumbel_setup_context)


_register_gumbel("alchemy_ops::gumbel_softmax_forward", "alchemy_ops::softmax_backward")
_register_gumbel("alchemy_ops::triton_gumbel_softmax_forward", "alchemy_ops::triton_softmax_backward")


def _philox_uniform_fake(seed, offset, numel):
    return seed.new_empty((numel,), dtype=torch.float32)


torch.library.register_fake("alchemy_ops::philox_uniform", _philox_uniform_fake)
torch.library.register_fake("alchemy_ops::triton_philox_uniform", _philox_uniform_fake)
