"""Seeded random tensor bytes.

Never zeros: a loader that returns a zero-filled buffer (a missed read, a view
into a recycled staging slot) is caught. A tensor's bytes depend only on the
seed and the tensor's name, not on the file it lands in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

CHUNK_BYTES = 16 << 20  # RNG chunk: large enough to be fast, small enough for any RAM


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=16).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def random_chunks(seed: int, name: str, nbytes: int) -> Iterator[memoryview]:
    """Seeded random bytes for one tensor, in chunks of at most 16 MiB.

    Never all zeros: the first 8 bytes are made non-zero if the RNG drew zeros.
    """
    rng = _rng(seed, name)
    first = True
    for pos in range(0, nbytes, CHUNK_BYTES):
        n = min(CHUNK_BYTES, nbytes - pos)
        # integers() fills ~5x faster than rng.bytes(); draw whole words, trim.
        words = rng.integers(0, 2**64, -(-n // 8), dtype=np.uint64)
        if first and not words[0]:
            words[0] = 1
        first = False
        yield memoryview(words).cast("B")[:n]


def random_bytes(seed: int, name: str, nbytes: int) -> bytes:
    """All of :func:`random_chunks` as one ``bytes`` (for small tensors and tests)."""
    return b"".join(random_chunks(seed, name, nbytes))
