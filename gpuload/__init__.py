"""gpuload: safetensors checkpoints straight into memory, one tensor-parallel
rank's shard at a time, reading only the bytes that rank owns.

>>> import gpuload
>>> tensors = gpuload.load_sharded("/models/tiny-llama", rank=1, world=4, device="cpu")
"""

from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .config import Config
from .errors import (
    BackendUnavailable,
    ConfigFileError,
    GpuloadError,
    HeaderError,
    IndexFileError,
    OutOfMemoryError,
    PlanError,
    ReadError,
    ResourceError,
    ShardingError,
)
from .loader import Loader, load_sharded
from .report import LoadReport
from .resident import PRESET_EXPERTS, PrefaultReport, map_resident, prefault, residency
from .selection import Selection
from .sharding import Sharder

__version__ = "0.1.0"


def release_host_pool() -> int:
    """Unmap the huge-page result mappings CPU loads keep for the next load
    (``gpuload.hostpool``); returns the bytes given back to the OS."""
    from . import hostpool

    return hostpool.release()


def release_gpu_cache() -> None:
    """Free the pinned staging and streams that GPU loads keep for the next
    load in this process (``gpuload.gpu_cache``); a no-op without GPU loads."""
    from . import gpu_cache

    gpu_cache.release()


__all__ = [
    "BackendUnavailable",
    "Checkpoint",
    "Config",
    "ConfigFileError",
    "GpuloadError",
    "HeaderError",
    "IndexFileError",
    "LoadReport",
    "Loader",
    "OutOfMemoryError",
    "PRESET_EXPERTS",
    "PrefaultReport",
    "PlanError",
    "ReadError",
    "ResourceError",
    "Selection",
    "Sharder",
    "ShardingError",
    "TensorInfo",
    "__version__",
    "load_sharded",
    "map_resident",
    "open_checkpoint",
    "prefault",
    "release_gpu_cache",
    "release_host_pool",
    "residency",
]
