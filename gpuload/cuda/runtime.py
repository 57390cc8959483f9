"""The CUDA runtime under the device pipeline: ``CupyRuntime`` on cupy, and its kernel warm-up.

``CupyRuntime`` implements :class:`gpuload.cuda.slots.Runtime`: cupy for
memory, streams, events and copies; the Numba kernel of
``gpuload.kernels.cuda`` for gathers. cupy, kvikio and numba.cuda are
imported only when a ``CupyRuntime`` is made, so this module imports
anywhere.

Memory
------
Results are allocated with ``cudaMalloc`` directly (``cupy.cuda.Memory``),
one allocation per tensor, *outside* cupy's memory pool: when the caller
drops a result its memory goes back to the driver at once, and nothing
gpuload allocated stays cached in a pool. Device scratch is allocated the
same way and freed by ``Loader.close()``. Pinned staging is
``cudaHostAlloc``'d (``cupy.cuda.PinnedMemory``, not the pinned pool) and
freed the same way.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from gpuload.errors import BackendUnavailable, PlanError
from gpuload.host.outputs import to_cupy, to_torch_dlpack
from gpuload.plan.ops import TensorPlan

_HOST_ALLOC_PORTABLE, _HOST_ALLOC_MAPPED = 1, 2  # cudaHostAlloc flags (cuda_runtime_api.h)
# cudaErrorMemoryAllocation. A number, not ``cupy.cuda.runtime.errorMemoryAllocation``:
# cupy 14 does not expose that constant to Python, and reading it turned a
# real out-of-memory into an AttributeError.
CUDA_ERROR_MEMORY_ALLOCATION = 2


class CupyRuntime:
    """The real runtime: cupy for memory, streams, events and copies; the
    Numba gather kernel launched on cupy streams through ``external_stream``."""

    def __init__(self, index: int) -> None:
        try:
            self.cupy = importlib.import_module("cupy")
        except ImportError as e:
            raise BackendUnavailable(
                f"the GPU path needs cupy ({e}): pip install 'gpuload[cu12]' (or [cu13])"
            ) from None
        cp = self.cupy
        self.index = index
        self._device = cp.cuda.Device(index)
        self._rt = cp.cuda.runtime
        # Imported here, in the caller's thread: numba.cuda and the kernel
        # module load once, and a broken numba install fails the Loader, not
        # a load. The caller's current device is left alone: work on device
        # N runs inside ``with Device(N)`` or on reader threads bound to it.
        self._kernels = importlib.import_module("gpuload.kernels.cuda")
        # With the device index the check compiles, links and loads every
        # variant on this device and names the NVVM / nvJitLink / driver
        # versions behind a mismatch, before the warm-up below would fail
        # with the linker's bare message.
        try:
            # The first CUDA call: a missing or too old driver is named by
            # cupy's own error here, before Numba's driver init would hide it.
            self._rt.getDeviceCount()
            problem = self._kernels.compiler_problem(index)
        except Exception as e:
            raise BackendUnavailable(f"the GPU path cannot run on cuda:{index}: {e}") from e
        if problem is not None:
            raise BackendUnavailable(
                f"the GPU path cannot run on cuda:{index}: {problem} "
                "(`gpuload doctor` reports the whole toolchain)"
            )
        self._warm()

    def _warm(self, **launch: Any) -> None:
        # Every gather variant compiled, linked, loaded and run once here, in
        # the caller's thread: a first compile inside a reader thread would
        # fail a load half way (and its warnings, errors under ``-W error``,
        # would be raised there).
        try:
            with self._device:  # the device current for the warm-up launches
                stream = self.stream()
                try:
                    warm_gathers(self._kernels, self._to_device, self._to_host, stream, **launch)
                finally:
                    self._kernels.release_stream(stream)
        except Exception as e:
            raise BackendUnavailable(
                f"the GPU path cannot run here: warming up the gather kernels failed: {e}"
            ) from e

    def _to_device(self, a: np.ndarray, stream: Any) -> Any:
        buf = self.device_alloc(a.nbytes)
        buf.set(a, stream=stream)
        return buf

    def _to_host(self, buf: Any) -> np.ndarray:
        return buf.get()

    def bind_thread(self) -> None:
        # cudaSetDevice makes the device's primary context current on this
        # thread; Numba then launches in that same context.
        self._device.use()

    def device_alloc(self, nbytes: int) -> Any:
        cp = self.cupy
        with self._device:
            if nbytes == 0:
                return cp.ndarray((0,), cp.uint8)
            try:
                mem = cp.cuda.memory.Memory(nbytes)  # cudaMalloc: outside the pool
            except cp.cuda.runtime.CUDARuntimeError as e:
                # Only cupy's pool says OutOfMemoryError; a bare cudaMalloc
                # says cudaErrorMemoryAllocation. The callers catch MemoryError.
                if not is_out_of_memory(e):
                    raise
                raise cp.cuda.memory.OutOfMemoryError(nbytes, -1) from e
            return cp.ndarray((nbytes,), cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))

    def torch_alloc(self, nbytes: int) -> Any:
        """``nbytes`` from torch's caching allocator on this device, as a cupy
        array over the same memory (DLPack; torch's tensor stays its owner)."""
        torch = importlib.import_module("torch")
        cp = self.cupy
        with self._device:
            if nbytes == 0:
                return cp.ndarray((0,), cp.uint8)
            try:
                t = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{self.index}")
            except torch.cuda.OutOfMemoryError as e:  # callers catch MemoryError
                raise MemoryError(str(e)) from e
            return cp.from_dlpack(t)

    def host_alloc(self, nbytes: int, *, pinned: bool) -> np.ndarray:
        if not pinned:
            return np.empty(nbytes, np.uint8)
        pm = self.cupy.cuda.pinned_memory
        try:
            with self._device:
                # cudaHostAllocPortable | cudaHostAllocMapped, not the pinned pool:
                # mapped so a zero-copy gather can read it (``device_view``).
                mem = pm.PinnedMemory(nbytes, _HOST_ALLOC_PORTABLE | _HOST_ALLOC_MAPPED)
        except Exception as e:  # CUDARuntimeError: locked-memory limits, host RAM
            raise PlanError(
                f"cannot pin {nbytes:,} bytes of staging ({e}); lower staging_bytes "
                "(GPULOAD_STAGING_BYTES) or set pin=0 (GPULOAD_PIN=0); nothing was read"
            ) from e
        # The array's base holds the allocation: freed when the slot drops it.
        return np.frombuffer(pm.PinnedMemoryPointer(mem, 0), np.uint8, nbytes)

    def device_view(self, host: np.ndarray) -> Any:
        """A cupy array over the device-mapped address of pinned ``host``.

        cupy wraps no ``cudaHostGetDevicePointer``; ``cudaPointerGetAttributes``
        gives the same device pointer for mapped memory and none (0) for
        pageable memory, which is refused."""
        cp = self.cupy
        ptr, n = host.ctypes.data, host.nbytes
        with self._device:
            devptr = self._rt.pointerGetAttributes(ptr).devicePointer
            if not devptr:
                raise ValueError(
                    f"host buffer at {ptr:#x} is not mapped pinned memory: no zero-copy gather"
                )
            mem = cp.cuda.UnownedMemory(devptr, n, host, self.index)  # host keeps it alive
            return cp.ndarray((n,), cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))

    def stream(self) -> Any:
        with self._device:
            return self.cupy.cuda.Stream(non_blocking=True)

    def destroy_stream(self, stream: Any) -> None:
        # The gather keeps a table buffer per stream until told otherwise; the
        # pipeline calls this after draining, so no launch still reads it.
        # cupy destroys the stream itself when its object is collected.
        with self._device:
            self._kernels.release_stream(stream)

    def event(self, *, timing: bool) -> Any:
        with self._device:
            # Waited-on events block (yield the CPU to reader threads) rather
            # than spin; timing events are only read after a blocking wait.
            return self.cupy.cuda.Event(block=not timing, disable_timing=not timing)

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait(self, event: Any) -> None:
        event.synchronize()

    def query(self, event: Any) -> bool:
        return bool(event.done)

    def elapsed(self, start: Any, end: Any) -> float:
        return self.cupy.cuda.get_elapsed_time(start, end) / 1e3

    def h2d(self, dst, dst_off: int, src: np.ndarray, src_off: int, n: int, stream) -> None:
        _bounds(dst.nbytes, dst_off, src.nbytes, src_off, n)
        self._rt.memcpyAsync(
            dst.data.ptr + dst_off,
            src.ctypes.data + src_off,
            n,
            self._rt.memcpyHostToDevice,
            stream.ptr,
        )

    def h2d_2d(
        self, dst, dst_off: int, dst_pitch: int, src: np.ndarray, src_off: int,
        src_pitch: int, width: int, height: int, stream,
    ) -> None:  # fmt: skip
        _bounds_2d(dst.nbytes, dst_off, dst_pitch, src.nbytes, src_off, src_pitch, width, height)
        self._rt.memcpy2DAsync(
            dst.data.ptr + dst_off,
            dst_pitch,
            src.ctypes.data + src_off,
            src_pitch,
            width,
            height,
            self._rt.memcpyHostToDevice,
            stream.ptr,
        )

    def d2d(self, dst, dst_off: int, src, src_off: int, n: int, stream) -> None:
        _bounds(dst.nbytes, dst_off, src.nbytes, src_off, n)
        self._rt.memcpyAsync(
            dst.data.ptr + dst_off,
            src.data.ptr + src_off,
            n,
            self._rt.memcpyDeviceToDevice,
            stream.ptr,
        )

    def gather(self, src, dst, table: np.ndarray, stream) -> None:
        self._kernels.gather(src, dst, table, stream=stream)

    def mem_info(self) -> tuple[int, int]:
        with self._device:
            free, total = self._rt.memGetInfo()
        return int(free), int(total)

    def release_cached(self) -> None:
        """Give allocator caches back to the driver: cupy's pool, and torch's
        when this process already uses CUDA through torch (memory torch keeps
        cached counts as used in cudaMemGetInfo). Called only when a load
        would not fit otherwise."""
        with self._device:
            self.cupy.get_default_memory_pool().free_all_blocks()
            torch = sys.modules.get("torch")  # never imported for this
            cuda = getattr(torch, "cuda", None)
            if cuda is not None and cuda.is_initialized():
                with cuda.device(self.index):
                    cuda.empty_cache()

    def to_framework(self, buf: Any, tensor: TensorPlan, framework: str) -> Any:
        with self._device:
            if framework == "torch":
                return to_torch_dlpack(buf, tensor)
            if framework == "cupy":
                return to_cupy(buf, tensor, self.cupy)
        raise ValueError(f"framework={framework!r}: GPU results are 'torch' or 'cupy'")

    def kvikio(self) -> Any:
        return importlib.import_module("kvikio")


def warm_gathers(
    kernels: Any,
    to_device: Callable[[np.ndarray, Any], Any],
    to_host: Callable[[Any], Any],
    stream: Any,
    **launch: Any,
) -> None:
    """Run every element width of the gather kernel once, on ``stream``, and
    check the bytes it moved.

    Each variant is compiled on first use; doing that here, before any
    reader thread exists, means no compile, link or module load ever happens
    in the middle of a load. ``kernels`` is ``gpuload.kernels.cuda``;
    ``to_device(array, stream)`` copies on ``stream`` (a non-blocking stream
    does not wait for the default one); ``launch`` goes to ``gather`` (the
    simulator tests' small shapes)."""
    src = np.arange(32, dtype=np.uint8)
    for word in (16, 8, 4, 2, 1):
        # One row of ``word`` bytes at source offset ``word``: ``word`` is the
        # widest element every address in it is a multiple of.
        table = np.array([[word, 0, 1, word, word, word]], dtype=np.int64)
        d_src, d_dst = to_device(src, stream), to_device(np.zeros(16, np.uint8), stream)
        kernels.gather(d_src, d_dst, table, stream=stream, **launch)
        stream.synchronize()  # before the buffers can be freed or read
        got = bytes(to_host(d_dst)[:word])
        if got != src[word : 2 * word].tobytes():
            raise RuntimeError(f"the {word}-byte gather kernel moved the wrong bytes: {got!r}")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether a ``cupy.cuda.runtime.CUDARuntimeError`` is cudaErrorMemoryAllocation."""
    status = getattr(e, "status", None)
    try:
        return int(status) == CUDA_ERROR_MEMORY_ALLOCATION
    except (TypeError, ValueError):  # no status at all: not ours to translate
        return False


def _bounds(dst_size: int, dst_off: int, src_size: int, src_off: int, n: int) -> None:
    # Raw pointers are not checked by CUDA: an offset bug would write past a
    # buffer silently. Checking costs nanoseconds next to a copy.
    if min(dst_off, src_off, n) < 0 or dst_off + n > dst_size or src_off + n > src_size:
        raise ValueError(
            f"copy of {n} bytes from offset {src_off} of a {src_size}-byte buffer "
            f"to offset {dst_off} of a {dst_size}-byte buffer is out of bounds"
        )


def _bounds_2d(
    dst_size: int, dst_off: int, dst_pitch: int, src_size: int, src_off: int,
    src_pitch: int, width: int, height: int,
) -> None:  # fmt: skip
    if height < 1 or dst_pitch < width or src_pitch < width:
        raise ValueError(f"2-D copy of {height} rows of {width} bytes has a pitch below the width")
    _bounds(
        dst_size,
        dst_off + (height - 1) * dst_pitch,
        src_size,
        src_off + (height - 1) * src_pitch,
        width,
    )
