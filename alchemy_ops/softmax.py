"""``log_softmax`` and ``softmax`` with temperature: one fused, numerically stable pass per row."""

from __future__ import annotations

import torch

from . import _backend, _checks, reference
from ._backend import resolve
from ._extension import _C
from ._ops import ops

# Devices whose torch.autocast runs softmax and log_softmax in fp32: CUDA's "fp32_set_opt_dtype" policy
# (fp16/bf16 input without dtype= gives an fp32 result; fp32 and fp64 input are left alone). CPU autocast
# has no rule for them: they run in the input's dtype, as F.log_softmax does there.
FP32_AUTOCAST_DEVICES = ("cuda",)


def autocast_to_fp32(input: torch.Tensor) -> bool:
    """Whether autocast asks for this fp16/bf16 input's softmax in fp32 (then computed from the
    low-precision input inside the kernel, no cast pass). A cheap check that torch.compile traces."""
    device = input.device.type
    return (
        input.dtype in (torch.float16, torch.bfloat16)
        and device in FP32_AUTOCAST_DEVICES
        and torch.is_autocast_enabled(device)
    )


def cast_before_kernel(input_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether ``dtype=`` needs a separate cast: the kernels widen fp16/bf16 to fp32 for free;
    any other change of dtype casts the input first, as PyTorch does."""
    widen = out_dtype == torch.float32 and input_dtype in (torch.float16, torch.bfloat16)
    return input_dtype != out_dtype and not widen


def _softmax(input, dim, dtype, temperature, log: bool) -> torch.Tensor:
    if dtype is None and _backend.direct_calls() and not torch.compiler.is_compiling():
        try:  # the common call, as cheap as torch.log_softmax's (see _backend.direct_calls)
            out = _C.softmax(input, dim, temperature, log)
        except (RuntimeError, TypeError, ValueError, IndexError):
            out = None  # the checked path below raises what it must, with its message
        if out is not None:
            return out
    input = _checks.check_tensor("input", input)
    if dtype is None and autocast_to_fp32(input):
        dtype = torch.float32
    out_dtype = _checks.result_dtype(input, dtype)
    temperature = _checks.check_temperature(temperature)
    dim = _checks.wrap_dim(dim, input.dim())
    which = resolve(input)
    if which == "reference":
        return reference.softmax(input, dim, temperature, log, dtype)
    if not input.dtype.is_floating_point:  # integer input with a floating dtype=: cast first, as torch does
        input = input.to(out_dtype)
    op = ops.softmax_forward if which == "cpp" else ops.triton_softmax_forward
    return op(input, dim, temperature, log, None if out_dtype == input.dtype else out_dtype)


def log_softmax(
    input: torch.Tensor, dim: int = -1, *, dtype: torch.dtype | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """``log(softmax(input / temperature))`` along ``dim``, as ``torch.log_softmax``.

    Args:
        input: floating-point tensor of any shape and strides (fp64, fp32, bf16, fp16).
        dim: the dimension normalized over.
        dtype: if given, the input is cast to it first and the result has it (fp16/bf16 to fp32 is fused).
        temperature: finite, > 0; divides the logits before the softmax.

    Returns:
        A tensor of ``input``'s shape, dtype ``dtype or input.dtype``. Statistics are accumulated in
        fp32 (fp64 for fp64). A row whose max is NaN or +-inf (a fully ``-inf`` row included) is NaN, as in PyTorch.

    Autocast: PyTorch's policy for ``torch.log_softmax``. Under CUDA autocast an fp16/bf16 input without
    ``dtype=`` gives an fp32 result, computed from the fp16/bf16 values in the kernel (no cast pass); the
    gradient comes back in the input's dtype. CPU autocast leaves softmax alone: the input's dtype.
    """
    return _softmax(input, dim, dtype, temperature, log=True)


def softmax(
    input: torch.Tensor, dim: int = -1, *, dtype: torch.dtype | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """``softmax(input / temperature)`` along ``dim``, as ``torch.softmax``; arguments as :func:`log_softmax`."""
    return _softmax(input, dim, dtype, temperature, log=False)
