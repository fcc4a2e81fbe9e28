"""alchemy_ops: fused, numerically stable softmax-family kernels for PyTorch (CPU, CUDA, Triton)."""

from . import _extension, _ops, distributed, nn  # noqa: F401  (operators, fake kernels, autograd)
from . import triton as _triton  # noqa: F401  (registers the triton_* kernels when triton is installed)
from ._backend import available_backends, backend
from ._checks import DimensionError
from .cross_entropy import CrossEntropyOutput, cross_entropy
from .gumbel_softmax import gumbel_softmax
from .linear_cross_entropy import linear_cross_entropy
from .softmax import log_softmax, softmax
from .topk_softmax import topk_softmax

__all__ = [
    "available_backends",
    "backend",
    "cross_entropy",
    "CrossEntropyOutput",
    "DimensionError",
    "distributed",
    "gumbel_softmax",
    "linear_cross_entropy",
    "log_softmax",
    "nn",
    "softmax",
    "topk_softmax",
]
__version__ = "0.1.0"
