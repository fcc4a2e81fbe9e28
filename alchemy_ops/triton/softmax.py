"""Triton kernels of ``triton_softmax_forward`` / ``triton_softmax_backward``.

One program per row; rows longer than BLOCK are looped over: an online max/sum-exp
pass, then an output pass. Any strides: a row is ``base + c * class_stride`` with
``base = o * outer_stride + i * inner_stride`` (int64; ``c * class_stride`` too when it can
exceed int32, see _tiling).

Registered as opaque kernels of the C++-declared schemas rather than through
``torch.library.triton_op``: under ``TRITON_INTERPRET=1`` ``wrap_triton`` returns the
raw interpreted function, which fake-tensor tracing cannot run, so ``torch.compile``
would fail on CPU. The opaque op compiles with fullgraph=True on CPU and GPU alike,
and the kernel is already fused, so Inductor has nothing to fuse into it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ..reference import acc_dtype
from ..softmax import cast_before_kernel
from ._layout import run_rows
from ._tiling import check_rows, class_loop_end, row_base, tiling


@triton.jit
def _softmax_forward_kernel(
    x_ptr, y_ptr, inv_t_ptr, classes, inner,
    xs_outer, xs_cls, xs_inner, ys_outer, ys_cls, ys_inner,
    LOG: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = row_base(x_ptr, row, inner, xs_outer, xs_inner)
    y_row = row_base(y_ptr, row, inner, ys_outer, ys_inner)
    end = class_loop_end(classes, WIDE)
    inv_t = tl.load(inv_t_ptr)  # fp32, or fp64 for fp64 rows
    row_max = tl.full((), float("-inf"), inv_t.dtype)
    row_sum = tl.zeros((), inv_t.dtype)
    for start in range(0, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols * xs_cls, mask=cols < classes, other=float("-inf")).to(inv_t.dtype)
        new_max = tl.maximum(row_max, tl.max(x, 0))
        # exp(-inf - -inf) would be NaN: while the max is -inf the sum is 0, shift by 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp((row_max - shift) * inv_t) + tl.sum(tl.exp((x - shift) * inv_t), 0)
        row_max = new_max
    # NaN or +inf entries make row_sum NaN, so the whole row is NaN, as in PyTorch.
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    log_sum = tl.log(row_sum)
    for start in range(0, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < classes
        z = (tl.load(x_row + cols * xs_cls, mask=mask, other=0.0).to(inv_t.dtype) - shift) * inv_t
        y = z - log_sum if LOG else tl.exp(z) / row_sum
        tl.store(y_row + cols * ys_cls, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_backward_kernel(
    dy_ptr, y_ptr, dx_ptr, inv_t_ptr, classes, inner,
    dys_outer, dys_cls, dys_inner, ys_outer, ys_cls, ys_inner, dxs_outer, dxs_cls, dxs_inner,
    LOG: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    dy_row = row_base(dy_ptr, row, inner, dys_outer, dys_inner)
    y_row = row_base(y_ptr, row, inner, ys_outer, ys_inner)
    dx_row = row_base(dx_ptr, row, inner, dxs_outer, dxs_inner)
    end = class_loop_end(classes, WIDE)
    inv_t = tl.load(inv_t_ptr)
    dot = tl.zeros((), inv_t.dtype)
    for start in range(0, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < classes
        dy = tl.load(dy_row + cols * dys_cls, mask=mask, other=0.0).to(inv_t.dtype)
        if LOG:
            dot += tl.sum(dy, 0)
        else:
            dot += tl.sum(dy * tl.load(y_row + cols * ys_cls, mask=mask, other=0.0).to(inv_t.dtype), 0)
    for start in range(0, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < classes
        dy = tl.load(dy_row + cols * dys_cls, mask=mask, other=0.0).to(inv_t.dtype)
        y = tl.load(y_row + cols * ys_cls, mask=mask, other=0.0).to(inv_t.dtype)
        dx = (dy - tl.exp(y) * dot) * inv_t if LOG else y * (dy - dot) * inv_t
        tl.store(dx_row + cols * dxs_cls, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_options(classes: int, dtype: torch.dtype, strides: list[tuple[int, int, int]]) -> dict:
    """BLOCK, WIDE and num_warps of a row kernel (see _tiling) for rows of ``classes`` in ``dtype``."""
    return tiling(classes, acc_dtype(dtype).itemsize, (classes - 1) * max(abs(s[1]) for s in strides))


def _inv_temperature(temperature: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A tensor, not a scalar argument: Triton passes Python floats as fp32, too coarse for fp64 rows.
    return torch.full((1,), 1.0 / _checks.check_temperature(temperature), dtype=acc_dtype(dtype), device=device)


@torch.library.register_kernel("alchemy_ops::triton_softmax_forward", ("cpu", "cuda"))
def _softmax_forward(
    input: torch.Tensor, dim: int, temperature: float, log: bool, dtype: torch.dtype | None
) -> torch.Tensor:
    out_dtype = _checks.result_dtype(input, dtype)
    x = input.to(out_dtype) if cast_before_kernel(input.dtype, out_dtype) else input
    x = x.reshape(1) if x.dim() == 0 else x
    dim = _checks.wrap_dim(dim, x.dim())
    out = torch.empty_like(x, dtype=out_dtype)
    if out.numel() > 0:
        inv_t = _inv_temperature(temperature, x.dtype, x.device)

        def launch(tensors, shape, strides):
            outer, classes, inner = shape
            check_rows(outer * inner, "softmax")
            _softmax_forward_kernel[(outer * inner,)](
                tensors[0], tensors[1], inv_t, classes, inner, *strides[0], *strides[1],
                LOG=log, **_launch_options(classes, x.dtype, strides),
            )  # fmt: skip

        run_rows(launch, [x], out, dim)
    return out.reshape(()) if input.dim() == 0 else out


@torch.library.register_kernel("alchemy_ops::triton_softmax_backward", ("cpu", "cuda"))
def _softmax_backward(
    grad_output: torch.Tensor, output: torch.Tensor, dim: int, temperature: float, log: bool
) -> torch.Tensor:
    y = output.reshape(1) if output.dim() == 0 else output
    dy = grad_output.reshape(y.shape).to(y.dtype)
    dim = _checks.wrap_dim(dim, y.dim())
    dx = torch.empty_like(y)
    if dx.numel() > 0:
        inv_t = _inv_temperature(temperature, y.dtype, y.device)

        def launch(tensors, shape, strides):
            outer, classes, inner = shape
            check_rows(outer * inner, "softmax backward")
            _softmax_backward_kernel[(outer * inner,)](
                tensors[0], tensors[1], tensors[2], inv_t, classes, inner, *strides[0], *strides[1], *strides[2],
                LOG=log, **_launch_options(classes, y.dtype, strides),
            )  # fmt: skip

        run_rows(launch, [dy, y], dx, dim)
    return dx.reshape(()) if output.dim() == 0 else dx
