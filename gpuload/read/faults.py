"""Fault injection for readers: short reads, EIO, EINTR and delays, for tests.

:class:`FaultyReader` wraps a :class:`~gpuload.read.posix.PosixReader` and injects
faults *under* its read loop, at the ``os.preadv`` call: it runs the inner
reader's own ``readinto`` code object with ``os`` bound to a shim whose
``preadv`` may

* return fewer bytes than asked (a short read): ``readinto``'s loop must go
  on from where the kernel stopped;
* raise ``OSError(EINTR)``: ``readinto`` must retry;
* raise ``OSError(EIO)``: ``readinto`` must turn it into a
  :class:`~gpuload.errors.ReadError` naming the file.

so what is exercised is the real loop and the real error translation of
:mod:`gpuload.read.posix`, not a copy. Delays are injected per read op, before it
starts, to widen race windows (a file changed mid-load, Ctrl-C mid-load).
Nothing here touches :mod:`gpuload.read.posix` or the ``os`` module: other readers
in the same process are unaffected.

>>> factory = FaultyReaderFactory(short_reads=0.3, eintr=0.1, seed=7)
>>> with Loader(device="cpu", reader_factory=factory) as loader:  # doctest: +SKIP
...     loader.load(path, 0, 2)
>>> factory.stats.faults  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

from gpuload.format.header import FileHeader
from gpuload.read import posix as _io

__all__ = ["FaultStats", "FaultyReader", "FaultyReaderFactory"]


@dataclasses.dataclass
class FaultStats:
    """What was injected; shared by every reader of one factory. Thread-safe."""

    ops: int = 0  # readinto calls
    syscalls: int = 0  # preadv calls that reached the shim
    short_reads: int = 0
    eio: int = 0
    eintr: int = 0
    delays: int = 0
    delay_s: float = 0.0
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def add(self, **counts: float) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    @property
    def faults(self) -> int:
        """Faults injected: short reads, EIO, EINTR and delays."""
        return self.short_reads + self.eio + self.eintr + self.delays

    def as_dict(self) -> dict[str, float]:
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_lock"
        }


def _probability(name: str, p: float, *, below_one: bool = False) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"{name}={p!r} has to be a probability in [0, 1]")
    if below_one and p == 1:
        raise ValueError(f"{name}=1 would retry forever; use a probability below 1")
    return float(p)


class _OsShim:
    """``os`` as :meth:`PosixReader.readinto` sees it under a FaultyReader."""

    def __init__(self, owner: FaultyReader) -> None:
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def preadv(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        return self._owner._preadv(fd, buffers, offset)


class FaultyReader:
    """A reader that injects faults into another reader's syscalls.

    Parameters
    ----------
    inner
        The reader to wrap: a :class:`~gpuload.read.posix.PosixReader` (its
        ``readinto`` loop runs unchanged, over a faulty ``preadv``).
    short_reads
        Probability that one ``preadv`` returns fewer bytes than asked (at
        least 1).
    eio
        Probability that one ``preadv`` fails with ``EIO``.
    eintr
        Probability that one ``preadv`` fails with ``EINTR`` (below 1).
    delay
        ``(lo, hi)`` seconds: each read op first sleeps a uniform time in
        that range. ``(0, 0)``: no delay.
    eio_after
        Fail every ``preadv`` after the first ``eio_after`` ones (counted over
        this reader) with ``EIO``: a deterministic mid-load failure.
    before_read
        ``callable(file, offset, nbytes)`` run at the start of every read op,
        on the reader thread (after the delay): lets a test change a file or
        send a signal while a load is in flight.
    stats
        Where counts go (a factory shares one among its readers).
    seed
        Seed of this reader's random choices.
    """

    def __init__(
        self,
        inner: Any,
        *,
        short_reads: float = 0.0,
        eio: float = 0.0,
        eintr: float = 0.0,
        delay: tuple[float, float] = (0.0, 0.0),
        eio_after: int | None = None,
        before_read: Callable[[str, int, int], None] | None = None,
        stats: FaultStats | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(inner, _io.PosixReader):
            raise TypeError(f"FaultyReader wraps a PosixReader, got {type(inner).__name__}")
        self.inner = inner
        self.name = f"faulty-{inner.name}"
        self.short_reads = _probability("short_reads", short_reads)
        self.eio = _probability("eio", eio)
        self.eintr = _probability("eintr", eintr, below_one=True)
        lo, hi = delay
        if not 0 <= lo <= hi:
            raise ValueError(f"delay={delay!r} has to be (lo, hi) seconds with 0 <= lo <= hi")
        self.delay = (float(lo), float(hi))
        if eio_after is not None and (not isinstance(eio_after, int) or eio_after < 0):
            raise ValueError(f"eio_after={eio_after!r} has to be an int >= 0 or None")
        self.eio_after = eio_after
        self.before_read = before_read
        self.stats = stats if stats is not None else FaultStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._syscalls = 0
        # PosixReader.readinto's own code, with ``os`` resolving to the shim.
        fn = type(inner).readinto
        scope = dict(fn.__globals__, os=_OsShim(self))
        self._readinto = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__)

    # -- the syscall -------------------------------------------------------

    def _draw(self) -> tuple[int, float, float]:
        with self._lock:
            self._syscalls += 1
            return self._syscalls, self._rng.random(), self._rng.random()

    def _preadv(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        n, r, frac = self._draw()
        self.stats.add(syscalls=1)
        if (self.eio_after is not None and n > self.eio_after) or r < self.eio:
            self.stats.add(eio=1)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        r -= self.eio
        if r < self.eintr:
            self.stats.add(eintr=1)
            raise OSError(errno.EINTR, os.strerror(errno.EINTR))  # InterruptedError
        r -= self.eintr
        want = sum(len(b) for b in buffers)
        if r < self.short_reads and want > 1:
            # Ask the kernel for only the first k bytes: a real short read.
            k = 1 + int(frac * (want - 1))
            part: list[memoryview] = []
            for b in buffers:
                if k <= 0:
                    break
                part.append(memoryview(b)[:k])
                k -= len(part[-1])
            self.stats.add(short_reads=1)
            return os.preadv(fd, part, offset)
        return os.preadv(fd, buffers, offset)

    # -- the reader interface ----------------------------------------------

    def advise(self, file: str, offset: int, length: int) -> None:
        self.inner.advise(file, offset, length)

    def readinto(self, file: str, offset: int, buffers: Sequence[memoryview]) -> None:
        self.stats.add(ops=1)
        lo, hi = self.delay
        if hi > 0:
            with self._lock:
                s = self._rng.uniform(lo, hi)
            time.sleep(s)
            self.stats.add(delays=1, delay_s=s)
        if self.before_read is not None:
            self.before_read(file, offset, sum(len(b) for b in buffers))
        self._readinto(self.inner, file, offset, buffers)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> FaultyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaultyReaderFactory:
    """``Loader(reader_factory=FaultyReaderFactory(...))``: every load gets a
    :class:`FaultyReader` over a fresh :class:`~gpuload.read.posix.PosixReader`.

    Takes :class:`FaultyReader`'s keywords; reader ``i`` is seeded
    ``seed + i``. ``stats`` sums the faults of every reader made.
    """

    def __init__(self, *, seed: int = 0, **faults: Any) -> None:
        self.faults = faults
        self.seed = seed
        self.stats = FaultStats()
        self.readers: list[FaultyReader] = []
        FaultyReader(_io.PosixReader([]), **faults)  # validate the keywords now

    def __call__(self, headers: Sequence[FileHeader], *, prefetch: bool = True) -> FaultyReader:
        inner = _io.PosixReader(headers, prefetch=prefetch)
        reader = FaultyReader(
            inner, stats=self.stats, seed=self.seed + len(self.readers), **self.faults
        )
        self.readers.append(reader)
        return reader
