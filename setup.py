"""Builds oes_fast._C: csrc/*.cpp and csrc/cpu/*.cpp always; csrc/cuda/*.cu when the
installed torch has CUDA and nvcc is found. Install without build isolation so the
extension compiles against the torch that is already installed:

    pip install --no-build-isolation -e .
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _build_cuda():
    if os.environ.get("OES_FAST_NO_CUDA") == "1":
        return False
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    return torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc)


# -march=native: the extension is built on the machine that runs it (vectorized for the host).
# -ffast-math at compile time only (never at link time, which would set FTZ/DAZ for the whole
# process): it lets gcc call glibc's vector logf/expf (libmvec) inside `omp simd` loops.
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-ffast-math"]
cxx_flags += os.environ.get("OES_FAST_ARCH_FLAGS", "-march=native").split()
sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
define_macros = []

if _build_cuda():
    sources += _sources("csrc/cuda/*.cu")
    define_macros.append(("OES_FAST_WITH_CUDA", "1"))
    arch = os.environ.get("OES_FAST_CUDA_ARCH", "-gencode=arch=compute_90,code=sm_90")
    extension = CUDAExtension(
        "oes_fast._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", *arch.split()]},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "oes_fast._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    name="oes_fast",
    version="0.1.0",
    description="Fast sparse deep image priors: Optimal Eye Surgeon and Lottery Image Prior in PyTorch",
    python_requires=">=3.10",
    packages=["oes_fast", "oes_fast.cli", "oes_fast.models", "oes_fast.kernels"],
    package_dir={"oes_fast": "oes_fast", "oes_fast.kernels": "kernels"},
    package_data={"oes_fast": ["data/*"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "pillow",
        "pypng",  # 16-bit color PNGs (Pillow reads and writes them at 8 bits)
        "scikit-image",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "pytest-benchmark", "triton>=3.6"]},
    entry_points={"console_scripts": ["oes-fast=oes_fast.cli:main"]},
)
