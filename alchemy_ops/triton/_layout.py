"""Row views for the Triton kernels: a tensor as [outer, classes, inner] around ``dim``, no copy."""

from __future__ import annotations

import torch


def _collapse(t: torch.Tensor, begin: int, end: int) -> tuple[int, int] | None:
    size, stride = 1, 1
    for d in range(end - 1, begin - 1, -1):
        s = t.size(d)
        if s == 1:
            continue
        if size == 1:
            size, stride = s, t.stride(d)
        elif t.stride(d) == stride * size:
            size *= s
        else:
            return None
    return size, stride


def row_view(t: torch.Tensor, dim: int) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """((outer, classes, inner), (outer_stride, class_stride, inner_stride)), or None if the
    dims around ``dim`` cannot be collapsed without a copy (e.g. a permuted view)."""
    outer, inner = _collapse(t, 0, dim), _collapse(t, dim + 1, t.dim())
    if outer is None or inner is None:
        return None
    return (outer[0], t.size(dim), inner[0]), (outer[1], t.stride(dim), inner[1])


def run_rows(launch, inputs: list[torch.Tensor], out: torch.Tensor, dim: int) -> torch.Tensor:
    """Calls ``launch(tensors, shape, strides)`` with ``tensors = [*inputs, out]`` viewed as rows;
    when a view does not collapse, runs on contiguous copies and copies the result into ``out``."""
    tensors = [*inputs, out]
    views = [row_view(t, dim) for t in tensors]
    if any(v is None for v in views):
        packed = [t.contiguous() for t in inputs]
        tensors = [*packed, torch.empty_like(packed[0], dtype=out.dtype)]
        views = [row_view(t, dim) for t in tensors]
    launch(tensors, views[-1][0], [v[1] for v in views])
    if tensors[-1] is not out:
        out.copy_(tensors[-1])
    return out
