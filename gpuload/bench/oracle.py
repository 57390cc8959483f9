"""Every contender's output is checked once, before it is timed.

The expected bytes come from the files through a dozen lines of header
reading of our own (not :mod:`gpuload.format.header`), cut to the rank's shard
with plain numpy slicing (:func:`gpuload.sharding.verify.cut`). Big models are checked
on a sample: every tensor outside the decoder layers and every tensor of the
first and last layers, which covers each kind of split (row, column, GQA
replicated, fused, experts) without reading the whole model again.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping

import numpy as np

from gpuload.sharding.selection import Selection
from gpuload.sharding.verify import as_bytes, cut

# Bytes per element of the dtypes the synthetic models use (and then some).
_WIDTH = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2}
_WIDTH |= {"I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_LAYER = re.compile(r"\.layers\.(\d+)\.")
SMALL_MODEL = 256 << 20  # below this, every tensor is checked


class Mismatch(Exception):
    """A contender's output differs from the files (or misses tensors)."""


def read_header(path: str) -> tuple[int, dict]:
    """``(data start, header)`` of one safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


class Oracle:
    """Expected bytes of any tensor of a checkpoint, read on demand."""

    def __init__(self, files: Iterable[str]) -> None:
        self.where: dict[str, tuple[str, int, dict]] = {}
        for f in files:
            start, header = read_header(f)
            for name, entry in header.items():
                if name != "__metadata__":
                    self.where[name] = (f, start, entry)
        self.nbytes = sum(b - a for *_, e in self.where.values() for a, b in [e["data_offsets"]])

    def nbytes_of(self, name: str, sel: Selection) -> int:
        """Bytes of ``name``'s part ``sel`` (what a loader delivers for it)."""
        return _WIDTH[self.where[name][2]["dtype"]] * math.prod(sel.shape)

    def full(self, name: str) -> np.ndarray:
        f, start, e = self.where[name]
        a, b = e["data_offsets"]
        fd = os.open(f, os.O_RDONLY)
        try:
            raw = os.pread(fd, b - a, start + a)
        finally:
            os.close(fd)
        width = _WIDTH[e["dtype"]]
        return np.frombuffer(raw, f"u{width}").reshape(e["shape"])

    def sample(self) -> list[str]:
        """Names to check: all of a small model; else the non-layer tensors and
        the first and last decoder layers."""
        names = sorted(self.where)
        if self.nbytes <= SMALL_MODEL:
            return names
        layers = {int(m.group(1)) for n in names if (m := _LAYER.search(n))}
        keep = {min(layers), max(layers)} if layers else set()
        return [n for n in names if (m := _LAYER.search(n)) is None or int(m.group(1)) in keep]

    def check(self, result: Mapping[str, object], selections: Mapping[str, Selection]) -> None:
        """Raise :class:`Mismatch` naming the tensors whose bytes differ from
        the oracle's (sampled), or that are missing or unexpected."""
        missing = sorted(set(selections) - set(result))
        extra = sorted(set(result) - set(selections))
        if missing or extra:
            raise Mismatch(f"tensors missing {missing[:3]} / unexpected {extra[:3]}")
        bad = [
            n
            for n in self.sample()
            if n in selections and as_bytes(result[n]) != cut(self.full(n), selections[n]).tobytes()
        ]
        if bad:
            raise Mismatch(f"bytes differ from the files in {len(bad)} tensor(s): {bad[:3]}")
