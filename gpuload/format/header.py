"""One safetensors file's header: strict parsing into :class:`FileHeader`.

The safetensors package has no API for data offsets, so gpuload parses the
header itself. Headers are untrusted input: every rule of the format is
checked (after safetensors' Rust core, ``src/tensor.rs``) and each failure is
a :class:`~gpuload.errors.HeaderError` naming the file and the tensor.

Layout of a file: ``u64 little-endian N`` | ``N bytes of UTF-8 JSON`` | data.
Tensor offsets in the JSON are relative to the start of the data section;
:class:`TensorInfo` stores absolute file offsets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from typing import Any

from gpuload.errors import HeaderError, ReadError
from gpuload.format.dtypes import DTYPES, DType
from gpuload.format.filetype import looks_like

MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap (HeaderTooLarge)
U64_MAX = (1 << 64) - 1
# Tensor entries per file. Real single files hold tens of thousands (a
# merged DeepSeek-V3 ~91k; Kimi K2 with its scales ~210k); 1.65 million
# zero-size ones fit in the 100 MB cap and took 46 s and 1.8 GB to parse.
MAX_TENSORS = 1 << 19
MAX_DIMS = 32  # numpy 1.x holds at most 32 dims (2.x: 64); no weight comes close
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor: where its bytes are and how to read them."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: str
    start: int  # absolute byte offset in ``file``
    nbytes: int

    @property
    def end(self) -> int:
        return self.start + self.nbytes

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclasses.dataclass(frozen=True)
class FileHeader:
    """A parsed safetensors file, and the identity it had when parsed."""

    path: str
    header_len: int
    size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]  # ordered by offset
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    version: str = ""  # a remote object's ETag at the header probe ("": local)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


class _Object(dict):
    """A header JSON object that remembers its first duplicate key, so the
    error can name the tensor whose entry repeats a key, not the key."""

    duplicate: str | None = None


def _header_object(pairs: list[tuple[str, Any]]) -> _Object:
    out = _Object()
    for k, v in pairs:
        if k in out and out.duplicate is None:
            out.duplicate = k
        out[k] = v
    return out


def _reject_constant(value: str) -> Any:
    raise ValueError(f"non-standard JSON constant {value}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _checked_bits(file: str, name: str, shape: list[Any], dtype: DType) -> int:
    """shape x bits with the u64 overflow guard of safetensors' ValidationOverflow.

    The guard multiplies zero dims as 1: ``[0, 2**70]`` holds no bytes, but no
    array can have that shape, and numpy or torch would fail on it later.
    """
    if len(shape) > MAX_DIMS:
        raise HeaderError(file, f"shape has {len(shape)} dims, more than {MAX_DIMS}", name)
    n = bound = dtype.bits
    for d in shape:
        if not _is_int(d) or d < 0:
            raise HeaderError(file, f"shape {shape!r} has a non-integer or negative dim", name)
        n *= d
        bound *= max(d, 1)
        if bound > U64_MAX:
            raise HeaderError(file, f"shape {shape!r} x {dtype.name} overflows 64 bits", name)
    return n


def _parse_entry(file: str, name: str, entry: Any, data_start: int) -> tuple[TensorInfo, int]:
    if not isinstance(entry, dict):
        raise HeaderError(file, f"entry is {type(entry).__name__}, not an object", name)
    if getattr(entry, "duplicate", None) is not None:
        raise HeaderError(file, f"duplicate key {entry.duplicate!r} in its entry", name)
    if set(entry) != _ENTRY_KEYS:
        missing, extra = _ENTRY_KEYS - set(entry), set(entry) - _ENTRY_KEYS
        raise HeaderError(
            file, f"entry keys wrong (missing {sorted(missing)}, unexpected {sorted(extra)})", name
        )
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise HeaderError(file, f"unknown dtype {entry['dtype']!r}", name)
    shape = entry["shape"]
    if not isinstance(shape, list):
        raise HeaderError(file, f"shape {shape!r} is not a list", name)
    nbits = _checked_bits(file, name, shape, dtype)
    if nbits % 8:
        raise HeaderError(file, f"{dtype.name} shape {shape} does not fill whole bytes", name)
    offs = entry["data_offsets"]
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
        raise HeaderError(file, f"data_offsets {offs!r} is not two integers", name)
    begin, end = offs
    if begin < 0 or end < begin or end > U64_MAX:
        raise HeaderError(file, f"data_offsets {offs} are reversed or out of range", name)
    if end - begin != nbits // 8:
        raise HeaderError(
            file,
            f"data_offsets {offs} span {end - begin} bytes but {dtype.name}{shape} "
            f"needs {nbits // 8}",
            name,
        )
    info = TensorInfo(name, dtype, tuple(shape), file, data_start + begin, nbits // 8)
    return info, begin


def parse_header_bytes(
    file: str, prefix: bytes, file_size: int, identity: tuple[int, int, int, int] = (0, 0, 0, 0)
) -> FileHeader:
    """Parse a header from its first bytes (``prefix`` holds at least 8 + N).

    Pure: no I/O, so fuzzers can drive it. ``file_size`` is the whole file's.
    """
    what = looks_like(prefix)
    if file_size < 8 or len(prefix) < 8:
        kind = f" (it looks like {what}, not a safetensors file)" if what else ""
        raise HeaderError(file, f"file is {file_size} bytes, too short for the 8-byte length{kind}")
    n = int.from_bytes(prefix[:8], "little")
    if n == 0:
        raise HeaderError(file, "header length is 0")
    if n > MAX_HEADER_BYTES and what:
        raise HeaderError(
            file,
            f"not a safetensors file: it looks like {what}",
        )
    if n > MAX_HEADER_BYTES:
        raise HeaderError(
            file,
            f"not a safetensors file: header length {n} (its first 8 bytes) "
            f"exceeds the {MAX_HEADER_BYTES} byte cap",
        )
    if 8 + n > file_size:
        kind = f": it looks like {what}" if what else ""
        raise HeaderError(
            file,
            f"header length {n} runs past the end of the {file_size}-byte file "
            f"(truncated, or not a safetensors file{kind})",
        )
    if len(prefix) < 8 + n:
        raise HeaderError(file, f"header truncated: have {len(prefix) - 8} of {n} bytes")
    # Each entry is a JSON object, each object a "{": counted (bytes.count,
    # a fraction of a second) before the parse that costs per object.
    objects = prefix.count(b"{", 8, 8 + n)
    if objects > MAX_TENSORS + 1:  # + the header object itself
        raise HeaderError(
            file,
            f"header declares up to {objects - 1:,} tensors ({objects:,} JSON objects), "
            f"more than the {MAX_TENSORS:,} gpuload reads per file",
        )
    try:
        text = bytes(prefix[8 : 8 + n]).decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_header_object, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise HeaderError(file, f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise HeaderError(file, "header JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise HeaderError(file, f"header is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise HeaderError(file, f"header JSON is a {type(doc).__name__}, not an object")
    if doc.duplicate is not None:
        raise HeaderError(file, "duplicate key in header JSON", tensor=doc.duplicate)

    data_start = 8 + n
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError(file, "__metadata__ must map strings to strings", "__metadata__")
    if getattr(metadata, "duplicate", None) is not None:
        raise HeaderError(file, f"duplicate key {metadata.duplicate!r}", "__metadata__")

    entries = [_parse_entry(file, name, e, data_start) for name, e in doc.items()]
    # No holes, no overlaps: sorted by offset, each tensor starts where the
    # previous one ended, and the data section ends exactly at end of file.
    entries.sort(key=lambda t: (t[1], t[0].nbytes))
    pos = 0
    for info, begin in entries:
        if begin < pos:
            raise HeaderError(file, f"bytes [{begin}, {begin + info.nbytes}) overlap", info.name)
        if begin > pos:
            raise HeaderError(file, f"hole: bytes [{pos}, {begin}) belong to no tensor", info.name)
        pos = begin + info.nbytes
    if data_start + pos < file_size:
        raise HeaderError(
            file,
            f"trailing bytes after the data section (data ends at {data_start + pos}, "
            f"file is {file_size})",
        )
    if data_start + pos > file_size:
        # Name the first tensor that runs past the end of the file.
        past = next(i for i, b in entries if data_start + b + i.nbytes > file_size)
        raise HeaderError(
            file,
            f"file ends before the data section does (bytes [{past.start}, {past.end}) "
            f"past the end of the {file_size}-byte file)",
            past.name,
        )
    tensors = {info.name: info for info, _ in entries}
    return FileHeader(file, n, file_size, dict(metadata), tensors, identity)


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def parse_header(path: str | os.PathLike[str]) -> FileHeader:
    """Read and validate the header of one ``.safetensors`` file."""
    file = os.fspath(path)
    # O_NONBLOCK: opening a FIFO (or a device) named *.safetensors must not
    # block forever; it is refused below. Reads of regular files ignore it.
    fd = -1
    try:  # the open inside: a Ctrl-C right after it must not leak the fd
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HeaderError(file, "is not a regular file")
        os.set_blocking(fd, True)
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        try:
            head = _pread_exact(fd, 8, 0)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            # Only read the JSON once its length passed the cheap checks, so
            # a hostile length never makes us allocate.
            body = b""
            if 0 < n <= MAX_HEADER_BYTES and 8 + n <= st.st_size:
                body = _pread_exact(fd, n, 8)
        except OSError as e:
            raise ReadError(f"{file}: reading the header failed: {e.strerror}") from e
        return parse_header_bytes(file, head + body, st.st_size, identity)
    finally:
        if fd >= 0:
            os.close(fd)
