"""The HTTP client of remote loads: pooled connections, ranged GETs read
straight into the caller's buffers, bounded retries, and the checks that
keep a wrong byte out of a result.

Standard library only (``http.client``): a range's body is read with
``readinto`` into the result or staging buffer itself, each response is
checked (status 206, ``Content-Range`` exactly the range asked for, the
object's size and ETag unchanged) before a byte of it is taken, and every
connection is the client's own, so :meth:`Client.close` leaves none open.

Retried, with a bounded, jittered backoff (count and total time): 5xx
(503 SlowDown included), 429, timeouts, resets, a connection dropped
mid-body and a short body; a retry resumes after the bytes already
received. Not retried: 401/403/404 (a clear error naming the URL; no
credential is ever part of a URL or a message), 412 and a changed ETag
(the object was replaced: :class:`~gpuload.errors.ReadError`), and a 200
answer to a ranged GET (the server ignores ``Range``; its body is never
read).
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from gpuload.errors import ReadError
from gpuload.read.remote.target import Settings, Target

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_XML_FIELD = re.compile(r"<(Code|Message)>([^<]{0,300})</\1>")
_RETRY_STATUS = {429, 500, 502, 503, 504}
_REDIRECT = {301, 302, 303, 307, 308}
REDIRECTS = 5


class Retry(Exception):
    """A failure worth another try (the message says what happened)."""


class Client:
    """Pooled HTTP(S) connections; thread-safe; counts body bytes received."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._open: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._moved: dict[str, Target] = {}  # resolved redirects (the Hub's CDN)
        self.bytes = 0  # body bytes received
        self.requests = 0
        self.retries = 0

    # -- connections -------------------------------------------------------

    def _connect(self, t: Target) -> http.client.HTTPConnection:
        p = t.parts
        key = (p.scheme, p.netloc)
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
        if p.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                p.hostname or "",
                p.port,
                timeout=self.settings.timeout,
                context=ssl.create_default_context(),
            )
        elif p.scheme == "http":
            conn = http.client.HTTPConnection(
                p.hostname or "", p.port, timeout=self.settings.timeout
            )
        else:
            raise ReadError(f"{t.url}: unsupported scheme {p.scheme!r}")
        with self._lock:
            self._open.add(conn)
        return conn

    def _release(self, t: Target, conn: http.client.HTTPConnection) -> None:
        p = t.parts
        with self._lock:
            if conn in self._open:
                self._idle.setdefault((p.scheme, p.netloc), []).append(conn)

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._open.discard(conn)
        conn.close()

    def close(self) -> None:
        """Close every connection (idle ones and any a failed request left)."""
        with self._lock:
            conns, self._open, self._idle = list(self._open), set(), {}
        for c in conns:
            c.close()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    # -- requests ----------------------------------------------------------

    def scrub(self, text: str) -> str:
        for s in self.settings.secrets:
            if s:
                text = text.replace(s, "***")
        return text

    def _start(self, t: Target, headers: dict[str, str]):
        """Send one GET, not waiting for its answer: (target, connection)."""
        t = self._moved.get(t.url, t)
        h = dict(t.headers)
        h.update(headers)
        if t.sign is not None:
            t.sign("GET", t, h)
        p = t.parts
        path = (p.path or "/") + (f"?{p.query}" if p.query else "")
        conn = self._connect(t)
        try:
            conn.request("GET", path, headers=h)
        except ssl.SSLCertVerificationError as e:
            self._drop(conn)  # not transient: no retry
            raise ReadError(f"{t.url}: TLS certificate not trusted: {e.verify_message}") from e
        except (OSError, http.client.HTTPException) as e:
            self._drop(conn)
            raise Retry(f"{type(e).__name__}: {e}") from e
        return t, conn

    def _answer(self, conn):
        try:
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self._drop(conn)
            raise Retry(f"{type(e).__name__}: {e}") from e
        with self._lock:
            self.requests += 1
        return resp

    def _send(self, t: Target, headers: dict[str, str]):
        """One request (redirects followed): (target, connection, response)."""
        for _ in range(REDIRECTS + 1):
            t, conn = self._start(t, headers)
            resp = self._answer(conn)
            if resp.status in _REDIRECT and resp.getheader("Location"):
                moved = t.moved(resp.getheader("Location", ""))
                self._finish(t, conn, resp)
                self._moved[t.url] = moved  # later ranges go straight there
                t = moved
                continue
            return t, conn, resp
        raise ReadError(f"{t.url}: more than {REDIRECTS} redirects")

    def start_range(self, t: Target, offset: int, length: int, etag: str) -> tuple | None:
        """Read-ahead: send the ranged GET for ``[offset, offset+length)``
        now; :meth:`read_range` given it as ``pending`` reads its answer
        (the body waits in the socket buffers meanwhile). None: not sent."""
        h = {"Range": f"bytes={offset}-{offset + length - 1}"}
        if etag:
            h["If-Match"] = etag
        try:
            t2, conn = self._start(t, h)
        except Retry:
            return None  # the read itself will retry and report
        return t2, conn, offset, length

    def discard(self, pending: tuple) -> None:
        """Drop a read-ahead that will not be read (its answer is unread)."""
        self._drop(pending[1])

    def _finish(self, t: Target, conn, resp, limit: int = 1 << 16) -> bytes:
        """Read a small body to its end and keep the connection, or drop it."""
        try:
            if resp.length is not None and resp.length > limit:
                raise OSError("body too long to drain")
            body = resp.read(limit + 1)
            if len(body) > limit or not resp.isclosed():
                raise OSError("body too long")
        except (OSError, http.client.HTTPException):
            self._drop(conn)
            return b""
        if resp.will_close:
            self._drop(conn)
        else:
            self._release(t, conn)
        return body

    def _fail(self, t: Target, conn, resp, what: str) -> Exception:
        """The error for a non-success status (the body drained for its code)."""
        body = self._finish(t, conn, resp).decode("utf-8", "replace")
        detail = " ".join(f"{k}: {v}" for k, v in _XML_FIELD.findall(body))
        status = f"HTTP {resp.status} {resp.reason}" + (f" ({detail})" if detail else "")
        if resp.status in _RETRY_STATUS:
            return Retry(status)
        hint = ""
        if resp.status in (401, 403):
            hint = "; check the credentials (AWS_* / HF_TOKEN or storage_options)"
        if resp.status == 404:
            hint = "; no such object"
        if resp.status == 412:
            hint = "; the object changed since its header was read (ETag no longer matches)"
        err = ReadError(self.scrub(f"{t.url}: {what} failed: {status}{hint}"))
        err.status = resp.status  # type: ignore[attr-defined]
        return err

    def _retrying(self, t: Target, what: str, attempt: Callable[[], Any]) -> Any:
        s = self.settings
        deadline = time.monotonic() + s.retry_seconds
        for k in range(s.retries + 1):
            try:
                return attempt()
            except Retry as e:
                last = str(e)
            wait = min(2.0, s.backoff * 2**k) * (0.5 + random.random() / 2)
            if k == s.retries or time.monotonic() + wait > deadline:
                break
            with self._lock:
                self.retries += 1
            time.sleep(wait)
        raise ReadError(self.scrub(f"{t.url}: {what} failed after {k + 1} tries: {last}"))

    def get_small(self, t: Target, limit: int) -> bytes | None:
        """A whole small object (index.json, config.json), or None on 404."""

        def attempt() -> bytes | None:
            t2, conn, resp = self._send(t, {})
            if resp.status == 404:
                self._finish(t2, conn, resp)
                return None
            if resp.status != 200:
                raise self._fail(t2, conn, resp, "GET")
            if resp.length is not None and resp.length > limit:
                self._drop(conn)
                raise ReadError(f"{t.url}: {resp.length} bytes, more than {limit}")
            try:
                body = resp.read(limit + 1)
            except (OSError, http.client.HTTPException) as e:
                self._drop(conn)
                raise Retry(f"{type(e).__name__}: {e}") from e
            if len(body) > limit:
                self._drop(conn)
                raise ReadError(f"{t.url}: more than {limit} bytes")
            if resp.length or not resp.isclosed():
                self._drop(conn)  # the read stopped early or never saw the end
                raise Retry(f"short body: {len(body)} bytes")
            self._count(len(body))
            self._finish(t2, conn, resp)
            return body

        return self._retrying(t, "GET", attempt)

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def read_range(
        self,
        t: Target,
        offset: int,
        buffers: Sequence[memoryview],
        *,
        etag: str = "",
        size: int | None = None,
        what: str = "",
        to_end: bool = False,
        pending: tuple | None = None,
    ) -> tuple[int, str, int]:
        """Fill ``buffers`` in order from bytes ``offset...`` of the object.

        ``etag`` (the ETag at the header probe): sent as ``If-Match`` and
        compared with each response's; ``size``: the object's size, compared
        with each ``Content-Range``; ``to_end``: a range running past the
        object's end is cut there (the header probe); ``pending``: this
        range's GET, already sent by :meth:`start_range`. Returns (object
        size, ETag, bytes filled).
        """
        bufs = [b.cast("B") if b.format != "B" else b for b in buffers if len(b)]
        state: dict[str, Any] = {"pos": offset, "size": size, "etag": etag, "to_end": to_end}
        state["pending"] = pending
        label = what or f"GET bytes {offset}+{sum(len(b) for b in bufs)}"

        def attempt() -> None:
            pos = state["pos"]
            want = sum(len(b) for b in bufs)
            h = {"Range": f"bytes={pos}-{pos + want - 1}"}
            if state["etag"]:
                h["If-Match"] = state["etag"]
            ahead, state["pending"] = state["pending"], None
            if ahead is not None and ahead[2:] == (pos, want):
                t2, conn = ahead[:2]
                resp = self._answer(conn)
                if resp.status in _REDIRECT:
                    self._finish(t2, conn, resp)
                    raise Retry("redirected")  # the next try follows it
            else:
                if ahead is not None:
                    self.discard(ahead)
                t2, conn, resp = self._send(t, h)
            if resp.status == 200:
                self._drop(conn)  # its body is the whole object: never read it
                raise ReadError(
                    f"{t.url}: the server ignored Range (HTTP 200 for bytes {pos}-"
                    f"{pos + want - 1}); gpuload reads only ranges and will not download "
                    "the whole object"
                )
            if resp.status != 206:
                raise self._fail(t2, conn, resp, label)
            got = self._check(t2, conn, resp, pos, want, state)
            while want > got:  # the probe of an object shorter than the probe
                last = bufs.pop()
                want -= len(last)
                if want < got:
                    bufs.append(last[: got - want])
                    want = got
            self._body(t2, conn, resp, bufs, state)

        self._retrying(t, label, attempt)
        return state["size"], state["etag"], state["pos"] - offset

    def _check(self, t, conn, resp, pos: int, want: int, state: dict) -> int:
        m = _CONTENT_RANGE.match(resp.getheader("Content-Range", "") or "")
        tag = resp.getheader("ETag", "") or ""
        err = None
        if m is None or int(m.group(1)) != pos or int(m.group(2)) + 1 - pos > want:
            err = f"Content-Range {resp.getheader('Content-Range')!r} for bytes {pos}+{want}"
        elif state["size"] is not None and m.group(3) not in ("*", str(state["size"])):
            err = f"the object is now {m.group(3)} bytes, not {state['size']}: it was replaced"
        elif state["etag"] and tag and tag != state["etag"]:
            err = f"ETag {tag} differs from {state['etag']} at the header probe: it was replaced"
        elif resp.length is not None and resp.length != int(m.group(2)) + 1 - pos:
            err = f"Content-Length {resp.length} disagrees with Content-Range"
        if err is not None:
            self._drop(conn)
            raise ReadError(f"{t.url}: {err}")
        if state["size"] is None and m.group(3) != "*":
            state["size"] = int(m.group(3))
        if not state["etag"]:
            state["etag"] = tag
        got = int(m.group(2)) + 1 - pos
        if got < want and not (state.get("to_end") and pos + got == state["size"]):
            self._drop(conn)  # a server may cap a range; never a silent short fill
            raise ReadError(f"{t.url}: asked for {want} bytes at {pos}, the server sent {got}")
        return got

    def _body(self, t, conn, resp, bufs: list[memoryview], state: dict) -> None:
        """Read the body into ``bufs``; a drop keeps what arrived and retries
        from there (the range and ETag checks make the rest safe to fetch)."""
        try:
            while bufs:
                n = resp.readinto(bufs[0])
                if n == 0:
                    raise Retry(f"short body: the connection ended at byte {state['pos']}")
                self._count(n)
                state["pos"] += n
                bufs[0] = bufs[0][n:]
                if not len(bufs[0]):
                    bufs.pop(0)
        except (OSError, http.client.HTTPException, Retry) as e:
            self._drop(conn)
            if isinstance(e, Retry):
                raise
            if isinstance(e, socket.timeout | TimeoutError):
                raise Retry(f"timed out after {self.settings.timeout} s") from e
            raise Retry(f"{type(e).__name__}: {e}") from e
        if resp.length:
            self._drop(conn)  # the server sent more than the range: never reuse
        elif resp.will_close:
            self._drop(conn)
        else:
            self._release(t, conn)
