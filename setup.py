"""Builds alchemy_ops._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc is found.

Environment:
  FORCE_CUDA=1                 build the CUDA kernels even if detection says no
  ALCHEMY_OPS_NO_CUDA=1        never build them
  TORCH_CUDA_ARCH_LIST         CUDA archs (default "8.0;9.0" when no GPU is visible)
  ALCHEMY_OPS_CPU_CAPABILITY   DEFAULT | AVX2 | AVX512 (default: what torch detects on the build machine)
  ALCHEMY_OPS_NVCC_FLAGS       extra nvcc flags (make cuda-check adds -Xptxas -v)
  ALCHEMY_OPS_EXTRA_INCLUDE    extra include dirs, os.pathsep-separated
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# at::vec is a scalar fallback unless the translation unit is compiled for a SIMD
# capability; these match the flags ATen uses for its own kernels.
CPU_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"],
    "DEFAULT": [],
}


def cpu_capability() -> str:
    wanted = os.environ.get("ALCHEMY_OPS_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    wanted = wanted.upper()
    return wanted if wanted in CPU_CAPABILITY_FLAGS else "DEFAULT"


def with_cuda() -> bool:
    if os.environ.get("ALCHEMY_OPS_NO_CUDA") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    capability = cpu_capability()
    cuda = with_cuda()
    cxx = ["-O3", f'-DALCHEMY_CPU_CAPABILITY="{capability}"']
    if capability != "DEFAULT":
        cxx += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    cxx += CPU_CAPABILITY_FLAGS[capability]
    # at::parallel_for is an OpenMP pragma in a header: without -fopenmp it runs serially.
    # At run time libgomp.so.1 resolves to the copy torch already loaded.
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = ["csrc/alchemy_ops.cpp", *sorted(glob.glob("csrc/autograd/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    include_dirs += [p for p in os.environ.get("ALCHEMY_OPS_EXTRA_INCLUDE", "").split(os.pathsep) if p]
    if not cuda:
        return CppExtension(
            "alchemy_ops._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    nvcc += os.environ.get("ALCHEMY_OPS_NVCC_FLAGS", "").split()
    return CUDAExtension(
        "alchemy_ops._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs,
        extra_link_args=link,
        extra_compile_args={"cxx": cxx + ["-DALCHEMY_WITH_CUDA"], "nvcc": nvcc + ["-DALCHEMY_WITH_CUDA"]},
    )


setup(
    name="alchemy_ops",
    version="0.1.0",
    packages=find_packages(include=["alchemy_ops", "alchemy_ops.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
