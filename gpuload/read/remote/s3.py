"""S3: AWS Signature Version 4 for GETs, object URLs and ListObjectsV2.

The signing is the documented algorithm (checked against botocore's signer
by the tests): GETs carry no body, so the payload hash is that of the empty
string. Without credentials requests go unsigned (public buckets).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import urllib.parse
import xml.etree.ElementTree as ET
from typing import Any

from gpuload.errors import ReadError
from gpuload.read.remote.client import Client, Target

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
LIST_LIMIT = 1 << 22  # one ListObjectsV2 page is at most ~1 MiB of XML


@dataclasses.dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str = ""
    region: str = "us-east-1"


def _quote(s: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(s, safe=safe)


def sign(creds: Credentials, method: str, t: Target, headers: dict[str, str], now=None) -> None:
    """Add ``x-amz-date``, ``x-amz-content-sha256`` (and the session token)
    and the SigV4 ``Authorization`` header for a bodiless request."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    day = stamp[:8]
    p = t.parts
    headers["x-amz-date"] = stamp
    headers["x-amz-content-sha256"] = EMPTY_SHA256
    if creds.session_token:
        headers["x-amz-security-token"] = creds.session_token
    signed = {"host": p.netloc}
    signed.update(
        {k.lower(): v.strip() for k, v in headers.items() if k.lower().startswith("x-amz-")}
    )
    names = sorted(signed)
    query = urllib.parse.parse_qsl(p.query, keep_blank_values=True)
    canonical = "\n".join(
        [
            method,
            p.path or "/",  # already percent-encoded by object_url
            "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query)),
            "".join(f"{k}:{signed[k]}\n" for k in names),
            ";".join(names),
            EMPTY_SHA256,
        ]
    )
    scope = f"{day}/{creds.region}/s3/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + creds.secret_access_key).encode()
    for part in (day, creds.region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={creds.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={sig}"
    )


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One bucket behind an endpoint: object targets and listings."""

    name: str
    endpoint: str  # "https://s3.us-east-1.amazonaws.com" or a custom one (path style)
    creds: Credentials | None
    virtual: bool = False  # bucket in the host name (AWS without a custom endpoint)

    def _signer(self):
        creds = self.creds
        if creds is None:
            return None
        return lambda method, t, headers: sign(creds, method, t, headers)

    def target(self, key: str, query: dict[str, str] | None = None) -> Target:
        base = urllib.parse.urlsplit(self.endpoint)
        path = "/" + _quote(key, safe="-_.~/")
        if self.virtual:
            netloc = f"{self.name}.{base.netloc}"
        else:
            netloc, path = base.netloc, f"{base.path.rstrip('/')}/{_quote(self.name)}{path}"
        q = urllib.parse.urlencode(sorted((query or {}).items()), quote_via=urllib.parse.quote)
        url = urllib.parse.urlunsplit((base.scheme, netloc, path, q, ""))
        return Target(url, (), self._signer())

    def list(self, client: Client, prefix: str) -> dict[str, tuple[int, str]]:
        """Every object directly under ``prefix``: name -> (size, ETag)."""
        out: dict[str, tuple[int, str]] = {}
        token = ""
        while True:
            q = {"list-type": "2", "prefix": prefix, "delimiter": "/"}
            if token:
                q["continuation-token"] = token
            t = self.target("", q)
            body = client.get_small(t, LIST_LIMIT)
            if body is None:
                raise FileNotFoundError(f"s3://{self.name}/{prefix}: no such bucket")
            root = _parse(body, t.url)
            ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            for c in root.iter(f"{ns}Contents"):
                key = c.findtext(f"{ns}Key") or ""
                out[key[len(prefix) :]] = (
                    int(c.findtext(f"{ns}Size") or 0),
                    c.findtext(f"{ns}ETag") or "",
                )
            if (root.findtext(f"{ns}IsTruncated") or "").lower() != "true":
                return out
            token = root.findtext(f"{ns}NextContinuationToken") or ""
            if not token:
                return out


def _parse(body: bytes, url: str) -> Any:
    try:
        return ET.fromstring(body)
    except ET.ParseError as e:
        raise ReadError(f"{url}: the listing is not XML ({e})") from None
