"""The device pipeline: execute a read plan into device buffers, overlapped.

Runs on the slots of :class:`gpuload.cuda.slots.Slots` (a stream, events,
pinned staging and device scratch each), through the CUDA seam
:class:`gpuload.cuda.slots.Runtime`.

Ordering
--------
A reader thread takes a free slot and:

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

Report: ``read_s`` and ``wait_s`` (for a slot and its stream) are
reader-thread seconds; ``h2d_s`` and ``gather_s`` are GPU seconds between
timing events, summed over streams (kvikio reads have no H2D: their
device-to-device placement counts as gather).
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gpuload.cuda.slots import Runtime, Slot, Slots
from gpuload.host.pipeline import piece_tables
from gpuload.kernels.host import ROW_BYTES, ROWS, SRC_OFF, gather_host
from gpuload.plan.ops import Plan, ReadOp
from gpuload.plan.transfer import copy_blocks, pack_layout
from gpuload.read.workers import run_jobs
from gpuload.report import LoadReport


class DevicePipeline(Slots):
    """Runs plans on a device through ``runtime``; slots are made once and reused."""

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
        # A reader may fill a staged op's staging only where its pieces lie
        # (remote multi-range GETs); the gathers read nothing else.
        read_staged = getattr(reader, "read_staged", None)
        advise_op = getattr(reader, "advise_op", None)

        def work(i: int) -> tuple[int, float, float, float, float, int, float]:
            op = ops[i]
            ahead = i + self.threads  # hint the range a thread takes next
            if ahead < len(ops):
                if advise_op is not None:
                    advise_op(ops[ahead])
                else:
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
                    host = memoryview(slot.host)[: op.length]
                    if op.staged and read_staged is not None:  # remote: maybe the rows only
                        read_staged(op, host)
                    else:
                        reader.readinto(op.file, op.offset, [host])
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


__all__ = ["DevicePipeline"]
