"""Remote checkpoints: ``s3://``, ``http(s)://`` and ``hf://`` paths, read
with ranged GETs so that each rank fetches only the byte ranges it owns.

A remote checkpoint is parsed with the same strict header rules and loaded
with the same plan and pipeline as a local one: only the reader differs
(:class:`gpuload.read.remote.reader.RemoteReader`). The HTTP client, the S3
request signing and the URL handling load only when a URL is opened, so
``import gpuload`` imports none of them. See ``docs/remote.md``.
"""

from __future__ import annotations

from typing import Any

SCHEMES = ("s3://", "http://", "https://", "hf://")
# Recognised, so that they fail with a clear message, not as a missing file.
UNSUPPORTED = ("gs://", "gcs://", "az://", "abfs://", "abfss://")


def is_remote(path: Any) -> bool:
    """Whether ``path`` is a URL gpuload reads remotely."""
    return isinstance(path, str) and path.lower().startswith(SCHEMES + UNSUPPORTED)


def open_remote(url: str, storage_options: dict[str, Any] | None = None):
    """Parse the remote checkpoint at ``url``: a
    :class:`~gpuload.format.checkpoint.Checkpoint` whose ``source`` makes its reader."""
    if url.lower().startswith(UNSUPPORTED):
        raise ValueError(
            f"{url}: {url.split(':', 1)[0]}:// is not supported; gpuload reads s3://, "
            "http(s):// and hf:// (a GCS bucket through its S3-compatible endpoint)"
        )
    from gpuload.read.remote.source import open_remote as _open

    return _open(url, storage_options)


__all__ = ["SCHEMES", "is_remote", "open_remote"]
