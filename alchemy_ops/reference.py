"""The ``reference`` backend: each op as a plain PyTorch composition (the spec and the test oracle)."""

from __future__ import annotations

import torch


def softmax(input: torch.Tensor, dim: int, temperature: float, log: bool, dtype: torch.dtype | None) -> torch.Tensor:
    x = input if dtype is None else input.to(dtype)
    if temperature != 1.0:
        x = x / temperature
    return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)
