"""HTTP multi-range GETs: a covering read of a column shard fetches only the
rows a rank owns, as one ``multipart/byteranges`` answer per batch of ranges.

A column shard's covering range holds every rank's slice of each row; at
world 8 a rank needs an eighth of it. Where the covering range would fetch
much more than the pieces (:data:`MIN_WASTE`), its wanted ranges are asked
for in batches (``Range: bytes=a-b,c-d,...``, at most :data:`MAX_RANGES`
ranges and :data:`MAX_HEADER` characters a request: Apache's ``MaxRanges``
default and nginx's 8 KiB header-line buffer), and each part's bytes are
written at their place in the op's staging block, from which the pipeline
gathers the pieces as it does after a covering read.

A server must prove its support: only a 206 whose ``multipart/byteranges``
parts carry exactly the ranges asked, in order, each followed by the
boundary, is taken. A 200, a single-range 206 or parts coalesced or ordered
differently raise :class:`Refused`, and the reader reads that server's
covering ranges from then on (:data:`SUPPORT`: one multi-range GET at a
time goes to a server until one has been answered as asked, so a refusing
server is sent one, whatever the threads). If-Match, the ETag and size checks, the
retries and short-body detection are the client's (:mod:`.client`): a body
cut anywhere retries the parts not yet complete, never keeps a part whose
end was not seen. S3 has no multi-range GET: the reader never sends one to
an ``s3://`` source.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Sequence

import numpy as np

from gpuload.errors import ReadError
from gpuload.plan.ops import ReadOp
from gpuload.read.remote.client import Client, Retry, Target

# Bytes a separate part costs beyond its data: its multipart headers (about
# 100 from nginx) and its "a-b," in the request. Rows closer than this are
# asked for as one range: reading the gap is cheaper than another part.
PART_COST = 128
MIN_WASTE = 1.25  # only when the covering range is this much larger than the parts
MAX_RANGES = 200  # ranges in one request (Apache's MaxRanges default)
MAX_HEADER = 6000  # characters of one Range header (nginx's header-line buffer is 8 KiB)
MAX_BODY = 8 << 20  # data bytes in one request's answer
_CT = re.compile(r"^multipart/byteranges\s*;.*\bboundary=\"?([^\";]{1,200})\"?", re.I)
_PART_RANGE = re.compile(rb"^content-range:[ \t]*bytes (\d+)-(\d+)/(\d+|\*)[ \t]*\r?$", re.I | re.M)


class Refused(Exception):
    """The server did not answer a multi-range GET as asked: read covering."""


class Support:
    """What each server (scheme and host) did with multi-range GETs, for
    the process: unknown, answered as asked, or refused. While unknown, one
    thread asks (:meth:`acquire` returns None to it) and the others wait
    for its answer."""

    def __init__(self) -> None:
        self._known: dict[str, bool] = {}
        self._asking: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def known(self, host: str) -> bool | None:
        with self._lock:
            return self._known.get(host)

    def acquire(self, host: str, wait: float = 60.0) -> bool | None:
        """The verdict for ``host``, or None: the caller asks, then :meth:`settle`."""
        while True:
            with self._lock:
                if host in self._known:
                    return self._known[host]
                asking = self._asking.get(host)
                if asking is None:
                    self._asking[host] = threading.Event()
                    return None
            if not asking.wait(wait):
                return False  # the asker is stuck: read covering meanwhile

    def settle(self, host: str, verdict: bool | None) -> None:
        """Record the answer (None: no verdict, a failure: the next one asks)."""
        with self._lock:
            if verdict is not None:
                self._known[host] = verdict
            asking = self._asking.pop(host, None)
        if asking is not None:
            asking.set()


SUPPORT = Support()


def wanted(op: ReadOp) -> list[tuple[int, int]]:
    """The file ranges ``[start, end)`` the pieces of ``op`` need, sorted;
    neighbours closer than :data:`PART_COST` are one range."""
    starts, ends = [], []
    for p in op.pieces:
        s = p.src + np.arange(p.rows, dtype=np.int64) * p.src_stride
        starts.append(s)
        ends.append(s + p.row_bytes)
    s, e = np.concatenate(starts), np.concatenate(ends)
    order = np.argsort(s, kind="stable")
    s, e = s[order], np.maximum.accumulate(e[order])
    # a new range starts where the gap since everything before exceeds PART_COST
    new = np.ones(len(s), bool)
    new[1:] = s[1:] - e[:-1] > PART_COST
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(s)) - 1
    return list(zip(s[first].tolist(), e[last].tolist(), strict=True))


def sparse_ranges(op: ReadOp) -> list[tuple[int, int]] | None:
    """``op``'s wanted ranges where a multi-range read saves enough (a
    staged op whose covering range is over :data:`MIN_WASTE` times its
    parts), else None."""
    if not op.staged or op.length < MIN_WASTE * op.useful_bytes:
        return None
    ranges = wanted(op)
    cost = sum(e - s for s, e in ranges) + PART_COST * len(ranges)
    return ranges if len(ranges) > 1 and op.length > MIN_WASTE * cost else None


def batches(ranges: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """``ranges`` (sorted) cut into requests under the range, header and body caps."""
    if not ranges:
        return []
    # every "a-b," is at most this long: the last range's end has the most digits
    width = 2 * len(str(ranges[-1][1])) + 2
    step = max(1, min(MAX_RANGES, MAX_HEADER // width))
    out: list[list[tuple[int, int]]] = []
    i = 0
    while i < len(ranges):
        cur = list(ranges[i : i + step])
        body = 0
        for k, (s, e) in enumerate(cur):  # the body cap, for long ranges
            body += e - s
            if body > MAX_BODY and k:
                cur = cur[:k]
                break
        out.append(cur)
        i += len(cur)
    return out


def range_header(ranges: Sequence[tuple[int, int]]) -> str:
    return "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in ranges)


def start(client: Client, t: Target, ranges, etag: str) -> tuple | None:
    """Read-ahead: send the multi-range GET of ``ranges`` now (None: not sent)."""
    if len(ranges) < 2:
        return None  # read() asks for one range as an ordinary GET
    h = {"Range": range_header(ranges)}
    if etag:
        h["If-Match"] = etag
    try:
        t2, conn = client._start(t, h)
    except Retry:
        return None  # the read itself retries and reports
    return t2, conn, tuple(ranges)


def read(
    client: Client,
    t: Target,
    base: int,
    block: memoryview,
    ranges: Sequence[tuple[int, int]],
    *,
    etag: str,
    size: int,
    pending: tuple | None = None,
) -> None:
    """Fill ``block[s - base : e - base]`` for each of ``ranges`` with one
    multi-range GET (and retries of the parts a failure left incomplete).

    Raises :class:`Refused` when the server does not answer it as asked
    (nothing of the answer is then trusted: the caller reads covering).
    """
    state = {"left": list(ranges), "pending": pending}
    label = f"multi-range GET of {len(ranges)} ranges from byte {ranges[0][0]}"

    def attempt() -> None:
        left = state["left"]
        ahead, state["pending"] = state["pending"], None
        if len(left) == 1:  # one range left (a retry): an ordinary ranged GET
            if ahead is not None:
                client.discard(ahead)
            s, e = left[0]
            client.read_range(t, s, [block[s - base : e - base]], etag=etag, size=size)
            state["left"] = []
            return
        if ahead is not None and ahead[2] == tuple(left):
            t2, conn = ahead[:2]
            resp = client._answer(conn)
        else:
            if ahead is not None:
                client.discard(ahead)
            h = {"Range": range_header(left)}
            if etag:
                h["If-Match"] = etag
            t2, conn, resp = client._send(t, h)
        multipart = _CT.match(resp.getheader("Content-Type", "") or "")
        if resp.status == 200 or (resp.status == 206 and multipart is None):
            client._drop(conn)  # a whole object or one coalesced range: never read it
            raise Refused(f"HTTP {resp.status} {resp.getheader('Content-Type')!r}")
        if resp.status != 206:
            raise client._fail(t2, conn, resp, label)  # 5xx: Retry; 412, 403...: ReadError
        tag = resp.getheader("ETag", "") or ""
        if etag and tag and tag != etag:
            client._drop(conn)
            raise ReadError(f"{t.url}: ETag {tag} differs from {etag}: the object was replaced")
        boundary = multipart.group(1).encode("latin-1")
        done = _body(client, t2, conn, resp, boundary, left, base, block, size)
        state["left"] = left[done:]
        if state["left"]:
            raise Retry(f"multipart body ended after {done} of {len(left)} parts")

    client._retrying(t, label, attempt)


def _body(client, t, conn, resp, boundary: bytes, left, base: int, block, size: int) -> int:
    """Read one multipart answer; copy its complete parts. Returns how many
    of ``left`` are now in ``block`` (a cut body: fewer than asked)."""
    data = sum(e - s for s, e in left)
    cap = data + 512 * len(left) + 4096  # the parts' headers are ~100 bytes each
    if resp.length is not None and resp.length > cap:
        client._drop(conn)
        raise Refused(f"a {resp.length}-byte answer to {data} bytes of ranges")
    raw = bytearray(resp.length if resp.length is not None else cap + 1)
    view, got, cut = memoryview(raw), 0, False
    try:
        while got < len(raw):
            n = resp.readinto(view[got:])
            if n == 0:
                break
            client._count(n)
            got += n
    except (OSError, http.client.HTTPException):
        cut = True  # a drop or a timeout: the parts that arrived whole are kept
    if resp.length is None and got > cap:
        client._drop(conn)
        raise Refused("an unbounded multipart answer")
    done = _parse(t, raw, got, boundary, left, base, block, size)
    whole = not cut and got == len(raw) and resp.length is not None
    if whole and done == len(left) and not resp.will_close:
        client._release(t, conn)
    else:
        client._drop(conn)
    return done


def _parse(t, raw: bytearray, end: int, boundary: bytes, left, base, block, size: int) -> int:
    """Copy each part that is exactly the range asked and ends at a boundary
    (``raw[:end]`` arrived). Returns the number of parts copied."""
    view = memoryview(raw)
    delim = b"--" + boundary
    nxt = b"\r\n" + delim
    i = raw.find(delim, 0, min(end, 2048))  # a preamble (nginx: one CRLF) may precede it
    if i < 0:
        if end >= 2048:
            raise Refused("no multipart boundary")
        return 0
    for k, (s, e) in enumerate(left):
        j = i + len(delim)
        if end < j + 2:
            return k
        if raw[j : j + 2] == b"--":
            raise Refused(f"{k} parts, asked for {len(left)}")
        head_end = raw.find(b"\r\n\r\n", j, min(end, j + 4096))
        if head_end < 0:
            if end >= j + 4096:
                raise Refused("a part header without its end")
            return k  # cut in the part's headers
        # the header as nginx and most servers write it, else any spelling
        line = b"\r\nContent-Range: bytes %d-%d/%d\r\n" % (s, e - 1, size)
        if raw.find(line, j - 2, head_end + 2) < 0:
            m = _PART_RANGE.search(raw, j, head_end + 2)
            if m is None or int(m.group(1)) != s or int(m.group(2)) != e - 1:
                got = m.group(0).decode("latin-1").strip() if m else "no Content-Range"
                raise Refused(f"part {k} is {got!r}, asked for bytes {s}-{e - 1}")
            if m.group(3) not in (b"*", str(size).encode()):
                raise ReadError(
                    f"{t.url}: the object is now {m.group(3).decode()} bytes, not {size}: "
                    "it was replaced"
                )
        d0 = head_end + 4
        d1 = d0 + e - s
        if end < d1 + len(nxt):
            return k  # cut in the part, or before the boundary that proves its end
        if raw[d1 : d1 + len(nxt)] != nxt:
            raise Refused(f"part {k} ({s}-{e - 1}) is not followed by the boundary")
        block[s - base : e - base] = view[d0:d1]
        i = d1 + 2
    return len(left)
