"""Shared test helpers: raw file crafting and the safetensors oracle."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, settings

# CI machines are slower and busier than the development ones: a property
# test is judged by what it finds, never by how long examples take to build.
settings.register_profile("gpuload", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gpuload")


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", pad: int = 0) -> Path:
    """Write a safetensors-shaped file from a header (dict or raw bytes) and data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    h += b" " * pad
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def write_tensors(path: Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str]) -> Path:
    """A safetensors file of numpy arrays, each stored as the given dtype name
    (the array's bytes as they are: an F8_E4M3 tensor from an ml_dtypes array)."""
    header, data, pos = {}, [], 0
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtypes[name], "shape": list(a.shape)}
        header[name]["data_offsets"] = [pos, pos + len(raw)]
        data.append(raw)
        pos += len(raw)
    write_raw(path, header, b"".join(data))
    assert set(oracle(path)) == set(tensors)  # the safetensors package reads it back
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
    from gpuload.format.dtypes import DTYPES, numpy_shape

    d = DTYPES[dtype]
    if d.packed:
        return np.frombuffer(raw, np.uint8).reshape(numpy_shape(d, shape))
    return np.frombuffer(raw, f"u{d.bits // 8}").reshape(shape)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------
# The dtype x shape matrix every tier loads (host, fake GPU, real GPU).

#: name suffix -> (shape, split dim). 24 divides by every world in
#: {1, 2, 3, 4, 8}; 96 keeps F4/F6 shards on whole bytes at every world
#: (96/8 = 12 elements x 6 bits = 9 bytes).
SHAPES = {
    "scalar": ((), None),
    "empty": ((0, 96), None),
    "vec": ((96,), 0),
    "row": ((24, 96), 0),
    "col": ((24, 96), 1),
    "exp0": ((24, 2, 96), 0),  # 3-D experts, expert-parallel style
    "exp1": ((2, 24, 96), 1),
    "exp2": ((2, 24, 96), 2),
}
RULES = {r"\.(vec|row|exp0)$": 0, r"\.(col|exp1)$": 1, r"\.exp2$": 2}


def write_matrix(
    where: Path, rng, *, aligned: bool = True, index: bool = False, extra: dict | None = None
) -> Path:
    """Every dtype x :data:`SHAPES` (plus ``extra``: name -> (dtype, shape)),
    random bytes, into ``where/model.safetensors`` (returned), or with
    ``index=True`` into two files plus index.json (``where`` is returned).
    Unaligned files put every tensor at an odd offset."""
    from gpuload.format.dtypes import DTYPES

    tensors = {
        f"{dname}.{kind}": (dname, shape)
        for dname, d in DTYPES.items()
        for kind, (shape, _) in SHAPES.items()
        if not (d.packed and not shape)  # a lone 4- or 6-bit scalar fills no byte
    }
    tensors.update(extra or {})
    names = list(tensors)
    groups = [names[::2], names[1::2]] if index else [names]
    files = []
    for i, group in enumerate(groups):
        header, data, pos = {"__metadata__": {"format": "pt"}}, [], 0
        for name in group:
            dname, shape = tensors[name]
            raw = rng.bytes(math.prod(shape) * DTYPES[dname].bits // 8)
            header[name] = {
                "dtype": dname,
                "shape": list(shape),
                "data_offsets": [pos, pos + len(raw)],
            }
            data.append(raw)
            pos += len(raw)
        text = json.dumps(header).encode()
        pad = (-len(text) % 8) + (0 if aligned else 3)
        fname = f"model-{i}.safetensors" if index else "model.safetensors"
        files.append(write_raw(where / fname, text, b"".join(data), pad=pad))
    if not index:
        return files[0]
    wm = {n: files[i].name for i, g in enumerate(groups) for n in g}
    (where / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return where


def split_dim(name: str) -> int | None:
    """The dim :data:`RULES` splits a matrix tensor on (None: whole)."""
    return SHAPES.get(name.split(".")[-1], (None, None))[1]


def differing(got: dict, want: dict[str, bytes]) -> list[str]:
    """Names whose result bytes differ from :func:`expected_shards`' (the
    same names on both sides, asserted)."""
    assert set(got) == set(want)
    return [n for n in want if np.ascontiguousarray(got[n]).tobytes() != want[n]]


def expected_shards(path: Path, rank: int, world: int, dims: dict | None = None) -> dict:
    """name -> this rank's bytes, by the safetensors oracle and ``np.split``;
    ``dims`` overrides :func:`split_dim` for extra tensors."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for f in files:
        for name, (dname, shape, raw) in oracle(f).items():
            full = carrier(dname, shape, raw)
            dim = (dims or {}).get(name, split_dim(name))
            out[name] = (full if dim is None else np.split(full, world, axis=dim)[rank]).tobytes()
    return out
