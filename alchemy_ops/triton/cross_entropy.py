"""Triton kernels of ``triton_cross_entropy_forward`` / ``_backward`` / ``_forward_inplace``.

Same math as ``csrc/include/alchemy/cross_entropy.h`` and same host logic as
``cross_entropy_host.h``: the logits are read in place as rows of C classes at the class
stride, one row per position r = o * inner + i at ``o * outer_stride + i * inner_stride``
(class dim 1 of [N, C, d...], or the single row of a 1-d [C] input). One program per row;
rows longer than BLOCK are looped over (BLOCK, num_warps and int64 offsets: see _tiling.py).

- forward: one online pass for the row statistics max and log_sum = log(sum exp(z - max))
  (shifting by 0 while the running max is -inf; both NaN when the row max is NaN or +-inf;
  the terms at the max, exactly 1, counted apart from the others and log_sum taken as
  log1p, so that log_sum is fp32-accurate however small it is),
  fused with T = sum_c w_c t'_c for probability targets and, in place, the target logit.
  The loss is formed from shifted values, never as lse - z (see cross_entropy.h, Precision):
  (1 - eps) w_y (log_sum - (z_y - max)) + eps / C (W log_sum - sum_c w_c (z_c - max)) for
  class indices, T log_sum - sum_c w_c t'_c (z_c - max) for probabilities, plus
  z_loss * (max + log_sum)^2. The shifted sums need the final max: a second walk over the
  row (still in cache), fused into the gradient walk when in place.
- lse: saved as fp64, float64(max) + float64(log_sum), whatever the input dtype (0 at
  ignored positions, NaN at bad ones). The gradient splits it per row into
  hi = acc(lse), lo = acc(lse - hi) and uses p_c = exp((z_c - hi) - lo): fp32-accurate for
  logits of any size, where an fp32 lse near 1e4 would be off by ~5e-4.
- in place: the same program then walks its row again, reading x and overwriting it with
  grad_scale[r] * d loss / d x (the target logit is then picked up in the first pass, so
  every read of the row is ordered before the writes through lse). It splits the lse it
  has just stored, so its gradient is bit for bit that of backward.
- backward: recomputes p_c from the saved fp64 lse (a first pass over the target row
  recomputes T for probability targets).

Everything else is accumulated in fp32 (fp64 for fp64 logits) and rounded once at the
store. The float arguments go to the kernels as a tensor in the accumulation dtype (Python
floats are passed as fp32, too coarse for fp64 rows); see ``_Problem.params``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.jit import JITFunction

from ..reference import acc_dtype
from ._layout import row_view
from ._tiling import check_rows, class_loop_end, row_base, tiling


class CrossEntropyArgumentError(RuntimeError, ValueError):
    """A bad argument of a cross-entropy op: a RuntimeError like the C++ kernels' TORCH_CHECK,
    and a ValueError like the public API's checks."""


class CrossEntropyTypeError(RuntimeError, TypeError):
    """A wrong dtype: a RuntimeError like the C++ kernels' TORCH_CHECK, and a TypeError."""


def _check(cond: bool, message: str, error: type[Exception] = CrossEntropyArgumentError) -> None:
    if not cond:
        raise error("alchemy_ops: " + message)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _tanh(u, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        t = libdevice.tanh(u)
    else:
        # The interpreter has no libdevice. tanh|u| = m / (m + 2) with m = expm1(2|u|), and
        # expm1 by Kahan's trick (e - 1) * x / log(e), accurate to a few ulp with a correctly
        # rounded exp/log (numpy's, under the interpreter). |u| is clamped at 20, where
        # tanh is 1 in fp64, so m stays finite.
        a = tl.minimum(tl.abs(u), 20.0)
        x = a + a
        e = tl.exp(x)
        m = tl.where(e == 1.0, x, (e - 1.0) * x / tl.log(e))
        t = m / (m + 2.0)
        t = tl.where(u < 0, -t, t)
        t = tl.where(u != u, u, t)  # NaN in, NaN out
    return t


@triton.jit
def _log1p(u, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        r = libdevice.log1p(u)
    else:
        # The interpreter has no libdevice: log1p(u) = log(w) * u / (w - 1) with w = 1 + u
        # (Kahan), accurate to a few ulp with a correctly rounded log; u when w rounds to 1.
        w = 1.0 + u
        r = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return r


@triton.jit
def _split_lse(lse, like):
    """The fp64 saved lse as hi + lo in the accumulation dtype (that of ``like``; lo = 0 for
    fp64): z - hi is exact for z near hi, then lo corrects (split_lse in cross_entropy.h)."""
    hi = lse.to(like.dtype)
    lo = (lse - hi.to(tl.float64)).to(like.dtype)
    return hi, lo


@triton.jit
def _grad_pass(
    x_row, xs_cls, dx_row, dxs_cls, t_row, ts_cls, w_ptr, classes,
    g, hi, lo, a, y, w_y, eps, eps_c, softcap, bad, row_max,
    SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr, SHIFTED_SUM: tl.constexpr,
    LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """dx_c = g * (a * p_c - b_c) * dz/dx over one row, p_c = exp((z_c - hi) - lo); ``bad``
    (a row-wide 0-d value) is 0 for a good row, NaN for an out-of-range class index, and
    selects 0 for ignore_index when it is +inf (see the callers).

    With SHIFTED_SUM (the in-place forward) it also returns the shifted sum the loss needs,
    from the same loads: sum_c w_c t'_c (z_c - row_max) for probabilities, sum_c w_c
    (z_c - row_max) for class indices (0 otherwise)."""
    shifted = tl.zeros((), hi.dtype)
    for start in range(0, class_loop_end(classes, WIDE), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < classes
        # Ignored and bad rows: d does not depend on x, which is not read (a limit of 0 classes).
        x = tl.load(x_row + cols * xs_cls, mask=cols < tl.where(bad == 0, classes, 0), other=0.0).to(hi.dtype)
        if SOFTCAP:
            th = _tanh(x / softcap, LIBDEVICE)
            z = softcap * th
        else:
            z = x
        p = tl.exp((z - hi) - lo)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        else:
            w = tl.full((BLOCK,), 1.0, hi.dtype)
        if SOFT:
            t = tl.load(t_row + cols * ts_cls, mask=mask, other=0.0).to(hi.dtype)
            wt = w * ((1.0 - eps) * t + eps_c)
            d = a * p - wt
            if SHIFTED_SUM:
                shifted += tl.sum(tl.where(mask, wt * (z - row_max), 0.0), 0)
        else:
            d = a * p - eps_c * w - tl.where(cols == y, (1.0 - eps) * w_y, 0.0)
            if SHIFTED_SUM:
                shifted += tl.sum(tl.where(mask, w * (z - row_max), 0.0), 0)
        d = g * d
        if SOFTCAP:
            d = d * (1.0 - th * th)
        if not SOFT:
            # bad: 0 (good row), NaN (class index out of range), +inf (ignore_index -> 0).
            d = tl.where(bad == float("inf"), 0.0, d + bad)
        tl.store(dx_row + cols * dxs_cls, d.to(dx_row.dtype.element_ty), mask=mask)
    return shifted


@triton.jit
def _ce_forward_kernel(
    x_ptr, t_ptr, w_ptr, par_ptr, scale_ptr, loss_ptr, lse_ptr,
    classes, inner, ignore_index,
    xs_outer, xs_cls, xs_inner, ts_outer, ts_cls, ts_inner,
    SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr,
    INPLACE: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = row_base(x_ptr, row, inner, xs_outer, xs_inner)
    t_row = row_base(t_ptr, row, inner, ts_outer, ts_inner)
    eps = tl.load(par_ptr)  # fp32, or fp64 for fp64 rows: the accumulation dtype
    z_loss = tl.load(par_ptr + 1)
    softcap = tl.load(par_ptr + 2)
    w_sum = tl.load(par_ptr + 3)
    eps_c = eps / classes

    y = 0
    if not SOFT:
        y = tl.load(t_ptr + row)
        live = (y != ignore_index) & (y >= 0) & (y < classes)  # the row is not read otherwise
    # sum_c exp(z_c - max) = ties + small: the terms at the max are exactly 1 and counted
    # apart, so the small terms are not absorbed into them (log_sum of a confident row, e.g.
    # 63 e^-18 next to one 1, keeps fp32 relative accuracy; see log_sum below).
    row_max = tl.full((), float("-inf"), eps.dtype)
    row_small = tl.zeros((), eps.dtype)
    row_ties = tl.zeros((), eps.dtype)
    mass = tl.zeros((), eps.dtype)  # T (probabilities)
    z_y = tl.zeros((), eps.dtype)  # the target logit, gathered in this pass when in place
    for start in range(0, class_loop_end(classes, WIDE), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < classes
        x_mask = mask
        if not SOFT:
            x_mask = mask & live
        x = tl.load(x_row + cols * xs_cls, mask=x_mask, other=float("-inf")).to(eps.dtype)
        if SOFTCAP:
            z = tl.where(mask, softcap * _tanh(x / softcap, LIBDEVICE), float("-inf"))
        else:
            z = x
        new_max = tl.maximum(row_max, tl.max(z, 0))
        # exp(-inf - -inf) would be NaN: while the max is -inf the sum is 0, shift by 0.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        tie = z == shift  # at the max (none while the max is -inf: then z is -inf, shift 0)
        block_small = tl.sum(tl.where(tie, 0.0, tl.exp(z - shift)), 0)
        # A new max turns the old ties into small terms; NaN (a NaN logit) propagates.
        kept = new_max == row_max
        row_small = tl.where(kept, row_small, (row_ties + row_small) * tl.exp(row_max - shift)) + block_small
        row_ties = tl.where(kept, row_ties, 0.0) + tl.sum(tie.to(eps.dtype), 0)
        row_max = new_max
        if SOFT:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            else:
                w = tl.full((BLOCK,), 1.0, eps.dtype)
            t = tl.load(t_row + cols * ts_cls, mask=mask, other=0.0).to(eps.dtype)
            mass += tl.sum(tl.where(mask, w * ((1.0 - eps) * t + eps_c), 0.0), 0)
        if INPLACE and not SOFT:
            # Not a separate load after this pass: nothing would order it before the other
            # threads' gradient stores to the same row. Values loaded here feed lse, which
            # every store below depends on.
            z_y += tl.sum(tl.where(cols == y, z, 0.0), 0)
    # NaN when the row max is NaN or +-inf (a fully -inf row included), as PyTorch's log_softmax.
    finite = (row_max > float("-inf")) & (row_max < float("inf"))
    row_max = tl.where(finite, row_max, float("nan"))
    # log(ties + small) as log1p((ties - 1) + small): ties >= 1 for a finite max.
    log_sum = tl.where(finite, _log1p((row_ties - 1.0) + row_small, LIBDEVICE), float("nan"))
    lse_acc = row_max + log_sum  # only for the z-loss term of the loss
    lse = row_max.to(tl.float64) + log_sum.to(tl.float64)  # the saved lse: unrounded

    w_y = tl.zeros((), eps.dtype)
    bad = tl.zeros((), eps.dtype)
    ignored = False
    valid = True
    if SOFT:
        target_mass = mass
    else:
        ignored = y == ignore_index
        valid = (y >= 0) & (y < classes)
        y_safe = tl.where(valid, y, 0)  # never read outside the row
        if not INPLACE:
            x_y = tl.load(x_row + y_safe * xs_cls).to(eps.dtype)
            if SOFTCAP:
                z_y = softcap * _tanh(x_y / softcap, LIBDEVICE)
            else:
                z_y = x_y
        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + y_safe)
        else:
            w_y = tl.full((), 1.0, eps.dtype)
        target_mass = (1.0 - eps) * w_y + eps_c * w_sum
        # As the CPU kernel: an ignored position has lse 0 (never read), a bad one NaN.
        lse = tl.where(ignored, 0.0, tl.where(valid, lse, float("nan"))).to(tl.float64)
        bad = tl.where(ignored, float("inf"), tl.where(valid, 0.0, float("nan"))).to(eps.dtype)
    tl.store(lse_ptr + row, lse)

    # The shifted sum of the loss: sum_c w_c t'_c (z_c - max) (probabilities) or
    # sum_c w_c (z_c - max) (class indices with smoothing), read after the max is final.
    shifted = tl.zeros((), eps.dtype)
    if INPLACE:
        hi, lo = _split_lse(lse, eps)  # as backward: the same gradient, bit for bit
        g = tl.load(scale_ptr + row)
        a = target_mass + 2.0 * z_loss * (hi + lo)
        shifted = _grad_pass(
            x_row, xs_cls, x_row, xs_cls, t_row, ts_cls, w_ptr, classes,
            g, hi, lo, a, y, w_y, eps, eps_c, softcap, bad, row_max,
            SOFT, HAS_WEIGHT, SOFTCAP, SOFT or SMOOTH, LIBDEVICE, BLOCK, WIDE,
        )  # fmt: skip
    elif SOFT or SMOOTH:
        for start in range(0, class_loop_end(classes, WIDE), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < classes
            x_mask = mask
            if not SOFT:
                x_mask = mask & live
            x = tl.load(x_row + cols * xs_cls, mask=x_mask, other=0.0).to(eps.dtype)
            if SOFTCAP:
                z = softcap * _tanh(x / softcap, LIBDEVICE)
            else:
                z = x
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            else:
                w = tl.full((BLOCK,), 1.0, eps.dtype)
            if SOFT:
                t = tl.load(t_row + cols * ts_cls, mask=mask, other=0.0).to(eps.dtype)
                w = w * ((1.0 - eps) * t + eps_c)
            # Per element, as PyTorch: a -inf logit gives +inf with w t' > 0, NaN with 0.
            shifted += tl.sum(tl.where(mask, w * (z - row_max), 0.0), 0)

    if SOFT:
        loss = mass * log_sum - shifted
    else:
        loss = (1.0 - eps) * w_y * (log_sum - (z_y - row_max))
        if SMOOTH:
            loss += eps_c * (w_sum * log_sum - shifted)
    loss += z_loss * lse_acc * lse_acc
    if not SOFT:
        loss = tl.where(ignored, 0.0, tl.where(valid, loss, float("nan")))
    tl.store(loss_ptr + row, loss)


@triton.jit
def _ce_backward_kernel(
    g_ptr, x_ptr, t_ptr, w_ptr, par_ptr, lse_ptr, dx_ptr,
    classes, inner, ignore_index,
    xs_outer, xs_cls, xs_inner, ts_outer, ts_cls, ts_inner, dxs_outer, dxs_cls, dxs_inner,
    SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = row_base(x_ptr, row, inner, xs_outer, xs_inner)
    t_row = row_base(t_ptr, row, inner, ts_outer, ts_inner)
    dx_row = row_base(dx_ptr, row, inner, dxs_outer, dxs_inner)
    eps = tl.load(par_ptr)
    z_loss = tl.load(par_ptr + 1)
    softcap = tl.load(par_ptr + 2)
    w_sum = tl.load(par_ptr + 3)
    eps_c = eps / classes
    g = tl.load(g_ptr + row)
    hi, lo = _split_lse(tl.load(lse_ptr + row), eps)

    y = 0
    w_y = tl.zeros((), eps.dtype)
    bad = tl.zeros((), eps.dtype)
    if SOFT:
        mass = tl.zeros((), eps.dtype)
        for start in range(0, class_loop_end(classes, WIDE), BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < classes
            t = tl.load(t_row + cols * ts_cls, mask=mask, other=0.0).to(eps.dtype)
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0)
            else:
                w = tl.full((BLOCK,), 1.0, eps.dtype)
            mass += tl.sum(tl.where(mask, w * ((1.0 - eps) * t + eps_c), 0.0), 0)
        a = mass + 2.0 * z_loss * (hi + lo)
    else:
        y = tl.load(t_ptr + row)
        ignored = y == ignore_index
        valid = (y >= 0) & (y < classes)
        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + tl.where(valid, y, 0))
        else:
            w_y = tl.full((), 1.0, eps.dtype)
        a = (1.0 - eps) * w_y + eps_c * w_sum + 2.0 * z_loss * (hi + lo)
        bad = tl.where(ignored, float("inf"), tl.where(valid, 0.0, float("nan"))).to(eps.dtype)
    _grad_pass(
        x_row, xs_cls, dx_row, dxs_cls, t_row, ts_cls, w_ptr, classes,
        g, hi, lo, a, y, w_y, eps, eps_c, softcap, bad, hi,
        SOFT, HAS_WEIGHT, SOFTCAP, False, LIBDEVICE, BLOCK, WIDE,
    )  # fmt: skip


# libdevice's tanh on GPUs; the interpreter (CPU tensors) has no libdevice.
_LIBDEVICE = isinstance(_ce_forward_kernel, JITFunction)


# ----------------------------------------------------------------------------------------
# Host logic (mirrors csrc/include/alchemy/cross_entropy_host.h)
# ----------------------------------------------------------------------------------------


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 1 else t


def _class_dim_view(t: torch.Tensor):
    """((outer, classes, inner), (outer_stride, class_stride, inner_stride)) of a [N, C, ...]
    tensor around dim 1, or None when its other dims do not collapse without a copy."""
    return row_view(t, 1)


class _Problem:
    """Everything the kernels need; see CrossEntropyProblem in cross_entropy_host.h."""

    def __init__(self, input, target, weight, ignore_index, label_smoothing, z_loss, softcap):
        _check(isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor),
               "cross_entropy input and target must be tensors", CrossEntropyTypeError)  # fmt: skip
        _check(input.dim() >= 1, "cross_entropy input must have a class dim, got a 0-d tensor")
        _check(input.dtype.is_floating_point, f"cross_entropy input must be floating-point, got {input.dtype}",
               CrossEntropyTypeError)  # fmt: skip
        _check(input.device == target.device, f"input is on {input.device} but target on {target.device}")
        _check(0.0 <= label_smoothing <= 1.0, "label_smoothing must be in [0, 1]")
        _check(math.isfinite(z_loss) and z_loss >= 0, "z_loss must be finite and >= 0")
        _check(math.isfinite(softcap), "softcap must be finite")
        self.soft = target.dtype.is_floating_point
        self.x = _as_batch(input)
        self.outer, self.classes = self.x.size(0), self.x.size(1)
        self.inner = math.prod(self.x.shape[2:])
        _check(self.classes > 0, "cross_entropy needs at least one class (input.size(1) is 0)")
        positions = list(input.shape)
        del positions[0 if input.dim() == 1 else 1]
        self.positions = positions
        if _class_dim_view(self.x) is None:  # a view whose other dims do not collapse
            self.x = self.x.contiguous()
        self.xs = _class_dim_view(self.x)[1]
        if self.soft:
            _check(target.shape == input.shape,
                   f"probability target has shape {list(target.shape)} but input has shape {list(input.shape)}; "
                   "class-index targets must be integer (cast with .long())")  # fmt: skip
            _check(target.dtype == input.dtype,
                   f"probability target dtype {target.dtype} differs from input dtype {input.dtype}",
                   CrossEntropyTypeError)  # fmt: skip
            self.target = _as_batch(target)
            if _class_dim_view(self.target) is None:
                self.target = self.target.contiguous()
            self.ts = _class_dim_view(self.target)[1]
        else:
            _check(target.dtype == torch.int64,
                   f"class-index target must be int64, got {target.dtype}; cast with .long()",
                   CrossEntropyTypeError)  # fmt: skip
            _check(
                list(target.shape) == positions,
                f"target has shape {list(target.shape)} but input {list(input.shape)} needs {positions}",
            )
            self.target = target.reshape(-1).contiguous()
            self.ts = (0, 0, 0)
        self.acc = acc_dtype(self.x.dtype)
        self.weight = None
        weight_sum: float | torch.Tensor = float(self.classes)
        if weight is not None:
            _check(weight.dim() == 1 and weight.numel() == self.classes,
                   f"weight must have shape [{self.classes}], got {list(weight.shape)}")  # fmt: skip
            _check(weight.device == input.device, f"weight is on {weight.device} but input on {input.device}")
            self.weight = weight.to(self.acc).contiguous()
            if label_smoothing > 0:  # W is only read with smoothing; summed on the device, no sync
                weight_sum = self.weight.sum()
        self.ignore_index = int(ignore_index)
        self.smoothing = float(label_smoothing)
        self.softcap = float(softcap) if softcap > 0 else 0.0
        # The floats as one tensor in the accumulation dtype: [eps, z_loss, softcap, W].
        params = torch.tensor([self.smoothing, float(z_loss), self.softcap, 0.0], dtype=self.acc, device=input.device)
        params[3] = weight_sum
        self.params = params

    @property
    def rows(self) -> int:
        return self.outer * self.inner

    def flags(self, *class_strides: int) -> dict:
        """The constexprs and launch options shared by the kernels; BLOCK, WIDE and num_warps by
        the rules of _tiling.py for rows of ``classes`` in the accumulation dtype."""
        check_rows(self.rows, "cross_entropy")
        span = (self.classes - 1) * max(abs(s) for s in (self.xs[1], self.ts[1], *class_strides))
        return dict(
            SOFT=self.soft,
            HAS_WEIGHT=self.weight is not None,
            SOFTCAP=self.softcap > 0,
            LIBDEVICE=_LIBDEVICE,
            **tiling(self.classes, self.acc.itemsize, span),
        )

    def weight_arg(self) -> torch.Tensor:
        return self.weight if self.weight is not None else self.params  # dummy, never read

    def position_string(self, flat: int) -> str:
        index = []
        for size in reversed(self.positions):
            index.append(flat % size if size > 0 else 0)
            flat = flat // size if size > 0 else 0
        index.reverse()
        return "(" + ", ".join(map(str, index)) + (",)" if len(index) == 1 else ")")

    def check_targets(self) -> None:
        """IndexError naming the first class index outside [0, C) that is not ignore_index."""
        t = self.target
        bad = t.ne(self.ignore_index) & (t.lt(0) | t.ge(self.classes))
        where = bad.nonzero()
        if where.size(0) == 0:
            return
        flat = int(where[0, 0])
        value = int(t[flat])
        raise IndexError(
            f"alchemy_ops: Target {value} is out of bounds (position {self.position_string(flat)}, "
            f"{self.classes} classes; expected 0 <= target < {self.classes} or ignore_index={self.ignore_index})"
        )


def _forward(p: _Problem, input: torch.Tensor, check_target: bool, grad_scale: torch.Tensor | None):
    # Checked before anything is written: a bad target must not cost the in-place caller its logits.
    if check_target and not p.soft and p.rows > 0:
        p.check_targets()
    loss = torch.empty(p.rows, dtype=p.acc, device=p.x.device)
    # fp64 whatever the input: max + log_sum unrounded, for an exact backward.
    lse = torch.empty(p.rows, dtype=torch.float64, device=p.x.device)
    if p.rows > 0:
        scale = p.params  # dummy, never read
        if grad_scale is not None:
            _check(grad_scale.numel() == p.rows, "grad_scale must have one value per position")
            scale = grad_scale.to(p.acc).reshape(-1).contiguous()
        _ce_forward_kernel[(p.rows,)](
            p.x, p.target, p.weight_arg(), p.params, scale, loss, lse,
            p.classes, p.inner, p.ignore_index, *p.xs, *p.ts,
            SMOOTH=p.smoothing > 0, INPLACE=grad_scale is not None, **p.flags(),
        )  # fmt: skip
        if grad_scale is not None and p.x.data_ptr() != input.data_ptr():
            _as_batch(input).copy_(p.x)
    return loss.view(p.positions), lse.view(p.positions)


@torch.library.register_kernel("alchemy_ops::triton_cross_entropy_forward", ("cpu", "cuda"))
def _cross_entropy_forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    check_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    p = _Problem(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    return _forward(p, input, check_target, None)


@torch.library.register_kernel("alchemy_ops::triton_cross_entropy_forward_inplace", ("cpu", "cuda"))
def _cross_entropy_forward_inplace(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    grad_scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    check_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    p = _Problem(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    # Each program rewrites its own row: rows that share memory (an expanded input) would race.
    _check(torch._debug_has_internal_overlap(input) != 1,
           "cross_entropy_forward_inplace: input has elements that share memory (e.g. an expanded "
           "tensor); pass a tensor that owns its logits, e.g. input.clone()")  # fmt: skip
    return _forward(p, input, check_target, grad_scale)


@torch.library.register_kernel("alchemy_ops::triton_cross_entropy_backward", ("cpu", "cuda"))
def _cross_entropy_backward(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> torch.Tensor:
    p = _Problem(input, target, weight, ignore_index, label_smoothing, z_loss, softcap)
    _check(grad_loss.numel() == p.rows and lse.numel() == p.rows,
           "grad_loss and lse must have one value per position")  # fmt: skip
    dx = torch.empty_like(input)
    if dx.numel() == 0:
        return dx
    g = grad_loss.to(p.acc).reshape(-1).contiguous()
    l = (lse if lse.dtype == torch.float64 else lse.double()).reshape(-1).contiguous()  # noqa: E741
    out = _as_batch(dx)
    view = _class_dim_view(out)
    packed = out if view is not None else torch.empty_like(p.x, memory_format=torch.contiguous_format)
    dxs = _class_dim_view(packed)[1]
    _ce_backward_kernel[(p.rows,)](
        g, p.x, p.target, p.weight_arg(), p.params, l, packed,
        p.classes, p.inner, p.ignore_index, *p.xs, *p.ts, *dxs,
        **p.flags(dxs[1]),
    )  # fmt: skip
    if packed is not out:
        out.copy_(packed)
    return dx
