"""The ``reference`` backend: each op as a plain PyTorch composition (the spec and the test oracle)."""

from __future__ import annotations

import math

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every op: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax(input: torch.Tensor, dim: int, temperature: float, log: bool, dtype: torch.dtype | None) -> torch.Tensor:
    x = input if dtype is None else input.to(dtype)
    # Divide in the accumulation dtype: x / T rounded to bf16 would lose most of a small T's precision.
    z = x.to(acc_dtype(x.dtype)) / temperature
    return (torch.log_softmax(z, dim) if log else torch.softmax(z, dim)).to(x.dtype)


def cross_entropy_mean_denominator(
    target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, classes: int, dtype: torch.dtype
) -> torch.Tensor:
    """What ``reduction="mean"`` divides the summed loss by, as PyTorch: the summed weight of the
    non-ignored class-index targets (their count without ``weight``), or the number of positions for
    probability targets. 0 when everything is ignored, so the mean is NaN, as in PyTorch."""
    if target.is_floating_point():
        return torch.tensor(float(target.numel() // max(classes, 1)), dtype=dtype, device=target.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    # Bad indices are clamped here only to keep the gather in bounds; their loss is NaN (or raised).
    picked = weight.to(dtype)[target.masked_fill(~valid, 0).clamp(0, classes - 1)]
    return picked.masked_fill(~valid, 0).sum()


def cross_entropy_valid_count(
    target: torch.Tensor, ignore_index: int, classes: int, dtype: torch.dtype
) -> torch.Tensor:
    """The number of non-ignored positions (all positions for probability targets): what the
    z-loss and token-accuracy means divide by."""
    if target.is_floating_point():
        return torch.tensor(float(target.numel() // max(classes, 1)), dtype=dtype, device=target.device)
    return (target != ignore_index).sum().to(dtype)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``F.cross_entropy`` in the accumulation dtype, with the z-loss and softcap extras; the result
    in ``dtype`` (default: the input's)."""
    acc = acc_dtype(input.dtype)
    dtype = dtype or input.dtype
    z = capped(input, softcap or 0.0)
    w = None if weight is None else weight.to(acc)
    soft = target.is_floating_point()
    # ATen's loss, not F.cross_entropy: a user may have set F.cross_entropy = ao.cross_entropy, which
    # under this backend would call back here forever.
    none = torch.nn._reduction.get_enum("none")
    loss = torch._C._nn.cross_entropy_loss(
        z, target.to(acc) if soft else target, w, none, ignore_index, label_smoothing
    )
    z_term = torch.zeros((), dtype=acc, device=input.device)
    if z_loss:
        lse = torch.logsumexp(z, dim=1 if z.dim() > 1 else 0)
        z_term = z_loss * lse.square()
        z_term = z_term if soft else z_term.masked_fill(target == ignore_index, 0)
    if reduction == "none":
        return (loss + z_term).to(dtype)
    if reduction == "sum":
        return (loss.sum() + z_term.sum()).to(dtype)
    # mean: the cross-entropy over the summed weights, the z-loss over the non-ignored positions
    classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    total = loss.sum() / cross_entropy_mean_denominator(target, w, ignore_index, classes, acc)
    if z_loss:
        total = total + z_term.sum() / cross_entropy_valid_count(target, ignore_index, classes, acc)
    return total.to(dtype)


# ---- gumbel_softmax: Philox4x32-10 written out in int64 tensor arithmetic (uint32 values) ----

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_UNIFORM_SCALE = 4.6566127342e-10
_UNIFORM_MIN = 2.0**-32
_UNIFORM_MAX = 1.0 - 2.0**-24


def _mulhilo32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32 bits of a * b for uint32 values held in int64, without int64 overflow."""
    t_lo = (a & 0xFFFF) * b  # < 2^48
    t_hi = (a >> 16) * b  # < 2^48
    s = t_hi + (t_lo >> 16)  # a * b = s * 2^16 + (t_lo & 0xffff)
    return s >> 16, ((s & 0xFFFF) << 16) | (t_lo & 0xFFFF)


def philox_uniform(seed: int | torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.rand(seed, counters)`` for int64 counters: the first word of Philox4x32-10 with
    key (seed lo, seed hi) and counter (counter lo, counter hi, 0, 0), as a float32 in [0, 1).
    ``seed``: an int, or an int64 tensor (no host sync, so torch.compile can trace it)."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0, c1 = counters & _MASK32, (counters >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(c2, _PHILOX_ROUND[1])
        hi_a, lo_a = _mulhilo32(c0, _PHILOX_ROUND[0])
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _MASK32, (k1 + _PHILOX_KEY[1]) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # the word as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def gumbel_noise(seed: int | torch.Tensor, offset: int, shape: tuple[int, ...], device) -> torch.Tensor:
    """fp32 Gumbel noise -log(-log(u)) of every element, u clamped into [2^-32, 1 - 2^-24]."""
    n = math.prod(shape)
    u = philox_uniform(seed, torch.arange(offset, offset + n, dtype=torch.int64, device=device))
    u = u.clamp(_UNIFORM_MIN, _UNIFORM_MAX)
    return -torch.log(-torch.log(u)).view(shape)


def gumbel_softmax(
    logits: torch.Tensor, seed: torch.Tensor, offset: int, tau: float, hard: bool, dim: int
) -> torch.Tensor:
    """softmax((logits + g - max) / tau) with the kernels' noise; hard: one-hot at the first argmax of
    logits + g, straight-through. Contiguous, in the logits' dtype."""
    acc = acc_dtype(logits.dtype)
    z = logits.to(acc) + gumbel_noise(seed.reshape(()), offset, tuple(logits.shape), logits.device).to(acc)
    z = z.contiguous()
    m = z.amax(dim, keepdim=True) if z.dim() else z
    soft = torch.softmax((z - m) / tau, dim if z.dim() else 0).to(logits.dtype)
    if not hard:
        return soft
    index = z.argmax(dim, keepdim=True) if z.dim() else torch.zeros((), dtype=torch.long)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0) if z.dim() else torch.ones_like(soft)
    # + (s - s): exactly 0 for a finite soft sample, so the value stays an exact one-hot; NaN rows stay NaN.
    return one_hot + (soft - soft.detach())


def topk_softmax(
    logits: torch.Tensor, k: int, renormalize: bool, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax along the last dim: a stable descending sort (NaN first, ties to the lowest
    index), then the softmax of the k selected (``renormalize``) or the full-row softmax gathered."""
    x = logits.to(acc_dtype(logits.dtype))
    _, indices = torch.sort(x.detach(), dim=-1, descending=True, stable=True)
    z = x / temperature
    indices = indices[..., :k]
    selected = z.gather(-1, indices)
    weights = torch.softmax(selected, -1) if renormalize else torch.softmax(z, -1).gather(-1, indices)
    return weights, indices


def capped(input: torch.Tensor, softcap: float) -> torch.Tensor:
    """``softcap * tanh(input / softcap)`` in the accumulation dtype (the input itself for softcap 0)."""
    z = input.to(acc_dtype(input.dtype))
    return softcap * torch.tanh(z / softcap) if softcap > 0 else z


def cross_entropy_shard_stats(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_start: int,
    ignore_index: int,
    softcap: float,
    smoothing: bool,
) -> torch.Tensor:
    """The [N, 6] statistics of one shard of the classes (csrc/include/alchemy/cross_entropy_shard.h):
    max, log-sum-exp relative to it, target logit, target weight, smoothing sum, weight sum."""
    z = capped(input, softcap)
    rows, classes = z.shape
    w = torch.ones(classes, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)
    top = z.amax(1) if classes and rows else z.new_empty(rows)
    shift = top.masked_fill(top == -math.inf, 0)
    log_sum = (z - shift[:, None]).exp().sum(1).log().masked_fill(top == -math.inf, -math.inf)
    column = target - class_start
    ignored = target == ignore_index
    owned = (column >= 0) & (column < classes) & ~ignored
    safe = column.clamp(0, classes - 1)
    stats = torch.stack(
        [
            top,
            log_sum,
            z.gather(1, safe[:, None]).squeeze(1).masked_fill(~owned, 0),
            w[safe].masked_fill(~owned, 0),
            (w * (z - shift[:, None])).sum(1) if smoothing else torch.zeros_like(top),
            w.sum().expand(rows),
        ],
        1,
    )
    stats[:, :5].masked_fill_(ignored[:, None], 0)
    return stats


def cross_entropy_shard_backward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    lse: torch.Tensor,
    coeffs: torch.Tensor,
    class_start: int,
    ignore_index: int,
    softcap: float,
) -> torch.Tensor:
    """d loss / d input of one shard: (k0 exp(z - lse) - k1 w - [class == target] k2) dz/dx, per row
    k = coeffs[r]; 0 where ignored. Computed in fp64, rounded once to the input dtype."""
    x = input.double()
    z = capped(x, softcap)
    classes = z.shape[1]
    w = torch.ones(classes, dtype=z.dtype, device=z.device) if weight is None else weight.double()
    k = coeffs.double()
    column = target - class_start
    at_target = torch.arange(classes, device=z.device)[None, :] == column[:, None]
    d = k[:, :1] * (z - lse.double()[:, None]).exp() - k[:, 1:2] * w - at_target * k[:, 2:3]
    if softcap > 0:
        d = d * (1 - torch.tanh(x / softcap) ** 2)
    return d.masked_fill((target == ignore_index)[:, None], 0).to(input.dtype)
