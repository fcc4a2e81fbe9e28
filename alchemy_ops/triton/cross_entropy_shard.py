"""Triton kernels of ``triton_cross_entropy_shard_stats`` / ``triton_cross_entropy_shard_backward``.

One shard of a vocabulary split over ranks: classes [class_start, class_start + C) of input
[N, C] (see ``csrc/include/alchemy/cross_entropy_shard.h``; the CPU kernels in
``csrc/cpu/cross_entropy_shard.cpp`` are the spec, and ``cross_entropy_shard_host.h`` the host
logic mirrored here). Rows are read at unit class stride, row r at ``r * row_stride``. One
program per row; rows longer than BLOCK are looped over. Ignored rows never read their row.

- stats: [N, 6] in the accumulation dtype, the ShardStat columns. One online pass for
  max and sum exp(z - max) (shifting by 0 while the running max is -inf), log_sum = log(sum)
  (-inf for a shard of -inf logits, NaN for NaN or +inf ones; the max is NaN when a logit is),
  the target's z and w by one load each, and with smoothing a second pass for
  sum_c w_c (z_c - m), m = max (0 when it is -inf). Ignored rows: zeros but the weight sum.
- backward: dx_c = (k0 exp((z_c - hi) - lo) - k1 w_c - [c == target] k2) dz/dx in the
  accumulation dtype, rounded once at the store (the target column included); 0 for ignored
  rows. hi + lo is the fp64 lse split as in cross_entropy.py.

The float arguments go to the kernels as a tensor in the accumulation dtype, as in
cross_entropy.py: [softcap, W].
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference import acc_dtype
from ._tiling import check_rows, class_loop_end, tiling
from .cross_entropy import _LIBDEVICE, CrossEntropyTypeError, _check, _split_lse, _tanh

_STATS = 6  # the ShardStat columns per position (cross_entropy_shard.h), in that order below
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _shard_row(t_ptr, row, classes, class_start, ignore_index):
    """(ignored, column, limit) of one row: the target's column in the shard (-1 for a class
    of another shard) and the number of classes to read (0 for an ignored row)."""
    y = tl.load(t_ptr + row)
    ignored = y == ignore_index
    column = y - class_start
    column = tl.where((y != ignore_index) & (column >= 0) & (column < classes), column, -1)
    limit = tl.where(ignored, 0, classes)
    return ignored, column, limit


@triton.jit
def _capped(x, softcap, SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr):
    if SOFTCAP:
        z = softcap * _tanh(x / softcap, LIBDEVICE)
    else:
        z = x
    return z


@triton.jit
def _weights(w_ptr, cols, mask, like, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    else:
        w = tl.full((BLOCK,), 1.0, like.dtype)
    return w


@triton.jit
def _shard_stats_kernel(
    x_ptr, t_ptr, w_ptr, par_ptr, out_ptr,
    classes, row_stride, class_start, ignore_index,
    HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
    LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * row_stride
    softcap = tl.load(par_ptr)  # fp32, or fp64 for fp64 rows: the accumulation dtype
    w_sum = tl.load(par_ptr + 1)
    ignored, column, limit = _shard_row(t_ptr, row, classes, class_start, ignore_index)

    row_max = tl.full((), float("-inf"), softcap.dtype)
    row_sum = tl.zeros((), softcap.dtype)
    nans = tl.zeros((), tl.int32)  # NaN logits: the max is NaN, as the CPU and CUDA kernels' nan_max
    for start in range(0, class_loop_end(classes, WIDE), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        live = cols < limit
        x = tl.load(x_row + cols, mask=live, other=float("-inf")).to(softcap.dtype)
        z = tl.where(live, _capped(x, softcap, SOFTCAP, LIBDEVICE), float("-inf"))  # tanh(-inf) is -1
        nans += tl.sum((z != z).to(tl.int32), 0)
        new_max = tl.maximum(row_max, tl.max(z, 0))
        # exp(-inf - -inf) would be NaN: while the max is -inf the sum is 0, shift by 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(z - shift), 0)
        row_max = new_max
    row_max = tl.where(nans > 0, float("nan"), row_max)
    # -inf for a shard of -inf logits (a neutral element of the merge); NaN for NaN or +inf.
    log_sum = tl.where(row_max == float("-inf"), float("-inf"), tl.log(row_sum))

    inside = column >= 0
    x_y = tl.load(x_row + tl.where(inside, column, 0), mask=inside, other=0.0).to(softcap.dtype)
    z_y = tl.where(inside, _capped(x_y, softcap, SOFTCAP, LIBDEVICE), 0.0)
    if HAS_WEIGHT:
        w_y = tl.load(w_ptr + tl.where(inside, column, 0), mask=inside, other=0.0)
    else:
        w_y = tl.where(inside, 1.0, 0.0).to(softcap.dtype)

    shifted = tl.zeros((), softcap.dtype)
    if SMOOTH:
        # sum_c w_c (z_c - m) with the final max, m = 0 for a shard of -inf logits (the sum is
        # then -inf, NaN with a zero weight, as PyTorch's smoothing term).
        m = tl.where(row_max == float("-inf"), 0.0, row_max)
        for start in range(0, class_loop_end(classes, WIDE), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < classes
            x = tl.load(x_row + cols, mask=cols < limit, other=0.0).to(softcap.dtype)
            z = _capped(x, softcap, SOFTCAP, LIBDEVICE)
            w = _weights(w_ptr, cols, mask, softcap, HAS_WEIGHT, BLOCK)
            shifted += tl.sum(tl.where(mask, w * (z - m), 0.0), 0)

    out_row = out_ptr + row * 6
    tl.store(out_row + 0, tl.where(ignored, 0.0, row_max))
    tl.store(out_row + 1, tl.where(ignored, 0.0, log_sum))
    tl.store(out_row + 2, z_y)  # 0 for ignored rows: their column is -1
    tl.store(out_row + 3, w_y)
    tl.store(out_row + 4, tl.where(ignored, 0.0, shifted))
    tl.store(out_row + 5, w_sum)


@triton.jit
def _shard_backward_kernel(
    x_ptr, t_ptr, w_ptr, par_ptr, lse_ptr, k_ptr, dx_ptr,
    classes, row_stride, class_start, ignore_index,
    HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * row_stride
    dx_row = dx_ptr + row * classes
    softcap = tl.load(par_ptr)
    ignored, column, limit = _shard_row(t_ptr, row, classes, class_start, ignore_index)
    hi, lo = _split_lse(tl.load(lse_ptr + row), softcap)
    k_prob = tl.load(k_ptr + 3 * row)
    k_weight = tl.load(k_ptr + 3 * row + 1)
    k_target = tl.load(k_ptr + 3 * row + 2)
    for start in range(0, class_loop_end(classes, WIDE), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < classes
        x = tl.load(x_row + cols, mask=cols < limit, other=0.0).to(softcap.dtype)
        if SOFTCAP:
            th = _tanh(x / softcap, LIBDEVICE)  # one tanh for the capped logit and its derivative
            z = softcap * th
        else:
            z = x
        w = _weights(w_ptr, cols, mask, softcap, HAS_WEIGHT, BLOCK)
        # The target column too is formed in the accumulation dtype and rounded once.
        d = k_prob * tl.exp((z - hi) - lo) - k_weight * w - tl.where(cols == column, k_target, 0.0)
        if SOFTCAP:
            d = d * (1.0 - th * th)
        d = tl.where(ignored, 0.0, d)
        tl.store(dx_row + cols, d.to(dx_row.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Host logic (mirrors csrc/include/alchemy/cross_entropy_shard_host.h)
# ----------------------------------------------------------------------------------------


class _ShardProblem:
    """Everything the kernels need; see ShardProblem in cross_entropy_shard_host.h."""

    def __init__(self, input, target, weight, class_start, ignore_index, softcap, weight_sum: bool):
        _check(isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor),
               "cross_entropy_shard: input and target must be tensors", CrossEntropyTypeError)  # fmt: skip
        _check(input.dim() == 2, f"cross_entropy_shard: input must be [N, C], got {list(input.shape)}")
        _check(input.dtype in _DTYPES,
               f"cross_entropy_shard: input must be float16, bfloat16, float32 or float64, got {input.dtype}",
               CrossEntropyTypeError)  # fmt: skip
        _check(target.dtype == torch.int64,
               f"cross_entropy_shard: target must be int64, got {target.dtype}; cast with .long()",
               CrossEntropyTypeError)  # fmt: skip
        _check(target.dim() == 1 and target.size(0) == input.size(0),
               f"cross_entropy_shard: target must be [{input.size(0)}], got {list(target.shape)}")  # fmt: skip
        _check(target.device == input.device, f"target is on {target.device} but input on {input.device}")
        _check(input.size(1) > 0, "cross_entropy_shard: a shard needs at least one class")
        _check(class_start >= 0, "cross_entropy_shard: class_start must be >= 0")
        _check(math.isfinite(softcap), "softcap must be finite")
        self.x = input if input.stride(1) == 1 else input.contiguous()
        self.rows, self.classes = self.x.shape
        self.row_stride = self.x.stride(0)
        self.target = target.contiguous()
        self.class_start = int(class_start)
        self.ignore_index = int(ignore_index)
        self.acc = acc_dtype(self.x.dtype)
        self.softcap = float(softcap) if softcap > 0 else 0.0
        self.weight = None
        if weight is not None:
            _check(weight.dim() == 1 and weight.numel() == self.classes,
                   f"weight must have shape [{self.classes}], got {list(weight.shape)}")  # fmt: skip
            _check(weight.device == input.device, f"weight is on {weight.device} but input on {input.device}")
            self.weight = weight.to(self.acc).contiguous()
        # [softcap, W] in the accumulation dtype; W summed on the device (no sync), only for stats.
        self.params = torch.tensor([self.softcap, float(self.classes)], dtype=self.acc, device=input.device)
        if weight_sum and self.weight is not None:
            self.params[1] = self.weight.sum()

    def args(self) -> tuple:
        weight = self.weight if self.weight is not None else self.params  # dummy, never read
        return self.x, self.target, weight, self.params

    def scalars(self) -> tuple:
        return self.classes, self.row_stride, self.class_start, self.ignore_index

    def flags(self) -> dict:
        """The constexprs and launch options of both kernels (BLOCK, WIDE, num_warps: _tiling.py)."""
        check_rows(self.rows, "cross_entropy_shard")
        return dict(
            HAS_WEIGHT=self.weight is not None,
            SOFTCAP=self.softcap > 0,
            LIBDEVICE=_LIBDEVICE,
            **tiling(self.classes, self.acc.itemsize, self.classes - 1),  # unit class stride
        )


@torch.library.register_kernel("alchemy_ops::triton_cross_entropy_shard_stats", ("cpu", "cuda"))
def _cross_entropy_shard_stats(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_start: int,
    ignore_index: int,
    softcap: float,
    smoothing: bool,
) -> torch.Tensor:
    p = _ShardProblem(input, target, weight, class_start, ignore_index, softcap, weight_sum=True)
    out = torch.empty((p.rows, _STATS), dtype=p.acc, device=p.x.device)
    if p.rows > 0:
        _shard_stats_kernel[(p.rows,)](*p.args(), out, *p.scalars(), SMOOTH=bool(smoothing), **p.flags())
    return out


@torch.library.register_kernel("alchemy_ops::triton_cross_entropy_shard_backward", ("cpu", "cuda"))
def _cross_entropy_shard_backward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    coeffs: torch.Tensor,
    class_start: int,
    ignore_index: int,
    softcap: float,
) -> torch.Tensor:
    p = _ShardProblem(input, target, weight, class_start, ignore_index, softcap, weight_sum=False)
    _check(isinstance(lse, torch.Tensor) and isinstance(coeffs, torch.Tensor),
           "cross_entropy_shard_backward: lse and coeffs must be tensors", CrossEntropyTypeError)  # fmt: skip
    _check(lse.numel() == p.rows and coeffs.dim() == 2 and tuple(coeffs.shape) == (p.rows, 3),
           f"cross_entropy_shard_backward: lse must be [{p.rows}] and coeffs [{p.rows}, 3], "
           f"got {list(lse.shape)} and {list(coeffs.shape)}")  # fmt: skip
    _check(lse.device == p.x.device and coeffs.device == p.x.device,
           f"lse and coeffs must be on the input's device ({p.x.device})")  # fmt: skip
    dx = torch.empty((p.rows, p.classes), dtype=p.x.dtype, device=p.x.device)
    if dx.numel() == 0:
        return dx
    lse = lse.to(torch.float64).reshape(-1).contiguous()
    coeffs = coeffs.to(p.acc).contiguous()
    _shard_backward_kernel[(p.rows,)](*p.args(), lse, coeffs, dx, *p.scalars(), **p.flags())
    return dx
