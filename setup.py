"""Builds fastsam._C: C++ CPU kernels always, CUDA kernels when the installed torch has CUDA.

FASTSAM_NO_EXT=1 skips the extension (the package then runs on the Triton and torch impls);
FASTSAM_FORCE_CUDA=1 builds the CUDA kernels even when no GPU is visible (e.g. in a container build).
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("FASTSAM_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # at::parallel_for only runs threads in code built with OpenMP; -fno-math-errno lets sqrt vectorize.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx = ["-O3", "-std=c++17", "-fno-math-errno"] + (openmp or ["-fopenmp-simd"])
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and (
        torch.cuda.is_available() or os.environ.get("FASTSAM_FORCE_CUDA") == "1"
    )
    if with_cuda:
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        ext = CUDAExtension(
            "fastsam._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("FASTSAM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension(
            "fastsam._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
