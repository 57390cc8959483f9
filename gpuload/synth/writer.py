"""An independent safetensors writer, for tests and synthetic checkpoints.

It shares no code with :mod:`gpuload.format.header`, so tests can check that
parser against it and against ``safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gpuload.format.dtypes import DTYPES

TensorData = bytes | bytearray | memoryview | np.ndarray


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Iterable[memoryview]]  # called once, when the file is written


def _tensor_nbytes(name: str, dtype: str, shape: Any) -> int:
    dt = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dt is None:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"tensor {name!r}: shape {shape!r} must be a tuple of ints >= 0")
    bits = dt.bits * math.prod(int(d) for d in shape)
    if bits % 8:
        raise ValueError(
            f"tensor {name!r}: {dtype}{list(shape)} is {bits} bits, not a whole number of "
            "bytes (the format packs sub-byte dtypes and requires numel x bits % 8 == 0)"
        )
    return bits // 8


def _as_bytes(name: str, data: Any) -> memoryview:
    if isinstance(data, np.ndarray):
        if data.dtype.byteorder == ">":
            raise ValueError(f"tensor {name!r}: big-endian array; safetensors is little-endian")
        arr = np.ascontiguousarray(data).reshape(-1)
        return memoryview(arr.view(np.uint8))
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data)
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    raise TypeError(f"tensor {name!r}: data is {type(data).__name__}, not bytes or np.ndarray")


def _header(
    entries: list[_Entry],
    metadata: Mapping[str, str] | None,
    align: int | None,
    header_pad: int,
    unaligned: bool,
) -> bytes:
    doc: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata must map str to str")
        doc["__metadata__"] = dict(metadata)
    pos = 0
    for e in entries:
        doc[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [pos, pos + e.nbytes],
        }
        pos += e.nbytes
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    n = len(text) + header_pad
    if unaligned:
        n += (1 - (8 + n)) % 8 or 8  # at least one space; data starts at 1 mod 8
    elif align is not None:
        n += -(8 + n) % align
    return text + b" " * (n - len(text))


def _chunks(path: Path, entries: list[_Entry]) -> Iterator[memoryview]:
    for e in entries:
        got = 0
        for chunk in e.chunks():
            got += len(chunk)
            yield chunk
        if got != e.nbytes:
            raise AssertionError(f"{path}: tensor {e.name!r} produced {got} of {e.nbytes} bytes")


_DONE = object()


def _ahead(chunks: Iterator[memoryview], depth: int = 2) -> Iterator[memoryview]:
    """Produce ``chunks`` in a thread, ``depth`` ahead of the consumer.

    The RNG holds the GIL but ``write`` releases it, so generating the next
    chunk while the last one is written about doubles the rate (measured).
    """
    q: queue.Queue[Any] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for c in chunks:
                if not put(c):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    thread = threading.Thread(target=produce, name="gpuload-synth", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _write_file(
    path: Path,
    entries: list[_Entry],
    metadata: Mapping[str, str] | None,
    align: int | None,
    header_pad: int,
    unaligned: bool,
    *,
    threaded: bool = False,
    fsync: bool = False,
) -> None:
    """Write one file: the length, the header, then each buffer in turn."""
    head = _header(entries, metadata, align, header_pad, unaligned)
    chunks = _chunks(path, entries)
    with open(path, "wb") as f, contextlib.closing(_ahead(chunks) if threaded else chunks) as it:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for chunk in it:
            f.write(chunk)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, tuple[str, tuple[int, ...], TensorData]],
    metadata: Mapping[str, str] | None = None,
    *,
    align: int | None = 8,
    header_pad: int = 0,
    unaligned: bool = False,
) -> None:
    """Write a ``.safetensors`` file from raw tensor bytes, in the given order.

    Parameters
    ----------
    path
        The file to create (overwritten if it exists).
    tensors
        Ordered mapping ``name -> (dtype, shape, data)``: ``dtype`` a safetensors
        dtype name (``"BF16"``, ``"F8_E4M3"``, ``"F4"``, ...), ``shape`` a tuple
        of ints (``()`` for a scalar), ``data`` the tensor's bytes (bytes-like or
        any C- or non-contiguous little-endian ``np.ndarray``, taken as raw bytes).
        Sub-byte dtypes (F4, F6_*) are packed: ``data`` holds numel x bits / 8
        bytes.
    metadata
        The ``__metadata__`` string map, or None for none.
    align
        Pad the JSON header with spaces so the data section starts at a
        multiple of ``align`` bytes (8: what ``safetensors`` writes). None: no
        alignment padding.
    header_pad
        Extra spaces added to the header (before alignment padding).
    unaligned
        Pad the header so the data section starts at 1 mod 8 (``align`` is not
        applied): then every tensor whose preceding tensors all have even byte
        sizes sits at an odd file offset.

    Raises
    ------
    ValueError
        Unknown dtype, bad shape, numel x bits not a multiple of 8, data of the
        wrong length, or bad ``align`` / ``header_pad``.

    Notes
    -----
    Offsets are relative to the data section, which starts at ``8 + N`` (``N``
    the header length). The header and each tensor's buffer are written in
    turn; nothing is concatenated.
    """
    if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise ValueError(f"{align=} must be a positive int or None")
    if isinstance(header_pad, bool) or not isinstance(header_pad, int) or header_pad < 0:
        raise ValueError(f"{header_pad=} must be an int >= 0")
    entries = []
    for name, spec in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} must be a str other than '__metadata__'")
        dtype, shape, data = spec
        nbytes = _tensor_nbytes(name, dtype, shape)
        buf = _as_bytes(name, data)
        if len(buf) != nbytes:
            raise ValueError(
                f"tensor {name!r}: {dtype}{list(shape)} needs {nbytes} bytes, data has {len(buf)}"
            )
        entries.append(
            _Entry(name, dtype, tuple(int(d) for d in shape), nbytes, lambda b=buf: (b,))
        )
    _write_file(Path(path), entries, metadata, align, header_pad, unaligned)
