"""Readers: bytes from checkpoint files into caller-provided buffers.

``PosixReader`` uses ``os.preadv`` (one syscall scatters a file range into
several destination buffers), loops on short reads, and treats a short read
at end of file as an error: a checkpoint never legitimately ends early.
Readers never touch CUDA streams: the pipeline owns ordering.

Each file is checked against the identity (device, inode, size, mtime) its
header was parsed with, at open and again at close: a file replaced or
rewritten during a load raises :class:`~gpuload.errors.ReadError`.

``PosixReader.copy_mapped`` is the warm-cache path for covering reads: when
every page of the range is cached, the owned rows are copied out of a
read-only mapping of the file with ``process_vm_readv`` on this process,
so only the owned bytes are copied and nothing is read twice. It is a
syscall copy, not a load from the mapping: a page that vanished (the file
was truncated) fails the call with EFAULT, where a memcpy from the mapping
would kill the process with SIGBUS.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
from collections.abc import Sequence

import numpy as np

from gpuload.errors import ReadError
from gpuload.format.header import FileHeader
from gpuload.memory.mapping import Mapping
from gpuload.read.vectored import IOV_MAX, _advance, _preadv_raw, _read_some, _vm_readv_raw


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


O_DIRECT = getattr(os, "O_DIRECT", 0o40000)  # Linux x86-64's value where os lacks it
DIRECT_ALIGN = 4096  # O_DIRECT's offset, length and address unit: a page covers every disk


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
        self._maps: dict[str, Mapping | None] = {}  # for copy_mapped; None: cannot map
        self._direct: dict[str, int | None] = {}  # O_DIRECT fds; None: refused here
        self._lock = threading.Lock()
        self._closed = False
        self.prefetch = prefetch
        # False once process_vm_readv was refused (seccomp, no syscall):
        # copy_mapped then declines and covering ranges are read.
        self.vm_ok = True

    def fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            return fd
        with self._lock:  # open each file once, even when threads race here
            fd = self._fds.get(file)
            if fd is None:
                if self._closed:  # never reopen behind close(): that fd would leak
                    raise ReadError(f"{file}: the reader is closed")
                # O_NONBLOCK: a file replaced by a FIFO since its header was
                # parsed must fail the identity check, not block here.
                flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
                fd = -1
                try:  # anything (a Ctrl-C too) between open and store closes it
                    fd = os.open(file, flags)
                    self._check(file, os.fstat(fd))
                    os.set_blocking(fd, True)  # a regular file: plain blocking reads
                    self._fds[file] = fd
                except BaseException as e:
                    if fd >= 0 and self._fds.get(file) != fd:
                        os.close(fd)
                    if isinstance(e, OSError) and not isinstance(e, ReadError):
                        raise ReadError(f"{file}: cannot open: {e.strerror}") from e
                    raise
            return fd

    def _check(self, file: str, st: os.stat_result) -> None:
        want = self._headers[file].identity
        if want != (0, 0, 0, 0) and _identity(st) != want:
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
            i = _advance([work], i, i + len(batch), got)

    def _mapping(self, file: str) -> Mapping | None:
        """The file's read-only mapping (made once), or None where it cannot
        be mapped: such a file is read with pread instead."""
        if file in self._maps:
            return self._maps[file]
        self.fd(file)  # opened and its identity checked first: a changed file raises
        with self._lock:
            if file not in self._maps:
                if self._closed:
                    raise ReadError(f"{file}: the reader is closed")
                try:
                    self._maps[file] = Mapping(file, self._headers[file].identity)
                except (ReadError, OSError):
                    self._maps[file] = None
            return self._maps[file]

    def cached(self, file: str, offset: int, length: int) -> bool:
        """Whether every page of ``[offset, offset+length)`` is in the page
        cache (``mincore`` on the file's mapping); False when unknown."""
        m = self._mapping(file)
        if m is None or length <= 0 or offset + length > m.size:
            return False
        try:
            return m.all_resident(offset, offset + length)
        except OSError:
            return False

    def copy_mapped(self, file: str, src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> bool:
        """Copy file bytes ``[src[i], src[i] + lengths[i])`` to the addresses
        ``dst[i]`` out of the page cache, with ``process_vm_readv`` from the
        file's read-only mapping: only these bytes are copied.

        The caller guarantees every destination is writable memory it owns
        (the host pipeline checks each against its result). Returns False,
        having copied nothing, where the syscall or the mapping is refused:
        the caller reads the range instead. A page that cannot be faulted in
        (the file was truncated) raises ReadError; it never signals.
        """
        m = self._mapping(file) if self.vm_ok else None
        if m is None or not len(src):
            return m is not None
        src = np.asarray(src, np.int64)
        lengths = np.asarray(lengths, np.int64)
        bad = (src < 0) | (src + lengths > m.size)
        if bad.any():
            at = int(np.argmax(bad))
            raise ReadError(
                f"{file}: a copy of {int(lengths[at])} bytes at offset {int(src[at])} "
                f"runs past the file's {m.size} bytes"
            )
        local = np.empty((len(src), 2), np.uint64)
        remote = np.empty((len(src), 2), np.uint64)
        local[:, 0], local[:, 1] = dst, lengths
        remote[:, 0], remote[:, 1] = m.addr + src, lengths
        i, first = 0, True
        while i < len(local):
            k = min(len(local), i + IOV_MAX)
            want = int(local[i:k, 1].sum())
            try:
                got = _vm_readv_raw(local[i:k], remote[i:k])
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                if first and e.errno in (errno.EPERM, errno.ENOSYS, errno.EACCES):
                    self.vm_ok = False  # refused, nothing copied: read instead
                    return False
                got, err = 0, e.strerror
            else:
                err = "nothing copied"
            first = False
            if got == 0:
                at = int(remote[i, 0]) - m.addr
                raise ReadError(
                    f"{file}: copying {want} bytes at offset {at} out of the page cache "
                    f"failed ({err}); was the file truncated?"
                )
            i = _advance([local, remote], i, k, got)
        return True

    def _direct_fd(self, file: str) -> int | None:
        """An ``O_DIRECT`` descriptor of ``file`` (identity checked), or None
        where the filesystem refuses it (tmpfs, some FUSE)."""
        direct = self._direct
        if file in direct:
            return direct[file]
        self.fd(file)  # the buffered one first: a changed file raises there
        with self._lock:
            if file not in direct:
                if self._closed:
                    raise ReadError(f"{file}: the reader is closed")
                try:
                    fd = os.open(file, os.O_RDONLY | O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    direct[file] = None
                else:
                    try:  # a changed file (or a Ctrl-C) before the store closes it
                        self._check(file, os.fstat(fd))
                        direct[file] = fd
                    except BaseException:
                        if direct.get(file) != fd:
                            os.close(fd)
                        raise
            return direct[file]

    def read_direct(
        self, file: str, offset: int, length: int, dst: int, room_before: int, room_after: int
    ) -> bool:
        """Read ``[offset, offset+length)`` to address ``dst`` with ``O_DIRECT``,
        past the page cache, widened to whole 4 KiB blocks: up to
        ``room_before`` bytes before ``dst`` and ``room_after`` after its end
        may be written with the file's neighbouring bytes (the caller owns
        them and they mirror the file there, or are slack).

        Returns False, having read nothing, where it cannot: the widened
        range does not fit the room, ``dst`` and ``offset`` disagree within a
        block, or the filesystem refuses ``O_DIRECT``; the caller reads
        buffered then. A file shorter than the range raises ReadError."""
        head = offset % DIRECT_ALIGN
        end = offset + length
        tail = -end % DIRECT_ALIGN
        if head > room_before or tail > room_after or (dst - head) % DIRECT_ALIGN:
            return False
        fd = self._direct_fd(file)
        if fd is None:
            return False
        pos, addr, want = offset - head, dst - head, head + length + tail
        while pos < end:
            view = (ctypes.c_char * want).from_address(addr)
            try:
                got = os.preadv(fd, [memoryview(view).cast("B")], pos)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                if e.errno == errno.EINVAL and pos == offset - head:  # refused, nothing read
                    self._direct[file] = None
                    return False
                raise ReadError(f"{file}: O_DIRECT read at {pos} failed: {e.strerror}") from e
            if got <= 0:
                raise ReadError(
                    f"{file}: read {pos - offset + head} of {length + head} bytes at offset "
                    f"{offset - head}; was the file truncated?"
                )
            if got % DIRECT_ALIGN and pos + got < end:  # a short read inside the file
                raise ReadError(f"{file}: O_DIRECT read at {pos} returned {got} bytes")
            pos, addr, want = pos + got, addr + got, want - got
        return True

    def close(self) -> None:
        """Close every file; raise if one changed while it was being read."""
        with self._lock:
            direct, self._direct = self._direct, {}
            for dfd in direct.values():
                if dfd is not None:
                    os.close(dfd)
            fds, self._fds, self._closed = self._fds, {}, True
            maps, self._maps = self._maps, {}
        for m in maps.values():  # no copy runs now: the pipeline joined its threads
            if m is not None:
                m._finalizer()
        changed = None
        try:
            for file in fds:
                try:
                    self._check(file, os.stat(file))
                except (ReadError, OSError) as e:
                    changed = changed or e
        finally:  # every fd, even when a Ctrl-C lands in the checks
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
        if changed is not None:
            raise changed if isinstance(changed, ReadError) else ReadError(str(changed))

    def __enter__(self) -> PosixReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
