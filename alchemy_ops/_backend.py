"""Backend selection: which implementation of an op runs for a given tensor.

- ``cpp``: the compiled extension (CPU kernels always; CUDA kernels when built with CUDA).
- ``triton``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
- ``reference``: plain PyTorch compositions, the readable spec and test oracle.
- ``auto``: ``cpp`` for CPU tensors; for CUDA tensors ``cpp`` if built with CUDA, else ``triton``.
"""

from __future__ import annotations

import os

import torch

from ._extension import WITH_CUDA

BACKENDS = ("auto", "cpp", "triton", "reference")

# Read once, at import: Triton decides interpreter mode when it is imported.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_importable() -> bool:
    try:
        from .triton import TRITON_AVAILABLE
    except ImportError:
        return False
    return TRITON_AVAILABLE


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"alchemy_ops: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


# Process-wide, like torch.backends flags: a plain global is what torch.compile can read and guard
# on (it recompiles when the backend changes); a ContextVar would break the graph.
_current: str = _check_name(os.environ.get("ALCHEMY_OPS_BACKEND", "auto"))


def available_backends() -> list[str]:
    """Backends this build can run on this machine, e.g. ``["cpp", "triton", "reference"]``."""
    names = ["cpp"]
    if _triton_importable() and (_TRITON_INTERPRET or torch.cuda.is_available()):
        names.append("triton")
    names.append("reference")
    return names


class backend:
    """Context manager selecting the backend for ops called inside it.

    >>> with alchemy_ops.backend("reference"):
    ...     y = alchemy_ops.log_softmax(x)

    The default comes from the environment variable ``ALCHEMY_OPS_BACKEND`` (else ``"auto"``). The setting
    is process-wide (as ``torch.backends`` flags are), so set it outside of worker threads.
    """

    def __init__(self, name: str) -> None:
        self.name = _check_name(name)
        self._previous: list[str] = []

    def __enter__(self) -> backend:
        global _current
        self._previous.append(_current)
        _current = self.name
        return self

    def __exit__(self, *exc: object) -> None:
        global _current
        _current = self._previous.pop()


def current_backend() -> str:
    return _current


def direct_calls() -> bool:
    """Whether ops may try their ``_C`` entries (alchemy_ops._C.softmax, _C.cross_entropy_loss):
    the backend would resolve to cpp. The entries take plain tensors on CPU (CUDA when built with
    it) without autocast or torch-function modes and exactly-typed options, call the same
    operators, and return None for anything else; then, or when an operator raises, the op takes
    its checked path, which gives PyTorch's casts and the modules' messages."""
    return _current == "auto" or _current == "cpp"


def resolve(tensor: torch.Tensor) -> str:
    """The concrete backend (cpp, triton or reference) that runs an op on ``tensor``."""
    name = _current
    on_cuda = tensor.device.type == "cuda"
    if name == "auto":
        return "triton" if on_cuda and not WITH_CUDA else "cpp"
    if name == "cpp" and on_cuda and not WITH_CUDA:
        raise RuntimeError(
            "alchemy_ops: backend 'cpp' was built without CUDA kernels; rebuild with nvcc available "
            "(FORCE_CUDA=1) or use backend('triton')."
        )
    if name == "cpp" and tensor.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"alchemy_ops: backend 'cpp' has no kernels for device {tensor.device}")
    if name == "triton" and "triton" not in available_backends():
        raise RuntimeError(
            "alchemy_ops: backend 'triton' is unavailable: it needs the triton package and a CUDA GPU, "
            "or TRITON_INTERPRET=1 set before importing alchemy_ops to run on CPU tensors."
        )
    return name
