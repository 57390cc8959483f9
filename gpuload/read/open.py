"""Opening a checkpoint wherever it is: a local path or a remote URL.

The one entry point callers use (``gpuload.open_checkpoint``): a URL goes to
:mod:`gpuload.read.remote` (headers by ranged GETs), anything else to
:func:`gpuload.format.checkpoint.open_local`. It sits in the read stage, not
the format stage, because a remote checkpoint needs the remote readers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from gpuload.format.checkpoint import Checkpoint, open_local


def open_checkpoint(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    storage_options: dict[str, Any] | None = None,
) -> Checkpoint:
    """Parse a checkpoint: a ``.safetensors`` file, a list of them, or a model
    directory (with ``model.safetensors.index.json`` and ``config.json``),
    also as a list of one.

    A ``s3://``, ``http(s)://`` or ``hf://`` URL is a remote checkpoint
    (:mod:`gpuload.read.remote`): its headers are fetched with ranged GETs, and
    ``storage_options`` overrides the endpoint and credentials the
    environment gives.

    Raises
    ------
    FileNotFoundError
        ``path`` (or a listed file) does not exist.
    HeaderError, IndexFileError
        A header or the index is malformed, or they disagree; the message names
        the file and the tensor.
    """
    # Imported here so that ``import gpuload`` imports no remote module; the
    # HTTP clients themselves load only once a URL is opened.
    from gpuload.read import remote

    if remote.is_remote(path):
        return remote.open_remote(path, storage_options)
    if storage_options is not None:
        raise ValueError(f"storage_options is for s3://, http(s):// and hf:// paths, not {path!r}")
    return open_local(path)


__all__ = ["open_checkpoint"]
