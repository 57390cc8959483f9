"""The host pipeline: execute a read plan into owned numpy buffers.

Reader threads take read ops in file order. A direct op scatters its file
range straight into the destination buffers with one ``preadv`` (gaps land
in a discard buffer). A staged (covering) op whose pages are all in the page
cache is not read at all with ``mapped`` on (``GPULOAD_MAPPED_GATHER``, the
default): its owned rows are copied out of the cached pages into their
results (:meth:`gpuload.read.posix.PosixReader.copy_mapped`) when it skips
at least ``MAPPED_MIN_GAP`` bytes a row, so such a column shard at world 8
copies an eighth of the bytes it covers. Otherwise, with ``scatter`` on (the
default, ``GPULOAD_SCATTER``), a staged op is read like a direct one: one
``preadv`` per 1024 rows puts every owned row straight into its result and
every gap into a small reused discard buffer (``scatter_iov``), so the
owned bytes are copied once and no gather pass follows. With it off (or a
reader without ``readinto_iov``) a staged op reads into one of a bounded
set of staging slots and is gathered from there by ``gather_host`` (the
numpy twin of the CUDA kernel), then the slot is returned. Staging never
escapes: results are the caller's own buffers, allocated once per tensor.

On the first error every queued op is cancelled, running ones finish, and
the error is raised: a failed load returns nothing.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable

import numpy as np

from gpuload.errors import PlanError
from gpuload.host.cold import ResultPrefaulter, mostly_cold, usable_cpus
from gpuload.kernels.host import NCOLS, gather_host
from gpuload.memory.mapping import PAGE, HostBuffer, page_place, placed_empty
from gpuload.plan.ops import Plan, ReadOp
from gpuload.plan.split import split_op
from gpuload.read.workers import Busy, run_jobs
from gpuload.report import LoadReport

_ZERO = np.zeros(0, np.uint8)
DISCARD = 256 << 10  # scatter's gap buffer: gaps longer than this reuse it in parts
# A cached covering op is copied row by row out of the page cache only when
# it skips at least this many bytes a row on average (the op's bytes less its
# owned ones, over its row count): process_vm_readv costs about a microsecond
# per row on top of the copy, and a covering read copies the skipped bytes
# instead. What decides is the bytes skipped, not the row length. On the
# 2-core VM (bench/mapped_gather.py --min-gap 0, two alternated runs:
# bench/results/2026-12-06-cpu-mapped/) the mapped copy ran 0.96-1.56x the
# covering read's speed where rows skip 6-25 KiB (12 of 14 above 1; 11 KiB
# rows at world 8: 1.33 and 1.40) and tied where they skip 2-5.5 KiB
# (0.94-1.05).
MAPPED_MIN_GAP = 6 << 10


def skipped_per_row(op: ReadOp) -> float:
    """The bytes a covering op reads past its owned rows, per row."""
    rows = sum(p.rows for p in op.pieces)
    return (op.length - sum(p.rows * p.row_bytes for p in op.pieces)) / max(1, rows)


def piece_tables(op: ReadOp) -> dict[str, np.ndarray]:
    """The op's pieces as per-destination piece tables, offsets relative to the op."""
    by_tensor: dict[str, list[list[int]]] = {}
    for p in op.pieces:
        by_tensor.setdefault(p.tensor, []).append(
            [p.src - op.offset, p.dst, p.rows, p.row_bytes, p.src_stride, p.dst_stride]
        )
    return {t: np.array(rows, np.int64).reshape(-1, NCOLS) for t, rows in by_tensor.items()}


def _check_fits(p, out: np.ndarray) -> None:
    """Refuse a piece whose rows would land outside its result: raw addresses
    are written from here on, never out of bounds."""
    if p.dst_end > out.nbytes or not out.flags.c_contiguous or out.dtype != np.uint8:
        raise PlanError(f"piece of {p.tensor!r} does not fit its {out.nbytes}-byte result")


def row_segments(
    op: ReadOp, outputs: dict[str, np.ndarray], *, merge: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The op's owned rows as ``(file offset, destination address, length)``
    int64 arrays in file order. Every destination is checked against its
    buffer first: a raw address is never written out of bounds. ``merge``
    joins rows that are contiguous in the file and in memory both."""
    srcs, dsts, lens = [], [], []
    for p in op.pieces:
        out = outputs[p.tensor]
        _check_fits(p, out)
        r = np.arange(p.rows, dtype=np.int64)
        srcs.append(p.src + r * p.src_stride)
        dsts.append(out.ctypes.data + p.dst + r * p.dst_stride)
        lens.append(np.full(p.rows, p.row_bytes, np.int64))
    order = np.argsort(np.concatenate(srcs), kind="stable")
    src, dst, n = (np.concatenate(a)[order] for a in (srcs, dsts, lens))
    if merge and len(src) > 1:
        starts = np.ones(len(src), bool)
        starts[1:] = (src[1:] != src[:-1] + n[:-1]) | (dst[1:] != dst[:-1] + n[:-1])
        at = np.flatnonzero(starts)
        src, dst, n = src[at], dst[at], np.add.reduceat(n, at)
    return src, dst, n


def scatter_iov(op: ReadOp, outputs: dict[str, np.ndarray], discard: np.ndarray) -> np.ndarray:
    """The op's file range as ``struct iovec`` entries, in file order: each row
    of each piece at its destination address, each gap in ``discard``.

    Returns an ``(n, 2)`` uint64 array of (address, length) for
    :meth:`gpuload.read.posix.PosixReader.readinto_iov`. Every destination is checked
    against its buffer first: a raw address is never written out of bounds.
    """
    if SCATTER_ONE_PIECE and len(op.pieces) == 1:
        iov = _one_piece_iov(op, op.pieces[0], outputs[op.pieces[0].tensor], discard)
        if iov is not None:
            return iov
    src, dst, n = row_segments(op, outputs)
    gaps = np.empty(len(src) + 1, np.int64)
    gaps[0] = src[0] - op.offset
    gaps[1:-1] = src[1:] - (src[:-1] + n[:-1])
    gaps[-1] = op.offset + op.length - (src[-1] + n[-1])
    if (gaps < 0).any():
        raise PlanError(f"pieces of a read of {op.file} overlap")
    # A gap longer than the discard buffer is written into it in parts.
    parts = np.maximum(1, -(-gaps // discard.size))
    upto = np.cumsum(parts)
    gap_of = np.repeat(np.arange(len(gaps)), parts)
    nth = np.arange(len(gap_of)) - np.repeat(upto - parts, parts)
    iov = np.empty((int(upto[-1]) + len(src), 2), np.uint64)
    at_gap = np.arange(len(gap_of)) + gap_of  # chunks before, plus the rows before the gap
    iov[at_gap, 0] = discard.ctypes.data
    iov[at_gap, 1] = np.minimum(discard.size, gaps[gap_of] - nth * discard.size)
    at_row = upto[:-1] + np.arange(len(src))
    iov[at_row, 0] = dst
    iov[at_row, 1] = n
    return iov[iov[:, 1] > 0]


# A covering op is nearly always one piece (one tensor's rows at a fixed
# stride): its iovec table is built in a few array operations, without the
# sort and the per-gap chunking the general case needs. The general build
# took 2 ms of a 27 ms warm world-8 load (18 ops; numpy, holding the GIL).
SCATTER_ONE_PIECE = True


def _one_piece_iov(op: ReadOp, p, out: np.ndarray, discard: np.ndarray) -> np.ndarray | None:
    """``scatter_iov`` for an op of one piece whose gaps each fit ``discard``;
    None where they do not (the general build then runs)."""
    _check_fits(p, out)
    lead = p.src - op.offset
    mid = p.src_stride - p.row_bytes if p.rows > 1 else 0
    trail = op.offset + op.length - p.src_end
    if min(lead, mid, trail) < 0:
        raise PlanError(f"pieces of a read of {op.file} overlap")
    if max(lead, mid, trail) > discard.size:
        return None
    r = np.arange(p.rows, dtype=np.uint64)
    iov = np.empty((2 * p.rows + 1, 2), np.uint64)
    iov[0] = (discard.ctypes.data, lead)
    iov[1::2, 0] = out.ctypes.data + p.dst + r * p.dst_stride
    iov[1::2, 1] = p.row_bytes
    iov[2::2, 0] = discard.ctypes.data
    iov[2::2, 1] = mid
    iov[-1, 1] = trail
    return iov[iov[:, 1] > 0]


def _mirrors(op: ReadOp, mirrored: set[str]) -> bool:
    """Whether a direct op's every piece is a run of a tensor whose result mirrors the file."""
    return not op.staged and all(p.tensor in mirrored for p in op.pieces)


def _direct_target(p, out: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(length, address, room before, room after)`` for an O_DIRECT read of
    piece ``p`` (one contiguous run) into ``out``, or None when ``out`` is not
    one of gpuload's own result mappings (``HostBuffer``).

    The read is widened to whole blocks: the bytes it adds before and after
    land in the same mapping, where the result mirrors the file (a whole
    tensor or one contiguous run of it: the caller checks) or in the
    mapping's slack, so they are the file's own bytes or nobody's."""
    hb = out.base
    if not isinstance(hb, HostBuffer) or out.ctypes.data != hb.data:
        return None
    dst = hb.data + p.dst
    return p.row_bytes, dst, dst - hb.addr, hb.addr + hb.size - (dst + p.row_bytes)


class HostPipeline:
    """Runs plans on the CPU; staging slots are created once and reused."""

    def __init__(
        self,
        threads: int,
        staging_bytes: int,
        *,
        scatter: bool = False,
        mapped: bool = False,
        cold: tuple[int, int] | None = None,
        direct: bool = False,
        threads_set: bool = True,
    ) -> None:
        self.threads = threads
        # False: ``threads`` is the default, and a warm load uses at most
        # one reader per usable core (see _run).
        self.threads_set = threads_set
        # (threads, largest direct read) for a load whose reads mostly miss
        # the page cache; None: the same as warm.
        self.cold = cold
        # Cold loads read whole-tensor runs into gpuload's own result
        # mappings with O_DIRECT (no page-cache copy); see _direct_target.
        self.direct = direct
        self.staging_bytes = staging_bytes
        self.scatter = scatter
        self.mapped = mapped
        self._slots: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._slot_size = 0
        self._slot_count = 0
        self._discard = _ZERO
        self._gaps = np.empty(DISCARD, np.uint8) if scatter else _ZERO
        self._busy = Busy()

    def _ensure_staging(self, plan: Plan, scatter: bool) -> None:
        need = 0 if scatter else plan.max_staged_bytes  # scattered reads need no staging
        if need > self._slot_size:  # grow, never shrink (staging is reused)
            count = max(1, min(self.threads, self.staging_bytes // need))
            self._slots = queue.SimpleQueue()
            for _ in range(count):
                self._slots.put(placed_empty(need + PAGE))  # + the in-slot offset
            self._slot_size, self._slot_count = need, count
        if plan.max_gap_bytes > self._discard.size:
            self._discard = np.empty(plan.max_gap_bytes, np.uint8)

    def run(
        self,
        plan: Plan,
        outputs: dict[str, np.ndarray],
        reader,
        report: LoadReport,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Fill ``outputs`` (name -> uint8 buffer) by executing ``plan``."""
        with self._busy():
            # A reader without raw scatter (a test's wrapper) stages and gathers.
            scatter = self.scatter and hasattr(reader, "readinto_iov")
            self._ensure_staging(plan, scatter)
            self._run(plan, outputs, reader, report, on_bytes, scatter)

    def _run(self, plan, outputs, reader, report, on_bytes, scatter: bool) -> None:
        ops = plan.ops
        discard = memoryview(self._discard)
        # A cold load (mincore says most reads miss the cache): a deeper
        # queue, more and smaller direct reads in flight at once.
        missing = mostly_cold(plan, reader)
        cold = self.cold is not None and missing
        # A warm load's reads are copies out of the page cache: each keeps a
        # core busy, so readers past the cores only take turns on them (a
        # warm world-8 load on the 2-core VM: 8 threads 3.5 GiB/s, 2 threads
        # 4.4, bench/warm_interleaved.py). A cold load's readers wait on the
        # disk and want a deep queue. ``threads`` chosen by the caller stands.
        if cold:
            threads = self.cold[0]
        elif self.threads_set:
            threads = self.threads
        else:
            threads = min(self.threads, usable_cpus())
        if cold:
            limit = self.cold[1]
            ops = tuple(
                part for op in ops for part in (split_op(op, limit) if not op.staged else (op,))
            )
        report.cold_reads = cold
        report.threads = threads
        direct = cold and self.direct and hasattr(reader, "read_direct")
        mirrored = {t.name for t in plan.tensors if t.strategy in ("whole", "contiguous")}

        mapped = self.mapped and hasattr(reader, "copy_mapped")
        # A reader may fill a staged op's block only where its pieces lie
        # (remote multi-range GETs): the gather reads nothing else.
        read_staged = getattr(reader, "read_staged", None)
        advise_op = getattr(reader, "advise_op", None)

        # Read-ahead hints only where a read may miss the page cache. On
        # cached pages a WILLNEED hint walks the page cache for nothing: a
        # warm 1 GiB world-1 load ran 63 ms without them against 67 with
        # them (2-core VM, alternated). A reader that cannot tell what is
        # cached (remote: its hint sends the next GET) always gets them.
        hints = missing or not hasattr(reader, "cached")

        def work(i: int) -> tuple[int, float, float, float, int]:
            op = ops[i]
            ahead = i + threads  # hint the range a thread will take next
            # ... unless it goes O_DIRECT: a WILLNEED hint would read it
            # into the page cache too, and the disk would serve it twice.
            if hints and ahead < len(ops) and not (direct and _mirrors(ops[ahead], mirrored)):
                if advise_op is not None:  # a reader that reads staged ops its own way
                    advise_op(ops[ahead])
                else:
                    reader.advise(ops[ahead].file, ops[ahead].offset, ops[ahead].length)
            if direct and _mirrors(op, mirrored):
                targets = [_direct_target(p, outputs[p.tensor]) for p in op.pieces]
                t0 = time.perf_counter()
                # Piece by piece (each is one tensor's run); where one cannot,
                # the whole op is read buffered below (the same bytes again).
                if None not in targets and all(
                    reader.read_direct(op.file, p.src, *tg)
                    for p, tg in zip(op.pieces, targets, strict=True)
                ):
                    return op.length, time.perf_counter() - t0, 0.0, 0.0, -1  # -1: O_DIRECT
            if not op.staged:
                bufs, pos = [], op.offset
                for p in op.pieces:
                    if p.src > pos:
                        bufs.append(discard[: p.src - pos])
                    bufs.append(memoryview(outputs[p.tensor])[p.dst : p.dst + p.row_bytes])
                    pos = p.src_end
                t0 = time.perf_counter()
                reader.readinto(op.file, op.offset, bufs)
                return op.length, time.perf_counter() - t0, 0.0, 0.0, 0
            if (
                mapped
                and reader.vm_ok  # process_vm_readv not refused so far
                and skipped_per_row(op) >= MAPPED_MIN_GAP
                and reader.cached(op.file, op.offset, op.length)
            ):
                # Cached pages: copy the owned rows out of them, nothing else.
                src, dst, n = row_segments(op, outputs, merge=True)
                t0 = time.perf_counter()
                if reader.copy_mapped(op.file, src, dst, n):
                    return op.length, time.perf_counter() - t0, 0.0, 0.0, int(n.sum())
            if scatter:  # the gather is the read: rows land in their results
                iov = scatter_iov(op, outputs, self._gaps)
                t0 = time.perf_counter()
                reader.readinto_iov(op.file, op.offset, iov)
                return op.length, time.perf_counter() - t0, 0.0, 0.0, 0
            t0 = time.perf_counter()
            slot = self._slots.get()
            t1 = time.perf_counter()
            try:
                # Read to the op's page offset (64-byte aligned), not to the
                # slot's start: see page_place.
                at = page_place(op.offset)
                block = slot[at : at + op.length]
                if read_staged is not None:  # remote: maybe only the pieces' rows
                    read_staged(op, memoryview(block))
                else:
                    reader.readinto(op.file, op.offset, [memoryview(block)])
                t2 = time.perf_counter()
                for tensor, table in piece_tables(op).items():
                    gather_host(block, outputs[tensor], table)
                t3 = time.perf_counter()
            finally:
                self._slots.put(slot)
            return op.length, t2 - t1, t3 - t2, t1 - t0, 0

        unread = 0  # bytes of mapped ops' ranges that were not read

        def add(result: tuple[int, float, float, float, int]) -> None:
            nonlocal unread
            nbytes, read_s, gather_s, wait_s, copied = result
            if copied < 0:
                report.direct_ops += 1
            elif copied:
                report.mapped_ops += 1
                unread += nbytes - copied
            report.read_s += read_s
            report.gather_s += gather_s
            report.wait_s += wait_s
            if on_bytes is not None:
                on_bytes(nbytes)

        # Cold (and prefetch on): fault the results in ahead of the reads.
        ahead = getattr(reader, "prefetch", False) and missing
        report.results_prefaulted = bool(ahead)
        # On the first error (or Ctrl-C) no op starts after it and the running
        # ones finish: no thread writes into a buffer after we return.
        with ResultPrefaulter(plan, outputs) if ahead else contextlib.nullcontext():
            run_jobs(len(ops), threads, work, add, name="gpuload-read")
        report.ops += len(ops)
        report.staged_ops += sum(op.staged for op in ops)
        report.bytes_read += plan.bytes_read - unread
        report.bytes_useful += plan.bytes_useful
