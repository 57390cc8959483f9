"""A fake, asynchronous CUDA runtime, so the device pipeline runs on the CPU.

It implements ``gpuload.cuda.slots.Runtime`` with the semantics that
matter for ordering, and none of CUDA:

* device memory is numpy bytes behind an opaque handle (``FakeDeviceBuffer``)
  that only the runtime's streams read or write, filled with random bytes
  when allocated, so an unwritten byte shows;
* each stream is a worker thread running its queue in order, sleeping a
  random while before work items, so host code that does not wait for a
  stream reads or overwrites memory the stream has not used yet -- the
  races of a real GPU, made likely;
* an H2D copy reads the host buffer when the stream *runs* it, not when it
  is queued (as a DMA from pinned memory does);
* events complete when their stream reaches them; waiting on one never
  recorded returns at once; errors in queued work are sticky and raised by
  the next wait, as CUDA reports asynchronous errors;
* a gather is ``kernels.gather_host`` run on the stream;
* pinned host memory is mapped, as ``cudaHostAllocMapped`` makes it:
  ``device_view`` returns a device buffer over the *same* bytes (a zero-copy
  gather reads them when its stream runs it), and refuses pageable memory
  or anything this runtime did not allocate pinned, as
  ``cudaPointerGetAttributes`` finds no device pointer for it.

``FakeKvikio`` stands in for the kvikio module: ``CuFile.pread`` fills fake
device memory from a thread, outside any stream, and rejects reads that are
not page aligned. Like kvikio 26, it is a package whose ``defaults``
submodule is an attribute only once imported (``import kvikio`` does not
import it). Neither imports cupy or numba.cuda.
"""

from __future__ import annotations

import collections
import importlib.abc
import importlib.util
import itertools
import os
import queue
import random
import sys
import threading
import time
import types
import weakref
from typing import Any

import numpy as np

from gpuload.cuda.memory import MIN_BLOCK, MIN_LARGE_ALLOC, ROUND_LARGE, raw_bytes
from gpuload.host.outputs import to_cupy, to_numpy, to_torch
from gpuload.kernels.host import _check, gather_host

PAGE = 4096


class FakeOutOfMemory(MemoryError):
    pass


class FakeDeviceBuffer:
    """Device bytes; ``buf[:n]`` is a view (for kvikio), like a cupy slice."""

    def __init__(self, array: np.ndarray, owner: FakeDeviceBuffer | None = None) -> None:
        self.array = array
        self._owner = owner  # a view keeps its allocation alive

    @property
    def size(self) -> int:
        return self.array.size

    nbytes = size

    def __getitem__(self, key: slice) -> FakeDeviceBuffer:
        if not isinstance(key, slice):
            raise TypeError("fake device buffers slice only")
        return FakeDeviceBuffer(self.array[key], self._owner or self)


class _Mark:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.time = 0.0


class FakeEvent:
    def __init__(self) -> None:
        self.mark: _Mark | None = None
        self.stream: FakeStream | None = None


class FakeStream:
    def __init__(self, max_delay: float, p_delay: float, seed: int) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._rng = random.Random(seed)
        self.max_delay, self.p_delay = max_delay, p_delay
        self.error: BaseException | None = None
        self.pending = 0
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="fake-stream")
        self.thread.start()

    def put(self, fn, *, marker: bool = False) -> None:
        with self._lock:
            self.pending += 1
        self._q.put((fn, marker))

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, marker = item
            try:
                if not marker and self._rng.random() < self.p_delay:
                    time.sleep(self._rng.uniform(0, self.max_delay))
                if marker or self.error is None:  # sticky: work after an error is skipped
                    fn()
            except BaseException as e:  # reported by the next wait, like CUDA
                self.error = self.error or e
            finally:
                with self._lock:
                    self.pending -= 1

    def close(self) -> None:
        self._q.put(None)
        self.thread.join(timeout=30)


class FakeRuntime:
    """See the module docstring. ``total`` bytes of device memory."""

    def __init__(
        self,
        *,
        total: int = 1 << 30,
        max_delay: float = 0.0005,
        p_delay: float = 0.3,
        seed: int = 0,
        kvikio: Any = None,
    ) -> None:
        self.total = total
        self.max_delay, self.p_delay = max_delay, p_delay
        self._seed = seed
        self._kvikio = kvikio
        self._lock = threading.Lock()
        self._allocated = self.peak = 0  # live device bytes, and their high-water mark
        self.host_peak = 0
        self.device_allocs: list[int] = []  # raw cudaMalloc sizes
        self.torch_allocs: list[int] = []  # results from torch's caching allocator
        self.host_allocs: list[tuple[int, bool]] = []
        self._host_live = 0  # live staging bytes
        # Frees from finalizers, settled under the lock by the next reader.
        # A finalizer can run inside any allocation (the cyclic GC), also one
        # made while this thread holds the lock: taking it there deadlocks.
        self._freed: collections.deque[tuple[int, bool]] = collections.deque()
        self.streams: list[FakeStream] = []
        self.bound_threads: set[int] = set()
        self.gathers = 0
        self._rng = np.random.default_rng(seed)
        self._mapped: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        self.device_views = 0
        self.copies_1d = self.copies_2d = 0  # async H2D copies queued, by kind

    # -- memory ------------------------------------------------------------

    def _free(self, n: int, host: bool = False) -> None:
        self._freed.append((n, host))  # no lock: see __init__

    def _settle(self) -> None:
        """Apply the frees finalizers queued (the caller holds the lock)."""
        while self._freed:
            n, host = self._freed.popleft()
            if host:
                self._host_live -= n
            else:
                self._allocated -= n

    @property
    def allocated(self) -> int:
        with self._lock:
            self._settle()
            return self._allocated

    @property
    def host_live(self) -> int:
        with self._lock:
            self._settle()
            return self._host_live

    def device_alloc(self, nbytes: int) -> FakeDeviceBuffer:
        return self._alloc(nbytes, raw_bytes(nbytes))  # cudaMalloc rounds

    def _alloc(self, nbytes: int, taken: int) -> FakeDeviceBuffer:
        # ``taken``: what the allocation costs the device.
        with self._lock:
            self._settle()
            if self._allocated + taken > self.total:
                raise FakeOutOfMemory(f"fake device: {nbytes} bytes do not fit")
            self._allocated += taken
            self.device_allocs.append(nbytes)
            self.peak = max(self.peak, self._allocated)
            seed = int(self._rng.integers(1 << 63))
        garbage = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
        # Freed when the bytes die: results handed out are views of them.
        weakref.finalize(garbage, self._free, taken)
        return FakeDeviceBuffer(garbage)

    def torch_alloc(self, nbytes: int) -> FakeDeviceBuffer:
        """Through torch's caching allocator: each block charged as torch rounds
        it (512 bytes; 2 MiB from 10 MiB up), counted apart from cudaMallocs.
        Segment sharing is not modelled: a freed block is free at once."""
        self.torch_allocs.append(nbytes)
        big = nbytes >= MIN_LARGE_ALLOC
        taken = -(-nbytes // (ROUND_LARGE if big else MIN_BLOCK)) * (
            ROUND_LARGE if big else MIN_BLOCK
        )
        buf = self._alloc(nbytes, taken)
        self.device_allocs.pop()
        return buf

    def host_alloc(self, nbytes: int, *, pinned: bool) -> np.ndarray:
        a = np.empty(nbytes, np.uint8)
        with self._lock:
            self._settle()
            self.host_allocs.append((nbytes, pinned))
            self._host_live += nbytes
            self.host_peak = max(self.host_peak, self._host_live)
        weakref.finalize(a, self._free, nbytes, True)
        if pinned:
            self._mapped[id(a)] = a
        return a

    def device_view(self, host: np.ndarray) -> FakeDeviceBuffer:
        # CUDA maps a pointer anywhere inside a mapped allocation, so a view
        # of one is fine; memory that never came from host_alloc(pinned) is not.
        root = host
        while isinstance(root.base, np.ndarray):
            root = root.base
        if self._mapped.get(id(root)) is not root:
            raise ValueError("fake CUDA: host buffer is not mapped pinned memory")
        self.device_views += 1
        return FakeDeviceBuffer(host)  # no copy: device reads see the host bytes

    def mem_info(self) -> tuple[int, int]:
        with self._lock:
            self._settle()
            return self.total - self._allocated, self.total

    def release_cached(self) -> None:
        pass

    # -- streams and events ------------------------------------------------

    def bind_thread(self) -> None:
        self.bound_threads.add(threading.get_ident())

    def stream(self) -> FakeStream:
        s = FakeStream(self.max_delay, self.p_delay, self._seed * 1000 + len(self.streams))
        self.streams.append(s)
        return s

    def destroy_stream(self, stream: FakeStream) -> None:
        stream.close()
        self.streams.remove(stream)

    def event(self, *, timing: bool) -> FakeEvent:
        return FakeEvent()

    def record(self, event: FakeEvent, stream: FakeStream) -> None:
        mark = _Mark()
        event.mark, event.stream = mark, stream

        def reach() -> None:
            mark.time = time.perf_counter()
            mark.done.set()

        stream.put(reach, marker=True)

    def wait(self, event: FakeEvent) -> None:
        if event.mark is None:
            return
        if not event.mark.done.wait(timeout=60):
            raise TimeoutError("fake event never completed")
        if event.stream.error is not None:
            raise RuntimeError(f"fake CUDA error: {event.stream.error!r}")

    def query(self, event: FakeEvent) -> bool:
        return event.mark is None or event.mark.done.is_set()

    def elapsed(self, start: FakeEvent, end: FakeEvent) -> float:
        assert start.mark.done.is_set() and end.mark.done.is_set(), "timing an event not reached"
        return end.mark.time - start.mark.time

    def busy(self) -> bool:
        return any(s.pending for s in self.streams)

    # -- work --------------------------------------------------------------

    def h2d(self, dst, dst_off: int, src: np.ndarray, src_off: int, n: int, stream) -> None:
        assert isinstance(dst, FakeDeviceBuffer) and isinstance(src, np.ndarray)
        _bounds(dst.size, dst_off, src.size, src_off, n)
        self.copies_1d += 1
        d, s = dst.array, src  # read at run time, as a DMA from pinned memory does

        def copy() -> None:
            d[dst_off : dst_off + n] = s[src_off : src_off + n]

        stream.put(copy)

    def h2d_2d(
        self, dst, dst_off, dst_pitch, src: np.ndarray, src_off, src_pitch, width, height, stream
    ) -> None:
        assert isinstance(dst, FakeDeviceBuffer) and isinstance(src, np.ndarray)
        if height < 1 or dst_pitch < width or src_pitch < width:
            raise ValueError("fake CUDA: cudaMemcpy2D pitch below the width")
        _bounds(dst.size, dst_off + (height - 1) * dst_pitch, src.size,
                src_off + (height - 1) * src_pitch, width)  # fmt: skip
        self.copies_2d += 1
        d, s = dst.array, src

        def copy() -> None:  # one DMA of ``height`` rows, run late like the others
            for r in range(height):
                a, b = dst_off + r * dst_pitch, src_off + r * src_pitch
                d[a : a + width] = s[b : b + width]

        stream.put(copy)

    def d2d(self, dst, dst_off: int, src, src_off: int, n: int, stream) -> None:
        assert isinstance(dst, FakeDeviceBuffer) and isinstance(src, FakeDeviceBuffer)
        _bounds(dst.size, dst_off, src.size, src_off, n)
        d, s = dst.array, src.array

        def copy() -> None:
            d[dst_off : dst_off + n] = s[src_off : src_off + n]

        stream.put(copy)

    def gather(self, src, dst, table: np.ndarray, stream) -> None:
        assert isinstance(dst, FakeDeviceBuffer) and isinstance(src, FakeDeviceBuffer)
        _check(table, src.array, dst.array)  # raised at launch, as the real wrapper does
        t = table.copy()  # the real launch uploads the table when queued
        self.gathers += 1
        stream.put(lambda: gather_host(src.array, dst.array, t))

    # -- results -----------------------------------------------------------

    def to_framework(self, buf: FakeDeviceBuffer, tensor, framework: str):
        if self.busy():
            raise AssertionError("results read on the host while a stream still has work queued")
        if framework == "torch":
            return to_torch(buf.array, tensor)
        if framework == "cupy":
            return to_cupy(buf.array, tensor, np)  # cupy's dtypes, numpy arrays
        return to_numpy(buf.array, tensor)

    def kvikio(self) -> Any:
        if self._kvikio is None:
            raise ImportError("No module named 'kvikio' (fake runtime)")
        return self._kvikio

    def close(self) -> None:
        for s in list(self.streams):
            self.destroy_stream(s)


def _bounds(dst_size: int, dst_off: int, src_size: int, src_off: int, n: int) -> None:
    if min(dst_off, src_off, n) < 0 or dst_off + n > dst_size or src_off + n > src_size:
        raise ValueError(
            f"copy of {n} bytes out of bounds ({src_off}/{src_size}->{dst_off}/{dst_size})"
        )


# --------------------------------------------------------------------------
# kvikio


class _Future:
    def __init__(self, thread: threading.Thread, box: list) -> None:
        self._thread, self._box = thread, box

    def get(self) -> int:
        self._thread.join()
        if isinstance(self._box[0], BaseException):
            raise self._box[0]
        return self._box[0]

    def done(self) -> bool:
        return not self._thread.is_alive()


class _CuFile:
    def __init__(self, kv: FakeKvikio, path: str) -> None:
        self._kv = kv
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size

    def pread(self, buf, size=None, file_offset=0, task_size=None) -> _Future:
        if not isinstance(buf, FakeDeviceBuffer):
            raise TypeError("fake kvikio reads into fake device memory only")
        size = buf.size if size is None else size
        end = file_offset + size
        if file_offset % PAGE or (end % PAGE and end != self._size):
            raise ValueError(f"unaligned read {file_offset}+{size}: GDS wants whole pages")
        self._kv.reads.append((file_offset, size))
        box: list = [None]
        rng = random.Random(file_offset)

        def run() -> None:
            try:
                time.sleep(rng.uniform(0, self._kv.max_delay))
                data = os.pread(self._fd, size, file_offset)
                buf.array[: len(data)] = np.frombuffer(data, np.uint8)
                box[0] = len(data)
            except BaseException as e:
                box[0] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return _Future(t, box)

    def close(self) -> None:
        os.close(self._fd)


class _Defaults:
    def __init__(self, compat: bool) -> None:
        self._values = {"num_threads": 1, "compat_mode": compat}

    # kvikio.defaults' own signatures: get(config_name), set(*config) taking
    # (name, value) or one dict of them.
    def get(self, config_name: str):
        return self._values[config_name]

    def set(self, *config) -> None:
        self._values.update(config[0] if len(config) == 1 else [config])

    def is_compat_mode_preferred(self) -> bool:
        return self._values["compat_mode"]


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes fake submodules importable by name, the way Python imports a
    package's submodule: only an import sets ``parent.child``."""

    def __init__(self) -> None:
        self.made: dict[str, types.ModuleType] = {}

    def find_spec(self, name, path=None, target=None):
        if name in self.made:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return self.made[spec.name]

    def exec_module(self, module) -> None:
        pass


_SUBMODULES = _Submodules()
sys.meta_path.append(_SUBMODULES)
_names = itertools.count()


class FakeKvikio(types.ModuleType):
    """A stand-in for the kvikio package (``CuFile``; ``defaults`` once imported).

    Registered in ``sys.modules`` under a name of its own, so that
    ``importlib.import_module(f"{kv.__name__}.defaults")`` works as it does for
    kvikio, and reading ``kv.defaults`` before that import fails as it does
    for kvikio 26.
    """

    __version__ = "fake"

    def __init__(
        self, *, compat: bool = True, max_delay: float = 0.0002, defaults: dict | None = None
    ) -> None:
        super().__init__(f"fake_kvikio_{next(_names)}")
        self.__path__: list[str] = []  # a package: submodules import
        sub = types.ModuleType(f"{self.__name__}.defaults")
        if defaults is None:  # kvikio >= 25.04's get/set; else what the caller gives
            state = _Defaults(compat)
            defaults = {f: getattr(state, f) for f in ("get", "set", "is_compat_mode_preferred")}
        for name, fn in defaults.items():
            setattr(sub, name, fn)
        _SUBMODULES.made[sub.__name__] = sub
        sys.modules[self.__name__] = self
        self.max_delay = max_delay
        self.reads: list[tuple[int, int]] = []

    def CuFile(self, path: str, flags: str = "r") -> _CuFile:  # noqa: N802  (kvikio's name)
        assert flags == "r"
        return _CuFile(self, path)
