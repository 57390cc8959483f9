"""gpuload inside PyTorch jobs.

- :func:`load_into`: a checkpoint into a module whose parameters are
  DTensors (FSDP2, tensor-parallel plans, both on a 2-D mesh) or plain
  tensors, each rank reading only its local shards' bytes.
- :func:`ranks`: rank and world from a ``torch.distributed`` process group
  (what ``gpuload.load_sharded(path)`` uses when they are omitted).

Importing this package does not import torch; its functions do, when called.
"""

from __future__ import annotations

from typing import Any

from gpuload.group import current_device, ranks

__all__ = ["current_device", "load_into", "local_box", "ranks"]


def __getattr__(name: str) -> Any:
    # Lazy: gpuload.loader imports .group, and load_into needs gpuload.loader.
    if name == "load_into":
        from gpuload.integrations.torch.dtensor import load_into

        return load_into
    if name == "local_box":
        from gpuload.integrations.torch.boxes import local_box

        return local_box
    raise AttributeError(f"module 'gpuload.torch' has no attribute {name!r}")
