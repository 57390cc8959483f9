"""Independent checking of loaded shards against the safetensors package.

The oracle reads each file with ``safetensors.deserialize`` (its own parser,
not ours) and cuts shards with plain numpy slicing. ``gpuload demo`` uses it
to check every byte it loads; the tests use the same functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors

from gpuload.format.dtypes import DTYPES, numpy_shape
from gpuload.sharding.selection import Selection


def reference_tensors(files) -> dict[str, np.ndarray]:
    """Every tensor of ``files`` as a numpy array of raw bytes: an unsigned
    integer of the element width (packed dtypes: uint8 bytes)."""
    out: dict[str, np.ndarray] = {}
    for f in files:
        for name, v in safetensors.deserialize(Path(f).read_bytes()):
            d = DTYPES[v["dtype"]]
            shape = tuple(v["shape"])
            raw = np.frombuffer(bytes(v["data"]), np.uint8)
            if d.packed:
                out[name] = raw.reshape(numpy_shape(d, shape))
            else:
                out[name] = raw.view(f"u{d.bits // 8}").reshape(shape)
    return out


def cut(full: np.ndarray, sel: Selection) -> np.ndarray:
    """This rank's shard by numpy slicing: the ranges along ``sel.dim``, side by side."""
    if sel.dim is None:
        return full
    parts = [np.take(full, np.arange(a, a + n), axis=sel.dim) for a, n in sel.ranges]
    if not parts:
        return np.take(full, np.arange(0), axis=sel.dim)
    return np.concatenate(parts, axis=sel.dim)


def as_bytes(array) -> bytes:
    """Raw bytes of a numpy array or a (CPU or CUDA) torch tensor."""
    if hasattr(array, "detach"):  # torch
        array = array.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy()
    if hasattr(array, "get"):  # cupy
        array = array.get()
    return np.ascontiguousarray(array).tobytes()


def mismatches(result: dict, expected: dict[str, np.ndarray]) -> list[str]:
    """Names whose loaded bytes differ from the expected arrays (or are missing/extra)."""
    bad = sorted(set(result) ^ set(expected))
    for name in sorted(set(result) & set(expected)):
        if as_bytes(result[name]) != expected[name].tobytes():
            bad.append(name)
    return bad
