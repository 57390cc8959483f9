"""A range-capable HTTP/1.1 file server on 127.0.0.1 for the remote tests,
with faults injected on request: 500s, 503 SlowDown, a connection dropped
mid-body, a short body, Range ignored, 404s, 403 for a wrong token, and a
file replaced while a load runs. Multi-range GETs (``bytes=a-b,c-d``) are
answered as ``multipart/byteranges`` as nginx does, or (``Faults.multirange``)
refused with one coalesced range or the whole object, or answered with a
wrong part or a part cut short (the faults above cut multipart bodies too).
It counts what it sends, so the tests can check the bytes a load fetched at
the server, and its open connections, so they can check that none is left
behind.

It serves ``GET /PATH`` from ``root`` (path-style S3 URLs look the same:
``/bucket/key``) with ``ETag``/``If-Match`` as nginx does them.
"""

from __future__ import annotations

import dataclasses
import http.server
import os
import re
import ssl
import threading
import time
import urllib.parse
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_MULTI = re.compile(r"^bytes=\d+-\d+(,\d+-\d+)+$")
BOUNDARY = "00000000000000000017"


@dataclasses.dataclass
class Faults:
    every: int = 0  # inject on every N-th .safetensors GET (0: never), once per range
    kind: str = ""  # "500" | "503" | "drop" | "short" | "ignore_range" | "hang"
    repeat: bool = False  # also on retries of a faulted request
    missing: tuple[str, ...] = ()  # file names answered 404
    token: str = ""  # required "Authorization: Bearer TOKEN" (else 403)
    ignore_if_match: bool = False  # serve a stale If-Match anyway (ETag still sent)
    on_request: object = None  # callable(n) run before the n-th .safetensors GET
    delay_s: float = 0.0  # every .safetensors GET waits this long before its answer
    redirect_to: str = ""  # answer every GET with a 302 to this base URL + the path
    # multi-range GETs: "multipart" (as nginx) | "single" (one 206 range from the
    # first asked to the last) | "whole" (200, the object) | "wrong_part" (a
    # part shifted by a byte, Content-Range to match) | "short_part" (a part one
    # byte short, then the boundary)
    multirange: str = "multipart"
    multi_seen: int = 0  # multi-range GETs received


class RangeServer:
    def __init__(self, root: Path, faults: Faults | None = None, tls=None) -> None:
        self.root = Path(root)
        self.faults = faults or Faults()
        self.lock = threading.Lock()
        self.sent = 0  # body bytes written
        self.requests: list[tuple[str, str, int]] = []  # (path, range, status)
        self.active = 0  # open connections
        self.n = 0  # .safetensors GETs seen
        self.faulted: set[tuple[str, str]] = set()
        self.auth_seen = 0  # requests that carried an Authorization header
        self.inflight = self.peak = 0  # requests being answered, and the most at once
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server.lock:
                    server.active += 1

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    with server.lock:
                        server.active -= 1

            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                with server.lock:
                    server.inflight += 1
                    server.peak = max(server.peak, server.inflight)
                try:
                    server._get(self)
                finally:
                    with server.lock:
                        server.inflight -= 1

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        scheme = "http"
        if tls is not None:  # (certificate file, key file)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*map(str, tls))
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def __enter__(self) -> RangeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def quiet(self, seconds: float = 5.0) -> int:
        """Bytes sent, once no request is being answered (a handler counts
        its bytes after its write returns, maybe after the client read them)."""
        deadline = time.monotonic() + seconds
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.sent

    def wait_idle(self, seconds: float = 5.0) -> int:
        """Open connections once the client had ``seconds`` to close them."""
        deadline = time.monotonic() + seconds
        while self.active and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.active

    # -- one request -------------------------------------------------------

    def _reply(self, h, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        with self.lock:
            self.requests.append((h.path, h.headers.get("Range", ""), status))

    def _get(self, h) -> None:
        f = self.faults
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        file = (self.root / path.lstrip("/")).resolve()
        name = file.name
        if h.headers.get("Authorization"):
            with self.lock:
                self.auth_seen += 1
        if f.token and h.headers.get("Authorization") != f"Bearer {f.token}":
            return self._reply(h, 403, b"<Error><Code>AccessDenied</Code></Error>")
        if f.redirect_to:
            return self._reply(h, 302, b"", {"Location": f.redirect_to + h.path})
        if name in f.missing or not file.is_file() or self.root.resolve() not in file.parents:
            return self._reply(h, 404, b"<Error><Code>NoSuchKey</Code></Error>")
        fault = ""
        if name.endswith(".safetensors"):
            with self.lock:
                self.n += 1
                n = self.n
            if callable(f.on_request):
                f.on_request(n)
            time.sleep(f.delay_s)
            key = (path, h.headers.get("Range", ""))
            # Never the same request twice: a retry of it gets through.
            if f.every and n % f.every == 0 and (f.repeat or key not in self.faulted):
                fault = f.kind
                self.faulted.add(key)
        if fault == "500":
            return self._reply(h, 500, b"<Error><Code>InternalError</Code></Error>")
        if fault == "503":
            return self._reply(h, 503, b"<Error><Code>SlowDown</Code></Error>")
        st = file.stat()
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        want = h.headers.get("If-Match")
        if want and want != etag and not f.ignore_if_match:
            return self._reply(h, 412, b"<Error><Code>PreconditionFailed</Code></Error>")
        data = file.read_bytes()
        if _MULTI.match(h.headers.get("Range", "")) and fault != "ignore_range":
            return self._multi(h, data, etag, fault)
        m = _RANGE.match(h.headers.get("Range", ""))
        if m is None or fault == "ignore_range":
            return self._send(h, 200, data, {"ETag": etag}, fault)
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
        if start >= len(data):
            return self._reply(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
        cr = f"bytes {start}-{end}/{len(data)}"
        self._send(h, 206, data[start : end + 1], {"ETag": etag, "Content-Range": cr}, fault)

    def _multi(self, h, data: bytes, etag: str, fault: str) -> None:
        f = self.faults
        with self.lock:
            f.multi_seen += 1
        spans = [tuple(map(int, r.split("-"))) for r in h.headers["Range"][6:].split(",")]
        if f.multirange == "whole":
            return self._send(h, 200, data, {"ETag": etag}, fault)
        if f.multirange == "single":
            a, b = spans[0][0], spans[-1][1]
            cr = f"bytes {a}-{b}/{len(data)}"
            return self._send(h, 206, data[a : b + 1], {"ETag": etag, "Content-Range": cr}, fault)
        body = bytearray()
        for k, (a, b) in enumerate(spans):
            if f.multirange == "wrong_part" and k == len(spans) // 2:
                a, b = a + 1, b + 1
            chunk = data[a : b + 1]
            if f.multirange == "short_part" and k == len(spans) // 2:
                chunk = chunk[:-1]
            body += (
                f"\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: bytes {a}-{b}/{len(data)}\r\n\r\n"
            ).encode() + chunk
        body += f"\r\n--{BOUNDARY}--\r\n".encode()
        ct = f"multipart/byteranges; boundary={BOUNDARY}"
        self._send(h, 206, bytes(body), {"ETag": etag, "Content-Type": ct}, fault)

    def _send(self, h, status: int, body: bytes, headers: dict, fault: str) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        with self.lock:
            self.requests.append((h.path, h.headers.get("Range", ""), status))
        if fault in ("drop", "short", "hang"):
            cut = len(body) // 2
            h.wfile.write(body[:cut])
            h.wfile.flush()
            with self.lock:
                self.sent += cut
            if fault == "hang":
                time.sleep(3)
            h.close_connection = True
            if fault == "drop":  # a reset, not a clean end
                h.connection.setsockopt(
                    __import__("socket").SOL_SOCKET,
                    __import__("socket").SO_LINGER,
                    b"\x01\x00\x00\x00\x00\x00\x00\x00",
                )
            return
        try:
            h.wfile.write(body)
        except OSError:  # the client refused a 200 body: it closed the connection
            h.close_connection = True
            return
        with self.lock:
            self.sent += len(body)


def self_signed(where: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key), made here."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = where / "cert.pem", where / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def replace_file(path: Path) -> None:
    """Rewrite ``path`` with different bytes of the same size (a new ETag)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 1, max(len(data) - 4096, 0), -1):
        data[i] ^= 0xFF
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)
