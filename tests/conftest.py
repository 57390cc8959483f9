"""Shared test helpers: raw file crafting and the safetensors oracle."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", pad: int = 0) -> Path:
    """Write a safetensors-shaped file from a header (dict or raw bytes) and data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * pad
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def oracle(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Raw bytes of every tensor as the safetensors package reads them."""
    return {
        name: (v["dtype"], tuple(v["shape"]), bytes(v["data"]))
        for name, v in safetensors.deserialize(Path(path).read_bytes())
    }


def carrier(dtype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """The oracle's bytes as a numpy array we can slice: an unsigned integer of
    the element width, or uint8 bytes (last dim in bytes) for packed dtypes."""
    from gpuload.dtypes import DTYPES, numpy_shape

    d = DTYPES[dtype]
    if d.packed:
        return np.frombuffer(raw, np.uint8).reshape(numpy_shape(d, shape))
    return np.frombuffer(raw, f"u{d.bits // 8}").reshape(shape)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
