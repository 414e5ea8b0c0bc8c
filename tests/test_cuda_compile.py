"""Compile-checks every csrc/cuda/*.cu with nvcc, as the extension build would, so the CUDA
kernels are at least known to compile on machines without a GPU (or without a CUDA torch).
Skipped when nvcc is not on PATH. About 30 s per file on a 2-core CPU.
"""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


def _nvcc_command(source: Path, obj: Path) -> list[str]:
    includes = include_paths()
    cmd = [
        NVCC, "-c", "-std=c++17", "-O3", "--use_fast_math",
        "-gencode=arch=compute_90,code=sm_90",  # H100 (sm_90), as setup.py builds by default
        "-DOES_FAST_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{ROOT / 'csrc'}", *(f"-I{p}" for p in includes),
    ]
    # A CPU-only torch ships the c10/cuda headers but not the header CMake generates for them
    # (it only holds C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows alone); tell
    # c10/cuda/CUDAMacros.h to skip it. A CUDA torch has the file and needs no flag.
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return cmd + [str(source), "-o", str(obj)]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source, tmp_path):
    obj = tmp_path / (source.stem + ".o")
    result = subprocess.run(_nvcc_command(source, obj), cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"nvcc failed on {source.relative_to(ROOT)} (exit {result.returncode}):\n{result.stderr}"
    )
    assert obj.exists() and obj.stat().st_size > 0
