"""Splitting planned reads to fit fixed-size buffers.

The planner (:mod:`gpuload.plan.planner`) sizes reads for the disk; the device
pipeline reads each one into a slot of fixed size (pinned staging, device
scratch), so it re-cuts any read longer than a slot into shorter ones that
deliver exactly the same bytes to the same places.

Pure, like the planner: integers and :class:`~gpuload.plan.ops.ReadOp` s in,
``ReadOp`` s out; no I/O, no CUDA. It is a module of its own rather than a
section of ``plan.py`` so that the planner stays one readable stage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from gpuload.errors import PlanError
from gpuload.plan.ops import PAGE, Piece, ReadOp

__all__ = ["aligned_span", "fit_ops", "split_op"]


def aligned_span(op: ReadOp) -> tuple[int, int]:
    """``(start, length)`` of ``op`` widened to whole 4 KiB pages: what a
    kvikio read fetches so that GDS can DMA it (the extra bytes are dropped)."""
    lo = op.offset - op.offset % PAGE
    hi = -(-(op.offset + op.length) // PAGE) * PAGE
    return lo, hi - lo


def fit_ops(
    ops: Iterable[ReadOp],
    *,
    host_bytes: int,
    scratch_bytes: int,
    device_reads: bool,
    scratched: Callable[[ReadOp], bool] | None = None,
) -> list[ReadOp]:
    """``ops``, each split (:func:`split_op`) until it fits one pipeline slot.

    Parameters
    ----------
    ops
        Planned reads, in order; the result keeps that order.
    host_bytes, scratch_bytes
        A slot's pinned staging and device scratch, in bytes.
    device_reads
        True for kvikio, which reads every op into scratch; False for posix
        reads into pinned staging.
    scratched
        Posix: whether a staged op is copied into scratch (every one when
        None); one that is not (no device gather) is bounded by staging alone.

    Notes
    -----
    Posix: a direct op must fit the pinned buffer, a staged op the pinned
    buffer and, if it is copied there, the scratch. kvikio: an op fits when
    its page-aligned span (:func:`aligned_span`) fits scratch; one that does
    not is split into reads two pages shorter than scratch, the most that
    widening to pages can add to a read.
    """
    out: list[ReadOp] = []
    for op in ops:
        if device_reads:
            fits = aligned_span(op)[1] <= scratch_bytes
            limit = scratch_bytes - 2 * PAGE
        else:
            to_scratch = op.staged and (scratched is None or scratched(op))
            limit = min(host_bytes, scratch_bytes) if to_scratch else host_bytes
            fits = op.length <= limit
        out.extend([op] if fits else split_op(op, limit))
    return out


def split_op(op: ReadOp, limit: int) -> list[ReadOp]:
    """``op`` as reads of at most ``limit`` bytes that deliver the same bytes.

    A direct op is cut at page boundaries where it can be (gaps between its
    pieces are never read alone). A staged op is cut into windows of whole
    rows; if a single row is longer than ``limit`` its rows are read
    directly instead, so nothing is indivisible.
    """
    if limit < 1:
        raise PlanError(f"cannot split a read of {op.file} into reads of {limit} bytes")
    if op.length <= limit:
        return [op]
    if not op.staged:
        return _pack_runs(op.file, list(op.pieces), limit)
    if max(p.row_bytes for p in op.pieces) > limit:
        rows = [p.row_range(r, 1) for p in op.pieces for r in range(p.rows)]
        runs = [
            dataclasses.replace(r, src_stride=r.row_bytes, dst_stride=r.row_bytes) for r in rows
        ]
        return _pack_runs(op.file, sorted(runs, key=lambda r: r.src), limit)
    out = []
    first = [0] * len(op.pieces)  # next row of each piece not yet in a window
    while True:
        left = [i for i, p in enumerate(op.pieces) if first[i] < p.rows]
        if not left:
            return out
        lo = min(op.pieces[i].src + first[i] * op.pieces[i].src_stride for i in left)
        parts = []
        for i in left:
            p = op.pieces[i]
            start = p.src + first[i] * p.src_stride
            room = lo + limit - start - p.row_bytes  # bytes past this row's end still free
            if room < 0:
                continue
            n = (
                p.rows - first[i]
                if p.rows == 1
                else min(p.rows - first[i], room // p.src_stride + 1)
            )
            parts.append(p.row_range(first[i], n))
            first[i] += n
        hi = max(q.src_end for q in parts)
        out.append(ReadOp(op.file, lo, hi - lo, tuple(parts), staged=True))


def _cut(run: Piece, limit: int) -> list[Piece]:
    """A contiguous run as parts of at most ``limit`` bytes, cut on pages when possible."""
    parts, pos, end = [], run.src, run.src_end
    while pos < end:
        nxt = min(end, pos + limit)
        if nxt < end and nxt - nxt % PAGE > pos:
            nxt -= nxt % PAGE
        n = nxt - pos
        parts.append(Piece(run.tensor, pos, 1, n, n, run.dst + pos - run.src, n))
        pos = nxt
    return parts


def _pack_runs(file: str, runs: list[Piece], limit: int) -> list[ReadOp]:
    """Direct reads of at most ``limit`` bytes over contiguous runs sorted by
    source offset; a read starts at a run, so gaps alone are never read."""
    out: list[ReadOp] = []
    cur: list[Piece] = []
    lo = pos = 0
    for run in runs:
        for part in _cut(run, limit):
            if cur and (part.src < pos or part.src_end - lo > limit):
                out.append(ReadOp(file, lo, pos - lo, tuple(cur), staged=False))
                cur = []
            if not cur:
                lo = part.src
            cur.append(part)
            pos = part.src_end
    if cur:
        out.append(ReadOp(file, lo, pos - lo, tuple(cur), staged=False))
    return out
