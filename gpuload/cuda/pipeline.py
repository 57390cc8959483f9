"""The device pipeline: execute a read plan into device buffers, overlapped.

Written against :class:`Runtime`, a small seam over CUDA (allocations,
streams, events, async copies, the gather launch), so the same code runs on
a GPU (``gpuload.cuda.backend.CupyRuntime``) and, in CPU tests, on a fake
asynchronous runtime whose streams are threads that run queued work late.

Slots and ordering
------------------
``K = clamp(threads + 1, 2, 16)`` slots, created once per pipeline (once
per ``Loader``). Each slot has a stream, a ``done`` event, three timing
events, a pinned host buffer (posix reads) and a device scratch buffer
(covering reads; every kvikio read). A reader thread takes a free slot and:

1. **waits on the slot's ``done`` event**: the copies and gathers that read
   the slot's buffers last time have finished on the GPU. Without this wait
   the read below overwrites pinned memory (or, for kvikio, device scratch)
   that a queued H2D or gather has not consumed yet: the "buffer and its
   stream out of step" corruption of other loaders;
2. reads the op's file range: posix ``preadv`` into the pinned buffer, or
   kvikio into device scratch (the reader blocks on kvikio's future: kvikio
   does not order itself on any stream);
3. enqueues on the slot's stream: a direct op's pieces go host -> their
   destination (or scratch -> destination for kvikio) with no gather; a
   staged op's pieces take the gather strategy the plan chose for their
   tensor (``gpuload.plan.transfer``): ``device``, the range goes host -> scratch
   and one gather launch per tensor packs it; ``zerocopy``, one gather
   launch reads the segments from the slot's pinned buffer through its
   device-mapped address; ``pack``, the reader thread packs the segments
   into the slot's second pinned buffer and H2D copies move them;
4. records ``done`` and hands the slot back without waiting, so it reads
   the next op while the GPU copies this one.

Before returning (also on failure) every ``done`` event is synchronized:
no stream touches a result or a staging buffer after ``run`` returns.

Budgets: pinned bytes <= ``staging_bytes`` and scratch bytes <=
``device_scratch_bytes``, whatever the plan says: an op longer than a slot
is split here (:func:`gpuload.plan.split.split_op`), down to single bytes if it must be.
A plan with packed tensors halves each slot's read buffer to make room for
its pack buffer; only ops with a ``device`` gather need scratch.

Report: ``read_s`` and ``wait_s`` (for a slot and its stream) are
reader-thread seconds; ``h2d_s`` and ``gather_s`` are GPU seconds between
timing events, summed over streams (kvikio reads have no H2D: their
device-to-device placement counts as gather).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from gpuload.errors import PlanError
from gpuload.host.pipeline import piece_tables
from gpuload.kernels.host import ROW_BYTES, ROWS, SRC_OFF, gather_host
from gpuload.plan.ops import PAGE, Plan, ReadOp, TensorPlan
from gpuload.plan.split import aligned_span, fit_ops
from gpuload.plan.transfer import copy_blocks, pack_layout
from gpuload.read.workers import Busy, run_jobs
from gpuload.report import LoadReport

MAX_SLOTS = 16
GROW = 64 << 10  # slot sizes grow in steps of this, so similar plans reuse them


class Runtime(Protocol):
    """What the pipeline needs from CUDA. Device buffers are opaque handles
    that the runtime allocates; offsets and sizes are bytes. Every ``h2d`` /
    ``d2d`` / ``gather`` is asynchronous on ``stream``; events order work."""

    def bind_thread(self) -> None: ...  # make the device current on this thread
    def device_alloc(self, nbytes: int) -> Any: ...  # owned; MemoryError when full
    # Pinned host memory is allocated device-mapped (cudaHostAllocMapped).
    def host_alloc(self, nbytes: int, *, pinned: bool) -> np.ndarray: ...
    # A device buffer aliasing pinned ``host`` (its mapped address); raises
    # ValueError for memory that is not mapped pinned memory.
    def device_view(self, host: np.ndarray) -> Any: ...
    def stream(self) -> Any: ...
    def destroy_stream(self, stream: Any) -> None: ...
    def event(self, *, timing: bool) -> Any: ...
    def record(self, event: Any, stream: Any) -> None: ...
    def wait(self, event: Any) -> None: ...  # host blocks until the event completes
    def query(self, event: Any) -> bool: ...
    def elapsed(self, start: Any, end: Any) -> float: ...  # seconds between events
    def h2d(self, dst: Any, dst_off: int, src: np.ndarray, src_off: int, n: int, s: Any): ...
    def d2d(self, dst: Any, dst_off: int, src: Any, src_off: int, n: int, s: Any): ...
    # ``height`` rows of ``width`` bytes, ``src_pitch`` apart in pinned host
    # memory, ``dst_pitch`` apart in device memory: one cudaMemcpy2DAsync.
    def h2d_2d(
        self, dst: Any, dst_off: int, dst_pitch: int, src: np.ndarray, src_off: int,
        src_pitch: int, width: int, height: int, s: Any,
    ): ...  # fmt: skip
    def gather(self, src: Any, dst: Any, table: np.ndarray, stream: Any) -> None: ...
    def mem_info(self) -> tuple[int, int]: ...  # (free, total) bytes
    def release_cached(self) -> None: ...  # return allocator caches to the driver
    def to_framework(self, buf: Any, tensor: TensorPlan, framework: str) -> Any: ...
    def kvikio(self) -> Any: ...  # the kvikio module; ImportError when unusable


@dataclasses.dataclass(eq=False)
class Slot:
    stream: Any
    done: Any  # recorded after the last work that reads this slot's buffers
    marks: tuple[Any, Any, Any]  # timing: before the copy, after it, after the gathers
    host: np.ndarray | None = None
    scratch: Any = None
    pack: np.ndarray | None = None  # pinned, for gather="pack"
    mapped: Any = None  # device view of ``host``, for gather="zerocopy"
    timed: bool = False  # marks hold an op not yet added to the report


class DevicePipeline:
    """Runs plans on a device through ``runtime``; slots are made once and reused."""

    def __init__(
        self, runtime: Runtime, *, threads: int, staging_bytes: int, scratch_bytes: int, pin: bool
    ) -> None:
        self.rt = runtime
        self.threads = threads
        self.pin = pin
        count = max(2, min(threads + 1, MAX_SLOTS))
        self.host_cap = staging_bytes // count  # per-slot budgets
        self.scratch_cap = scratch_bytes // count
        self.host_size = 0  # current per-slot sizes (grow; host shrinks to make room to pack)
        self.scratch_size = 0
        self.pack_size = 0
        self._busy = Busy()
        self.slots = [
            Slot(s, runtime.event(timing=False), tuple(runtime.event(timing=True) for _ in "abc"))
            for s in (runtime.stream() for _ in range(count))
        ]

    # -- sizing ------------------------------------------------------------

    def _wanted(self, plan: Plan, device_reads: bool) -> tuple[int, int, int]:
        """Per-slot (pinned, pack, scratch) bytes this plan wants, within the budgets."""
        if not plan.ops:
            return self.host_size, self.pack_size, self.scratch_size
        if device_reads:  # kvikio: every read lands in scratch, widened to pages
            if self.scratch_cap < 3 * PAGE:
                raise PlanError(
                    f"device scratch budget of {self.scratch_cap} bytes per slot "
                    f"({len(self.slots)} slots) is below the {3 * PAGE} a kvikio read "
                    "needs: raise device_scratch_bytes or use backend='posix'"
                )
            longest = max(aligned_span(op)[1] for op in plan.ops)
            scratch = max(self.scratch_size, _grow(longest, self.scratch_cap))
            return self.host_size, self.pack_size, scratch
        packs = "pack" in plan.gathers.values()
        cap = self.host_cap // 2 if packs else self.host_cap  # the pack buffer takes half
        if cap < 1:
            raise PlanError(f"staging budget leaves no bytes for {len(self.slots)} slots")
        host = _grow(max(op.length for op in plan.ops), cap)
        if self.host_size <= cap:
            host = max(host, self.host_size)
        # Without packing, an earlier load's pack buffers stay while both fit.
        keep = self.pack_size if self.pack_size + host <= self.host_cap else 0
        pack = host if packs else keep
        gathers = plan.gathers
        staged = [op.length for op in plan.ops if op.staged and _scratched(op, gathers)]
        scratch = self.scratch_size
        if staged:
            if self.scratch_cap < 1:
                raise PlanError(
                    f"device scratch budget leaves no bytes for {len(self.slots)} slots"
                )
            scratch = max(scratch, _grow(min(max(staged), host), self.scratch_cap))
        return host, pack, scratch

    def growth(self, plan: Plan, *, device_reads: bool) -> int:
        """Device bytes that :meth:`prepare` would add for ``plan`` (for the memory check)."""
        _, _, scratch = self._wanted(plan, device_reads)
        return (scratch - self.scratch_size) * len(self.slots)

    def prepare(self, plan: Plan, *, device_reads: bool) -> list[ReadOp]:
        """Grow the slots for ``plan`` (allocating before any I/O) and return its
        ops, each fitting a slot."""
        with self._busy():  # never free buffers a running load's streams use
            return self._prepare(plan, device_reads)

    def _prepare(self, plan: Plan, device_reads: bool) -> list[ReadOp]:
        host, pack, scratch = self._wanted(plan, device_reads)
        if pack != self.pack_size:
            self.pack_size = 0
            for s in self.slots:
                s.pack = None
        if host != self.host_size:
            self.host_size = 0  # a failed allocation leaves sizes that force a retry
            for s in self.slots:
                s.host = s.mapped = None  # drop the old buffers before taking the new ones
            for s in self.slots:
                s.host = self.rt.host_alloc(host, pinned=self.pin)
            self.host_size = host
        if pack != self.pack_size and pack:
            for s in self.slots:
                s.pack = self.rt.host_alloc(pack, pinned=self.pin)
            self.pack_size = pack
        gathers = {} if device_reads else plan.gathers
        if "zerocopy" in gathers.values():
            for s in self.slots:
                if s.mapped is None:
                    s.mapped = self.rt.device_view(s.host)
        if scratch > self.scratch_size:
            self.scratch_size = 0
            for s in self.slots:
                s.scratch = None
            for s in self.slots:
                s.scratch = self.rt.device_alloc(scratch)
            self.scratch_size = scratch
        return fit_ops(
            plan.ops,
            host_bytes=self.host_size,
            scratch_bytes=self.scratch_size,
            device_reads=device_reads,
            scratched=lambda op: _scratched(op, gathers),
        )

    # -- running -----------------------------------------------------------

    def run(
        self,
        plan: Plan,
        outputs: dict[str, Any],
        reader,
        report: LoadReport,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Fill ``outputs`` (name -> device buffer) by executing ``plan``."""
        with self._busy():
            device_reads = getattr(reader, "into", "host") == "device"
            ops = self._prepare(plan, device_reads)
            gathers = {} if device_reads else plan.gathers
            self._run(ops, outputs, reader, report, on_bytes, device_reads, gathers)
        report.ops += len(ops)
        report.staged_ops += sum(op.staged for op in ops)
        report.bytes_useful += plan.bytes_useful

    def _run(self, ops, outputs, reader, report, on_bytes, device_reads: bool, gathers) -> None:
        free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
        for s in self.slots:
            free.put(s)

        def work(i: int) -> tuple[int, float, float, float, float, int, float]:
            op = ops[i]
            ahead = i + self.threads  # hint the range a thread takes next
            if ahead < len(ops):
                reader.advise(ops[ahead].file, ops[ahead].offset, ops[ahead].length)
            t0 = time.perf_counter()
            slot = free.get()
            try:
                h2d_s, gather_s = self._reuse(slot)
                t1 = time.perf_counter()
                if device_reads:
                    pad, nread = reader.read_device(op.file, op.offset, op.length, slot.scratch)
                else:
                    pad, nread = 0, op.length
                    reader.readinto(op.file, op.offset, [memoryview(slot.host)[: op.length]])
                t2 = time.perf_counter()
                pcie, pack_s = self._enqueue(op, slot, outputs, pad, device_reads, gathers)
            finally:
                # Whatever was queued from this slot's buffers, the next user
                # of the slot waits for it.
                self.rt.record(slot.done, slot.stream)
                free.put(slot)
            return nread, t2 - t1, h2d_s, gather_s, t1 - t0, pcie, pack_s

        def add(result: tuple[int, float, float, float, float, int, float]) -> None:
            nbytes, read_s, h2d_s, gather_s, wait_s, pcie, pack_s = result
            report.bytes_pcie += pcie
            report.pack_s += pack_s
            report.bytes_read += nbytes
            report.read_s += read_s
            report.h2d_s += h2d_s
            report.gather_s += gather_s
            report.wait_s += wait_s
            if on_bytes is not None:
                on_bytes(nbytes)

        try:
            run_jobs(
                len(ops), self.threads, work, add, name="gpuload-dev", setup=self.rt.bind_thread
            )
        except BaseException:
            # The threads are joined; drain the streams too, so nothing writes
            # into the results or staging after we return.
            with contextlib.suppress(Exception):  # the first error is the one raised
                self._drain()
            raise
        h2d_s, gather_s = self._drain()
        report.h2d_s += h2d_s
        report.gather_s += gather_s

    def _reuse(self, slot: Slot) -> tuple[float, float]:
        """Wait until the GPU is done with the slot's buffers; the timings of
        the slot's previous op, now complete."""
        self.rt.wait(slot.done)
        return self._harvest(slot)

    def _drain(self) -> tuple[float, float]:
        """Wait for every slot's stream; the timings not yet reported."""
        h2d = gather = 0.0
        for slot in self.slots:
            self.rt.wait(slot.done)
            a, b = self._harvest(slot)
            h2d, gather = h2d + a, gather + b
        return h2d, gather

    def _harvest(self, slot: Slot) -> tuple[float, float]:
        if not slot.timed:
            return 0.0, 0.0
        slot.timed = False
        m0, m1, m2 = slot.marks
        return self.rt.elapsed(m0, m1), self.rt.elapsed(m1, m2)

    def _enqueue(
        self, op: ReadOp, slot: Slot, outputs, pad: int, device_reads: bool, gathers
    ) -> tuple[int, float]:
        """Queue the op's copies and gathers on the slot's stream; (bytes over
        PCIe, seconds this thread spent packing)."""
        rt, s = self.rt, slot.stream
        if op.staged and not device_reads:
            return self._enqueue_staged(op, slot, outputs, gathers)
        rt.record(slot.marks[0], s)
        if device_reads:
            # The bytes are in device scratch already (kvikio): no H2D. Direct
            # pieces are device copies, counted with the gathers.
            rt.record(slot.marks[1], s)
            if not op.staged:
                for p in op.pieces:
                    rt.d2d(
                        outputs[p.tensor],
                        p.dst,
                        slot.scratch,
                        pad + p.src - op.offset,
                        p.row_bytes,
                        s,
                    )
        else:  # a row shard or whole tensor: straight to its destination, no gather
            runs = [(p.tensor, (p.dst, p.src - op.offset, p.row_bytes)) for p in op.pieces]
            _h2d_blocks(rt, outputs, slot.host, runs, s)
            rt.record(slot.marks[1], s)
        if op.staged:
            for tensor, table in piece_tables(op).items():
                table[:, SRC_OFF] += pad  # where the op's first byte landed in scratch
                rt.gather(slot.scratch, outputs[tensor], table, s)
        rt.record(slot.marks[2], s)
        slot.timed = True
        return (0 if device_reads else op.useful_bytes), 0.0

    def _enqueue_staged(self, op: ReadOp, slot: Slot, outputs, gathers) -> tuple[int, float]:
        """A covering read in pinned staging, each tensor by its gather strategy."""
        rt, s = self.rt, slot.stream
        tables = piece_tables(op)
        kinds = {t: gathers.get(t, "device") for t in tables}
        t0 = time.perf_counter()
        copies, at = [], 0
        for tensor, table in tables.items():
            if kinds[tensor] == "pack":  # on this thread, into the slot's pack buffer
                packed, runs = pack_layout(table, at)
                gather_host(slot.host[: op.length], slot.pack, packed)
                copies += [(tensor, run) for run in runs]
                at += sum(n for _, _, n in runs)
        pack_s = time.perf_counter() - t0
        pcie = at
        rt.record(slot.marks[0], s)
        if "device" in kinds.values():
            rt.h2d(slot.scratch, 0, slot.host, 0, op.length, s)
            pcie += op.length
        _h2d_blocks(rt, outputs, slot.pack, copies, s)
        rt.record(slot.marks[1], s)
        for tensor, table in tables.items():
            if kinds[tensor] == "device":
                rt.gather(slot.scratch, outputs[tensor], table, s)
            elif kinds[tensor] == "zerocopy":  # the kernel reads the segments over PCIe
                rt.gather(slot.mapped, outputs[tensor], table, s)
                pcie += int((table[:, ROWS] * table[:, ROW_BYTES]).sum())
        rt.record(slot.marks[2], s)
        slot.timed = True
        return pcie, pack_s

    def idle(self) -> None:
        """Wait for the streams and free device scratch, keeping streams and
        pinned staging for a later Loader (``gpuload.cuda.cache``)."""
        with self._busy():
            self._drain()
            for slot in self.slots:
                slot.scratch = None
            self.scratch_size = 0

    def pinned_bytes(self) -> int:
        return len(self.slots) * (self.host_size + self.pack_size) if self.pin else 0

    def close(self) -> None:
        """Wait for the streams, then free staging, scratch and streams."""
        with contextlib.suppress(Exception):  # a sticky CUDA error: free anyway
            self._drain()
        for slot in self.slots:
            slot.host = slot.scratch = slot.pack = slot.mapped = None
            self.rt.destroy_stream(slot.stream)
        self.slots = []
        self.host_size = self.scratch_size = self.pack_size = 0


def _h2d_blocks(rt: Runtime, outputs, host: np.ndarray, runs, stream) -> None:
    """Queue ``(tensor, (dst_off, host_off, n))`` copies, each regular run of
    rows of one tensor as one 2-D copy rather than one copy per row."""
    i = 0
    while i < len(runs):
        tensor = runs[i][0]
        j = i
        while j < len(runs) and runs[j][0] == tensor:
            j += 1
        for d, dp, src, sp, w, h in copy_blocks([c for _, c in runs[i:j]]):
            if h == 1:
                rt.h2d(outputs[tensor], d, host, src, w, stream)
            else:
                rt.h2d_2d(outputs[tensor], d, dp, host, src, sp, w, h, stream)
        i = j


def _scratched(op: ReadOp, gathers: dict[str, str]) -> bool:
    """Whether a staged op copies its range to device scratch: some tensor
    in it gathers on the device (the default where the plan chose none)."""
    return any(gathers.get(p.tensor, "device") == "device" for p in op.pieces)


def _grow(need: int, cap: int) -> int:
    """``need`` rounded up to the growth step, but never past ``cap``."""
    return min(cap, -(-need // GROW) * GROW)


__all__ = ["DevicePipeline", "Runtime", "Slot"]
