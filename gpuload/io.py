"""Readers: bytes from checkpoint files into caller-provided buffers.

``PosixReader`` uses ``os.preadv`` (one syscall scatters a file range into
several destination buffers), loops on short reads, and treats a short read
at end of file as an error: a checkpoint never legitimately ends early.
Readers never touch CUDA streams: the pipeline owns ordering.

Each file is checked against the identity (device, inode, size, mtime) its
header was parsed with, at open and again at close: a file replaced or
rewritten during a load raises :class:`~gpuload.errors.ReadError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .checkpoint import FileHeader
from .errors import ReadError

IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)


_libc: ctypes.CDLL | None = None


def _preadv_raw(fd: int, iov: np.ndarray, offset: int) -> int:
    """One ``preadv(2)`` into ``iov``, an ``(n, 2)`` uint64 array laid out as
    ``struct iovec`` (address, length); bytes read, or OSError. ctypes drops
    the GIL for the call, so reader threads read in parallel."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
        lib.preadv.restype = ctypes.c_ssize_t
        _libc = lib
    n = _libc.preadv(fd, iov.ctypes.data, len(iov), offset)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(n)


def _read_some(
    preadv: Callable[[int, Any, int], int], fd: int, iov: Any, file: str, pos: int, want: int
) -> int:
    """One ``preadv(fd, iov, pos)`` of up to ``want`` bytes, retried on EINTR:
    the bytes read, never 0. A failed read or end of file raises ReadError.
    The loops of :meth:`PosixReader.readinto` (buffers) and
    :meth:`PosixReader.readinto_iov` (raw iovecs) share it; each advances its
    own entries past a short read."""
    while True:
        try:
            got = preadv(fd, iov, pos)
        except OSError as e:
            if e.errno == errno.EINTR:  # PEP 475 retries, but be explicit
                continue
            raise ReadError(f"{file}: read of {want} bytes at {pos} failed: {e.strerror}") from e
        if got == 0:
            raise ReadError(
                f"{file}: unexpected end of file at offset {pos} "
                f"({want} bytes still to read); was the file truncated?"
            )
        return got


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class PosixReader:
    """pread(v)-based reader over the files of one checkpoint.

    Parameters
    ----------
    headers
        The parsed files; their identities are checked at open and close.
    prefetch
        Issue ``posix_fadvise(WILLNEED)`` for ranges announced with
        :meth:`advise` (``GPULOAD_PREFETCH=0`` turns it off).
    """

    name = "posix"

    def __init__(self, headers: Sequence[FileHeader], *, prefetch: bool = True) -> None:
        self._headers = {h.path: h for h in headers}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.prefetch = prefetch

    def fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            return fd
        with self._lock:  # open each file once, even when threads race here
            fd = self._fds.get(file)
            if fd is None:
                if self._closed:  # never reopen behind close(): that fd would leak
                    raise ReadError(f"{file}: the reader is closed")
                try:
                    # O_NONBLOCK: a file replaced by a FIFO since its header
                    # was parsed must fail the identity check, not block here.
                    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
                    fd = os.open(file, flags)
                except OSError as e:
                    raise ReadError(f"{file}: cannot open: {e.strerror}") from e
                self._check(file, os.fstat(fd), fd)
                os.set_blocking(fd, True)  # a regular file: plain blocking reads
                self._fds[file] = fd
            return fd

    def _check(self, file: str, st: os.stat_result, fd: int | None = None) -> None:
        want = self._headers[file].identity
        if want != (0, 0, 0, 0) and _identity(st) != want:
            if fd is not None:
                os.close(fd)
            raise ReadError(
                f"{file}: file changed since its header was read "
                f"(inode/size/mtime {want[1:]} -> {_identity(st)[1:]})"
            )

    def advise(self, file: str, offset: int, length: int) -> None:
        """Hint that ``[offset, offset+length)`` is read soon (best effort)."""
        if self.prefetch and hasattr(os, "posix_fadvise"):
            # A hint: some filesystems refuse it, and reads work regardless.
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd(file), offset, length, os.POSIX_FADV_WILLNEED)

    def readinto(self, file: str, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` in order from the file range starting at ``offset``."""
        fd = self.fd(file)
        bufs = [b for b in buffers if len(b)]
        pos = offset
        while bufs:
            batch = bufs[:IOV_MAX]
            want = sum(len(b) for b in batch)
            got = _read_some(os.preadv, fd, batch, file, pos, want)
            pos += got
            # Drop the buffers that are full; trim the one a short read split.
            while got and bufs:
                if got >= len(bufs[0]):
                    got -= len(bufs[0])
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][got:]
                    got = 0

    def readinto_iov(self, file: str, offset: int, iov: np.ndarray) -> None:
        """Fill raw memory from the file range starting at ``offset``, as
        :meth:`readinto` fills buffers: ``iov`` is an ``(n, 2)`` uint64 array
        of ``(address, length)`` pairs (``struct iovec``), filled in order.

        The caller guarantees every range is writable memory it owns for the
        whole call (the host pipeline checks each against its buffer). Built
        with numpy, a covering read scatters thousands of rows per syscall
        without a Python object per row."""
        fd = self.fd(file)
        work = np.asarray(iov, dtype=np.uint64).reshape(-1, 2)
        work = work[work[:, 1] > 0]  # a fresh C-contiguous copy: trimmed below, never iov
        i, pos = 0, offset
        while i < len(work):
            batch = work[i : i + IOV_MAX]
            want = int(batch[:, 1].sum())
            got = _read_some(_preadv_raw, fd, batch, file, pos, want)
            pos += got
            # Skip the entries that are full; trim the one a short read split.
            ends = np.cumsum(batch[:, 1], dtype=np.uint64)
            full = int(np.searchsorted(ends, got, side="right"))
            done = got - (int(ends[full - 1]) if full else 0)
            i += full
            if done:
                work[i, 0] += np.uint64(done)
                work[i, 1] -= np.uint64(done)

    def close(self) -> None:
        """Close every file; raise if one changed while it was being read."""
        with self._lock:
            fds, self._fds, self._closed = self._fds, {}, True
        changed = None
        for file, fd in fds.items():
            try:
                self._check(file, os.stat(file))
            except (ReadError, OSError) as e:
                changed = changed or e
            finally:
                os.close(fd)
        if changed is not None:
            raise changed if isinstance(changed, ReadError) else ReadError(str(changed))

    def __enter__(self) -> PosixReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
