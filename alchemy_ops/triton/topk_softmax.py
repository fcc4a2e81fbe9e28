"""Triton kernels of ``triton_topk_softmax_forward`` / ``triton_topk_softmax_backward`` (last dim).

Forward, two launches:

1. One program per row: an online max / sum-exp pass; the k-th largest value by bisection over
   the bits of an order-preserving integer key (NaN largest, -0 = +0; one counting pass per bit:
   32 for fp32/bf16/fp16 rows, 64 for fp64); the values above it and, of those equal to it, the
   lowest indices (a cumulative sum) are compacted in index order into a scratch row; the lse.
2. One program per row, over tiles of the selected: the rank of each selected entry among the k
   by pairwise comparison (O(k^2) per row: meant for k up to a few hundred), where it writes its
   index and weight.

BLOCK, num_warps and int64 class offsets by the rules of _tiling.py (the selection keeps an
int64 key per logit, so its blocks are sized for 8-byte values).

Backward, two launches: every logit of the row (0, or -s p_c / T without renormalisation), then
the k selected. Registered as opaque kernels of the C++ schemas, as softmax.py explains.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import acc_dtype
from ._tiling import check_rows, class_loop_end, num_warps, tiling
from .softmax import _inv_temperature

_KEY_BYTES = 8  # the selection keeps an int64 key per logit, whatever the dtype
_MAX_TILE = 64
_MAX_KBLOCK = 1024


@triton.jit
def _to_acc(x, IS64: tl.constexpr):
    if IS64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _key(x, IS64: tl.constexpr):
    """int64 key, monotone in the selection order: NaN above +inf, -0 equal to +0."""
    x = x + 0.0  # -0 -> +0
    if IS64:
        bits = x.to(tl.int64, bitcast=True)
        key = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
        key = tl.where(x != x, 0x7FF0000000000001, key)  # above +inf, with room for key + 1
    else:
        bits = x.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
        key = tl.where(x != x, 0x7F800001, key)
    return key


@triton.jit
def _count_at_least(x_row, classes, bound, IS64: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    count = tl.zeros((), tl.int32)
    for start in range(0, class_loop_end(classes, WIDE), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < classes
        key = _key(_to_acc(tl.load(x_row + cols, mask=mask, other=0.0), IS64), IS64)
        count += tl.sum(((key >= bound) & mask).to(tl.int32), 0)
    return count


@triton.jit
def _topk_select_kernel(
    x_ptr, sel_ptr, max_ptr, lse_ptr, inv_t_ptr, classes, k,
    RENORM: tl.constexpr, IS64: tl.constexpr, HIGH_BIT: tl.constexpr, NEG_BASE: tl.constexpr,
    BLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * classes
    inv_t = tl.load(inv_t_ptr)
    row_max = tl.full((), float("-inf"), inv_t.dtype)
    row_sum = tl.zeros((), inv_t.dtype)
    for start in range(0, class_loop_end(classes, WIDE), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = _to_acc(tl.load(x_row + cols, mask=cols < classes, other=float("-inf")), IS64)
        new_max = tl.maximum(row_max, tl.max(x, 0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp((row_max - shift) * inv_t) + tl.sum(tl.exp((x - shift) * inv_t), 0)
        row_max = new_max
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)

    # The k-th largest key t: the largest t with count(key >= t) >= k, one bit at a time.
    t = tl.full((), NEG_BASE, tl.int64)
    if _count_at_least(x_row, classes, 0, IS64, BLOCK, WIDE) >= k:
        t = tl.zeros((), tl.int64)
    for i in range(0, HIGH_BIT + 1):
        candidate = t | (tl.full((), 1, tl.int64) << (HIGH_BIT - i))
        if _count_at_least(x_row, classes, candidate, IS64, BLOCK, WIDE) >= k:
            t = candidate
    need = k - _count_at_least(x_row, classes, t + 1, IS64, BLOCK, WIDE)  # how many keys equal to t to take

    n_sel = tl.zeros((), tl.int32)
    n_eq = tl.zeros((), tl.int32)
    sel_sum = tl.zeros((), inv_t.dtype)
    for start in range(0, class_loop_end(classes, WIDE), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < classes
        x = _to_acc(tl.load(x_row + cols, mask=mask, other=0.0), IS64)
        key = _key(x, IS64)
        eq = (key == t) & mask
        eq_rank = n_eq + tl.cumsum(eq.to(tl.int32), 0)
        sel = ((key > t) & mask) | (eq & (eq_rank <= need))
        pos = n_sel + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(sel_ptr + row * k + pos, cols.to(tl.int64), mask=sel)
        n_sel += tl.sum(sel.to(tl.int32), 0)
        n_eq += tl.sum(eq.to(tl.int32), 0)
        if RENORM:
            sel_sum += tl.sum(tl.where(sel, tl.exp((x - shift) * inv_t), 0.0), 0)
    total = sel_sum if RENORM else row_sum
    finite = (row_max == row_max) & (tl.abs(row_max) < float("inf"))
    tl.store(max_ptr + row, shift)
    tl.store(lse_ptr + row, tl.where(finite, tl.log(total), float("nan")))


@triton.jit
def _topk_rank_kernel(
    x_ptr, sel_ptr, max_ptr, lse_ptr, w_ptr, i_ptr, inv_t_ptr, classes, k,
    IS64: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    # One program per row, looping over tiles of the selected: a grid over k tiles would put k
    # on grid y, limited to 65535.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * classes
    sel_row = sel_ptr + row * k
    inv_t = tl.load(inv_t_ptr)
    row_max = tl.load(max_ptr + row)
    lse = tl.load(lse_ptr + row)
    for e_start in range(0, k, TILE):
        e = e_start + tl.arange(0, TILE)
        e_mask = e < k
        e_idx = tl.load(sel_row + e, mask=e_mask, other=0)
        e_x = _to_acc(tl.load(x_row + e_idx, mask=e_mask, other=0.0), IS64)
        e_key = _key(e_x, IS64)
        rank = tl.zeros((TILE,), tl.int32)
        for start in range(0, k, TILE):
            i = start + tl.arange(0, TILE)
            i_mask = i < k
            i_idx = tl.load(sel_row + i, mask=i_mask, other=0)
            i_key = _key(_to_acc(tl.load(x_row + i_idx, mask=i_mask, other=0.0), IS64), IS64)
            ahead = (i_key[None, :] > e_key[:, None]) | (
                (i_key[None, :] == e_key[:, None]) & (i_idx[None, :] < e_idx[:, None])
            )
            rank += tl.sum((ahead & i_mask[None, :]).to(tl.int32), 1)
        w = tl.exp((e_x - row_max) * inv_t - lse)
        tl.store(w_ptr + row * k + rank, w, mask=e_mask)
        tl.store(i_ptr + row * k + rank, e_idx, mask=e_mask)


@triton.jit
def _grad_dot(g_row, w_row, k, KBLOCK: tl.constexpr):
    s = tl.zeros((), tl.load(w_row).dtype)
    for start in range(0, k, KBLOCK):
        j = start + tl.arange(0, KBLOCK)
        mask = j < k
        s += tl.sum(tl.load(g_row + j, mask=mask, other=0.0) * tl.load(w_row + j, mask=mask, other=0.0), 0)
    return s


@triton.jit
def _topk_grad_dense_kernel(
    g_ptr, w_ptr, i_ptr, lse_ptr, x_ptr, dx_ptr, inv_t_ptr, classes, k,
    RENORM: tl.constexpr, BLOCK: tl.constexpr, KBLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * classes
    dx_row = dx_ptr + row * classes
    inv_t = tl.load(inv_t_ptr)
    if RENORM:
        for start in range(0, class_loop_end(classes, WIDE), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            tl.store(dx_row + cols, tl.zeros((BLOCK,), dx_ptr.dtype.element_ty), mask=cols < classes)
    else:
        s = _grad_dot(g_ptr + row * k, w_ptr + row * k, k, KBLOCK)
        row_max = tl.load(x_row + tl.load(i_ptr + row * k)).to(inv_t.dtype)  # the top-1 logit
        lse = tl.load(lse_ptr + row)
        for start in range(0, class_loop_end(classes, WIDE), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < classes
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(inv_t.dtype)
            dx = -inv_t * s * tl.exp((x - row_max) * inv_t - lse)
            tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _topk_grad_selected_kernel(g_ptr, w_ptr, i_ptr, dx_ptr, inv_t_ptr, classes, k, KBLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(inv_t_ptr)
    s = _grad_dot(g_ptr + row * k, w_ptr + row * k, k, KBLOCK)
    for start in range(0, k, KBLOCK):
        j = start + tl.arange(0, KBLOCK)
        mask = j < k
        g = tl.load(g_ptr + row * k + j, mask=mask, other=0.0)
        w = tl.load(w_ptr + row * k + j, mask=mask, other=0.0)
        idx = tl.load(i_ptr + row * k + j, mask=mask, other=0)
        tl.store(dx_ptr + row * classes + idx, (inv_t * w * (g - s)).to(dx_ptr.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor, k: int, temperature: float) -> None:
    if logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError("alchemy_ops: topk_softmax needs floating-point logits with at least one dim")
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"alchemy_ops: k must be in [1, {logits.shape[-1]}], got {k}")


@torch.library.register_kernel("alchemy_ops::triton_topk_softmax_forward", ("cpu", "cuda"))
def _topk_softmax_forward(
    logits: torch.Tensor, k: int, renormalize: bool, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(logits, k, temperature)
    x = logits.contiguous()
    classes = x.shape[-1]
    rows = x.numel() // classes
    acc = acc_dtype(x.dtype)
    lead = list(x.shape[:-1])
    weights = x.new_empty([*lead, k], dtype=acc)
    indices = x.new_empty([*lead, k], dtype=torch.int64)
    lse = x.new_empty(lead, dtype=acc)
    if rows == 0:
        return weights, indices, lse
    inv_t = _inv_temperature(temperature, x.dtype, x.device)
    is64 = x.dtype == torch.float64
    check_rows(rows, "topk_softmax")
    selected = x.new_empty((rows, k), dtype=torch.int64)
    row_max = x.new_empty((rows,), dtype=acc)
    _topk_select_kernel[(rows,)](
        x, selected, row_max, lse, inv_t, classes, k,
        RENORM=renormalize, IS64=is64, HIGH_BIT=62 if is64 else 30, NEG_BASE=-(2**63) if is64 else -(2**31),
        **tiling(classes, _KEY_BYTES, classes - 1),
    )  # fmt: skip
    tile = min(_MAX_TILE, triton.next_power_of_2(k))  # a TILE x TILE comparison of int64 keys
    _topk_rank_kernel[(rows,)](
        x, selected, row_max, lse, weights, indices, inv_t, classes, k,
        IS64=is64, TILE=tile, num_warps=num_warps(tile * tile, _KEY_BYTES),
    )  # fmt: skip
    return weights, indices, lse


@torch.library.register_kernel("alchemy_ops::triton_topk_softmax_backward", ("cpu", "cuda"))
def _topk_softmax_backward(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    lse: torch.Tensor,
    renormalize: bool,
    temperature: float,
) -> torch.Tensor:
    x = logits.contiguous()
    classes, k = x.shape[-1], weights.shape[-1]
    rows = x.numel() // classes
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx
    acc = acc_dtype(x.dtype)
    g = grad_weights.to(acc).contiguous()
    w = weights.to(acc).contiguous()
    idx = indices.contiguous()
    lse = lse.to(acc).contiguous()
    inv_t = _inv_temperature(temperature, x.dtype, x.device)
    check_rows(rows, "topk_softmax backward")
    element_bytes = acc.itemsize
    kblock = min(_MAX_KBLOCK, triton.next_power_of_2(k))
    _topk_grad_dense_kernel[(rows,)](
        g, w, idx, lse, x, dx, inv_t, classes, k, RENORM=renormalize, KBLOCK=kblock,
        **tiling(classes, element_bytes, classes - 1),
    )  # fmt: skip
    _topk_grad_selected_kernel[(rows,)](
        g, w, idx, dx, inv_t, classes, k, KBLOCK=kblock, num_warps=num_warps(kblock, element_bytes)
    )
    return dx
