"""Triton kernel of ``triton_gumbel_softmax_forward``.

Same stream as ``csrc/include/alchemy/philox.h`` by construction: the uniform of element k is
``tl.rand(seed, offset + k)`` itself (k the logical row-major index, int64), clamped into
[2^-32, 1 - 2^-24], and the noise is ``-log(-log(u))`` in fp32. One program per row of the contiguous
logits viewed as [outer, classes, inner] (row (o, i) starts at ``o * classes * inner + i``, its classes
are ``inner`` apart): a first pass over blocks of classes keeps the online max / sum of
``exp((z - max) / tau)`` of z = x + g and the first index of the max; a second pass recomputes the
noise and writes the outputs. BLOCK and num_warps by the rule of _tiling.py. Registered as an opaque
kernel of the C++ schema (see softmax.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _checks
from ..reference import acc_dtype
from ._tiling import check_rows, class_loop_end, tiling

# constexpr: a @jit function may only read globals that are constexpr (plain floats compile
# under the interpreter only).
_UNIFORM_MIN = tl.constexpr(2.3283064365386963e-10)  # 2^-32
_UNIFORM_MAX = tl.constexpr(0.99999994039535522)  # 1 - 2^-24


@triton.jit
def _gumbel(seed, counters):
    u = tl.rand(seed, counters)
    u = tl.minimum(tl.maximum(u, _UNIFORM_MIN), _UNIFORM_MAX)
    return -tl.log(-tl.log(u))


@triton.jit
def _gumbel_softmax_kernel(
    x_ptr, y_ptr, soft_ptr, seed_ptr, offset, inv_t_ptr, classes, inner,
    HARD: tl.constexpr, KEEP_SOFT: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    start = (row // inner) * classes * inner + row % inner
    seed = tl.load(seed_ptr)
    inv_t = tl.load(inv_t_ptr)  # fp32, or fp64 for fp64 logits
    row_max = tl.full((), float("-inf"), inv_t.dtype)
    row_sum = tl.zeros((), inv_t.dtype)
    arg = tl.zeros((), tl.int64)
    nans = tl.zeros((), tl.int32)
    end = class_loop_end(classes, WIDE)  # the class indices are int64 anyway (Philox counters)
    for block in range(0, end, BLOCK):
        cols = block + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < classes
        at = start + cols * inner
        x = tl.load(x_ptr + at, mask=mask, other=float("-inf")).to(inv_t.dtype)
        z = tl.where(mask, x + _gumbel(seed, offset + at).to(inv_t.dtype), float("-inf"))
        nans += tl.sum((z != z).to(tl.int32), 0)
        block_max = tl.max(z, 0)
        block_arg = tl.argmax(z, 0, tie_break_left=True)
        arg = tl.where(block_max > row_max, block + block_arg, arg)  # strict: earlier blocks win ties
        new_max = tl.maximum(row_max, block_max)
        # exp(-inf - -inf) would be NaN: while the max is -inf the sum is 0, shift by 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp((row_max - shift) * inv_t) + tl.sum(tl.exp((z - shift) * inv_t), 0)
        row_max = new_max
    # A NaN or +inf logit, or every logit -inf: the whole row is NaN, as PyTorch's formula gives.
    bad = (nans > 0) | (row_max == float("-inf")) | (row_max == float("inf"))
    nan = float("nan")
    for block in range(0, end, BLOCK):
        cols = block + tl.arange(0, BLOCK).to(tl.int64)
        mask = cols < classes
        at = start + cols * inner
        if HARD:
            one_hot = tl.where(cols == arg, 1.0, 0.0)
            tl.store(y_ptr + at, tl.where(bad, nan, one_hot).to(y_ptr.dtype.element_ty), mask=mask)
        if (not HARD) or KEEP_SOFT:
            x = tl.load(x_ptr + at, mask=mask, other=0.0).to(inv_t.dtype)
            z = x + _gumbel(seed, offset + at).to(inv_t.dtype)
            soft = tl.where(bad, nan, tl.exp((z - row_max) * inv_t) / row_sum)
            out_ptr = soft_ptr if HARD else y_ptr
            tl.store(out_ptr + at, soft.to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.register_kernel("alchemy_ops::triton_gumbel_softmax_forward", ("cpu", "cuda"))
def _gumbel_softmax_forward(
    logits: torch.Tensor, seed: torch.Tensor, offset: int, tau: float, hard: bool, keep_soft: bool, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.check_temperature(tau)
    if not logits.is_floating_point():
        raise TypeError(f"alchemy_ops: gumbel_softmax needs floating-point logits, got {logits.dtype}")
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != logits.device:
        raise ValueError("alchemy_ops: seed must be a one-element int64 tensor on the logits' device")
    if offset < 0:
        raise ValueError(f"alchemy_ops: the Philox offset must be >= 0, got {offset}")
    x = (logits.reshape(1) if logits.dim() == 0 else logits).contiguous()
    dim = _checks.wrap_dim(dim, x.dim())
    y = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    keep = hard and keep_soft
    soft = torch.empty(logits.shape if keep else (0,), dtype=logits.dtype, device=logits.device)
    if y.numel() > 0:
        classes = x.shape[dim]
        inner = math.prod(x.shape[dim + 1 :])
        rows = x.numel() // classes
        check_rows(rows, "gumbel_softmax")
        acc = acc_dtype(x.dtype)
        inv_t = torch.full((1,), 1.0 / tau, dtype=acc, device=x.device)
        _gumbel_softmax_kernel[(rows,)](
            x, y, soft if keep else y, seed, offset, inv_t, classes, inner,
            HARD=hard, KEEP_SOFT=keep, **tiling(classes, acc.itemsize, classes - 1),
        )  # fmt: skip
    return y, soft


@triton.jit
def _philox_uniform_kernel(u_ptr, seed_ptr, offset, numel, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(u_ptr + k, tl.rand(tl.load(seed_ptr), offset + k), mask=k < numel)


@torch.library.register_kernel("alchemy_ops::triton_philox_uniform", ("cpu", "cuda"))
def _philox_uniform(seed: torch.Tensor, offset: int, numel: int) -> torch.Tensor:
    if seed.dtype != torch.int64 or seed.numel() != 1 or offset < 0 or numel < 0:
        raise ValueError("alchemy_ops: seed must be a one-element int64 tensor; offset and numel >= 0")
    u = torch.empty(numel, dtype=torch.float32, device=seed.device)
    if numel > 0:
        check_rows(triton.cdiv(numel, 1024), "philox_uniform")
        _philox_uniform_kernel[(triton.cdiv(numel, 1024),)](u, seed, offset, numel, BLOCK=1024)
    return u
