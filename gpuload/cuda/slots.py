"""The device pipeline's slots: each one's stream, events and buffers, sized within the budgets.

Written against :class:`Runtime`, a small seam over CUDA (allocations,
streams, events, async copies, the gather launch), so the same code runs on
a GPU (``gpuload.cuda.runtime.CupyRuntime``) and, in CPU tests, on a fake
asynchronous runtime whose streams are threads that run queued work late.

``K = clamp(threads + 1, 2, 16)`` slots, created once per pipeline (once
per ``Loader``). Each slot has a stream, a ``done`` event, three timing
events, a pinned host buffer (posix reads) and a device scratch buffer
(covering reads; every kvikio read). :class:`Slots` grows them for a plan
before any I/O, waits on them, and frees them; how a load uses them is
``gpuload.cuda.pipeline``.

Budgets: pinned bytes <= ``staging_bytes`` and scratch bytes <=
``device_scratch_bytes``, whatever the plan says: an op longer than a slot
is split here (:func:`gpuload.plan.split.split_op`), down to single bytes if it must be.
A plan with packed tensors halves each slot's read buffer to make room for
its pack buffer; only ops with a ``device`` gather need scratch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Protocol

import numpy as np

from gpuload.errors import PlanError
from gpuload.plan.ops import PAGE, Plan, ReadOp, TensorPlan
from gpuload.plan.split import aligned_span, fit_ops
from gpuload.read.workers import Busy

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


class Slots:
    """The slots of a :class:`~gpuload.cuda.pipeline.DevicePipeline`: made once and
    reused, grown for each plan, drained and freed."""

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


def _scratched(op: ReadOp, gathers: dict[str, str]) -> bool:
    """Whether a staged op copies its range to device scratch: some tensor
    in it gathers on the device (the default where the plan chose none)."""
    return any(gathers.get(p.tensor, "device") == "device" for p in op.pieces)


def _grow(need: int, cap: int) -> int:
    """``need`` rounded up to the growth step, but never past ``cap``."""
    return min(cap, -(-need // GROW) * GROW)


__all__ = ["Runtime", "Slot", "Slots"]
