"""oes_fast.allocator.keep_freed_memory: freed tensors' memory is reused without page faults."""
import subprocess
import sys
import textwrap

import pytest

from oes_fast.allocator import keep_freed_memory

# Allocates, touches and frees a 48 MiB tensor 8 times; prints the minor page faults of each time.
FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from oes_fast.allocator import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    counts = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(12 << 20)  # 48 MiB of float32, freed at once
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(*counts)
""")


def faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.strip().splitlines()[-1].split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    pages = (48 << 20) // 4096
    # glibc's default maps a block this large afresh each time: all its pages fault in again
    assert all(n >= pages // 2 for n in faults("default"))
    # kept: the heap grows to hold it in the first times, then reuses it; not every time on every
    # machine (a fresh-clone run once saw one more allocation fault in again, cause unknown)
    kept = faults("keep")
    assert sum(n < pages // 10 for n in kept) >= len(kept) // 2, kept


@pytest.mark.parametrize("limit", [0, -1, 2**31])
def test_limit_checked(limit):
    with pytest.raises(ValueError, match="limit"):
        keep_freed_memory(limit)
