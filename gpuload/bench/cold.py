"""Cold runs: drop the files' pages from the page cache, and prove it.

``fsync`` then ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file; then
``mincore`` (:func:`gpuload.residency`) counts the pages still resident. On
tmpfs or ramfs the pages *are* the file and cannot leave: the bench then says
"cold not possible here" rather than report warm figures as cold ones. Pages
that something still maps or pins (a live CPU-resident result) stay too, so
the bench drops every result before it evicts.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpuload.memory.mapping import evict

# Evicted means at most this fraction of a file's pages stayed resident (the
# header page, re-read by whoever opened the file last, and a few stragglers).
MAX_RESIDENT = 0.02


def cold_possible(files: Sequence[str]) -> str | None:
    """None when eviction works on these files, else why not (said once, up front)."""
    left = evict(files)
    if left <= MAX_RESIDENT:
        return None
    return (
        f"cold not possible here: {left:.0%} of a file's pages stay resident after "
        "POSIX_FADV_DONTNEED (tmpfs/ramfs, or pages locked by another process)"
    )
