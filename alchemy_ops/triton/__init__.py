"""Triton kernels for the ``triton_*`` operators. Imported for its registrations; a missing
triton package only makes the ``triton`` backend unavailable."""

try:
    import triton  # noqa: F401
except ImportError:
    TRITON_AVAILABLE = False
else:
    TRITON_AVAILABLE = True
    from . import cross_entropy, cross_entropy_shard, gumbel_softmax, softmax, topk_softmax  # noqa: F401
