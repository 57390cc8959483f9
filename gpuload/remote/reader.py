"""The remote reader: the posix reader's interface over ranged GETs.

The pipeline calls :meth:`RemoteReader.readinto` from its reader threads
exactly as it calls :meth:`gpuload.io.PosixReader.readinto`: the plan's
(coalesced, split) read ops become one ranged GET each, whose body is read
straight into the op's destination buffers (results, staging or the gap
discard). Bytes the header probe already fetched (the first MiB of each
file) are copied from it, not fetched again. Each reader has its own connection pool, closed by
:meth:`close`, so a load leaves no connection behind.

Read-ahead (``GPULOAD_PREFETCH``): the pipeline announces the op a thread
takes next with :meth:`advise`; with prefetch on, the reader opens a
connection for it ahead of need (connect and TLS handshake overlap the
current transfer); with it off, connections open on demand.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..checkpoint import FileHeader
from ..errors import ReadError
from .client import Client


class RemoteReader:
    """Ranged GETs for the files of one remote checkpoint; thread-safe."""

    name = "remote"

    def __init__(self, source, headers: Sequence[FileHeader], *, prefetch: bool = True) -> None:
        self.source = source
        self.client = Client(source.client.settings)
        self.client._moved = dict(source.client._moved)  # the Hub's resolved redirects
        self._files = {h.path: (source.files[h.path], h.size, h.version) for h in headers}
        self.prefetch = prefetch
        self._warm: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def bytes_received(self) -> int:
        """Body bytes received by this reader's requests (retries included)."""
        return self.client.bytes

    def readinto(self, file: str, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` in order from the object's bytes at ``offset``."""
        if self._closed:
            raise ReadError(f"{file}: the reader is closed")
        target, size, etag = self._files[file]
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
        self.client.read_range(target, offset, buffers, etag=etag, size=size)

    def advise(self, file: str, offset: int, length: int) -> None:
        """Read-ahead hint: with prefetch on, make sure an idle connection to
        the object's host is open before a thread asks for the range."""
        if not self.prefetch or self._closed:
            return
        target = self._files[file][0]
        self.client.warm(target)

    def close(self) -> None:
        self._closed = True
        self.client.close()

    def __enter__(self) -> RemoteReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
