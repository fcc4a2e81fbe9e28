"""The ``reference`` backend: each op as a plain PyTorch composition (the spec and the test oracle)."""

from __future__ import annotations

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


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> torch.Tensor:
    """``F.cross_entropy`` in the accumulation dtype, with the z-loss and softcap extras."""
    acc = acc_dtype(input.dtype)
    z = input.to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    w = None if weight is None else weight.to(acc)
    soft = target.is_floating_point()
    loss = torch.nn.functional.cross_entropy(
        z, target.to(acc) if soft else target, weight=w, ignore_index=ignore_index, reduction="none",
        label_smoothing=label_smoothing,
    )  # fmt: skip
    if z_loss:
        lse = torch.logsumexp(z, dim=1 if z.dim() > 1 else 0)
        z_term = z_loss * lse.square()
        loss = loss + (z_term if soft else z_term.masked_fill(target == ignore_index, 0))
    if reduction == "none":
        return loss.to(input.dtype)
    total = loss.sum()
    if reduction == "mean":
        classes = input.shape[1] if input.dim() > 1 else input.shape[0]
        total = total / cross_entropy_mean_denominator(target, w, ignore_index, classes, acc)
    return total.to(input.dtype)


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
