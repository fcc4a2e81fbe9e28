"""Benchmark cases: what each op is compared against, with the bytes that must move."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import alchemy_ops as ao


@dataclass
class Case:
    op: str
    mode: str  # "forward" or "forward+backward"
    dtype: torch.dtype
    shape: tuple[int, ...]
    # provider name -> fn(x) returning (output, grad or None)
    providers: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]] = field(
        default_factory=dict
    )
    passes: int = 2  # logits-sized tensors that must be read or written

    @property
    def name(self) -> str:
        return f"{self.op} {self.mode} {str(self.dtype).removeprefix('torch.')} {'x'.join(map(str, self.shape))}"


def _runner(fn: Callable[[torch.Tensor], torch.Tensor], backward: bool, grad: torch.Tensor | None):
    def run(x: torch.Tensor):
        if not backward:
            return fn(x), None
        xr = x.detach().requires_grad_()
        y = fn(xr)
        y.backward(grad)
        return y, xr.grad

    return run


def softmax_cases(shapes, dtypes, device: str, compile_baseline: bool) -> list[Case]:
    cases = []
    for op, ours, theirs in [
        ("log_softmax", ao.log_softmax, lambda t: F.log_softmax(t, -1)),
        ("softmax", ao.softmax, lambda t: F.softmax(t, -1)),
    ]:
        for shape in shapes:
            for dtype in dtypes:
                for backward in (False, True):
                    grad = torch.randn(shape, device=device, dtype=dtype) if backward else None
                    case = Case(
                        op, "forward+backward" if backward else "forward", dtype, shape, passes=5 if backward else 2
                    )
                    case.providers["alchemy_ops"] = _runner(lambda t, f=ours: f(t, -1), backward, grad)
                    case.providers["torch eager"] = _runner(theirs, backward, grad)
                    if compile_baseline:
                        case.providers["torch.compile"] = _runner(torch.compile(theirs, dynamic=False), backward, grad)
                    cases.append(case)
    return cases
