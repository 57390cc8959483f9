"""The remote reader: the posix reader's interface over ranged GETs.

The pipeline calls :meth:`RemoteReader.readinto` from its reader threads
exactly as it calls :meth:`gpuload.read.posix.PosixReader.readinto`: the plan's
(coalesced, split) read ops become one ranged GET each, whose body is read
straight into the op's destination buffers (results, staging or the gap
discard). Bytes the header probe already fetched (the first MiB of each
file) are copied from it, not fetched again. Each reader has its own connection pool, closed by
:meth:`close`, so a load leaves no connection behind.

Read-ahead (``GPULOAD_PREFETCH``): the pipeline announces, as a thread
starts op ``i``, the op ``i + threads`` a thread takes later
(:meth:`advise`). With prefetch on, the reader sends that range's GET at
once on a connection of its own; the thread that takes the op reads the
answer (which waited in the socket buffers, so no memory of gpuload's
holds it and nothing is copied twice). So up to twice ``threads`` GETs are
in flight. With it off, each GET is sent when its op starts.

Covering (staged) ops of column shards: where the covering range is much
larger than the rows the pieces need, :meth:`RemoteReader.read_staged`
fetches only those rows with HTTP multi-range GETs
(:mod:`gpuload.read.remote.multirange`), into the same staging block, so
the pipeline's gather is unchanged. A server that does not answer them as
asked is remembered, and its covering ranges are read whole from then on;
S3 sources never get one (S3 has no multi-range GET).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from gpuload.errors import ReadError
from gpuload.format.header import FileHeader
from gpuload.plan.ops import ReadOp
from gpuload.read.remote import multirange
from gpuload.read.remote.client import Client


class _Ahead:
    """One read-ahead GET: claimed, then sent (``sent`` None: not sent)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.sent: tuple | None = None

    def wait(self) -> tuple | None:
        self.done.wait()
        return self.sent


class RemoteReader:
    """Ranged GETs for the files of one remote checkpoint; thread-safe."""

    name = "remote"

    def __init__(self, source, headers: Sequence[FileHeader], *, prefetch: bool = True) -> None:
        self.source = source
        self.client = Client(source.client.settings)
        self.client._moved = dict(source.client._moved)  # the Hub's resolved redirects
        self._files = {h.path: (source.files[h.path], h.size, h.version) for h in headers}
        self.prefetch = prefetch
        # Read-ahead GETs, claimed before they are sent: a thread that takes
        # the op while its GET is being sent waits for it (never sends a
        # second one), and an op already read is never sent ahead.
        self._pending: dict[tuple[str, int, int], _Ahead] = {}
        self._read: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()
        self._closed = False
        # Multi-range GETs: never to S3; a server that refused one is
        # remembered (multirange.SUPPORT) and gets covering ranges from then on.
        self.multirange = not hasattr(source, "bucket")
        self.multi_ops = 0  # staged ops read by multi-range GETs
        self._ranges: dict[tuple[str, int, int], list[tuple[int, int]]] = {}

    @property
    def bytes_received(self) -> int:
        """Body bytes received by this reader's requests (retries included)."""
        return self.client.bytes

    def readinto(self, file: str, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` in order from the object's bytes at ``offset``."""
        if self._closed:
            raise ReadError(f"{file}: the reader is closed")
        target, size, etag = self._files[file]
        key = (file, offset, sum(len(b) for b in buffers))
        with self._lock:
            claim = self._pending.pop(key, None)
            if claim is None:
                self._read.add(key)
        ahead = claim.wait() if claim is not None else None
        seed = self.source.seeds.get(file, b"")
        if offset < len(seed):  # the probe fetched these bytes already
            rest = []
            for b in buffers:
                n = max(0, min(len(b), len(seed) - offset))
                if n:
                    b[:n] = seed[offset : offset + n]
                if n < len(b):
                    rest.append(b[n:])
                offset += n
            buffers = rest
            if not buffers:
                return
        self.client.read_range(target, offset, buffers, etag=etag, size=size, pending=ahead)

    def _sparse(self, op: ReadOp) -> list[tuple[int, int]] | None:
        """The ranges of ``op`` to fetch by multi-range GETs (those the
        header probe holds left out), or None: read its covering range."""
        if not self.multirange or not op.staged:
            return None
        if multirange.SUPPORT.known(self._host(op.file)) is False:
            return None
        key = (op.file, op.offset, op.length)
        with self._lock:
            if key in self._ranges:  # computed by advise_op
                return self._ranges.pop(key)
        ranges = multirange.sparse_ranges(op)
        if ranges is None:
            return None
        seed = len(self.source.seeds.get(op.file, b""))
        ranges = [(max(s, seed), e) for s, e in ranges if e > seed]
        return ranges or None

    def _host(self, file: str) -> str:
        p = self._files[file][0].parts
        return f"{p.scheme}://{p.netloc}"

    def read_staged(self, op: ReadOp, block: memoryview) -> None:
        """Fill ``block`` (``op.length`` bytes, for file bytes from
        ``op.offset``) at least where ``op``'s pieces lie: by multi-range
        GETs of those rows where that saves enough, else the whole range."""
        ranges = self._sparse(op)
        host = self._host(op.file)
        verdict = multirange.SUPPORT.acquire(host) if ranges is not None else False
        if verdict is False:
            return self.readinto(op.file, op.offset, [block])
        asking = verdict is None  # this thread learns whether the server can
        if self._closed:
            if asking:
                multirange.SUPPORT.settle(host, None)
            raise ReadError(f"{op.file}: the reader is closed")
        target, size, etag = self._files[op.file]
        seed = self.source.seeds.get(op.file, b"")
        if op.offset < len(seed):  # the probe fetched these bytes already
            n = min(len(seed), op.offset + op.length) - op.offset
            block[:n] = seed[op.offset : op.offset + n]
        key = (op.file, op.offset, op.length)
        with self._lock:
            claim = self._pending.pop(key, None)
            if claim is None:
                self._read.add(key)
        nxt = claim.wait() if claim is not None else None
        parts = multirange.batches(ranges)
        try:
            for i, batch in enumerate(parts):
                cur, nxt = nxt, None
                if self.prefetch and i + 1 < len(parts):  # the next batch, in flight meanwhile
                    nxt = multirange.start(self.client, target, parts[i + 1], etag)
                multirange.read(
                    self.client, target, op.offset, block, batch, etag=etag, size=size, pending=cur
                )
                if asking:
                    multirange.SUPPORT.settle(host, True)
                    asking = False
        except multirange.Refused:
            multirange.SUPPORT.settle(host, False)
            if nxt is not None:
                self.client.discard(nxt)
            # nothing of the refused answer is trusted: the whole range again
            return self.readinto(op.file, op.offset, [block])
        except BaseException:
            if asking:
                multirange.SUPPORT.settle(host, None)
            if nxt is not None:
                self.client.discard(nxt)
            raise
        with self._lock:
            self.multi_ops += 1

    def advise_op(self, op: ReadOp) -> None:
        """Read-ahead of a plan op: its first multi-range GET where
        :meth:`read_staged` will read it so (once the server has answered
        one as asked), else :meth:`advise`."""
        ranges = self._sparse(op)
        if ranges is None:
            return self.advise(op.file, op.offset, op.length)
        key = (op.file, op.offset, op.length)
        with self._lock:
            if key not in self._read:
                self._ranges[key] = ranges  # for read_staged: computed once
        if not self.prefetch or self._closed:
            return
        if not multirange.SUPPORT.known(self._host(op.file)):
            return  # not yet known: neither a covering GET nor a multi-range one
        with self._lock:
            if key in self._read or key in self._pending:
                return
            claim = self._pending[key] = _Ahead()
        target, _, etag = self._files[op.file]
        claim.sent = multirange.start(self.client, target, multirange.batches(ranges)[0], etag)
        claim.done.set()

    def advise(self, file: str, offset: int, length: int) -> None:
        """Read-ahead: with prefetch on, send the GET of a range that a
        thread reads soon (not one the header probe already holds)."""
        if not self.prefetch or self._closed or length <= 0:
            return
        if offset < len(self.source.seeds.get(file, b"")):
            return
        key = (file, offset, length)
        with self._lock:
            if key in self._read or key in self._pending:
                return
            claim = self._pending[key] = _Ahead()
        target, _, etag = self._files[file]
        claim.sent = self.client.start_range(target, offset, length, etag)
        claim.done.set()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for claim in pending:  # a failed load's unread read-aheads
            sent = claim.wait()
            if sent is not None:
                self.client.discard(sent)
        self.client.close()

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
