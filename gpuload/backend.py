"""Backends: where results live and how the plan's bytes get there.

The loader talks to a backend through five calls (check_memory, allocate,
reader, run, convert). ``HostBackend`` is the CPU product path; the CUDA
backend (``gpuload.device_cuda``) implements the same calls with pinned
staging, streams and device kernels.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from .config import Config
from .errors import BackendUnavailable, PlanError
from .io import PosixReader
from .outputs import convert
from .pipeline import HostPipeline
from .plan import Plan, TensorPlan
from .report import LoadReport
from .resident import mem_available


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
        self._pipeline = HostPipeline(cfg.threads, cfg.staging_bytes, scatter=cfg.scatter)
        self._reader_factory = reader_factory or PosixReader

    def check_memory(self, nbytes: int) -> None:
        avail = mem_available()
        if nbytes > avail:
            raise PlanError(
                f"results need {nbytes:,} bytes of host memory but only {avail:,} "
                "are available (MemAvailable); nothing was read"
            )

    def allocate(self, plan: Plan) -> dict[str, np.ndarray]:
        # One buffer per tensor: each result owns its memory, never staging.
        return {t.name: np.empty(t.out_nbytes, np.uint8) for t in plan.tensors}

    def reader(self, headers, *, prefetch: bool):
        return self._reader_factory(headers, prefetch=prefetch)

    def run(self, plan, buffers, reader, report, on_bytes) -> None:
        self._pipeline.run(plan, buffers, reader, report, on_bytes)

    def convert(self, buffers, tensors, framework) -> dict:
        return convert(buffers, tensors, framework)

    def close(self) -> None:
        self._pipeline = None  # type: ignore[assignment]  # drops the staging slots


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
    device pipeline runs without a GPU (see ``gpuload.pipeline_device``).
    """
    if device == "cpu":
        if runtime is not None:
            raise ValueError("runtime= is for CUDA devices; device='cpu' has no runtime")
        return HostBackend(cfg, reader_factory)
    try:
        mod = importlib.import_module("gpuload.device_cuda")
    except ImportError as e:
        raise BackendUnavailable(f"device={device!r}: the GPU backend is unavailable ({e})") from e
    return mod.CudaBackend(device, cfg, reader_factory, runtime=runtime)
