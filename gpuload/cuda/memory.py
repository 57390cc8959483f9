"""What a GPU load's results really take from the device, by allocator.

The pre-load fit check compares the device's free bytes with what the
results will *take*, not their sizes: every allocator rounds. On a nearly
full 12 GB GPU, the sum of the sizes can fit while the allocations do not.

``raw``: one ``cudaMalloc`` per result (cupy/numpy users). The driver hands
out 512-byte aligned blocks and maps large ones in 2 MiB pages.

``torch``: ``torch.empty`` through PyTorch's CUDA caching allocator
(``framework="torch"``), so that ``torch.cuda.memory_allocated`` sees the
results (vLLM sizes its KV cache from it) and freeing one returns it to
torch's cache instead of a device-synchronising ``cudaFree``. Its rounding
(c10/cuda/CUDACachingAllocator.cpp): sizes round up to 512 bytes; requests
up to 1 MiB share 2 MiB segments, up to 10 MiB share 20 MiB segments, and
larger ones take their own segment rounded up to 2 MiB.
"""

from __future__ import annotations

from collections.abc import Iterable

KiB, MiB = 1 << 10, 1 << 20
MIN_BLOCK = 512
SMALL_SIZE, SMALL_BUFFER = 1 * MiB, 2 * MiB
LARGE_BUFFER, MIN_LARGE_ALLOC, ROUND_LARGE = 20 * MiB, 10 * MiB, 2 * MiB


def _up(n: int, step: int) -> int:
    return -(-n // step) * step


def raw_bytes(n: int) -> int:
    """Device bytes one ``cudaMalloc(n)`` takes."""
    if n <= 0:
        return 0
    return _up(n, ROUND_LARGE) if n >= SMALL_BUFFER else _up(n, MIN_BLOCK)


def torch_bytes(sizes: Iterable[int]) -> int:
    """Device bytes torch's caching allocator reserves for fresh blocks of ``sizes``
    (segments shared by the small and middle sizes, as the allocator packs them)."""
    small = middle = large = 0
    for n in sizes:
        if n <= 0:
            continue
        n = _up(n, MIN_BLOCK)
        if n <= SMALL_SIZE:
            small += n
        elif n < MIN_LARGE_ALLOC:
            middle += n
        else:
            large += _up(n, ROUND_LARGE)
    return _up(small, SMALL_BUFFER) + _up(middle, LARGE_BUFFER) + large


def footprint(sizes: Iterable[int], allocator: str) -> int:
    """Device bytes that results of ``sizes`` take with ``allocator`` ("raw" or "torch")."""
    if allocator == "torch":
        return torch_bytes(sizes)
    if allocator == "raw":
        return sum(raw_bytes(n) for n in sizes)
    raise ValueError(f"allocator={allocator!r} is 'raw' or 'torch'")


__all__ = ["footprint", "raw_bytes", "torch_bytes"]
