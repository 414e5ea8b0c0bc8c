"""Seeds and uniforms of the package's counter-based random stream (Philox4x32-10).

Everything random in oes_fast (initial weights, DIP inputs, Gumbel noise, tie-breaking) is
drawn from `philox_uniform(seed, offset)`, so a seed reproduces bit-identical numbers on any
machine, backend and torch version.
"""
from __future__ import annotations

import hashlib

import torch

from .ops import philox_uniform as _philox_uniform_like


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for one named use of a user seed (e.g. "init", "input", "search").

    Separate streams keep, say, the initial weights and the Gumbel noise of the same user seed
    independent. Derived by hashing, so it is the same everywhere. `seed`: int >= 0; `stream`:
    any string. Returns an int in [0, 2**63).
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    digest = hashlib.blake2b(f"oes_fast:{stream}:{int(seed)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def uniform(shape, seed: int, offset: int = 0, device="cpu") -> torch.Tensor:
    """float32 uniforms in [0, 1] of the given shape (a tuple of ints or torch.Size) on `device`:
    element j (row-major) is u(seed, offset + j), for `seed` and `offset` ints in [0, 2**63)
    (a `stream_seed` as seed). The same bits on every device."""
    like = torch.empty(shape, device=device, dtype=torch.float32)
    return _philox_uniform_like(like, seed, offset)
