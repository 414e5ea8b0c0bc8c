"""oes_fast.allocator.keep_freed_memory: freed tensors' memory is reused without page faults."""
import subprocess
import sys
import textwrap

import pytest

from oes_fast.allocator import keep_freed_memory

# Allocates, touches and frees a 48 MiB tensor 6 times; prints the minor page faults of the last 4
# (the heap grows to hold it in the first two).
FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from oes_fast.allocator import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def once():
        torch.ones(12 << 20)  # 48 MiB of float32, freed at once
    once()
    once()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        once()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    pages = (48 << 20) // 4096
    # glibc's default maps a block this large afresh each time: its pages fault in again
    assert faults("default") >= 4 * pages // 2
    assert faults("keep") < pages // 10


@pytest.mark.parametrize("limit", [0, -1, 2**31])
def test_limit_checked(limit):
    with pytest.raises(ValueError, match="limit"):
        keep_freed_memory(limit)
