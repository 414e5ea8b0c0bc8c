"""Shared test setup.

Triton reads TRITON_INTERPRET when it is first imported, and pytest imports this file before
any test module, so it is set here: without a GPU, Triton kernels run in the interpreter.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason=f"needs the shared data folder {SHARED_DATA} (present on developer machines and in CI only)",
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; skips the test when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data folder {SHARED_DATA} (present on developer machines and in CI only)")
    return SHARED_DATA
