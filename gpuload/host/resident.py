"""CPU-resident tensors: host arrays as zero-copy views of the checkpoint's
mappings, or as copies in memory gpuload owns.

MoE experts too large for the GPU stay in host memory, read through the
checkpoint's mmap. :func:`map_resident` maps each file once and hands out
views; the views' byte ranges are prefaulted and pinned by
:mod:`gpuload.host.prefault` before they are returned.

A fused tensor cut per section comes back as a copy (:func:`is_copy`), read
once from the mapping into anonymous memory gpuload owns
(:class:`~gpuload.memory.mapping.HostBuffer`). It is not swept (its pages were just
written, so they are resident) but it is pinned with the views, by the same
method, and unpinned when its last array dies.

gpuload itself never reads a mapped page with a load instruction, and checks
each file's identity after its last page is populated (a changed file raises
ReadError). The views it returns are still a mapping: a file truncated after
the call makes a later read of them die of SIGBUS (``cpu_resident="copy"``
reads the tensors into anonymous memory instead; see docs/cpu_resident.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

import numpy as np

from gpuload import config
from gpuload.format.checkpoint import Checkpoint
from gpuload.format.dtypes import numpy_shape
from gpuload.format.header import TensorInfo
from gpuload.host.populate import check_unchanged
from gpuload.host.prefault import PrefaultReport, _prefault
from gpuload.memory import mapping
from gpuload.read import posix as _io
from gpuload.sharding.selection import Selection

__all__ = [
    "PRESET_EXPERTS",
    "map_resident",
]

#: Routed MoE experts: ``*.experts.*`` (HF names) and ``ffn_*_exps`` (GGUF
#: names). Shared experts (``shared_expert(s).``, ``ffn_*_shexp``) stay out:
#: every token uses them, so they belong on the device.
PRESET_EXPERTS = r"(?:^|\.)experts\.|(?:^|\.)ffn_[a-z0-9_]+_exps(?:\.|$)"


def _byte_range(info: TensorInfo, sel: Selection) -> tuple[int, int]:
    """The file bytes covering ``sel``: tight when the split dimension is the
    outermost non-trivial one, else the whole tensor."""
    d, shape = sel.dim, info.shape
    if d is None or not shape or shape[d] == 0 or info.nbytes % shape[d]:
        return info.start, info.end
    if any(n != 1 for n in shape[:d]) or not sel.ranges:
        return info.start, info.end
    row = info.nbytes // shape[d]
    lo = min(s for s, _ in sel.ranges)
    hi = max(s + n for s, n in sel.ranges)
    return info.start + lo * row, info.start + hi * row


def _array(
    base: np.ndarray, info: TensorInfo, sel: Selection, owned: list[mapping.HostBuffer]
) -> np.ndarray:
    """``sel`` of ``info`` as a view of ``base``, or (several ranges) a copy
    in a :class:`~gpuload.memory.mapping.HostBuffer` appended to ``owned``."""
    dt, shape = info.dtype, numpy_shape(info.dtype, info.shape)
    full = base[info.start : info.end].view(dt.numpy or np.uint8).reshape(shape)
    if sel.dim is None:
        return full
    d, ranges = sel.dim, sel.ranges
    if dt.packed:  # uint8 bytes: the last dim counts bytes, and must cut at one
        if len(shape) != len(info.shape):
            raise ValueError(f"{info.name}: {dt.name} rows of {info.shape} are not whole bytes")
        if d == len(shape) - 1:
            if any((s * dt.bits) % 8 or (n * dt.bits) % 8 for s, n in ranges):
                raise ValueError(f"{info.name}: {dt.name} cut {ranges} splits a byte")
            ranges = tuple((s * dt.bits // 8, n * dt.bits // 8) for s, n in ranges)
    if any(s + n > shape[d] for s, n in ranges):
        raise ValueError(f"{info.name}: ranges {sel.ranges} exceed shape {info.shape}[{d}]")
    parts = [full[(slice(None),) * d + (slice(s, s + n),)] for s, n in ranges]
    if len(parts) == 1:
        return parts[0]
    out_shape = shape[:d] + (sum(n for _, n in ranges),) + shape[d + 1 :]
    nbytes = int(np.prod(out_shape)) * full.dtype.itemsize
    if nbytes == 0:  # nothing to pin
        return np.concatenate(parts, axis=d)
    # Into memory gpuload owns, so the copy can be pinned like the views and
    # unpinned, then unmapped, when its last array dies.
    buf = mapping.HostBuffer(nbytes, f"the copy of {info.name}")
    owned.append(buf)
    out = np.asarray(buf).view(full.dtype).reshape(out_shape)
    return np.concatenate(parts, axis=d, out=out)


def is_copy(info: TensorInfo, sel: Selection) -> bool:
    """Whether ``sel`` of ``info`` comes back as a copy, not a view: several
    ranges (a fused tensor, such as ``gate_up_proj``, split per section under
    tensor parallelism) cannot be one strided view of the file."""
    return sel.dim is not None and len(sel.ranges) > 1


def map_resident(
    checkpoint: Checkpoint,
    selections: Mapping[str, Selection],
    cfg: config.Config | None = None,
    *,
    device: int | None = None,
    writable: bool = False,
    copy: bool = False,
) -> tuple[dict[str, np.ndarray], PrefaultReport]:
    """Host arrays for ``selections``, backed by the checkpoint's files.

    Each file is mapped once; the bytes of the tensors returned as views are
    prefaulted (per ``cfg.prefault``) and pinned (per ``cfg.pin``) for CUDA
    ``device`` (default: the current device), and so are the copies (pinned
    by the same method; not prefaulted: their pages were just written).

    Returns
    -------
    arrays
        name -> numpy array of the tensor's dtype (packed sub-byte dtypes:
        ``uint8`` bytes, see :func:`~gpuload.format.dtypes.numpy_shape`) and the
        selection's shape. A whole tensor, or a selection with one range, is
        a **zero-copy view** of the mapping (strided for a column cut):
        read-only over a shared mapping, or with ``writable=True`` writable
        over a private copy-on-write one (a write copies the page it touches;
        the file never changes; pinned by ``mlock`` of the same page-cache
        pages, never by CUDA). A selection with several ranges (a fused
        tensor split per section, see :func:`is_copy`) cannot be one view: it
        is an owned, writable copy (its bytes read once, to copy) in
        anonymous memory gpuload maps (:class:`~gpuload.memory.mapping.HostBuffer`),
        listed in ``report.copies`` and pinned with the views: by CUDA when
        they are, else by ``mlock`` (``report.pinned_bytes`` counts it).
    report
        the :class:`PrefaultReport`.

    ``copy=True`` (``cpu_resident="copy"``): every tensor is read with
    ``pread`` into anonymous memory gpuload owns (a C-contiguous copy, in
    ``report.copies``), pinned as copies are; nothing stays mapped, so the
    file may change or vanish after the call.

    Notes
    -----
    A view is a mapping of the file: if the file is truncated after this
    returns, reading the view dies of SIGBUS (as with numpy's and
    safetensors' own mmaps). During the call, pages are populated with calls
    that report failure and each file's identity is checked afterwards, so
    a file changed or failing under the call raises ReadError instead.

    The mapping and its pins live as long as any view does, whatever happens
    to ``checkpoint``; the last view to die unpins, then unmaps. A copy's
    buffer and its pin live as long as the copy (or a view of it) does.
    """
    cfg = config.get() if cfg is None else cfg
    headers = {h.path: h for h in checkpoint.files}
    for name in selections:
        if name not in checkpoint.tensors:
            raise ValueError(f"tensor {name!r} is not in the checkpoint")
    files = sorted({checkpoint.tensors[n].file for n in selections})
    # Copies are read with pread, never through the mapping: a read reports
    # a truncated or failing file as an error, a load from a mapping dies
    # of SIGBUS. The reader checks each file's identity at open and close.
    reader = _io.PosixReader([headers[f] for f in files], prefetch=cfg.prefetch)
    try:
        maps: dict[str, mapping.Mapping] = {}
        ranges: dict[str, list[tuple[int, int]]] = {}
        arrays, owned, copies = {}, [], []
        for name, sel in selections.items():
            info = checkpoint.tensors[name]
            if copy or is_copy(info, sel):
                copies.append(name)
                arrays[name] = _copy(reader, info, sel, owned)
                continue
            if info.file not in maps:
                ident = headers[info.file].identity
                maps[info.file] = mapping.Mapping(info.file, ident, private=writable)
            ranges.setdefault(info.file, []).append(_byte_range(info, sel))
            # A view touches nothing: its pages are populated (or not) below.
            arrays[name] = _array(np.asarray(maps[info.file]), info, sel, owned)
        jobs = [(maps[f], rs) for f, rs in ranges.items()]
        report = _prefault(jobs, cfg, device=device, owned=owned, cuda=copy or not writable)
        report.copies = copies
    except BaseException:
        with contextlib.suppress(Exception):
            reader.close()
        raise
    reader.close()  # raises ReadError if a file changed while it was read
    check_unchanged(checkpoint, maps)  # after the last mapped page was populated
    return arrays, report


def _copy(
    reader: _io.PosixReader, info: TensorInfo, sel: Selection, owned: list[mapping.HostBuffer]
) -> np.ndarray:
    """``sel`` of ``info`` read with ``reader`` into a C-contiguous array in
    a :class:`~gpuload.memory.mapping.HostBuffer` appended to ``owned``: the bytes
    covering the selection (:func:`_byte_range`) go to scratch memory, then
    the selection is cut from there."""
    lo, hi = _byte_range(info, sel)
    scratch = np.empty(hi - lo, np.uint8)
    if hi > lo:
        reader.readinto(info.file, lo, [memoryview(scratch)])
    sub_info, sub = info, sel
    if (lo, hi) != (info.start, info.end):  # tight: rows [r0, r1) of dim d
        d = sel.dim
        r0 = min(s for s, _ in sel.ranges)
        r1 = max(s + n for s, n in sel.ranges)
        shape = info.shape[:d] + (r1 - r0,) + info.shape[d + 1 :]
        sub = dataclasses.replace(sel, ranges=tuple((s - r0, n) for s, n in sel.ranges))
        sub_info = dataclasses.replace(info, shape=shape, nbytes=hi - lo)
    sub_info = dataclasses.replace(sub_info, start=0)
    made: list[mapping.HostBuffer] = []
    arr = _array(scratch, sub_info, sub, made)
    if made or arr.nbytes == 0:  # already a copy in memory gpuload owns
        owned.extend(made)
        return arr
    buf = mapping.HostBuffer(arr.nbytes, f"the copy of {info.name}")
    owned.append(buf)
    out = np.asarray(buf).view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    return out
