"""Argument checks shared by the public ops: clear Python exceptions before any kernel runs."""

from __future__ import annotations

import math

import torch

_FLOAT32_MAX = torch.finfo(torch.float32).max


class DimensionError(IndexError, ValueError):
    """A ``dim`` outside the tensor's range; an IndexError as in PyTorch, and a ValueError."""


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"alchemy_ops: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def wrap_dim(dim: object, ndim: int) -> int:
    """Normalizes ``dim`` into ``[0, max(ndim, 1))``; a 0-d tensor accepts 0 and -1, as in PyTorch."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"alchemy_ops: dim must be an int, got {type(dim).__name__}")
    size = max(ndim, 1)
    if not -size <= dim < size:
        raise DimensionError(
            f"alchemy_ops: dim {dim} is out of range for a {ndim}-d tensor (expected in [{-size}, {size - 1}])"
        )
    return dim % size


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"alchemy_ops: temperature must be a Python number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"alchemy_ops: temperature must be finite and > 0, got {temperature}")
    if 1.0 / t > _FLOAT32_MAX:  # the kernels multiply by 1/T in fp32
        raise ValueError(f"alchemy_ops: temperature {temperature} is too small: 1/temperature overflows float32")
    return t


def result_dtype(input: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a softmax result: ``dtype`` if given (the input is cast to it first), else the input's."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"alchemy_ops: dtype must be a torch.dtype, got {type(dtype).__name__}")
    out = dtype or input.dtype
    if not out.is_floating_point:
        raise TypeError(
            f"alchemy_ops: softmax needs floating-point values, got {out}; cast with .float() or pass "
            "dtype=torch.float32"
        )
    return out
