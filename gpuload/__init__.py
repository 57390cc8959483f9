"""gpuload: safetensors checkpoints straight into memory, one tensor-parallel
rank's shard at a time, reading only the bytes that rank owns.

>>> import gpuload
>>> tensors = gpuload.load_sharded("/models/tiny-llama", rank=1, world=4, device="cpu")
"""

from gpuload.config import Config
from gpuload.errors import (
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
from gpuload.format.checkpoint import Checkpoint
from gpuload.format.header import TensorInfo
from gpuload.host.prefault import PrefaultReport, prefault
from gpuload.host.resident import PRESET_EXPERTS, map_resident
from gpuload.load import load_sharded
from gpuload.loader import Loader
from gpuload.memory.mapping import residency
from gpuload.read.open import open_checkpoint
from gpuload.report import LoadReport
from gpuload.sharding.selection import Selection
from gpuload.sharding.sharder import Sharder

__version__ = "0.1.0"


def release_host_pool() -> int:
    """Unmap the huge-page result mappings CPU loads keep for the next load
    (``gpuload.memory.pool``); returns the bytes given back to the OS."""
    from gpuload.memory import pool as hostpool

    return hostpool.release()


def release_gpu_cache() -> None:
    """Free the pinned staging and streams that GPU loads keep for the next
    load in this process (``gpuload.cuda.cache``); a no-op without GPU loads."""
    from gpuload.cuda import cache as gpu_cache

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
