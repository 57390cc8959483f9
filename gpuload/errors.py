"""The gpuload error hierarchy.

Every failure that comes from the checkpoint, the plan or the hardware is a
``GpuloadError``; bad arguments stay ``ValueError``/``TypeError`` and missing
paths ``FileNotFoundError``, as Python users expect.
"""

from __future__ import annotations


class GpuloadError(Exception):
    """Base class of every gpuload failure.

    ``keywords``: the keyword arguments the message tells the caller to pass,
    spelled as they appear in it (``"allow_uneven=True"``, ``"num_heads="``),
    so that a front end with other names for them (the command line's
    ``--allow-uneven``) can say them its way.
    """

    keywords: tuple[str, ...] = ()

    def __init__(self, *args: object, keywords: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        if keywords:
            self.keywords = tuple(keywords)


class HeaderError(GpuloadError):
    """A safetensors header (or index.json) is malformed or inconsistent.

    ``file`` and ``tensor`` name where; ``tensor`` is None when the fault is
    not tied to one tensor (a bad length prefix, say).
    """

    def __init__(self, file: str, message: str, tensor: str | None = None) -> None:
        self.file = str(file)
        self.tensor = tensor
        where = f"{self.file}: tensor {tensor!r}: " if tensor is not None else f"{self.file}: "
        super().__init__(where + message)


class IndexFileError(HeaderError):
    """model.safetensors.index.json is malformed or disagrees with the files."""


class ConfigFileError(HeaderError):
    """config.json is not valid JSON, or not a JSON object."""


class ShardingError(GpuloadError):
    """A tensor cannot be split as its rule asks (uneven, unknown heads...)."""


class PlanError(GpuloadError):
    """The read plan cannot be built or does not fit its budgets."""


class ReadError(GpuloadError):
    """Reading a checkpoint file failed (short read, EIO, file changed)."""


class BackendUnavailable(GpuloadError):
    """A requested backend or device cannot be used on this machine."""


__all__ = [
    "BackendUnavailable",
    "ConfigFileError",
    "GpuloadError",
    "HeaderError",
    "IndexFileError",
    "PlanError",
    "ReadError",
    "ShardingError",
]
