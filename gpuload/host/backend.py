"""Backends: where results live and how the plan's bytes get there.

The loader talks to a backend through five calls (check_memory, allocate,
reader, run, convert). ``HostBackend`` is the CPU product path; the CUDA
backend (``gpuload.cuda.backend``) implements the same calls with pinned
staging, streams and device kernels.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np

from gpuload.config import Config
from gpuload.errors import BackendUnavailable, GpuloadError, PlanError
from gpuload.host.cold import mostly_cold
from gpuload.host.outputs import convert
from gpuload.host.pipeline import HostPipeline
from gpuload.memory.mapping import (
    HUGE_PAGE,
    PAGE,
    HostBuffer,
    Mapping,
    mem_available,
    page_place,
    placed_empty,
)
from gpuload.plan.ops import Plan, TensorPlan
from gpuload.read.posix import PosixReader
from gpuload.report import LoadReport


class Backend(Protocol):
    device: str
    name: str  # the reader that runs: "posix" | "kvikio"
    reason: str  # why that reader was chosen

    def check_memory(self, nbytes: int) -> None: ...
    def allocate(self, plan: Plan) -> dict[str, Any]: ...
    def reader(self, headers, *, prefetch: bool) -> Any: ...
    def run(
        self,
        plan: Plan,
        buffers: dict[str, Any],
        reader,
        report: LoadReport,
        on_bytes: Callable[[int], None] | None,
    ) -> None: ...
    def convert(
        self, buffers: dict[str, Any], tensors: list[TensorPlan], framework: str
    ) -> dict: ...
    def close(self) -> None: ...


class HostBackend:
    """Results in host memory (numpy buffers), read with the posix reader."""

    device = "cpu"

    def __init__(self, cfg: Config, reader_factory: Callable[..., Any] | None = None) -> None:
        if cfg.backend == "kvikio":
            raise BackendUnavailable(
                "backend='kvikio' reads into GPU memory; device='cpu' "
                "uses the posix reader (backend='auto' or 'posix')"
            )
        self.name, self.reason = "posix", "device is cpu: posix preadv into host memory"
        self._pipeline = HostPipeline(
            cfg.threads,
            cfg.staging_bytes,
            scatter=cfg.scatter,
            mapped=cfg.mapped_gather,
            cold=(max(cfg.threads, cfg.cold_threads), cfg.cold_chunk_bytes),
            direct=cfg.cold_direct and cfg.hugepages,  # O_DIRECT lands only in HostBuffers
            threads_set=cfg.threads_set,
        )
        self._reader_factory = reader_factory or PosixReader
        self._hugepages = cfg.hugepages
        self._direct = cfg.cold_direct and cfg.hugepages

    def check_memory(self, nbytes: int) -> None:
        avail = mem_available()
        if nbytes > avail:
            raise PlanError(
                f"results need {nbytes:,} bytes of host memory but only {avail:,} "
                "are available (MemAvailable); nothing was read"
            )

    def allocate(
        self, plan: Plan, into: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        # One buffer per tensor: each result owns its memory, never staging.
        # Each is placed against the file offset its first byte comes from.
        # ``into`` (gpuload.torch.load_into): the caller's own buffers instead.
        into = into or {}
        for t in plan.tensors:
            buf = into.get(t.name)
            if buf is not None and not (
                isinstance(buf, np.ndarray)
                and buf.dtype == np.uint8
                and buf.ndim == 1
                and buf.flags.c_contiguous
                and buf.flags.writeable
                and buf.nbytes == t.out_nbytes
            ):
                raise PlanError(
                    f"into[{t.name!r}] must be a writable contiguous 1-D uint8 array of "
                    f"{t.out_nbytes} bytes"
                )
        first = {p.tensor: p.src for op in plan.ops for p in op.pieces if p.dst == 0}
        # A cold load that reads with O_DIRECT wants each result at its
        # source's exact place in a page, so whole blocks can land in it.
        exact = self._direct and _plan_cold(plan)
        big = sum(1 for t in plan.tensors if t.name not in into and t.out_nbytes >= POOL_MIN)
        # Mapped results only within half of the mappings this process has
        # left (other code in it needs some): the rest come from np.empty.
        cap = HostBuffer.live + mappings_left() // 2 if big else 0
        return {
            t.name: into[t.name]
            if t.name in into
            else host_result(
                t.out_nbytes,
                t.name,
                first.get(t.name, 0),
                self._hugepages and HostBuffer.live < cap,
                exact=exact,
            )
            for t in plan.tensors
        }

    def reader(self, headers, *, prefetch: bool):
        return self._reader_factory(headers, prefetch=prefetch)

    def run(self, plan, buffers, reader, report, on_bytes) -> None:
        self._pipeline.run(plan, buffers, reader, report, on_bytes)

    def convert(self, buffers, tensors, framework) -> dict:
        return convert(buffers, tensors, framework)

    def close(self) -> None:
        self._pipeline = None  # type: ignore[assignment]  # drops the staging slots


def host_result(
    nbytes: int,
    name: str,
    src_offset: int = 0,
    hugepages: bool = True,
    *,
    pooled: bool = True,
    exact: bool = False,
) -> np.ndarray:
    """A fresh ``uint8`` buffer for one result on the host, whose first byte
    is read from file offset ``src_offset``.

    Two things decide how fast the kernel copies file pages into fresh
    memory (bench/fresh_memory.py, 2 GiB cached, 8 threads, on the 2-core
    VM: bench/results/2026-11-29-cpu/fresh_memory.md):

    - where the destination sits against the source within a page: the
      CPU's string copy runs at a fraction of its speed when the
      destination is 1-63 bytes past the source modulo 4 KiB. A large
      ``np.empty`` starts 16 bytes into a page, so every tensor whose data
      starts on a page boundary hits it: 0.568 s into ``np.empty`` (huge
      pages by numpy's own advice) against 0.271 s into a page-aligned
      huge-page buffer. The result is placed at the source's page offset,
      rounded down to 64 bytes: 64-byte aligned, and never just past its
      source.
    - huge pages: 4 KiB pages cost a fault and a zeroing each (0.797 s
      page-aligned with 4 KiB pages against 0.271 s with huge pages).

    So a result of at least a huge page is mapped by gpuload
    (:class:`gpuload.memory.mapping.HostBuffer`, ``MADV_HUGEPAGE``) at that page
    offset. The array keeps the mapping alive, and when the last view dies
    the mapping goes to the pool (:mod:`gpuload.memory.pool`), faulted in,
    for the next load. A result from ``POOL_MIN`` (64 KiB) up to a huge page
    gets a pooled mapping of 4 KiB pages the same way: fresh memory for it
    would cost a fault and a zeroing per page on every load (a warm world-8
    load on the 2-core VM read its 12 MiB of such results at 1.5 GB/s a
    thread, its larger ones at 8.4). Smaller results come from ``np.empty``,
    and so do all once gpuload holds :func:`max_result_mappings` of its own
    mappings (a process has a limit on mappings, and a CPU load of a model
    with tens of thousands of experts must not reach it).

    ``pooled``: the mapping comes from, and goes back to, the process's pool
    of faulted-in result mappings (:mod:`gpuload.memory.pool`) when one fits.
    ``exact``: a mapped result starts at exactly its source's offset in a
    page (not rounded down to 64 bytes), so a cold load's ``O_DIRECT`` reads
    of whole 4 KiB blocks can land in it (``PosixReader.read_direct``).
    """
    at = page_place(src_offset)
    mapped = hugepages and nbytes >= POOL_MIN
    if exact and mapped:
        at = src_offset % PAGE
    if mapped and HostBuffer.live < max_result_mappings():
        try:
            buf = HostBuffer(
                nbytes,
                f"the result {name!r}",
                huge=nbytes >= HUGE_PAGE,
                page_offset=at,
                pooled=pooled,
            )
            return np.asarray(buf)
        except MemoryError:
            # mmap refused: the process's mappings (vm.max_map_count, shared
            # with everything else in it) or its memory ran out. np.empty
            # (malloc, from a heap) usually still serves it; if memory is
            # truly gone, it says so too.
            pass
    if nbytes < PLACE_MIN:
        return np.empty(nbytes, np.uint8)
    return placed_empty(nbytes, at)


PLACE_MIN = 64 << 10  # smaller results are not placed (see host_result)
POOL_MIN = 64 << 10  # smaller results are not mapped nor pooled (see host_result)


def mappings_left() -> int:
    """How many more mappings this process may make (``vm.max_map_count``
    less the lines of /proc/self/maps); a large number where unknown."""
    try:
        with open("/proc/self/maps", "rb") as f:
            used = sum(1 for _ in f)
    except OSError:
        return 1 << 30
    return max(0, _map_count_limit() - used)


@functools.cache
def _map_count_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


@functools.cache
def max_result_mappings() -> int:
    """A quarter of the kernel's per-process mapping limit (``vm.max_map_count``,
    65530 by default), and at most 16384."""
    return max(0, min(16384, _map_count_limit() // 4))


def make_backend(
    device: str,
    cfg: Config,
    reader_factory: Callable[..., Any] | None = None,
    *,
    runtime: Any = None,
):
    """The backend for a resolved device string ("cpu" or "cuda:N").

    ``runtime`` replaces the CUDA runtime of the GPU backend (cupy, by
    default): the CPU tests pass a fake asynchronous one so that the real
    device pipeline runs without a GPU (see ``gpuload.cuda.pipeline``).
    """
    if device == "cpu":
        if runtime is not None:
            raise ValueError("runtime= is for CUDA devices; device='cpu' has no runtime")
        return HostBackend(cfg, reader_factory)
    try:
        mod = importlib.import_module("gpuload.cuda.backend")
    except ImportError as e:
        raise BackendUnavailable(f"device={device!r}: the GPU backend is unavailable ({e})") from e
    return mod.CudaBackend(device, cfg, reader_factory, runtime=runtime)


def _plan_cold(plan: Plan, samples: int = 16) -> bool:
    """Whether most of a sample of the plan's reads miss the page cache
    (``mincore``), decided before the results are allocated."""
    if not plan.ops:
        return False
    maps: dict[str, Mapping] = {}  # one mapping per file, not one per sampled read

    def cached(file: str, offset: int, length: int) -> bool:
        m = maps.get(file) or maps.setdefault(file, Mapping(file))
        return m.all_resident(offset, min(m.size, offset + length))

    try:
        return mostly_cold(plan, SimpleNamespace(cached=cached), samples)
    except (OSError, GpuloadError):
        return False
    finally:
        maps.clear()  # unmapped now, also when a Ctrl-C lands here
