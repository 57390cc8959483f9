"""Faulting in mapped file pages without SIGBUS, and the identity check
that follows: what :mod:`gpuload.host.resident` (``cpu_resident``) and
:mod:`gpuload.host.prefault` (``prefault``) run over the checkpoint's mappings.

A load instruction on a mapped page the kernel cannot read (the file was
truncated under the mapping, or the storage answers EIO) raises SIGBUS, which
kills the process. These calls fault pages in through the kernel instead,
which reports such a page as an error.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable

import numpy as np

from gpuload.errors import ReadError
from gpuload.format.checkpoint import Checkpoint
from gpuload.memory import mapping
from gpuload.read import vectored as _io

__all__ = ["MADV_POPULATE_READ", "check_unchanged", "populate"]

_log = logging.getLogger(__name__)

PAGE = mapping.PAGE
MADV_POPULATE_READ = 22  # <asm-generic/mman-common.h>; not in Python's mmap before 3.13


def populate(m: mapping.Mapping, s: int, e: int) -> None:
    """Fault ``[s, e)`` of ``m`` (``s`` page-aligned) into the page cache and
    this process's page tables, or raise :class:`ReadError`: never a load
    instruction, which dies of SIGBUS where a page cannot be read (the file
    was truncated under the mapping, or the disk answers EIO).

    ``madvise(MADV_POPULATE_READ)`` (Linux 5.14+) reports such a page as
    EFAULT (EHWPOISON for poisoned memory). Where it is missing (EINVAL),
    ``process_vm_readv`` of one byte per page from the mapping faults the
    pages in through the kernel (get_user_pages), which reports failure the
    same way. Where both are refused (seccomp), nothing is touched: the
    pages fault on first use, after the call."""
    while True:
        err = m.madvise(s, e, MADV_POPULATE_READ)
        if err in (errno.EINTR, errno.EAGAIN):
            continue
        break
    if err == 0:
        return
    if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        raise _unreadable(m, s, e, os.strerror(err))
    _touch_via_kernel(m, s, e)


def _unreadable(m: mapping.Mapping, s: int, e: int, why: str) -> ReadError:
    return ReadError(
        f"{m.path}: bytes {s}..{e} of its mapping cannot be read ({why}): "
        "the file was truncated or changed under the load, or the storage failed"
    )


def _touch_via_kernel(m: mapping.Mapping, s: int, e: int) -> None:
    pages = np.arange(m.addr + s, m.addr + e, PAGE, dtype=np.uint64)
    scratch = np.empty(min(len(pages), _io.IOV_MAX), np.uint8)
    for i in range(0, len(pages), _io.IOV_MAX):
        chunk = pages[i : i + _io.IOV_MAX]
        remote = np.empty((len(chunk), 2), np.uint64)
        remote[:, 0], remote[:, 1] = chunk, 1
        local = np.array([[scratch.ctypes.data, len(chunk)]], np.uint64)
        try:
            got = _io._vm_readv_raw(local, remote)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOSYS, errno.EACCES):
                _log.info("%s: cannot populate its mapping here (%s)", m.path, exc.strerror)
                return
            raise _unreadable(m, s, e, exc.strerror) from None
        if got < len(chunk):  # a page past the first failed: the rest is unread
            at = s + (i + got) * PAGE
            raise _unreadable(m, at, min(e, at + PAGE), "the page could not be faulted in")


def check_unchanged(checkpoint: Checkpoint, files: Iterable[str]) -> None:
    """Raise :class:`ReadError` unless every file in ``files`` still has the
    identity (device, inode, size, mtime) its header was parsed with: run
    after the last mapped page is populated, so a load over a mapping either
    returns over an unchanged file or raises.

    A remote checkpoint has no file to stat: its reader makes every ranged
    GET conditional on the ETag recorded at the header probe instead."""
    if checkpoint.source is not None:
        return
    headers = {h.path: h for h in checkpoint.files}
    for f in sorted(set(files)):
        want = headers[f].identity
        if want == (0, 0, 0, 0):
            continue
        try:
            st = os.stat(f)
        except OSError as e:
            raise ReadError(f"{f}: file changed under the load ({e.strerror})") from None
        now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if now != want:
            raise ReadError(
                f"{f}: file changed under the load (inode/size/mtime {want[1:]} -> {now[1:]})"
            )
