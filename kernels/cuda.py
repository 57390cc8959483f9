"""Launching the CUDA gather (:mod:`gpuload.kernels.gather_kernel`): width
groups, piece tables uploaded through pinned memory, per-stream workspaces.

A gather splits its table by element width (``layout.width_groups``) and
launches one kernel per group on the caller's stream; the tables go up
through pinned host buffers so the upload never blocks the reader thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
from numba import cuda

from .gather_kernel import _DTYPES, _SIM, _kernel, variants
from .host import DST_OFF, SRC_OFF, _check
from .layout import WCOLS, widest_word, width_groups, word_table

__all__ = [
    "DEFAULT_LAUNCH",
    "Launch",
    "compiler_problem",
    "gather",
    "pinned_table_bytes",
    "release_stream",
    "variants",
    "word_size",
    "workspace_bytes",
]


@dataclass(frozen=True)
class Launch:
    """Launch shape of the gather kernel; the defaults suit real GPUs.

    ``threads`` per block: up to 1024, a multiple of 32 or part of a warp
    idles. ``tile_words``: words per tile, 16 per thread by default (32 KiB of
    uint64). The grid is ``clamp(n_tiles, min_blocks, max_blocks)`` blocks;
    ``min_blocks`` is 128 because Numba warns about any smaller grid (an error
    under ``filterwarnings=error``), and surplus blocks find no tile and exit
    at once. The simulator tests use tiny shapes, so that KiB buffers cross
    tile, row and grid-stride boundaries and Python threads stay few.
    """

    threads: int = 256
    tile_words: int = 4096
    min_blocks: int = 128
    max_blocks: int = 16384

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= 1024:
            raise ValueError(f"threads={self.threads} must be in 1..1024")
        if self.tile_words < 1:
            raise ValueError(f"tile_words={self.tile_words} must be positive")
        if not 1 <= self.min_blocks <= self.max_blocks:
            raise ValueError(f"need 1 <= {self.min_blocks=} <= {self.max_blocks=}")


_workspaces: dict[tuple[int, ...], Any] = {}
# Table buffers a stream outgrew, each with the event recorded on the stream
# behind the last launch that may read it: (event, buffer), freed once passed.
_retired: dict[tuple[int, ...], list[tuple[Any, Any]]] = {}
# Pinned host copies of the tables, per stream: [event, buffer] pairs, the
# event recorded behind the upload that last read the buffer. A pageable
# source would make the H2D of the table synchronous (the driver stages it),
# stalling the reader thread behind its own transfers.
_pinned: dict[tuple[int, ...], list[list[Any]]] = {}
_PINNED_PER_STREAM = 4  # uploads in flight per stream before the oldest is waited for
_lock = threading.Lock()


def compiler_problem(device: int | None = None) -> str | None:
    """Why the kernels cannot run here (no libNVVM; with ``device``, any
    variant that does not compile, link or load on it), or None.

    Checked when a GPU Loader is made, so that a missing compiler fails
    there and not at the first gather, half way through a load's reads.
    The device check (``toolchain.check``) names the versions found and what
    to install; it is cached per process."""
    if _SIM:
        return None
    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        return (
            "Numba finds no libNVVM to compile the gather kernels; fix: pip install "
            "'gpuload[cu13]' (or [cu12]), which brings numba-cuda and NVVM"
        )
    if device is None:
        return None
    from .toolchain import check

    return check(device=device).problem


def _as_device(a: Any, name: str):
    if not getattr(a, "__cuda_ndarray__", False):
        if _SIM or not hasattr(a, "__cuda_array_interface__"):
            raise TypeError(f"{name} must be a device array, got {type(a).__name__}")
        # sync=False: no host wait on the producer's stream; the caller orders with events.
        a = cuda.as_cuda_array(a, sync=False)
    return a


def _extent(a: Any) -> SimpleNamespace:
    # What kernels.host._check reads from an array, so a device array is
    # validated by exactly the rules of the host twin.
    flags = SimpleNamespace(c_contiguous=a.is_c_contiguous())
    return SimpleNamespace(dtype=a.dtype, ndim=a.ndim, size=a.size, flags=flags)


def _pointer(a: Any) -> int:
    if _SIM:
        # The simulator's device memory is the wrapped numpy array, whose
        # address stands in for the device pointer. numpy would let a uint64
        # view start at any byte, so without this the simulator could not show
        # that a slice at an odd offset forces narrow words, as a GPU requires.
        return a.__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


def word_size(src: Any, dst: Any, table: np.ndarray) -> int:
    """The widest element (8, 4, 2 or 1 bytes) common to the whole table and both
    buffers: what every piece could use without a head/tail split. ``gather``
    moves each piece's aligned middle wider (``layout.width_groups``)."""
    return _word(_as_device(src, "src"), _as_device(dst, "dst"), table)


def _word(src: Any, dst: Any, table: np.ndarray) -> int:
    return widest_word(table, _pointer(src), _pointer(dst))


def _as_stream(stream: Any):
    if _SIM:
        return stream or 0  # simulated launches run to completion before returning
    from numba.cuda.cudadrv.driver import Stream

    if stream is None or (isinstance(stream, int) and stream == 0):
        return cuda.default_stream()
    if isinstance(stream, Stream):
        return stream
    return cuda.external_stream(_handle(stream))


def _handle(stream: Any) -> int:
    """The raw handle of a stream ``gather`` accepts (or of ``_as_stream``'s
    result), read without a CUDA call, so no context is made current."""
    if stream is None:
        return 0
    if isinstance(stream, int):
        return stream
    if not _SIM:
        from numba.cuda.cudadrv.driver import Stream

        if isinstance(stream, Stream):
            # numba-cuda 0.30 returns an int *subclass* (a CUstream_flags
            # member) for the default stream, which int() warns about.
            return int(stream.__int__())
    proto = getattr(stream, "__cuda_stream__", None)  # CUDA stream protocol: (version, handle)
    if proto is not None:
        return int((proto() if callable(proto) else proto)[1])
    for attr in ("ptr", "cuda_stream"):  # cupy.cuda.Stream, torch.cuda.Stream
        handle = getattr(stream, attr, None)
        if isinstance(handle, int):
            return handle
    if _SIM:
        return id(stream)  # the simulator's streams have no handle: identity stands in
    raise TypeError(f"stream must be 0, a CUDA stream or its handle, got {type(stream).__name__}")


class _Passed:
    """The simulator's stand-in event: simulated launches finish before
    ``gather`` returns, so the stream has always passed it."""

    def record(self, stream: Any = 0) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def _event():
    """An event to record on a stream (tests substitute one they control)."""
    if _SIM:
        return _Passed()  # the simulator's cuda.event() has no query()
    return cuda.event(timing=False)


def _staging_event():
    """The event behind a pinned table's upload (tests substitute one they control)."""
    if _SIM:
        return _Passed()
    return cuda.event(timing=False)


def _pinned_copy(key: tuple[int, ...], pieces: np.ndarray) -> tuple[list[Any], np.ndarray]:
    """A pinned buffer of ``key`` that no queued upload still reads, holding ``pieces``."""
    ring = _pinned.setdefault(key, [])
    entry = next((e for e in ring if e[1].size >= pieces.size and e[0].query()), None)
    if entry is None:
        if len(ring) >= _PINNED_PER_STREAM:  # bounded: wait for the oldest, then reuse it
            entry = ring.pop(0)
            entry[0].synchronize()
            ring.append(entry)
            if entry[1].size < pieces.size:
                entry[1] = cuda.pinned_array(_table_size(pieces.size, entry[1].size), np.int64)
        else:
            size = _table_size(pieces.size, max((e[1].size for e in ring), default=0))
            entry = [_staging_event(), cuda.pinned_array(size, np.int64)]
            ring.append(entry)
    host = entry[1][: pieces.size]
    host[:] = pieces
    return entry, host


def _table_size(need: int, had: int) -> int:
    return max(need, 2 * had, 64 * WCOLS)


def _reap(key: tuple[int, ...]) -> None:
    """Free the retired table buffers of ``key`` whose stream has passed them."""
    retired = _retired.get(key)
    if retired:
        retired[:] = [(ev, buf) for ev, buf in retired if not ev.query()]
        if not retired:
            _retired.pop(key, None)


def _upload(pieces: np.ndarray, stream: Any):
    """Copy the word table to a device buffer owned by (device, stream)."""
    # A buffer per stream, reused: the copy is queued behind the previous
    # launch on the same stream, so it cannot overwrite a table still in use,
    # and no per-launch allocation means no deferred cuMemFree, which would
    # synchronize the device every few launches. ``release_stream`` frees it.
    if _SIM:
        key: tuple[int, ...] = (0, _handle(stream))  # one simulated device
    else:
        key = (cuda.get_current_device().id, _handle(stream))
        if key[1] == 2:  # CU_STREAM_PER_THREAD: one handle, a stream per host thread
            key += (threading.get_ident(),)
    _reap(key)
    buf = _workspaces.get(key)
    if buf is None or buf.size < pieces.size:
        if buf is not None:
            # Launches queued earlier on this stream may still read the old
            # table: it is freed only once the stream passes this event, and
            # not by chance when a deferred free happens to synchronize.
            ev = _event()
            ev.record(stream=stream)
            _retired.setdefault(key, []).append((ev, buf))
        # Doubling keeps regrowth (and retired buffers) rare.
        size = _table_size(pieces.size, buf.size if buf is not None else 0)
        buf = _workspaces[key] = cuda.device_array(size, dtype=np.int64)
    view = buf[: pieces.size]
    entry, host = _pinned_copy(key, pieces)
    view.copy_to_device(host, stream=stream)
    entry[0].record(stream=stream)  # the pinned buffer is free once the stream passes this
    return view


def release_stream(stream: Any) -> None:
    """Free the device buffers that ``gather`` keeps for the piece tables of ``stream``.

    Call it once the stream's work is done and before the stream is
    destroyed; otherwise the buffer lives as long as the process. ``stream``
    is anything ``gather`` accepts. A stream that never ran a gather is a
    no-op, and a later gather on the same stream allocates afresh.

    Notes
    -----
    The buffer is found by the stream's handle alone, without a CUDA call;
    buffers retired when the table outgrew them are freed after waiting for
    the event recorded behind their last use (already passed when the
    stream's work is done). Numba frees them through its deferred
    deallocation, which may flush pending frees on this thread, so call it
    with the stream's device current. Releasing the per-thread default stream
    (handle 2) frees every thread's buffer for it.
    """
    handle = _handle(stream)
    for key in [k for k in list(_workspaces) if k[1] == handle]:
        _workspaces.pop(key, None)
    for key in [k for k in list(_retired) if k[1] == handle]:
        for ev, _buf in _retired.pop(key, ()):
            ev.synchronize()  # no launch may still read it
    for key in [k for k in list(_pinned) if k[1] == handle]:
        for ev, _buf in _pinned.pop(key, ()):
            ev.synchronize()  # no upload may still read it


def pinned_table_bytes() -> int:
    """Pinned host bytes held for piece tables, over all streams (see ``release_stream``)."""
    return sum(buf.nbytes for ring in list(_pinned.values()) for _ev, buf in list(ring))


def workspace_bytes() -> int:
    """Device bytes held for piece tables, over all streams (see ``release_stream``)."""
    held = [buf.nbytes for buf in list(_workspaces.values())]
    held += [buf.nbytes for bufs in list(_retired.values()) for _ev, buf in list(bufs)]
    return sum(held)


DEFAULT_LAUNCH = Launch()


def gather(
    src: Any, dst: Any, table: np.ndarray, *, stream: Any = 0, launch: Launch = DEFAULT_LAUNCH
) -> None:
    """Copy every piece of ``table`` from device buffer ``src`` into ``dst``, in one launch.

    Parameters
    ----------
    src, dst : device array
        Contiguous 1-D uint8 device arrays: Numba device arrays or any object
        with ``__cuda_array_interface__`` (cupy, torch).
    table : (n, 6) integer numpy array
        Piece table in bytes, host memory (see ``gpuload.kernels``).
    stream : optional
        0 (default stream), a Numba stream, a raw ``CUstream`` handle, or an
        object exposing one (``__cuda_stream__``, cupy ``.ptr``, torch
        ``.cuda_stream``). The table copy and the launch are queued on it.
    launch : Launch
        Launch shape; the default suits real GPUs.

    Raises
    ------
    ValueError
        Bad table shape, negative entries, a piece past the end of ``src`` or
        ``dst``, or a buffer that is not contiguous 1-D uint8 -- all checked on
        the host before anything is queued, with the host twin's rules.

    Notes
    -----
    Asynchronous: returns once the work is queued, without synchronizing;
    order later work with an event on ``stream``. Pieces that move no bytes,
    and an empty table, queue nothing. The element width is the widest of 8, 4,
    2 and 1 bytes that divides every offset, row length and stride in the
    table and both buffers' base pointers (``word_size``); byte-aligned tables
    work, at a lower bandwidth. Pieces must not overlap in ``dst``, nor ``dst``
    overlap ``src``: threads write in no set order.
    """
    src, dst = _as_device(src, "src"), _as_device(dst, "dst")
    table = np.asarray(table)
    _check(table, _extent(src), _extent(dst))
    s = None
    src_base, dst_base = _pointer(src), _pointer(dst)
    for word, part in width_groups(table, src_base, dst_base):
        # The views start at the first word-aligned byte of each buffer; the
        # part's offsets are aligned there (width_groups), so shift them.
        so, do = -src_base % word, -dst_base % word
        part = part.copy()
        part[:, SRC_OFF] -= so
        part[:, DST_OFF] -= do
        pieces, n_tiles = word_table(part, word, launch.tile_words)
        if n_tiles == 0:
            continue
        dtype = _DTYPES[word]
        src_w = src[so : so + (src.size - so) // word * word].view(dtype)
        dst_w = dst[do : do + (dst.size - do) // word * word].view(dtype)
        s = _as_stream(stream) if s is None else s
        kernel = _kernel(word)
        blocks = min(max(n_tiles, launch.min_blocks), launch.max_blocks)
        table_d = _upload(pieces, s)
        kernel[blocks, launch.threads, s](src_w, dst_w, table_d, n_tiles, launch.tile_words)
