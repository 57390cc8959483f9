"""gpuload: safetensors checkpoints straight into (GPU) memory, one rank's shard."""

from .errors import (
    BackendUnavailable,
    GpuloadError,
    HeaderError,
    IndexFileError,
    PlanError,
    ReadError,
    ShardingError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "GpuloadError",
    "HeaderError",
    "IndexFileError",
    "PlanError",
    "ReadError",
    "ShardingError",
    "__version__",
]
