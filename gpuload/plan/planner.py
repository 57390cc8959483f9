"""The read planner: selections in, byte-exact read operations out.

Pure: integers in, frozen dataclasses out; no I/O, no CUDA. Every alignment
and sizing decision of a load lives here, so it is all testable on the CPU.

A rank's :class:`~gpuload.sharding.selection.Selection` of a tensor becomes *pieces*:
2-D strided byte regions (``rows`` runs of ``row_bytes`` at ``src_stride`` in
the file, landing at ``dst_stride`` in the output). Pieces become
:class:`~gpuload.plan.ops.ReadOp` s, each one contiguous file range that is either

* **direct** (``staged=False``): every piece in it is one contiguous run,
  read straight into its destination; gaps between them go to a discard
  buffer. Row shards and replicated tensors plan this way.
* **staged** (``staged=True``): the range is read into staging and its
  pieces are gathered from there (kernels: the numpy twin or the CUDA
  kernel). Column shards with many small rows plan this way: reading the
  covering block and packing beats one read per row (TensorCast measured
  ~0.33 GiB/s for per-row reads of small rows against ~9 GiB/s for
  block + pack).

Ranges longer than ``chunk_bytes`` are split; neighbours closer than
``coalesce_gap`` are merged while the result stays under the cap and the
gap bytes read (bytes of tensors the rank does not load) stay under
``max_overread`` of the useful bytes in the merged read: one saved I/O is
worth a small gap, never reading a small checkpoint's other tensors whole.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from gpuload.errors import PlanError
from gpuload.format.dtypes import numpy_shape
from gpuload.format.header import TensorInfo
from gpuload.plan.ops import PAGE, Piece, Plan, PlanOptions, ReadOp, TensorPlan
from gpuload.sharding.selection import Selection

# --------------------------------------------------------------------------
# selection -> pieces


def _bytes_of(bits: int, info: TensorInfo, what: str) -> int:
    if bits % 8:
        raise PlanError(
            f"{info.file}: tensor {info.name!r}: {info.dtype.name} split at {what} "
            "does not fall on a byte boundary"
        )
    return bits // 8


def tensor_pieces(info: TensorInfo, sel: Selection) -> tuple[list[Piece], int]:
    """The pieces of one selection and the output size in bytes."""
    bits = info.dtype.bits
    if sel.dim is None:
        if tuple(sel.shape) != info.shape:
            raise PlanError(f"{info.file}: tensor {info.name!r}: whole selection changes shape")
        if not info.nbytes:
            return [], 0
        return [
            Piece(info.name, info.start, 1, info.nbytes, info.nbytes, 0, info.nbytes)
        ], info.nbytes
    d = sel.dim
    if len(sel.shape) != len(info.shape) or any(
        a != b for i, (a, b) in enumerate(zip(sel.shape, info.shape, strict=True)) if i != d
    ):
        raise PlanError(
            f"{info.file}: tensor {info.name!r}: selection shape {sel.shape} "
            f"does not match tensor shape {info.shape}"
        )
    outer = math.prod(info.shape[:d])
    inner_bits = math.prod(info.shape[d + 1 :]) * bits
    src_row = _bytes_of(info.shape[d] * inner_bits, info, f"dim {d}")
    dst_row = _bytes_of(sel.shape[d] * inner_bits, info, f"dim {d}")
    out_nbytes = _bytes_of(outer * sel.shape[d] * inner_bits, info, f"dim {d}")
    pieces: list[Piece] = []
    placed = 0
    for start, length in sel.ranges:
        if start + length > info.shape[d]:
            raise PlanError(
                f"{info.file}: tensor {info.name!r}: range {start}+{length} "
                f"exceeds dim {d} of size {info.shape[d]}"
            )
        where = f"dim {d} index {start}"
        src_off = _bytes_of(start * inner_bits, info, where)
        row_bytes = _bytes_of(length * inner_bits, info, where)
        dst_off = _bytes_of(placed * inner_bits, info, where)
        placed += length
        if row_bytes == 0 or outer == 0:
            continue
        rows = outer
        if rows > 1 and row_bytes == src_row == dst_row:  # full rows: one run
            rows, row_bytes = 1, rows * row_bytes
        pieces.append(
            Piece(info.name, info.start + src_off, rows, row_bytes, src_row, dst_off, dst_row)
        )
    return pieces, out_nbytes


# --------------------------------------------------------------------------
# pieces -> read ops


def _runs(file: str, piece: Piece, opts: PlanOptions) -> Iterable[ReadOp]:
    """A contiguous run (``rows == 1``) as direct reads of at most
    ``chunk_bytes``: equal parts rounded up to pages, so a long range never
    becomes reads smaller than ``min_chunk_bytes`` (the OS's 128 KiB
    read-ahead would otherwise turn it into many tiny I/Os)."""
    n = piece.row_bytes
    parts = math.ceil(n / opts.chunk_bytes)
    size = max(opts.min_chunk_bytes, math.ceil(n / parts / PAGE) * PAGE)
    size = min(size, opts.chunk_bytes)
    for pos in range(0, n, size):
        take = min(size, n - pos)
        part = Piece(piece.tensor, piece.src + pos, 1, take, take, piece.dst + pos, take)
        yield ReadOp(file, part.src, take, (part,), staged=False)


def _rows_as_runs(piece: Piece) -> Iterable[Piece]:
    for r in range(piece.rows):
        row = piece.row_range(r, 1)
        yield dataclasses.replace(row, src_stride=row.row_bytes, dst_stride=row.row_bytes)


def _strided_ops(
    file: str, pieces: list[Piece], opts: PlanOptions
) -> tuple[list[ReadOp], str, str | None]:
    """Ops for the strided pieces of one tensor (all share rows and strides:
    they are ranges of one split dimension). Returns the ops, the strategy
    and, for a covering read on a GPU, the gather strategy."""
    rows, stride = pieces[0].rows, pieces[0].src_stride
    lo = min(p.src for p in pieces)
    span = max(p.src + p.row_bytes for p in pieces) - lo  # bytes of one row block
    useful = sum(p.nbytes for p in pieces)
    covering = (rows - 1) * stride + span
    direct = span > opts.chunk_bytes or opts.cost.prefer_direct(
        rows * len(pieces), useful, covering, opts.chunk_bytes
    )
    if direct:
        ops = [op for p in pieces for run in _rows_as_runs(p) for op in _runs(file, run, opts)]
        return ops, "direct", None
    # Covering: blocks of k whole rows, each block one staged read holding
    # the rows of every piece (fused sections share the same rows).
    k = (opts.chunk_bytes - span) // stride + 1
    blocks = math.ceil(rows / k)
    k = math.ceil(rows / blocks)  # balance the blocks
    ops = []
    for first in range(0, rows, k):
        count = min(k, rows - first)
        start = lo + first * stride
        length = (count - 1) * stride + span
        parts = tuple(p.row_range(first, count) for p in pieces)
        ops.append(ReadOp(file, start, length, parts, staged=True))
    gather = None
    if opts.gather is not None:
        line = opts.gather.model.line_bytes
        gather = opts.gather.choose(
            rows=rows * len(pieces),
            seg=useful // (rows * len(pieces)),
            useful=useful,
            covering=sum(op.length for op in ops),
            # segments sit at the same offsets of every block's staging
            aligned=stride % line == 0 and all((p.src - lo) % line == 0 for p in pieces),
        )
    return ops, "covering", gather


def _coalesce(ops: list[ReadOp], opts: PlanOptions) -> list[ReadOp]:
    """Merge neighbouring reads of one kind when the gap is small and the
    result stays under the cap: fewer, larger I/Os for small tensors.

    Groups are collected first and each merged read is built once: merging
    pairwise rebuilt (and re-validated) the growing read at every step,
    quadratic in the pieces of a checkpoint of many small tensors."""
    out: list[ReadOp] = []
    group: list[ReadOp] = []
    useful = gaps = 0  # of the group: useful bytes, bytes of the gaps merged over
    for op in ops:
        u = op.useful_bytes  # a sum over the op's pieces: once per op
        if group:
            first, last = group[0], group[-1]
            gap = op.offset - (last.offset + last.length)
            if (
                first.file == op.file
                and first.staged == op.staged
                and 0 <= gap <= opts.coalesce_gap
                and gaps + gap <= opts.max_overread * (useful + u)
                and op.offset + op.length - first.offset <= opts.chunk_bytes
            ):
                group.append(op)
                useful, gaps = useful + u, gaps + gap
                continue
            out.append(_merged(group))
        group, useful, gaps = [op], u, 0
    if group:
        out.append(_merged(group))
    return out


def _merged(group: list[ReadOp]) -> ReadOp:
    if len(group) == 1:
        return group[0]
    first, last = group[0], group[-1]
    pieces = tuple(p for op in group for p in op.pieces)
    length = last.offset + last.length - first.offset
    gap = length - sum(op.length for op in group)
    return ReadOp(first.file, first.offset, length, pieces, first.staged, gap)


def plan_reads(
    items: Sequence[tuple[TensorInfo, Selection]], options: PlanOptions | None = None
) -> Plan:
    """Plan the reads that load ``items`` (each tensor with this rank's selection).

    Returns a :class:`Plan` whose ops are sorted by file and offset, each at
    most ``options.chunk_bytes`` long, and whose pieces cover every selected
    byte exactly once.
    """
    opts = options or PlanOptions()
    files: dict[str, int] = {}
    tensors: list[TensorPlan] = []
    ops: list[ReadOp] = []
    for info, sel in items:
        files.setdefault(info.file, len(files))
        pieces, out_nbytes = tensor_pieces(info, sel)
        strided = [p for p in pieces if p.rows > 1]
        runs = [p for p in pieces if p.rows == 1]
        for p in runs:
            ops.extend(_runs(info.file, p, opts))
        strategy = "whole" if sel.dim is None else "contiguous"
        gather = None
        if strided:
            more, strategy, gather = _strided_ops(info.file, strided, opts)
            ops.extend(more)
        if not pieces:
            strategy = "empty"
        out_shape = numpy_shape(info.dtype, tuple(sel.shape))
        tensors.append(TensorPlan(info, sel, out_nbytes, out_shape, strategy, gather))
    ops.sort(key=lambda op: (files[op.file], op.offset, op.length))
    return Plan(tuple(tensors), tuple(_coalesce(ops, opts)))
