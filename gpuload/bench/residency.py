"""Is a "warm" run warm? Page-cache residency, checked right before each run.

Some machines page idle page-cache pages out on their own (the kernel's
DAMON ``pageout`` scheme runs on the development VMs), so a warm run can be
partly cold and single runs swing by 3x. :func:`ensure_warm` runs before
every warm timing, outside the timed window: it measures the files'
residency with ``mincore``, reads them back in when pages are missing, and
returns what it found and what the run started with, so every warm figure
carries its own evidence.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from gpuload.memory.mapping import residency

WARM = 0.999  # fraction of pages that counts as warm
_CHUNK = 16 << 20


def resident_fraction(files: Sequence[str]) -> float:
    """Resident pages over all pages of ``files`` (``mincore``); 1.0 for no pages."""
    resident = total = 0
    for f in files:
        r, t = residency(f)
        resident, total = resident + r, total + t
    return resident / total if total else 1.0


def _read_back(files: Sequence[str]) -> None:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            pos = 0
            while n := os.preadv(fd, [view], pos):
                pos += n
        finally:
            os.close(fd)


def ensure_warm(files: Sequence[str], threshold: float = WARM) -> dict[str, float | bool]:
    """Make ``files`` resident before a warm run; the evidence, for the record.

    Returns ``found`` (the resident fraction when called), ``rewarmed``
    (whether the files were read back in) and ``resident`` (the fraction the
    timed run starts with)."""
    found = resident_fraction(files)
    if found >= threshold:
        return {"found": found, "rewarmed": False, "resident": found}
    _read_back(files)
    return {"found": found, "rewarmed": True, "resident": resident_fraction(files)}


def summary(befores: Sequence[object]) -> str:
    """A cell for the table: the page cache before the runs of one row.

    Warm runs (``ensure_warm`` dicts): the lowest residency a run started
    with, and how many runs needed reading back in. Cold runs (``evict``
    fractions): the most that stayed resident."""
    warm = [b for b in befores if isinstance(b, dict)]
    cold = [b for b in befores if isinstance(b, float | int) and not isinstance(b, bool)]
    if warm:
        low = min(float(b["resident"]) for b in warm)
        again = sum(bool(b["rewarmed"]) for b in warm)
        return f"≥{100 * low:.1f}%" + (f" ({again} re-warmed)" if again else "")
    if cold:
        return f"≤{100 * max(cold):.1f}%"
    return "—"
