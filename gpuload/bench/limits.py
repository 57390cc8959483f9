"""The hardware limits a loader is measured against, in the same run:

* ``pread``: every byte of every file, read by a thread pool in 64 MiB
  chunks into one reused buffer (pinned when a GPU is there): the read limit;
* ``H2D``: a pinned host buffer copied to the device, the PCIe limit;
* ``D2D``: a device buffer copied to another, the device-memory limit;
* ``fio``: sequential buffered reads of the same files, when fio is installed
  (the storage limit that a cold load is held to).
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import functools
import gc
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gpuload.bench.residency import ensure_warm
from gpuload.bench.timing import Timing, measure
from gpuload.host.backend import host_result
from gpuload.memory.mapping import evict

CHUNK = 64 << 20
PROBE_BYTES = 1 << 30  # H2D / D2D buffer: large enough to amortise launch cost


def pread_all(files: Sequence[str], buf: np.ndarray, threads: int, chunk: int = CHUNK) -> int:
    """Read every byte of ``files`` into ``buf`` with ``threads`` threads.

    File bytes land at their offset in the concatenation of the files, modulo
    ``len(buf)``: a buffer the size of the files holds them all; a smaller one
    (at least ``threads * chunk`` bytes, so concurrent reads do not share
    bytes) is reused round robin, which measures the same bandwidth without
    the memory. Returns the bytes read.
    """
    jobs, pos = [], 0
    for f in files:
        size = os.path.getsize(f)
        jobs += [(f, off, pos + off, min(chunk, size - off)) for off in range(0, size, chunk)]
        pos += size
    cap = len(buf)
    if cap < pos and cap < min(chunk, pos):
        raise ValueError(f"buffer of {cap} bytes cannot take a {chunk}-byte read")
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    mv = memoryview(buf).cast("B")

    def one(job: tuple[str, int, int, int]) -> int:
        f, off, at, n = job
        at = at % cap if cap < pos else at
        if at + n > cap:  # wrap: start over at the beginning of the buffer
            at = 0
        got = 0
        while got < n:
            k = os.preadv(fds[f], [mv[at + got : at + n]], off + got)
            if k == 0:
                raise OSError(f"{f}: unexpected end of file at {off + got}")
            got += k
        return n

    try:
        with cf.ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(one, jobs))
    finally:
        for fd in fds.values():
            os.close(fd)


def fresh_buffer(nbytes: int) -> np.ndarray:
    """New memory as fast to fill as any: page-aligned, in huge pages where
    the kernel has them (what gpuload's large results get, see
    :func:`gpuload.host.backend.host_result`). A plain ``np.empty`` of this size
    starts 16 bytes into a page, which makes the kernel's copy from a
    page-aligned file offset about 2x slower (bench/fresh_memory.py): no
    floor at all."""
    return host_result(nbytes, "the fresh buffer", 0, pooled=False)  # fresh: never a kept one


def release_freed(*, pool: bool = True) -> None:
    """Hand freed memory back to the OS (collect garbage, then glibc's
    ``malloc_trim``, and with ``pool`` gpuload's kept result mappings,
    :mod:`gpuload.memory.pool`), so the next run writes fresh pages, as a
    process's first load does, instead of pages the last run freed."""
    gc.collect()
    _libc_trim().malloc_trim(0)
    if pool:
        from gpuload.memory import pool as hostpool

        hostpool.release()


@functools.cache
def _libc_trim() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def ring_bytes(total: int, threads: int, chunk: int = CHUNK) -> int:
    """A reused read buffer: two chunks per thread, no more than the files."""
    return max(1, min(total, 2 * threads * chunk))


def pread_timing(
    files: Sequence[str],
    threads: int,
    runs: int,
    warmup: int,
    *,
    before: Callable[[], object] | None = None,
    pinned: Any = None,
    fresh: bool = False,
) -> Timing:
    """The read limit: ``pread_all`` into a reused ring (pinned through
    ``pinned``, a :class:`~gpuload.bench.gpu.Gpu`, when given), or with
    ``fresh=True`` into a new buffer the size of the files per run (page
    zeroing included: the floor of any loader returning owned arrays)."""
    total = sum(os.path.getsize(f) for f in files)
    if fresh:
        t = measure(
            "pread → fresh buffer", total,
            lambda: pread_all(files, fresh_buffer(total), threads), runs, warmup,
            before=before,
        )  # fmt: skip
        t.note = "a new page-aligned huge-page buffer per run: the floor of owned results"
        return t
    nring = ring_bytes(total, threads)
    _, ring = pinned.pinned(nring) if pinned is not None else (None, fresh_buffer(nring))
    name = "pread → pinned" if pinned is not None else "pread → host"
    t = measure(name, total, lambda: pread_all(files, ring, threads), runs, warmup, before=before)
    t.note = f"{threads} threads, {CHUNK >> 20} MiB preads into a reused {nring >> 20} MiB buffer"
    return t


def device_timings(gpu: Any, runs: int, warmup: int, n: int = PROBE_BYTES) -> list[Timing]:
    """H2D from a pinned buffer and D2D, ``n`` bytes each, through ``gpu``."""
    owner, _ = gpu.pinned(n)
    dst, src = gpu.empty(n), gpu.empty(n)
    h2d = measure("H2D pinned", n, lambda: gpu.h2d(dst, owner), runs, warmup, sync=gpu.sync)
    h2d.note = f"{n >> 20} MiB pinned host buffer to the device"
    d2d = measure("D2D copy", n, lambda: gpu.d2d(dst, src), runs, warmup, sync=gpu.sync)
    d2d.note = f"{n >> 20} MiB device to device"
    return [h2d, d2d]


# --------------------------------------------------------------------------
# fio


def fio_available() -> str | None:
    """None when fio runs here, else why not."""
    return None if shutil.which("fio") else "fio not installed (apt-get install fio)"


def fio_timing(files: Sequence[str], threads: int, runs: int, warmup: int, *, cold: bool) -> Timing:
    """fio's own bytes and runtimes (not our wall clock, which would count
    its start-up); cold runs evict first and let fio invalidate too."""
    times, total, befores = [], 0, []
    for i in range(warmup + runs):
        # cold: evicted first; warm: residency checked (and restored) first
        befores.append(evict(files) if cold else ensure_warm(files))
        total, secs = fio_read(files, threads, invalidate=cold)
        if i >= warmup:
            times.append(secs)
    note = "4 MiB psync reads, fio's runtime (ms resolution)"
    return Timing("fio", total, times, note, {"before": befores})


def fio_read(
    files: Sequence[str],
    threads: int,
    *,
    invalidate: bool,
    iodepth: int = 1,
    bs: int = 4 << 20,
) -> tuple[int, float]:
    """One fio run: every file read sequentially, split over ``threads`` jobs
    running together, ``bs``-byte reads. ``iodepth=1``: buffered ``pread``s
    (psync); deeper: ``O_DIRECT`` reads through io_uring with ``iodepth`` in
    flight per job, the queue the Run:ai streamer keeps. ``invalidate=True``
    makes fio drop the files' cached pages first (a cold read). Returns
    ``(bytes, seconds)``: the bytes all jobs read and the longest job's runtime."""
    sizes = [(f, os.path.getsize(f)) for f in files]
    total = sum(s for _, s in sizes)
    per = max(bs, -(-total // max(1, threads)))
    per = -(-per // 4096) * 4096  # O_DIRECT offsets must be whole blocks
    deep = iodepth > 1
    lines = [
        "[global]",
        "rw=read",
        f"ioengine={'io_uring' if deep else 'psync'}",
        f"direct={int(deep)}",
        f"iodepth={iodepth}",
        f"invalidate={int(invalidate)}",
        "group_reporting=1",
    ]
    k = 0
    for f, size in sizes:
        for off in range(0, size, per):
            # fio's filename syntax treats ':' as a separator: escape it.
            lines += [f"[r{k}]", f"filename={f.replace(':', chr(92) + ':')}"]
            n = min(per, size - off)
            if deep:  # O_DIRECT: whole blocks (the tail of a file is read buffered by loaders)
                n = n // 4096 * 4096
                if not n:
                    continue
            lines += [f"offset={off}", f"size={n}", f"bs={min(bs, n)}"]  # fio: bs <= size
            k += 1
    with tempfile.NamedTemporaryFile("w", suffix=".fio", delete=False) as jf:
        jf.write("\n".join(lines) + "\n")
    try:
        res = subprocess.run(
            ["fio", "--output-format=json", jf.name], capture_output=True, text=True, timeout=3600
        )
        if res.returncode:
            raise OSError(f"fio failed ({res.returncode}): {res.stderr.strip()[-300:]}")
        out = res.stdout
    finally:
        os.unlink(jf.name)
    doc = json.loads(out[out.index("{") :])  # fio may print notes before the JSON
    read = doc["jobs"][0]["read"]
    seconds = read["runtime"] / 1000.0  # ms, longest job under group_reporting
    return int(read["io_bytes"]), seconds
