"""Loads the compiled operator library ``alchemy_ops._C`` and checks it fits this CPU."""

import torch

try:
    from . import _C  # registers the alchemy_ops::* operators
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "alchemy_ops: the compiled extension alchemy_ops._C is missing or was built against another torch. "
        "Build it with `pip install --no-build-isolation .` (or `make build` in a checkout)."
    ) from e

_CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")


def _cpu_supports(capability: str) -> bool:
    if capability == "AVX512":
        return bool(torch.cpu._is_avx512_supported())
    if capability == "AVX2":
        return bool(torch.cpu._is_avx2_supported())
    return True


if not _cpu_supports(_C.cpu_capability):
    raise ImportError(
        f"alchemy_ops was compiled for {_C.cpu_capability} but this CPU lacks it. Rebuild on this machine, or "
        "set ALCHEMY_OPS_CPU_CAPABILITY=AVX2 (or DEFAULT) when building for older CPUs."
    )

CPU_CAPABILITY: str = _C.cpu_capability
WITH_CUDA: bool = bool(_C.with_cuda)
