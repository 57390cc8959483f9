"""Read-only file mappings and anonymous host buffers that gpuload owns, and
what the kernel says about residency (``mincore``) and free memory.

A :class:`Mapping` is one ``mmap(PROT_READ, MAP_SHARED)`` of a whole file
(or, for torch, a writable ``MAP_PRIVATE`` one: see the class), made with
libc through ctypes so gpuload owns the address and decides when it goes
away. It exposes ``__array_interface__``: ``np.asarray(mapping)`` is a
``uint8`` array whose ``.base`` is the mapping, so every view cut from it
keeps the mapping alive. When the last one dies, a finalizer undoes
the pins (``cudaHostUnregister`` or ``munlock``, made by
:mod:`gpuload.memory.pinning`) and then unmaps: a range must never be
unmapped while the driver still has it registered. A :class:`HostBuffer` is
anonymous memory held the same way: the home of a cpu_resident copy or of a
result, pinned and released like a mapping.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os
import weakref
from collections.abc import Sequence

import numpy as np

from gpuload.errors import ReadError
from gpuload.memory import pool as hostpool
from gpuload.memory.libc import _os_error, libc

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and most arm64 kernels
POOL_STEP = 64 << 10  # size classes of pooled mappings smaller than a huge page
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)  # 14 in <asm-generic/mman-common.h>

Ranges = Sequence[tuple[int, int]]  # (start, end) byte offsets in the mapping


class _Release:
    """What the finalizer undoes. Holds no reference to the Mapping."""

    def __init__(self, addr: int, size: int) -> None:
        self.addr, self.size = addr, size
        self.pool: bool | None = (
            None  # a pooled result mapping: its huge flag (gpuload.memory.pool)
        )
        self.cuda = None  # the cupy runtime module that registered cuda_ptrs
        self.cuda_ptrs: list[int] = []
        self.locked: list[tuple[int, int]] = []

    def unpin(self) -> None:
        # Every piece, even when one refuses (a context torn down at exit):
        # a piece left registered would outlive the munmap that follows.
        ptrs, self.cuda_ptrs = self.cuda_ptrs, []
        for p in ptrs:
            with contextlib.suppress(Exception):
                self.cuda.hostUnregister(p)
        locked, self.locked = self.locked, []
        for a, n in locked:
            libc().munlock(a, n)

    def __call__(self) -> None:
        try:
            self.unpin()  # before munmap: the driver must not keep a dead range
        finally:
            if self.pool is not None:  # faulted in already: kept for the next result
                hostpool.give(self.addr, self.size, self.pool)
            else:
                libc().munmap(self.addr, self.size)


class Mapping:
    """A read-only shared mapping of one whole file, or a private one.

    ``np.asarray(mapping)`` gives a ``uint8`` array of the file's bytes;
    arrays cut from it keep the mapping (and its pins) alive. ``identity``
    (``st_dev, st_ino, st_size, st_mtime_ns``, as in
    :class:`~gpuload.format.header.FileHeader`) guards against a file replaced
    since its header was parsed.

    ``private=True`` maps ``MAP_PRIVATE`` with write permission, for
    frameworks that cannot mark memory read-only (torch): reads share the
    page cache (one copy in RAM), and a write copies only the page it
    touches into this process; the file never changes. Such a mapping is
    never locked itself: ``mlock`` (or a long-term CUDA registration) of a
    writable private mapping breaks copy-on-write up front, copying every
    page. :meth:`pin_target` gives a read-only shared twin of the same file
    to lock instead: locking it keeps the same page-cache pages resident.
    """

    def __init__(
        self,
        path: str,
        identity: tuple[int, int, int, int] | None = None,
        *,
        private: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.private = private
        self._identity = identity
        self._twin: Mapping | None = None
        # O_NONBLOCK: a FIFO swapped in for the file must not hang the open;
        # the identity (a regular file's inode) check below then refuses it.
        fd = -1
        try:  # the open inside: a Ctrl-C right after it must not leak the fd
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(fd)
            now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if identity is not None and identity != (0, 0, 0, 0) and now != identity:
                raise ReadError(f"{self.path}: file changed since its header was parsed")
            if st.st_size == 0:
                raise ReadError(f"{self.path}: cannot map an empty file")
            prot, flags = mmap.PROT_READ, mmap.MAP_SHARED
            if private:
                prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE
            addr = libc().mmap(None, st.st_size, prot, flags, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                raise ReadError(f"{self.path}: {_os_error('mmap')}")
        finally:
            if fd >= 0:
                os.close(fd)  # the mapping keeps the file open
        self.addr, self.size = addr, st.st_size
        self._release = _Release(addr, st.st_size)
        # Not at exit: arrays may outlive this module's teardown, and the OS
        # (and the CUDA driver) reclaim everything when the process ends.
        self._finalizer = weakref.finalize(self, self._release)
        self._finalizer.atexit = False
        self.__array_interface__ = {
            "shape": (st.st_size,),
            "typestr": "|u1",
            # shared: read-only (a write would be SIGSEGV); private: writable
            "data": (addr, not private),
            "version": 3,
        }

    def pin_target(self) -> Mapping:
        """The mapping to pin for this one: itself, or for a private mapping
        a read-only shared twin of the file, kept alive by this mapping."""
        if not self.private:
            return self
        if self._twin is None:
            self._twin = Mapping(self.path, self._identity)
        return self._twin

    @property
    def pinned(self) -> str | None:
        """How the mapping is pinned now: "cuda", "mlock" or None."""
        r = self._release
        return "cuda" if r.cuda_ptrs else "mlock" if r.locked else None

    def madvise(self, start: int, end: int, advice: int) -> int:
        """madvise over [start, end) (start page-aligned); 0 or the errno."""
        ok = libc().madvise(self.addr + start, end - start, advice) == 0
        return 0 if ok else ctypes.get_errno()

    def mincore(self, start: int, end: int) -> int:
        """How many pages of [start, end) are in the page cache."""
        n = (end - start + PAGE - 1) // PAGE
        if n <= 0:
            return 0
        vec = (ctypes.c_ubyte * n)()
        if libc().mincore(self.addr + start, end - start, vec) != 0:
            raise _os_error(f"mincore on {self.path}")
        return int(np.count_nonzero(np.frombuffer(vec, np.uint8, n) & 1))  # bit 0: resident

    def all_resident(self, offset: int, end: int) -> bool:
        """Whether every page of the byte range [offset, end) is in the page cache."""
        start = offset - offset % PAGE
        return self.mincore(start, end) == -(-(end - start) // PAGE)


class HostBuffer:
    """Anonymous, writable memory gpuload maps and owns: the home of a
    cpu_resident *copy* (a fused tensor cut per section cannot be one view of
    the file), so that it is pinned like a :class:`Mapping` (``cudaHostRegister``
    or ``mlock`` of the whole buffer) and, when its last array dies, unpinned
    and then unmapped by the same finalizer.

    ``np.asarray(buffer)`` is a writable ``uint8`` array of ``nbytes``
    starting ``page_offset`` bytes into the mapping (``data``); the mapping
    is ``size`` bytes from ``addr``, whole pages. ``path`` names it in
    messages.
    Its pages are written by the copy, so they are resident already: there
    is nothing to prefault.

    It is also where a CPU load puts a large result (``huge=True``, see
    :func:`gpuload.host.backend.host_result`): aligned to 2 MiB and advised
    ``MADV_HUGEPAGE``, so the reads that fill it fault whole huge pages;
    ``huge`` then says whether the kernel took the advice.
    """

    private = False  # anonymous: no page cache to share, registered as is
    live = 0  # HostBuffers mapped and not yet released: one mapping each

    def __init__(
        self,
        nbytes: int,
        what: str,
        *,
        huge: bool = False,
        page_offset: int = 0,
        pooled: bool = False,
    ) -> None:
        if not 0 <= page_offset < PAGE:
            raise ValueError(f"page_offset {page_offset} is not within a page")
        self.path, self.nbytes = what, nbytes
        size = max(PAGE, -(-(page_offset + nbytes) // PAGE) * PAGE)
        if pooled:  # a size class the pool can hand on: whole huge pages, or
            # 64 KiB steps below one (a few tensor shapes share a class)
            step = HUGE_PAGE if huge else POOL_STEP
            size = -(-size // step) * step
        kept = hostpool.take(size, libc().munmap) if pooled else None
        if kept is not None:
            addr, self.huge = kept  # faulted in by the load it served before
        else:
            addr = _map_anonymous(size, HUGE_PAGE if huge else PAGE, what)
            # Transparent huge pages: one fault (and one TLB entry) per 2 MiB
            # instead of 512. A hint: where THP is off it does nothing, and
            # 4 KiB pages work the same.
            self.huge = huge and libc().madvise(addr, size, MADV_HUGEPAGE) == 0
        self.addr, self.size = addr, size
        self.data = addr + page_offset  # where the array starts
        self._release = _Release(addr, size)
        if pooled:
            self._release.pool = self.huge
        self._finalizer = weakref.finalize(self, _release_buffer, self._release)
        self._finalizer.atexit = False  # as for Mapping: the OS reclaims it at exit
        HostBuffer.live += 1
        self.__array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (self.data, False),  # writable: the copy is the caller's own
            "version": 3,
        }

    def pin_target(self) -> HostBuffer:
        return self

    @property
    def pinned(self) -> str | None:
        """How the buffer is pinned now: "cuda", "mlock" or None."""
        r = self._release
        return "cuda" if r.cuda_ptrs else "mlock" if r.locked else None


def page_place(offset: int) -> int:
    """Where in a page to put the first byte copied from file ``offset``:
    the offset's place in its page, rounded down to 64 bytes. The kernel's
    copy runs at a fraction of its speed when the destination is 1-63 bytes
    past the source modulo 4 KiB (see :func:`gpuload.host.backend.host_result`);
    this way it is 64-byte aligned and never just past its source."""
    return offset % PAGE & ~63


def placed_empty(nbytes: int, page_offset: int = 0) -> np.ndarray:
    """``nbytes`` of ``np.empty`` memory starting ``page_offset`` bytes into a
    page (a large ``np.empty`` itself starts 16 bytes into one); one page
    more is allocated, and the array keeps it alive."""
    raw = np.empty(nbytes + PAGE, np.uint8)
    skip = (page_offset - raw.ctypes.data) % PAGE
    return raw[skip : skip + nbytes]


def _release_buffer(release: _Release) -> None:
    try:
        release()
    finally:
        HostBuffer.live -= 1  # a soft count for a cap: a rare lost update is harmless


def _map_anonymous(size: int, align: int, what: str) -> int:
    """``size`` bytes of fresh anonymous memory starting at a multiple of
    ``align``: mapped ``align`` longer, then the slack either side unmapped."""
    prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    span = size + (align - PAGE if align > PAGE else 0)
    addr = libc().mmap(None, span, prot, flags, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise MemoryError(f"{what}: {_os_error(f'mmap of {span} bytes')}")
    start = -(-addr // align) * align
    if start > addr:
        libc().munmap(addr, start - addr)
    if addr + span > start + size:
        libc().munmap(start + size, addr + span - start - size)
    return start


# --------------------------------------------------------------------------
# what the kernel says


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (free pages where absent)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * PAGE


def residency(
    path: str | os.PathLike[str], offset: int = 0, length: int | None = None
) -> tuple[int, int]:
    """``(resident pages, total pages)`` of ``[offset, offset + length)`` of a
    file (default: to its end), measured with ``mincore``."""
    m = Mapping(os.fspath(path))
    end = m.size if length is None else min(m.size, offset + length)
    if end <= offset:
        return 0, 0
    start = offset - offset % PAGE
    return m.mincore(start, end), -(-(end - start) // PAGE)


def evict(files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> float:
    """Drop ``files`` (one path or several) from the page cache (``fsync``,
    then ``posix_fadvise(DONTNEED)``); returns the largest fraction of any
    file's pages still resident afterwards (0.0: fully evicted). On tmpfs the
    pages are the file and stay; pages a live mapping holds stay too, so our
    own dead mappings are collected first."""
    if isinstance(files, str | os.PathLike):
        files = [files]  # not its characters
    gc.collect()
    worst = 0.0
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        resident, total = residency(f)
        if total:
            worst = max(worst, resident / total)
    return worst
