"""The host pipeline: execute a read plan into owned numpy buffers.

Reader threads take read ops in file order. A direct op scatters its file
range straight into the destination buffers with one ``preadv`` (gaps land
in a discard buffer). A staged op reads into one of a bounded set of staging
slots and is gathered from there by ``gather_host`` (the numpy twin of the
CUDA kernel), then the slot is returned. Staging never escapes: results are
the caller's own buffers, allocated once per tensor.

On the first error every queued op is cancelled, running ones finish, and
the error is raised: a failed load returns nothing.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import numpy as np

from .kernels import NCOLS, gather_host
from .plan import Plan, ReadOp
from .report import LoadReport
from .workers import Busy, run_jobs

_ZERO = np.zeros(0, np.uint8)


def piece_tables(op: ReadOp) -> dict[str, np.ndarray]:
    """The op's pieces as per-destination piece tables, offsets relative to the op."""
    by_tensor: dict[str, list[list[int]]] = {}
    for p in op.pieces:
        by_tensor.setdefault(p.tensor, []).append(
            [p.src - op.offset, p.dst, p.rows, p.row_bytes, p.src_stride, p.dst_stride]
        )
    return {t: np.array(rows, np.int64).reshape(-1, NCOLS) for t, rows in by_tensor.items()}


class HostPipeline:
    """Runs plans on the CPU; staging slots are created once and reused."""

    def __init__(self, threads: int, staging_bytes: int) -> None:
        self.threads = threads
        self.staging_bytes = staging_bytes
        self._slots: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._slot_size = 0
        self._slot_count = 0
        self._discard = _ZERO
        self._busy = Busy()

    def _ensure_staging(self, plan: Plan) -> None:
        need = plan.max_staged_bytes
        if need > self._slot_size:  # grow, never shrink (staging is reused)
            count = max(1, min(self.threads, self.staging_bytes // need))
            self._slots = queue.SimpleQueue()
            for _ in range(count):
                self._slots.put(np.empty(need, np.uint8))
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
            self._ensure_staging(plan)
            self._run(plan, outputs, reader, report, on_bytes)

    def _run(self, plan, outputs, reader, report, on_bytes) -> None:
        ops = plan.ops
        discard = memoryview(self._discard)

        def work(i: int) -> tuple[int, float, float, float]:
            op = ops[i]
            ahead = i + self.threads  # hint the range a thread will take next
            if ahead < len(ops):
                reader.advise(ops[ahead].file, ops[ahead].offset, ops[ahead].length)
            if not op.staged:
                bufs, pos = [], op.offset
                for p in op.pieces:
                    if p.src > pos:
                        bufs.append(discard[: p.src - pos])
                    bufs.append(memoryview(outputs[p.tensor])[p.dst : p.dst + p.row_bytes])
                    pos = p.src_end
                t0 = time.perf_counter()
                reader.readinto(op.file, op.offset, bufs)
                return op.length, time.perf_counter() - t0, 0.0, 0.0
            t0 = time.perf_counter()
            slot = self._slots.get()
            t1 = time.perf_counter()
            try:
                block = slot[: op.length]
                reader.readinto(op.file, op.offset, [memoryview(block)])
                t2 = time.perf_counter()
                for tensor, table in piece_tables(op).items():
                    gather_host(block, outputs[tensor], table)
                t3 = time.perf_counter()
            finally:
                self._slots.put(slot)
            return op.length, t2 - t1, t3 - t2, t1 - t0

        def add(result: tuple[int, float, float, float]) -> None:
            nbytes, read_s, gather_s, wait_s = result
            report.read_s += read_s
            report.gather_s += gather_s
            report.wait_s += wait_s
            if on_bytes is not None:
                on_bytes(nbytes)

        # On the first error (or Ctrl-C) no op starts after it and the running
        # ones finish: no thread writes into a buffer after we return.
        run_jobs(len(ops), self.threads, work, add, name="gpuload-read")
        report.ops += len(ops)
        report.staged_ops += sum(op.staged for op in ops)
        report.bytes_read += plan.bytes_read
        report.bytes_useful += plan.bytes_useful
