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
