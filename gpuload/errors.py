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


class OutOfMemoryError(GpuloadError, MemoryError):
    """Memory ran out during a load: RAM, the address space (``RLIMIT_AS``),
    the process's mappings (``vm.max_map_count``) or device memory. Also a
    ``MemoryError``, which is what callers of allocating code catch."""


class ResourceError(GpuloadError, RuntimeError):
    """A system resource other than memory ran out during a load (a thread
    could not be started). Also a ``RuntimeError``, as Python raises it."""


__all__ = [
    "BackendUnavailable",
    "ConfigFileError",
    "GpuloadError",
    "HeaderError",
    "IndexFileError",
    "OutOfMemoryError",
    "PlanError",
    "ReadError",
    "ResourceError",
    "ShardingError",
]


def exhausted(exc: BaseException, what: str) -> GpuloadError | None:
    """The GpuloadError for ``exc`` when it says a resource ran out (a
    ``MemoryError``; ``RuntimeError: can't start new thread``), else None.
    ``what`` says during what, for the message."""
    if isinstance(exc, GpuloadError):
        return None
    if isinstance(exc, MemoryError):
        detail = str(exc) or type(exc).__name__
        return OutOfMemoryError(
            f"{what}: out of memory ({detail}); nothing was returned and what the load "
            "had allocated is freed (free memory, raise ulimit -v, or load fewer tensors)"
        )
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        return ResourceError(
            f"{what}: cannot start a thread ({exc}); lower threads= (GPULOAD_THREADS) "
            "or raise the process's limits (ulimit -u, ulimit -v)"
        )
    return None
