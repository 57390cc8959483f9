"""Huge-page result mappings a CPU process keeps for its next load.

A CPU load puts each result of 2 MiB or more in its own 2 MiB-aligned
mapping advised ``MADV_HUGEPAGE`` (``gpuload.host.backend.host_result``). The
first load of a process faults them in as huge pages: 2.2-2.7x faster than
4 KiB pages. But where THP's ``defrag`` is ``madvise`` (or ``always``), a
huge-page fault that finds no free 2 MiB block compacts memory
synchronously, and in a process that allocates other memory between loads
that made warm loads bimodal (3.1, 2.4, 6.3, 6.6, 2.4 GiB/s in issue 24).

So a result mapping is not unmapped when its last array dies: it comes
back here, already faulted in (whole huge pages where the kernel gave them),
and the next result of the same size class takes it. The next load then
writes memory with no page fault at all. Size classes are whole 2 MiB
pages, so a Llama-shaped checkpoint's few tensor sizes reuse each other's
mappings. Results from 64 KiB up to 2 MiB are mappings of 4 KiB pages kept
the same way, in 64 KiB size classes: fresh pages for them cost a fault and a
zeroing each on every load (a world-8 rank has many such shards).

Bounded: at most :func:`cap` bytes (a quarter of RAM) are kept; a mapping
returned past it is unmapped. :func:`release` (``gpuload.release_host_pool()``)
unmaps everything kept. ``hugepages=0`` (``GPULOAD_HUGEPAGES=0``) bypasses
the pool with the rest of the huge-page path.

Mappings come back from finalizers, which may run inside any allocation,
also one made while this module holds its lock: they are queued without the
lock (a deque append is atomic) and settled by the next taker.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_returned: collections.deque[tuple[int, int, bool]] = collections.deque()
_kept: dict[int, list[tuple[int, bool]]] = {}  # size -> [(addr, huge)], newest last
_bytes = 0
stats = {"reused": 0, "kept": 0, "unmapped": 0}


@functools.cache
def cap() -> int:
    """Bytes the pool may keep: a quarter of physical RAM."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (OSError, ValueError):
        return 1 << 30


def give(addr: int, size: int, huge: bool) -> None:
    """Return a mapping (called from a finalizer: no lock taken here)."""
    _returned.append((addr, size, huge))


def _settle(unmap) -> None:
    global _bytes
    while _returned:
        addr, size, huge = _returned.popleft()
        if _bytes + size > cap():
            unmap(addr, size)
            stats["unmapped"] += 1
            continue
        _kept.setdefault(size, []).append((addr, huge))
        _bytes += size
        stats["kept"] += 1


def take(size: int, unmap) -> tuple[int, bool] | None:
    """A kept mapping of exactly ``size`` bytes, ``(addr, huge)``, or None."""
    global _bytes
    with _lock:
        _settle(unmap)
        free = _kept.get(size)
        if not free:
            return None
        addr, huge = free.pop()
        _bytes -= size
        stats["reused"] += 1
        return addr, huge


def held() -> int:
    """Bytes kept now (returned mappings settled first)."""
    from gpuload.memory.libc import libc

    with _lock:
        _settle(libc().munmap)
        return _bytes


def release(unmap=None) -> int:
    """Unmap every kept mapping; returns the bytes given back to the OS."""
    global _bytes
    if unmap is None:
        from gpuload.memory.libc import libc

        def unmap(a: int, n: int) -> None:
            libc().munmap(a, n)

    with _lock:
        _settle(unmap)
        freed = _bytes
        for size, free in _kept.items():
            for addr, _ in free:
                unmap(addr, size)
        _kept.clear()
        _bytes = 0
    return freed


@contextlib.contextmanager
def set_aside() -> Iterator[None]:
    """Loads inside the block find the pool empty, as the first load of a
    process does; what the pool kept before comes back after it, and what
    the block's results gave back is unmapped. For benchmarks that time a
    first load in a process that holds a pool for other loads (its results
    must be dropped inside the block to be unmapped)."""
    global _bytes
    from gpuload.memory.libc import libc

    with _lock:
        _settle(libc().munmap)
        saved, saved_bytes = dict(_kept), _bytes  # the lists move over as they are
        _kept.clear()
        _bytes = 0
    try:
        yield
    finally:
        release()
        with _lock:
            for size, free in saved.items():
                _kept.setdefault(size, []).extend(free)
            _bytes += saved_bytes


__all__ = ["cap", "give", "held", "release", "set_aside", "stats", "take"]
