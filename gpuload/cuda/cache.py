"""The process-wide GPU cache: warmed runtimes and idle pipelines, per device.

A one-shot ``load_sharded(..., device="cuda:N")`` used to pay all of the GPU
path's setup on every call: the gather kernels' warm-up (compile, link,
load, one launch per width), the slots' streams and events, and
``cudaHostAlloc`` / ``cudaFreeHost`` of every slot's pinned staging. What is
safe to share is kept here, per device, for the life of the process:

* one warmed :class:`~gpuload.cuda.runtime.CupyRuntime` per device index;
* idle :class:`~gpuload.cuda.pipeline.DevicePipeline` s (streams, events,
  pinned staging), one per (device, threads, budgets, pin): a closed
  ``Loader`` parks its pipeline here once its streams are drained, and the
  next ``Loader`` with the same settings takes it.

Device scratch is never kept: a parked pipeline gives its scratch back to
the driver, so the cache holds no GPU memory beyond the gather's small
piece-table buffers. Only the default runtime is cached; a caller-supplied
``runtime=`` is the caller's to manage.

:func:`release` (``gpuload.release_gpu_cache()``) frees everything: the
parked pipelines' pinned staging and streams. Call it when the loads are
over and the host memory is wanted back (9 x 16 MiB pinned by default).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_runtimes: dict[int, Any] = {}
_idle: dict[tuple, Any] = {}  # (device index, settings) -> a parked pipeline


def runtime(index: int, make: Callable[[int], Any]) -> Any:
    """The process's warmed runtime for device ``index`` (made by ``make`` once)."""
    with _lock:
        rt = _runtimes.get(index)
        if rt is None:
            rt = _runtimes[index] = make(index)
        return rt


def take(key: tuple, make: Callable[[], Any]) -> Any:
    """A parked pipeline for ``key``, or a new one from ``make``."""
    with _lock:
        pipe = _idle.pop(key, None)
    return pipe if pipe is not None else make()


def park(key: tuple, pipe: Any) -> None:
    """Keep ``pipe`` (drained, scratch freed) for the next Loader with ``key``;
    close it instead when one is parked already or it cannot be drained."""
    try:
        pipe.idle()
    except Exception:  # a sticky CUDA error: not reusable
        with contextlib.suppress(Exception):
            pipe.close()
        return
    with _lock:
        if key not in _idle:
            _idle[key] = pipe
            return
    pipe.close()


def held() -> dict[str, int]:
    """What the cache holds: runtimes, parked pipelines, their pinned bytes."""
    with _lock:
        pipes = list(_idle.values())
        n = len(_runtimes)
    pinned = sum(p.pinned_bytes() for p in pipes)
    return {"runtimes": n, "pipelines": len(pipes), "pinned_bytes": pinned}


def release() -> None:
    """Free every parked pipeline (pinned staging, streams, events).

    The warmed runtimes stay: they hold compiled kernels, no memory of note.
    Safe at any time; a Loader still open keeps its own pipeline."""
    with _lock:
        pipes = list(_idle.values())
        _idle.clear()
    for p in pipes:
        with contextlib.suppress(Exception):
            p.close()


def forget_runtimes() -> None:
    """Drop the cached runtimes too (tests; a process about to fork)."""
    release()
    with _lock:
        _runtimes.clear()


__all__ = ["forget_runtimes", "held", "park", "release", "runtime", "take"]
