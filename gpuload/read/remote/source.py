"""Remote checkpoint sources: URLs -> objects, the header probes, and the
:class:`~gpuload.format.checkpoint.Checkpoint` a load plans from.

``s3://BUCKET/PREFIX/`` and ``http(s)://HOST/PATH/`` are model directories
(``model.safetensors.index.json``, else ``model.safetensors``; S3 also lists
``*.safetensors`` under the prefix); a URL ending in ``.safetensors`` is one
file; ``hf://ORG/REPO[@REVISION][/SUBDIR]`` is a directory behind the Hub's
resolve URLs (``HF_ENDPOINT``, ``HF_TOKEN``).

Headers: one ranged GET of :data:`PROBE_BYTES` per file, all files at once,
and a second GET only for a header longer than the probe; the strict header
rules of :mod:`gpuload.format.header` apply unchanged. Each object's size and
ETag are recorded there, and every later range is checked against them.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from typing import Any

from gpuload import config as _config
from gpuload.errors import ConfigFileError, HeaderError, IndexFileError, ReadError
from gpuload.format.checkpoint import INDEX_NAME, _no_duplicates, _plain_file_name, assemble
from gpuload.format.header import MAX_HEADER_BYTES, FileHeader, _reject_constant, parse_header_bytes
from gpuload.read.remote.client import Client, Settings, Target
from gpuload.read.remote.s3 import Bucket, Credentials
from gpuload.read.workers import run_jobs

PROBE_BYTES = 1 << 20  # hf-mount's probe: the header and often the first tensors' start
JSON_LIMIT = 64 << 20  # index.json / config.json
PROBE_THREADS = 16
MAX_SEEDS = 64  # probes kept to serve reads from: at most 64 MiB per checkpoint

#: The keys ``storage_options=`` takes (each overrides its environment variable).
OPTIONS = {
    "endpoint": "S3 endpoint URL (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3)",
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
    "region": "AWS_REGION (default us-east-1)",
    "allow_http": "AWS_ALLOW_HTTP: a plain-http S3 endpoint is refused unless true",
    "hf_endpoint": "HF_ENDPOINT (default https://huggingface.co)",
    "hf_token": "HF_TOKEN",
    "headers": "extra HTTP headers for http(s):// (a dict)",
    "timeout": "seconds per connect and socket read (30)",
    "retries": "retries per request after the first (5)",
    "retry_seconds": "total seconds one request may spend retrying (60)",
}


@dataclasses.dataclass
class Source:
    """Where a remote checkpoint's objects are, and the client reading them."""

    root: str  # the URL the caller gave, as printed in reports
    base: str  # the directory URL files are named against (or "")
    client: Client
    target_of: Any  # name (relative to base) -> Target
    files: dict[str, Target] = dataclasses.field(default_factory=dict)  # url -> target
    probe_bytes: int = 0  # bytes the header probes fetched
    # Each file's first bytes as the probe fetched them (the header and the
    # start of the data): ranges inside them are served from here, as
    # hf-mount seeds its buffer with the probe's trailing bytes.
    seeds: dict[str, bytes] = dataclasses.field(default_factory=dict, repr=False)

    def reader(self, headers, *, prefetch: bool):
        from gpuload.read.remote.reader import RemoteReader

        return RemoteReader(self, headers, prefetch=prefetch)


def _options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    opts: dict[str, Any] = dict(_config.remote_env())
    if storage_options is not None:
        if not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict, got {type(storage_options).__name__}")
        bad = sorted(set(storage_options) - set(OPTIONS))
        if bad:
            raise TypeError(f"unknown storage_options {bad}; known: {sorted(OPTIONS)}")
        opts.update({k: v for k, v in storage_options.items() if v is not None})
    return opts


def _settings(opts: dict[str, Any]) -> Settings:
    s = Settings(
        secrets=tuple(
            str(opts[k]) for k in ("secret_access_key", "session_token", "hf_token") if opts.get(k)
        )
    )
    for k, cast in (("timeout", float), ("retries", int), ("retry_seconds", float)):
        if k in opts:
            v = cast(opts[k])
            if v < 0 or (k == "timeout" and v == 0):
                raise ValueError(f"storage_options[{k!r}] must be positive, got {opts[k]!r}")
            setattr(s, k, v)
    return s


def make_source(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[Source, list[str] | None]:
    """The source of ``url`` and, for a single-file URL, its one file name."""
    opts = _options(storage_options)
    client = Client(_settings(opts))
    scheme = url.split("://", 1)[0].lower()
    rest = url.split("://", 1)[1]
    single = rest.endswith(".safetensors")
    if scheme == "s3":
        bucket_name, _, key = rest.partition("/")
        if not bucket_name:
            raise ValueError(f"{url}: no bucket name")
        creds = None
        if opts.get("access_key_id") and opts.get("secret_access_key"):
            creds = Credentials(
                str(opts["access_key_id"]),
                str(opts["secret_access_key"]),
                str(opts.get("session_token") or ""),
                str(opts.get("region") or "us-east-1"),
            )
        endpoint = opts.get("endpoint")
        region = str(opts.get("region") or "us-east-1")
        virtual = not endpoint
        endpoint = str(endpoint or f"https://s3.{region}.amazonaws.com").rstrip("/")
        if endpoint.startswith("http://") and not _config.parse_bool(
            "allow_http", opts.get("allow_http", False)
        ):
            raise ValueError(
                f"{url}: the S3 endpoint {endpoint} is plain http; set AWS_ALLOW_HTTP=true "
                "or storage_options={'allow_http': True} to allow it"
            )
        bucket = Bucket(bucket_name, endpoint, creds, virtual)
        prefix = key.rsplit("/", 1)[0] + "/" if single and "/" in key else ("" if single else key)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        src = Source(
            url, f"s3://{bucket_name}/{prefix}", client, lambda n: bucket.target(prefix + n)
        )
        src.bucket, src.prefix = bucket, prefix  # type: ignore[attr-defined]
    elif scheme in ("http", "https"):
        extra = opts.get("headers") or {}
        if not isinstance(extra, dict):
            raise TypeError("storage_options['headers'] must be a dict")
        base = url.rsplit("/", 1)[0] + "/" if single else (url if url.endswith("/") else url + "/")
        hdrs = tuple((str(k), str(v)) for k, v in extra.items())
        client.settings.secrets += tuple(str(v) for _, v in hdrs)
        src = Source(url, base, client, lambda n: Target(urllib.parse.urljoin(base, _q(n)), hdrs))
    elif scheme == "hf":
        repo, sub = _hf_parts(url, rest)
        endpoint = str(opts.get("hf_endpoint") or "https://huggingface.co").rstrip("/")
        token = opts.get("hf_token")
        hdrs = (("Authorization", f"Bearer {token}"),) if token else ()
        if single:  # hf://org/repo/dir/file.safetensors: its directory
            sub = sub.rsplit("/", 1)[0] if "/" in sub else ""
        base = f"{endpoint}/{repo}/{sub + '/' if sub else ''}"
        src = Source(url, base, client, lambda n: Target(base + _q(n), hdrs))
    else:
        raise ValueError(f"{url}: unsupported scheme {scheme!r}")
    names = [urllib.parse.unquote(url.rstrip("/").rsplit("/", 1)[-1])] if single else None
    return src, names


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="/-_.~@")


def _hf_parts(url: str, rest: str) -> tuple[str, str]:
    """``ORG/REPO[@REV][/SUB]`` -> ("ORG/REPO/resolve/REV", "SUB")."""
    parts = rest.strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"{url}: expected hf://ORG/REPO[@REVISION][/PATH]")
    repo, _, rev = parts[1].partition("@")
    sub = "/".join(parts[2:])
    rev = urllib.parse.quote(rev or "main", safe="")
    return f"{parts[0]}/{repo}/resolve/{rev}", _q(sub)


def _json(src: Source, name: str, err: type[HeaderError]) -> Any:
    t = src.target_of(name)
    body = src.client.get_small(t, JSON_LIMIT)
    if body is None:
        return None
    try:
        return json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_no_duplicates(t.url, err),
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError:
        raise err(t.url, "not UTF-8") from None
    except RecursionError:
        raise err(t.url, "JSON nested too deeply") from None
    except ValueError as e:
        raise err(t.url, f"not valid JSON: {e}") from None


def probe(src: Source, name: str) -> FileHeader:
    """Parse one file's header from one ranged GET (two for a long header)."""
    t = src.target_of(name)
    buf = bytearray(PROBE_BYTES)
    size, etag, got = src.client.read_range(
        t, 0, [memoryview(buf)], what="header probe", to_end=True
    )
    head = bytes(buf[:got])
    n = int.from_bytes(head[:8], "little") if got >= 8 else 0
    if got < 8 + n and 0 < n <= MAX_HEADER_BYTES and 8 + n <= size:
        more = bytearray(8 + n - got)
        src.client.read_range(t, got, [memoryview(more)], etag=etag, size=size, what="header")
        head += bytes(more)
    h = parse_header_bytes(t.url, head, size, (0, 0, size, 0))
    if len(src.seeds) < MAX_SEEDS:
        src.seeds[t.url] = head
    return dataclasses.replace(h, version=etag)


def open_remote(url: str, storage_options: dict[str, Any] | None = None):
    """Discover, probe and assemble the checkpoint at ``url``."""
    src, names = make_source(url, storage_options)
    try:
        return _open(src, names)
    finally:
        src.client.close()  # the probes' connections: a load opens its own


def _open(src: Source, names: list[str] | None):
    weight_map = index = None
    single = names is not None
    if names is None:
        listed = None
        if hasattr(src, "bucket"):
            listed = src.bucket.list(src.client, src.prefix)  # type: ignore[attr-defined]
        doc = (
            None
            if listed is not None and INDEX_NAME not in listed
            else _json(src, INDEX_NAME, IndexFileError)
        )
        if doc is not None:
            index = src.target_of(INDEX_NAME).url
            if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
                raise IndexFileError(index, "has no weight_map object")
            weight_map = {t: _plain_file_name(index, t, f) for t, f in doc["weight_map"].items()}
            names = sorted(set(weight_map.values()))
            if listed is not None:
                for f in names:
                    if f not in listed:
                        who = next(t for t, n in weight_map.items() if n == f)
                        raise IndexFileError(index, f"references missing file {f!r}", who)
        elif listed is not None:
            names = (
                ["model.safetensors"]
                if "model.safetensors" in listed
                else sorted(n for n in listed if n.endswith(".safetensors") and "/" not in n)
            )
            if not names:
                raise FileNotFoundError(f"{src.root}: no {INDEX_NAME} and no *.safetensors objects")
        else:
            names = ["model.safetensors"]
    headers: list[FileHeader | None] = [None] * len(names)

    def job(i: int) -> None:
        try:
            headers[i] = probe(src, names[i])
        except ReadError as e:
            missing = getattr(e, "status", None) == 404
            if index is not None and missing:
                who = next(t for t, n in (weight_map or {}).items() if n == names[i])
                raise IndexFileError(
                    index, f"references missing file {names[i]!r} ({e})", who
                ) from None
            if index is None and names == ["model.safetensors"] and missing and not single:
                raise FileNotFoundError(
                    f"{src.root}: no {INDEX_NAME} and no model.safetensors"
                ) from None
            raise

    run_jobs(len(names), min(PROBE_THREADS, len(names)), job, lambda _: None, name="gpuload-probe")
    hdrs = [h for h in headers if h is not None]
    src.files = {h.path: src.target_of(n) for h, n in zip(hdrs, names, strict=True)}
    config = _json(src, "config.json", ConfigFileError)
    cfg_path = src.target_of("config.json").url if config is not None else None
    src.probe_bytes = src.client.bytes  # listing, index, header probes, config
    file_names = {h.path: n for h, n in zip(hdrs, names, strict=True)}
    root = None if single else src.root
    return assemble(hdrs, weight_map, index, config, cfg_path, root, file_names, src)
