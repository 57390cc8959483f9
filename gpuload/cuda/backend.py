"""The CUDA backend: results in device memory, filled by the device pipeline.

``CudaBackend`` is what the loader talks to on ``device="cuda:N"``: it
checks and allocates the results, picks the reader (posix into pinned
staging, or kvikio) and runs the plan on a shared
:class:`~gpuload.cuda.pipeline.DevicePipeline`. Under it is
:class:`~gpuload.cuda.runtime.CupyRuntime` (made only when no runtime is
given, so this module imports anywhere, and the CPU tests run
``CudaBackend`` on a fake runtime without cupy, kvikio or numba.cuda).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from gpuload.config import Config
from gpuload.cuda import cache as gpu_cache
from gpuload.cuda.memory import footprint
from gpuload.cuda.pipeline import DevicePipeline
from gpuload.cuda.runtime import CupyRuntime
from gpuload.errors import BackendUnavailable, PlanError
from gpuload.plan.ops import Plan, TensorPlan
from gpuload.read.kvikio import KvikioReader, describe_kvikio, gds_active, kvikio_defaults
from gpuload.read.posix import PosixReader

_DEVICE_RE = re.compile(r"^cuda:(\d+)$")


class CudaBackend:
    """Results in device memory; read with posix (pinned staging) or kvikio.

    Parameters
    ----------
    device
        A resolved ``"cuda:N"``; N is a device index, never a rank.
    cfg
        The load's settings (budgets, threads, backend, pin).
    reader_factory
        Builds the host reader instead of :class:`~gpuload.read.posix.PosixReader`
        (tests inject faults with it); when given, ``backend='auto'`` reads
        with it rather than kvikio.
    runtime
        The CUDA runtime (default :class:`CupyRuntime` on device N); CPU tests
        pass a fake one.
    """

    def __init__(
        self,
        device: str,
        cfg: Config,
        reader_factory: Callable[..., Any] | None = None,
        *,
        runtime: Any = None,
    ) -> None:
        m = _DEVICE_RE.match(device)
        if not m:
            raise ValueError(f"CudaBackend needs a resolved device like 'cuda:0', got {device!r}")
        if reader_factory is not None and cfg.backend == "kvikio":
            raise ValueError(
                "reader_factory builds a host reader for pinned staging; "
                "backend='kvikio' reads into device memory with kvikio instead"
            )
        self.device = device
        self.index = int(m.group(1))
        # The default runtime and its pipelines are shared per device by the
        # process (gpuload.cuda.cache): warm-up, streams and pinned staging once.
        self._shared = runtime is None
        if runtime is None:
            runtime = gpu_cache.runtime(self.index, lambda i: CupyRuntime(i))
        self.runtime = runtime
        self._cfg = cfg
        self._reader_factory = reader_factory
        self._kvikio, self.name, self.reason = _choose_reader(cfg, self.runtime, reader_factory)

        def make() -> DevicePipeline:
            return DevicePipeline(
                self.runtime,
                threads=cfg.threads,
                staging_bytes=cfg.staging_bytes,
                scratch_bytes=cfg.device_scratch_bytes,
                pin=cfg.pin,
            )

        key = (self.index, cfg.threads, cfg.staging_bytes, cfg.device_scratch_bytes, cfg.pin)
        self._key = key
        self._pipeline = gpu_cache.take(key, make) if self._shared else make()

    @property
    def device_reads(self) -> bool:
        return self._kvikio is not None

    def _fits(self, nbytes: int, what: str) -> None:
        free, total = self.runtime.mem_info()
        if nbytes > free:
            self.runtime.release_cached()  # cupy's pool may hold free blocks
            free, total = self.runtime.mem_info()
        if nbytes > free:
            raise PlanError(
                f"{what} need {nbytes:,} bytes of memory on {self.device} but only "
                f"{free:,} of {total:,} are free; nothing was read"
            )

    # Results go through torch's caching allocator for framework="torch"
    # (the Loader sets this), raw cudaMalloc otherwise.
    framework: str | None = None

    @property
    def allocator(self) -> str:
        torch_ok = self.framework == "torch" and hasattr(self.runtime, "torch_alloc")
        return "torch" if torch_ok else "raw"

    def check_memory(self, nbytes: int) -> None:
        self._fits(nbytes, "results")

    def allocate(self, plan: Plan) -> dict[str, Any]:
        # Before any I/O: the results, as their allocator rounds them, and any
        # scratch growth must fit, and an allocation that fails anyway
        # (fragmentation, a racing process) is a PlanError too. Each tensor
        # gets its own allocation: results never share memory with staging
        # or with each other.
        via = self.allocator
        results = footprint((t.out_nbytes for t in plan.tensors), via)
        extra = self._pipeline.growth(plan, device_reads=self.device_reads)
        self._fits(results + extra, "results and device scratch" if extra else "results")
        alloc = self.runtime.torch_alloc if via == "torch" else self.runtime.device_alloc
        buffers: dict[str, Any] = {}
        try:
            self._pipeline.prepare(plan, device_reads=self.device_reads)
            for t in plan.tensors:
                buffers[t.name] = alloc(t.out_nbytes)
            return buffers
        except MemoryError as e:
            buffers.clear()  # free what was taken now, not when the traceback dies
            free, total = self.runtime.mem_info()
            raise PlanError(
                f"out of memory on {self.device} allocating {results + extra:,} bytes "
                f"(results and scratch; {free:,} of {total:,} free now); nothing was read"
            ) from e

    def reader(self, headers, *, prefetch: bool):
        if self._kvikio is not None:
            return KvikioReader(
                headers, prefetch=prefetch, kvikio=self._kvikio, threads=self._cfg.threads
            )
        return (self._reader_factory or PosixReader)(headers, prefetch=prefetch)

    def run(self, plan, buffers, reader, report, on_bytes) -> None:
        self._pipeline.run(plan, buffers, reader, report, on_bytes)

    def convert(self, buffers, tensors: list[TensorPlan], framework: str) -> dict:
        return {t.name: self.runtime.to_framework(buffers[t.name], t, framework) for t in tensors}

    def close(self) -> None:
        if self._shared:
            gpu_cache.park(self._key, self._pipeline)  # see gpuload.cuda.cache.release
        else:
            self._pipeline.close()


def _choose_reader(cfg: Config, runtime: Any, reader_factory) -> tuple[Any, str, str]:
    """(kvikio module or None, backend name, why) for ``cfg.backend``."""
    posix = "posix preadv into pinned staging, H2D on the slot streams"
    if cfg.backend == "posix":
        return None, "posix", f"backend='posix': {posix}"
    if cfg.backend == "auto" and reader_factory is not None:
        return None, "posix", f"a reader_factory was given: {posix}"
    if cfg.backend == "auto" and cfg.gather in ("zerocopy", "pack"):
        return None, "posix", f"gather={cfg.gather!r} gathers from pinned staging: {posix}"
    try:
        kvikio = runtime.kvikio()
        kvikio_defaults(kvikio)  # the settings submodule: an old or broken kvikio lacks it
    except Exception as e:  # ImportError, or a libcufile that fails to load
        if cfg.backend == "kvikio":
            raise BackendUnavailable(
                f"backend='kvikio' but kvikio is unusable here ({e}); "
                "pip install kvikio-cu12 (or -cu13), or use backend='posix'"
            ) from e
        return None, "posix", f"auto: kvikio unusable ({e}); {posix}"
    how = describe_kvikio(kvikio)
    if cfg.backend == "kvikio":
        return kvikio, "kvikio", f"backend='kvikio': {how}"
    if gds_active(kvikio) is not True:
        # Compatibility mode buys nothing over posix and costs the device
        # gather (world x PCIe bytes for column shards) and a d2d per row shard.
        return None, "posix", f"auto: {how}, so no GDS to gain; {posix}"
    return kvikio, "kvikio", f"auto: kvikio imports and GDS is active; {how}"
