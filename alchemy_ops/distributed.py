"""``vocab_parallel_cross_entropy``: cross-entropy over a vocabulary split across the ranks of a
process group (a tensor-parallel LM head), on any ``torch.distributed`` backend.

Each rank holds the logits of its slice of the vocabulary, ``[N, V_r]``, and the same targets; the
loss equals ``ao.cross_entropy`` of the concatenated ``[N, V]`` logits, on every rank. Per call:

1. local checks, then one small all-gather of every rank's metadata (shapes, dtype, vocabulary
   slice, fingerprints of the targets and options, whether its checks passed): a rank with bad
   input makes every rank raise, instead of leaving the others waiting in a collective;
2. the fused shard kernel (``cross_entropy_shard_stats``): per token max, log-sum-exp, target logit
   and weight, smoothing sum, in one read of the local logits;
3. one all-gather of those statistics, packed ``[N, 6]`` per rank, combined in fp64 on every rank.
   It is a gather rather than a sum all-reduce because merging log-sum-exps needs every shard's
   max, which no single sum or max reduction carries; it moves ``world * N * 6`` numbers;
4. backward is local: a shard's gradient needs only the combined statistics, no collective.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import reference
from ._backend import resolve
from ._ops import ops
from .cross_entropy import _check_arguments, check_class_targets

__all__ = ["vocab_parallel_cross_entropy"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The metadata each rank contributes: its checks' status, token count, vocabulary slice
# (start -1 when inferred from the rank order), dtype, and fingerprints of target and options.
_STATUS, _TOKENS, _VOCAB, _START, _DTYPE, _TARGET, _OPTIONS = range(7)
_META = 7


@dataclass
class _Shard:
    group: dist.ProcessGroup | None
    world: int
    class_start: int
    vocab: int  # V: classes over all ranks
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float  # 0: none
    backend: str

    def _op(self, name: str):
        if self.backend == "reference":
            return getattr(reference, name)
        return getattr(ops, name if self.backend == "cpp" else f"triton_{name}")

    def stats(self, logits, target, weight):
        op = self._op("cross_entropy_shard_stats")
        return op(logits, target, weight, self.class_start, self.ignore_index, self.softcap, self.label_smoothing > 0)

    def backward(self, logits, target, weight, lse, coeffs):
        op = self._op("cross_entropy_shard_backward")
        return op(logits, target, weight, lse, coeffs, self.class_start, self.ignore_index, self.softcap)


def _combine(gathered: torch.Tensor, target: torch.Tensor, shard: _Shard):
    """Loss per token (fp64) and what backward needs, from the [world, N, 6] shard statistics
    (columns as in csrc/include/alchemy/cross_entropy_shard.h)."""
    s = gathered.double()
    top, log_sum, z_y, w_y, smooth_sum, weight_sum = s.unbind(-1)
    lse = torch.logsumexp(top + log_sum, 0)  # shards of -inf logits (lse -inf) drop out
    w_y, z_y = w_y.sum(0), z_y.sum(0)
    eps = shard.label_smoothing
    loss = (1 - eps) * w_y * (lse - z_y)
    if eps > 0:  # sum_c w_c (lse - z_c), each shard's part relative to its finite max
        shift = top.masked_fill(top == -math.inf, 0)
        loss = loss + eps / shard.vocab * (weight_sum * (lse - shift) - smooth_sum).sum(0)
    ignored = target == shard.ignore_index
    bad = ~ignored & ((target < 0) | (target >= shard.vocab))  # only when the check was skipped
    loss = loss.masked_fill(ignored, 0).masked_fill(bad, math.nan)
    z_term = (shard.z_loss * lse * lse).masked_fill(ignored, 0)
    return loss, z_term, lse, w_y.masked_fill(bad, math.nan), weight_sum.sum(0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, shard: _Shard):
        stats = shard.stats(logits, target, weight)
        gathered = stats.new_empty((shard.world * stats.shape[0], stats.shape[1]))
        if stats.numel() > 0:
            _all_gather(gathered, stats.contiguous(), shard.group)
        loss, z_term, lse, w_y, weight_sum = _combine(gathered.view(shard.world, *stats.shape), target, shard)
        ctx.save_for_backward(logits, target, weight, lse, w_y, weight_sum)
        ctx.shard = shard
        target_weight = w_y.to(stats.dtype)
        ctx.mark_non_differentiable(target_weight)
        return loss.to(stats.dtype), z_term.to(stats.dtype), target_weight

    @staticmethod
    def backward(ctx, grad_loss, grad_z_term, _grad_w_y):
        logits, target, weight, lse, w_y, weight_sum = ctx.saved_tensors
        shard = ctx.shard
        eps, g = shard.label_smoothing, grad_loss.double()
        # d loss / d z_c = g (a p_c - eps / V w_c - [c == y] (1 - eps) w_y) + g_z 2 z_loss lse p_c;
        # see cross_entropy.h. The z term has its own upstream gradient: a mean divides it by the
        # number of tokens, the cross-entropy by the summed weights.
        a = g * ((1 - eps) * w_y + eps / shard.vocab * weight_sum) + grad_z_term.double() * (2 * shard.z_loss * lse)
        coeffs = torch.stack([a, g * (eps / shard.vocab), g * ((1 - eps) * w_y)], 1)
        grad = shard.backward(logits, target, weight, lse, coeffs.to(grad_loss.dtype))
        return grad, None, None, None


def _all_gather(out: torch.Tensor, mine: torch.Tensor, group) -> None:
    """The ranks' ``mine`` concatenated along dim 0 into ``out`` (all_gather_single from torch 2.13)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, mine, group=group)


def _fingerprint(target: torch.Tensor) -> int:
    """A cheap checksum of the targets (one device reduction), to catch ranks that disagree."""
    position = torch.arange(target.numel(), device=target.device) % 65521 + 1
    return int(((target.reshape(-1) + 101) * position).sum())


def _options_fingerprint(*options) -> int:
    return zlib.crc32(repr(options).encode() + struct.pack("<q", len(options))) & 0x7FFFFFFF


def _collective_device(group, local_logits) -> torch.device:
    if isinstance(local_logits, torch.Tensor):
        return local_logits.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange_metadata(row: list[int], group, device) -> list[list[int]]:
    world = dist.get_world_size(group)
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    table = torch.empty(world * _META, dtype=torch.int64, device=device)
    _all_gather(table, mine, group)
    return table.view(world, _META).tolist()


def _slices(table: list[list[int]]) -> list[int]:
    """Each rank's first class, inferred from the rank order or checked to tile [0, V)."""
    sizes = [r[_VOCAB] for r in table]
    starts = [r[_START] for r in table]
    if all(s == -1 for s in starts):
        return [sum(sizes[:r]) for r in range(len(sizes))]
    if any(s == -1 for s in starts):
        raise ValueError("alchemy_ops: vocab_start must be given on every rank or on none")
    end = 0
    for start, size in sorted(zip(starts, sizes, strict=True)):
        if start != end:
            raise ValueError(
                "alchemy_ops: the ranks' vocabulary slices (vocab_start, size) = "
                f"{list(zip(starts, sizes, strict=True))} do not tile [0, {sum(sizes)}) without gaps or overlaps"
            )
        end += size
    return starts


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    check_target: bool = True,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits whose vocabulary is split over the ranks of ``group``.

    Every rank of the group calls it with its slice of the logits and the same targets, and gets
    the same loss: ``ao.cross_entropy(cat(local_logits of every rank, dim=1), target, ...)``, with
    label smoothing over the whole vocabulary V (``eps / V``, mean over all V classes), weighted mean
    and ``ignore_index`` across ranks, and ``z_loss`` on the whole vocabulary's log-sum-exp. The
    gradient of ``local_logits`` is this rank's slice of that loss's gradient.

    Args:
        local_logits: ``(N, V_r)`` fp32, bf16, fp16 or fp64: this rank's classes, any strides.
        target: ``(N)`` int64 class indices into the whole vocabulary ``[0, V)`` or ``ignore_index``;
            the same on every rank (checked by a fingerprint). Probability targets are not supported.
        group: the process group; the default group when None.
        weight: ``(V_r)`` class weights of this rank's classes, or None on every rank.
        ignore_index, reduction, label_smoothing, z_loss, softcap, check_target: as ``ao.cross_entropy``.
        vocab_start: this rank's first class. None (on every rank): ranks hold consecutive slices in
            rank order, of any sizes. Given: the slices must tile ``[0, V)``.

    Returns:
        The loss in ``local_logits``' dtype, identical on every rank: a scalar, or ``(N)`` for
        ``reduction="none"``. Accumulated in fp32 (fp64 for fp64), combined across ranks in fp64.

    Raises:
        The errors of ``ao.cross_entropy`` on the rank whose input is bad, and ``RuntimeError`` on
        the others; ``ValueError`` on every rank when the ranks disagree on the token count, dtype,
        targets, options or vocabulary slices. No rank is left waiting in a collective.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "alchemy_ops: vocab_parallel_cross_entropy needs torch.distributed.init_process_group() first; "
            "on one device use alchemy_ops.cross_entropy"
        )
    error, row = None, [1] + [0] * (_META - 1)
    try:
        logits, target, weight, ignore_index, label_smoothing, z_loss, softcap = _check_arguments(
            local_logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap
        )
        if logits.dim() != 2:
            raise ValueError(
                f"alchemy_ops: local_logits must be (N, V_r), got shape {tuple(logits.shape)}; "
                "flatten the token dims with .flatten(0, -2) and the target with .flatten()"
            )
        if target.is_floating_point():
            raise TypeError(
                "alchemy_ops: vocab_parallel_cross_entropy takes class-index targets only; cast with .long()"
            )
        if vocab_start is not None and (isinstance(vocab_start, bool) or not isinstance(vocab_start, int)):
            raise TypeError(f"alchemy_ops: vocab_start must be an int or None, got {type(vocab_start).__name__}")
        if vocab_start is not None and vocab_start < 0:
            raise ValueError(f"alchemy_ops: vocab_start must be >= 0, got {vocab_start}")
        options = (ignore_index, reduction, label_smoothing, z_loss, softcap, weight is None, check_target)
        row = [
            0,
            logits.shape[0],
            logits.shape[1],
            -1 if vocab_start is None else vocab_start,
            _DTYPES.index(logits.dtype),
            _fingerprint(target),
            _options_fingerprint(*options),
        ]
    except Exception as e:  # reported to the other ranks before this rank raises it
        error = e
    table = _exchange_metadata(row, group, _collective_device(group, local_logits))
    if error is not None:
        raise error
    failed = [r for r, meta in enumerate(table) if meta[_STATUS] != 0]
    if failed:
        raise RuntimeError(
            f"alchemy_ops: vocab_parallel_cross_entropy: rank(s) {failed} of the group got bad input and raised "
            "there; this rank stops too (no statistics were exchanged)"
        )
    for field, what in ((_TOKENS, "token counts N"), (_DTYPE, "logits dtypes"), (_OPTIONS, "options")):
        values = [meta[field] for meta in table]
        if len(set(values)) > 1:
            shown = [_DTYPES[v] for v in values] if field == _DTYPE else values
            raise ValueError(f"alchemy_ops: the ranks disagree on their {what}: {shown} (rank order)")
    if len({meta[_TARGET] for meta in table}) > 1:
        raise ValueError("alchemy_ops: the ranks hold different targets; every rank must pass the same target")
    starts = _slices(table)
    rank, vocab = dist.get_rank(group), sum(meta[_VOCAB] for meta in table)
    if check_target:
        check_class_targets(target, vocab, ignore_index)
    shard = _Shard(
        group, len(table), starts[rank], vocab, ignore_index, label_smoothing, z_loss, softcap or 0.0, resolve(logits)
    )
    acc_weight = None if weight is None else weight.to(reference.acc_dtype(logits.dtype))
    loss, z_term, w_y = _VocabParallelCrossEntropy.apply(logits, target, acc_weight, shard)
    if reduction == "none":
        return (loss + z_term).to(logits.dtype)
    if reduction == "sum":
        return (loss.sum() + z_term.sum()).to(logits.dtype)
    # mean: the cross-entropy over the summed weights, the z-loss over the non-ignored tokens
    kept = target != ignore_index
    count = kept.sum().to(loss.dtype)
    total = loss.sum() / (count if weight is None else w_y.masked_fill(~kept, 0).sum())
    return (total + z_term.sum() / count).to(logits.dtype)
