"""Builds oes_fast._C: csrc/*.cpp and csrc/cpu/*.cpp always; csrc/cuda/*.cu when the
installed torch has CUDA and nvcc is found. Install without build isolation so the
extension compiles against the torch that is already installed:

    pip install --no-build-isolation -e .
"""
import glob
import os
import platform
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


# Portable flags: a wheel built here must run on any x86-64 CPU (or any CPU of the build's
# architecture). The hot CPU kernels are compiled again for AVX2+FMA and AVX-512 inside
# target regions and chosen at run time (csrc/cpu/cpu_isa.h; OES_FAST_CPU_ISA forces one).
# OES_FAST_ARCH_FLAGS replaces the baseline flags, e.g. "-march=native" for a build that only
# ever runs on the machine that built it.
# -ffast-math at compile time only (never at link time, which would set FTZ/DAZ for the whole
# process): it lets gcc call glibc's vector logf/expf (libmvec) inside `omp simd` loops.
# -Wno-psabi: the 64-byte vector types of the baseline copy warn about an ABI they never cross.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
_BASELINE_ARCH = "-march=x86-64 -mtune=generic" if _X86 else ""
cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-ffast-math", "-Wno-psabi"]
cxx_flags += os.environ.get("OES_FAST_ARCH_FLAGS", _BASELINE_ARCH).split()
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
        "PyWavelets",  # skimage.restoration.estimate_sigma (metrics.noise_sigma)
        "tqdm",
        "matplotlib",
    ],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "pytest-benchmark", "triton>=3.6"]},
    entry_points={"console_scripts": ["oes-fast=oes_fast.cli:main"]},
)
