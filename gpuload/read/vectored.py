"""Vectored syscalls through ctypes: ``preadv(2)`` and ``process_vm_readv(2)``
over ``struct iovec`` arrays, and the short-transfer bookkeeping they share.

:class:`~gpuload.read.posix.PosixReader` reads and copies with them;
:func:`gpuload.host.populate.populate` faults pages in with
``process_vm_readv``. ctypes drops the GIL for each call, so threads run
them in parallel.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gpuload.errors import ReadError

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


def _vm_readv_raw(local: np.ndarray, remote: np.ndarray) -> int:
    """One ``process_vm_readv(2)`` on this process: copy the ``remote``
    ranges (addresses in this process, here a file mapping) into the
    ``local`` ones, both ``(n, 2)`` uint64 ``struct iovec`` arrays. Bytes
    copied, or OSError (EFAULT: a remote page could not be faulted in)."""
    n = _vm_lib().process_vm_readv(
        os.getpid(), local.ctypes.data, len(local), remote.ctypes.data, len(remote), 0
    )
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(n)


@functools.cache
def _vm_lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    f = lib.process_vm_readv
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong]
    f.argtypes += [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    f.restype = ctypes.c_ssize_t
    return lib


def _advance(iovs: Sequence[np.ndarray], i: int, k: int, got: int) -> int:
    """After a call that moved ``got`` bytes through entries ``i:k`` of the
    ``(n, 2)`` iovec arrays ``iovs`` (kept in step): the first entry not
    yet full. A short call's split entry is trimmed in place in each array."""
    ends = np.cumsum(iovs[0][i:k, 1], dtype=np.uint64)
    full = int(np.searchsorted(ends, got, side="right"))
    done = got - (int(ends[full - 1]) if full else 0)
    i += full
    if done:
        for iov in iovs:
            iov[i, 0] += np.uint64(done)
            iov[i, 1] -= np.uint64(done)
    return i


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
