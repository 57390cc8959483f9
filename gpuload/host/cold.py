"""Cold or warm: what a CPU load samples of the page cache before it reads,
and what it does ahead of the reads of a load that is mostly cold.

:func:`mostly_cold` decides which settings a load runs (the cold queue depth
and O_DIRECT, or one reader per core and no hints); :class:`ResultPrefaulter`
faults a cold load's results in on a thread of its own while its reads wait
on storage.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from gpuload.memory.libc import libc
from gpuload.memory.mapping import PAGE
from gpuload.plan.ops import Plan

MADV_POPULATE_WRITE = 23  # Linux 5.14: fault pages in writable, errors returned, content kept
POPULATE_STEP = 8 << 20  # one madvise call; the stop flag is checked between them
POPULATE_MIN = 64 << 10  # smaller results are not worth a call

# How much of a sampled read mostly_cold asks mincore about: its first MiB
# (256 pages), not all of it. A warm load of 1 GiB at world 8 spent 2.8 ms of
# its 25 in mincore over whole 16 MiB reads (cProfile, 2-core VM); the
# sample of reads spread over the plan, not the pages within one read, is
# what tells a cold file from a cached one.
PROBE_BYTES = 1 << 20


def mostly_cold(plan: Plan, reader, samples: int = 16) -> bool:
    """Whether most of a sample of the plan's reads miss the page cache
    (each read judged by its first ``PROBE_BYTES``)."""
    cached = getattr(reader, "cached", None)
    if cached is None or not plan.ops:
        return False
    picked = plan.ops[:: max(1, len(plan.ops) // samples)][:samples]
    return 2 * sum(
        not cached(op.file, op.offset, min(op.length, PROBE_BYTES)) for op in picked
    ) > len(picked)


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ResultPrefaulter:
    """Faults the results' pages in, in the order the reads fill them, on a
    thread of its own while a cold load's reads wait on storage.

    A fresh result costs a page fault and a zeroing per page when the read's
    copy first touches it; on a cold load that cost sits between the storage
    and the copy. ``MADV_POPULATE_WRITE`` takes it ahead of time and never
    changes a page's content, so it may run beside the reads that fill the
    same pages. Measured on the 2-core VM, 2 GiB cold (bench/cold_sweep.py):
    see docs/performance.md. Warm loads are CPU-bound and lose by it
    (about 8% there), so it runs only when :func:`mostly_cold` says so.
    """

    def __init__(self, plan: Plan, outputs: dict[str, np.ndarray]) -> None:
        self._stop = threading.Event()
        order = dict.fromkeys(p.tensor for op in plan.ops for p in op.pieces)
        self._bufs = [outputs[t] for t in order if outputs[t].nbytes >= POPULATE_MIN]
        self._thread = threading.Thread(target=self._run, name="gpuload-prefault", daemon=True)

    def _run(self) -> None:
        for b in self._bufs:
            start, end = b.ctypes.data, b.ctypes.data + b.nbytes
            for at in range(start - start % PAGE, end, POPULATE_STEP):
                if self._stop.is_set():
                    return
                if libc().madvise(at, min(POPULATE_STEP, end - at), MADV_POPULATE_WRITE):
                    return  # an older kernel (EINVAL) or no memory: the reads fault as usual

    def __enter__(self) -> ResultPrefaulter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Stopped and joined before the load returns: no madvise on a result
        # after its buffers are the caller's (or freed, when the load failed).
        self._stop.set()
        self._thread.join()
