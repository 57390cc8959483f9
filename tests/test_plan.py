"""Planner invariants: pieces cover the selection exactly, reads respect caps;
splitting a read to fit a buffer (``gpuload.plan.split``) keeps its bytes.

Plans are executed in memory against a random "file" and compared with numpy
slicing of the tensor, so the planner is checked for bytes, not for shape.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuload.errors import PlanError
from gpuload.format.dtypes import DTYPES
from gpuload.format.header import TensorInfo
from gpuload.kernels.host import gather_host
from gpuload.plan.ops import PAGE, CostModel, KiB, Piece, PlanOptions, ReadOp
from gpuload.plan.planner import plan_reads
from gpuload.plan.split import aligned_span, fit_ops, split_op
from gpuload.sharding.selection import Selection

BYTE_DTYPES = ["U8", "BF16", "F32", "F64", "C64"]


def split_selection(shape, dim, rank, world, sections=1):
    """Even split of ``sections`` equal sections of ``dim`` (fused when > 1)."""
    if dim is None:
        return Selection.whole(shape)
    sec = shape[dim] // sections
    per = sec // world
    ranges = tuple((s * sec + rank * per, per) for s in range(sections))
    out = list(shape)
    out[dim] = per * sections
    return Selection(dim, ranges, tuple(out), "column" if dim else "row")


def expected_bytes(data: np.ndarray, sel: Selection) -> bytes:
    if sel.dim is None:
        return data.tobytes()
    parts = [np.take(data, range(a, a + n), axis=sel.dim) for a, n in sel.ranges]
    return np.concatenate(parts, axis=sel.dim).tobytes() if parts else b""


def execute(sizes: dict[str, int], ops, file_bytes: np.ndarray):
    """Execute ``ops`` in memory into zeroed outputs of ``sizes`` bytes; returns
    the outputs and how many times each of their bytes was written."""
    out = {name: np.zeros(n, np.uint8) for name, n in sizes.items()}
    hits = {name: np.zeros(n, np.int32) for name, n in sizes.items()}
    for op in ops:
        block = file_bytes[op.offset : op.offset + op.length].copy()
        for p in op.pieces:
            rel = np.array(
                [[p.src - op.offset, p.dst, p.rows, p.row_bytes, p.src_stride, p.dst_stride]],
                np.int64,
            )
            gather_host(block, out[p.tensor], rel)
            for r in range(p.rows):
                hits[p.tensor][
                    p.dst + r * p.dst_stride : p.dst + r * p.dst_stride + p.row_bytes
                ] += 1
    return out, hits


def run_plan(plan, file_bytes: np.ndarray) -> dict[str, np.ndarray]:
    """Execute a plan in memory, counting writes so double writes show up."""
    out, hits = execute({t.name: t.out_nbytes for t in plan.tensors}, plan.ops, file_bytes)
    for name, h in hits.items():
        assert (h == 1).all(), f"{name}: bytes written {h.min()}..{h.max()} times"
    return out


@st.composite
def tensor_case(draw):
    dtype = DTYPES[draw(st.sampled_from(BYTE_DTYPES))]
    world = draw(st.sampled_from([1, 2, 3, 4, 8]))
    ndim = draw(st.integers(1, 3))
    dim = draw(st.sampled_from([None, *range(ndim)]))
    sections = draw(st.sampled_from([1, 2, 3])) if dim is not None else 1
    shape = [draw(st.integers(1, 12)) for _ in range(ndim)]
    if dim is not None:
        shape[dim] = world * sections * draw(st.integers(1, 6))
    rank = draw(st.integers(0, world - 1))
    lead = draw(st.integers(0, 37))  # unaligned start in the file
    return dtype, tuple(shape), dim, sections, rank, world, lead


@settings(max_examples=150, deadline=None)
@given(
    cases=st.lists(tensor_case(), min_size=1, max_size=4),
    chunk=st.sampled_from([64, 100, 512, 4096, 1 << 20]),
    gap=st.sampled_from([0, 16, 4096]),
    prefer=st.sampled_from(["model", "direct", "covering"]),
)
def test_plan_reproduces_numpy_slicing(cases, chunk, gap, prefer):
    rng = np.random.default_rng(0)
    items, arrays, pos = [], {}, 0
    for i, (dtype, shape, dim, sections, rank, world, lead) in enumerate(cases):
        pos += lead
        nbytes = math.prod(shape) * dtype.bits // 8
        info = TensorInfo(f"t{i}", dtype, shape, "f", pos, nbytes)
        arrays[info.name] = (pos, nbytes, shape, dtype)
        items.append((info, split_selection(shape, dim, rank, world, sections)))
        pos += nbytes
    cost = {
        "model": CostModel(),
        "direct": CostModel(op_seconds=0.0),
        "covering": CostModel(op_seconds=1.0),
    }[prefer]
    opts = PlanOptions(
        chunk_bytes=chunk, min_chunk_bytes=min(chunk, 64), coalesce_gap=gap, cost=cost
    )
    plan = plan_reads(items, opts)
    file_bytes = rng.integers(0, 256, pos + 8, dtype=np.uint8)
    out = run_plan(plan, file_bytes)
    for info, sel in items:
        start, nbytes, shape, dtype = arrays[info.name]
        data = file_bytes[start : start + nbytes].view(dtype.numpy).reshape(shape)
        assert out[info.name].tobytes() == expected_bytes(data, sel)
    for op in plan.ops:
        # An op only exceeds the cap when one row block of a strided tensor
        # is itself larger (then it is read row by row, directly).
        assert op.length <= chunk or not op.staged
        assert op.length <= max(chunk, opts.min_chunk_bytes)
    assert plan.bytes_read == plan.bytes_useful + plan.bytes_wasted
    assert plan.bytes_gap <= opts.max_overread * plan.bytes_useful  # merged gaps are bounded
    offsets = [(op.file, op.offset) for op in plan.ops]
    assert offsets == sorted(offsets)


def _info(shape, dtype="BF16", start=0):
    d = DTYPES[dtype]
    return TensorInfo("w", d, shape, "f", start, math.prod(shape) * d.bits // 8)


def test_column_shard_of_small_rows_reads_covering_block():
    # o_proj 4096x4096 bf16 at world 8: 512-byte segments; per-row reads would
    # be 4096 tiny I/Os, so the covering block wins.
    info = _info((4096, 4096))
    plan = plan_reads([(info, split_selection(info.shape, 1, 3, 8))])
    assert plan.tensors[0].strategy == "covering"
    assert all(op.staged and op.length <= 64 << 20 for op in plan.ops)
    assert plan.bytes_useful == info.nbytes // 8


def test_column_shard_of_long_rows_reads_rows_directly():
    info = _info((16, 8 << 20))  # 16 rows of 16 MiB: 2 MiB segments at world 8
    plan = plan_reads([(info, split_selection(info.shape, 1, 0, 8))])
    assert plan.tensors[0].strategy == "direct"
    assert plan.bytes_wasted == 0 and len(plan.ops) == 16


def test_large_row_shard_is_split_at_cap_with_floor():
    info = _info((32000, 4096))  # 250 MiB embedding, rank 1 of 2: 125 MiB
    plan = plan_reads(
        [(info, split_selection(info.shape, 0, 1, 2))],
        PlanOptions(chunk_bytes=64 << 20, min_chunk_bytes=4 << 20),
    )
    sizes = [op.length for op in plan.ops]
    assert sum(sizes) == info.nbytes // 2 and max(sizes) <= 64 << 20
    assert min(sizes) >= 4 << 20 and all(op.offset % 4096 == 0 for op in plan.ops)


def test_small_neighbours_coalesce_into_one_read():
    infos = [TensorInfo(f"n{i}", DTYPES["F32"], (256,), "f", 8 + i * 1024, 1024) for i in range(8)]
    plan = plan_reads([(i, Selection.whole(i.shape)) for i in infos])
    assert len(plan.ops) == 1 and plan.bytes_wasted == 0 and len(plan.ops[0].pieces) == 8


def test_fused_column_sections_share_one_covering_read():
    # GPT-2 c_attn: [768, 2304] split per section along dim 1.
    info = _info((768, 2304), "F32")
    plan = plan_reads([(info, split_selection(info.shape, 1, 1, 4, sections=3))])
    assert plan.tensors[0].strategy == "covering"
    assert plan.bytes_read < info.nbytes  # the block is read once, not per section


def test_empty_and_scalar_tensors():
    empty = TensorInfo("e", DTYPES["F32"], (0, 4), "f", 0, 0)
    scalar = TensorInfo("s", DTYPES["F32"], (), "f", 0, 4)
    plan = plan_reads([(empty, Selection.whole((0, 4))), (scalar, Selection.whole(()))])
    assert [t.strategy for t in plan.tensors] == ["empty", "whole"]
    assert plan.bytes_read == 4


def test_sub_byte_split_must_land_on_bytes():
    f4 = TensorInfo("q", DTYPES["F4"], (4, 6), "f", 0, 12)
    with pytest.raises(PlanError, match="byte boundary"):
        plan_reads([(f4, Selection(1, ((0, 3),), (4, 3), "column"))])
    ok = plan_reads([(f4, Selection(1, ((2, 2),), (4, 2), "column"))])
    assert ok.tensors[0].out_nbytes == 4 and ok.tensors[0].out_shape == (4, 1)


def test_bad_pieces_and_ops_cannot_exist():
    with pytest.raises(PlanError):
        Piece("t", 0, 2, 8, 4, 0, 8)  # rows overlap in the source
    p = Piece("t", 100, 1, 8, 8, 0, 8)
    with pytest.raises(PlanError):
        ReadOp("f", 104, 8, (p,), staged=False)  # piece outside the read
    with pytest.raises(ValueError):
        PlanOptions(chunk_bytes=KiB, min_chunk_bytes=2 * KiB)


# -- splitting reads to fit a buffer (gpuload.plan.split) ----------------------------------


@st.composite
def op_and_limit(draw):
    """Any valid read, direct or staged, unaligned, with gaps; and any budget."""
    staged = draw(st.booleans())
    base = draw(st.integers(0, 2 * PAGE))
    pieces = []
    if staged:  # pieces of any rows and strides, interleaved or overlapping in the file
        for i in range(draw(st.integers(1, 4))):
            rows, row = draw(st.integers(1, 8)), draw(st.integers(1, 300))
            src, stride = base + draw(st.integers(0, 600)), row + draw(st.integers(0, 300))
            dst, dst_stride = draw(st.integers(0, 50)), row + draw(st.integers(0, 50))
            pieces.append(Piece(f"t{i}", src, rows, row, stride, dst, dst_stride))
    else:  # ordered contiguous runs across page boundaries, gaps between them
        pos = base
        for i in range(draw(st.integers(1, 4))):
            pos += draw(st.integers(0, 300))
            n = draw(st.integers(1, PAGE + 300))
            pieces.append(Piece(f"t{i}", pos, 1, n, n, draw(st.integers(0, 50)), n))
            pos += n
    lo = min(p.src for p in pieces)
    lo -= draw(st.integers(0, min(lo, 100)))  # bytes before the first piece
    hi = max(p.src_end for p in pieces) + draw(st.integers(0, 100))
    op = ReadOp("f", lo, hi - lo, tuple(pieces), staged)
    return op, draw(st.integers(1, op.length + 8))


@settings(max_examples=200, deadline=None)
@given(case=op_and_limit())
def test_split_op_delivers_exactly_the_bytes_of_the_op(case):
    op, limit = case
    parts = split_op(op, limit)
    assert parts == [op] or op.length > limit
    for part in parts:  # within the budget, never outside the original range
        assert part.file == op.file and part.length <= limit
        assert op.offset <= part.offset and part.offset + part.length <= op.offset + op.length
    sizes = {p.tensor: p.dst_end for p in op.pieces}
    file_bytes = np.random.default_rng(limit).integers(
        0, 256, op.offset + op.length, dtype=np.uint8
    )
    want, want_hits = execute(sizes, [op], file_bytes)
    got, got_hits = execute(sizes, parts, file_bytes)
    for name in sizes:  # every byte the op writes, written once more, and nothing else
        np.testing.assert_array_equal(got_hits[name], want_hits[name])
        np.testing.assert_array_equal(got[name], want[name])


def test_aligned_span_widens_to_whole_pages():
    run = Piece("t", 5000, 1, 100, 100, 0, 100)
    assert aligned_span(ReadOp("f", 5000, 100, (run,), staged=False)) == (PAGE, PAGE)
    whole = Piece("t", PAGE, 1, PAGE, PAGE, 0, PAGE)
    assert aligned_span(ReadOp("f", PAGE, PAGE, (whole,), staged=False)) == (PAGE, PAGE)
    straddle = Piece("t", PAGE - 1, 1, 2, 2, 0, 2)
    assert aligned_span(ReadOp("f", PAGE - 1, 2, (straddle,), staged=False)) == (0, 2 * PAGE)


def test_direct_op_is_split_on_page_boundaries():
    run = Piece("t", 100, 1, 3 * PAGE, 3 * PAGE, 0, 3 * PAGE)
    parts = split_op(ReadOp("f", 100, 3 * PAGE, (run,), staged=False), PAGE + 50)
    assert [(p.offset, p.length) for p in parts] == [
        (100, PAGE - 100),
        (PAGE, PAGE),
        (2 * PAGE, PAGE),
        (3 * PAGE, 100),
    ]
    assert [p.pieces[0].dst for p in parts] == [0, PAGE - 100, 2 * PAGE - 100, 3 * PAGE - 100]


def test_staged_op_splits_into_row_windows_or_direct_rows():
    piece = Piece("t", 0, 6, 100, 300, 0, 100)  # 6 rows of 100 bytes, 300 apart
    op = ReadOp("f", 0, 5 * 300 + 100, (piece,), staged=True)
    windows = split_op(op, 700)  # three whole rows fit 700 bytes
    assert [(w.offset, w.length, w.staged) for w in windows] == [(0, 700, True), (900, 700, True)]
    rows = split_op(op, 99)  # a row is longer than the budget: rows are read directly
    assert not any(r.staged for r in rows) and max(r.length for r in rows) <= 99
    assert sum(r.useful_bytes for r in rows) == op.useful_bytes
    with pytest.raises(PlanError, match="reads of 0 bytes"):
        split_op(op, 0)


def test_fit_ops_respects_each_buffer():
    run = Piece("t", 1, 1, 4 * PAGE, 4 * PAGE, 0, 4 * PAGE)
    direct = ReadOp("f", 1, 4 * PAGE, (run,), staged=False)
    staged = ReadOp("f", 0, 2000, (Piece("u", 0, 10, 100, 200, 0, 100),), staged=True)
    posix = fit_ops([direct, staged], host_bytes=PAGE, scratch_bytes=500, device_reads=False)
    assert all(op.length <= PAGE for op in posix)
    assert all(op.length <= 500 for op in posix if op.pieces[0].tensor == "u")
    assert sum(op.useful_bytes for op in posix) == direct.useful_bytes + staged.useful_bytes
    # kvikio reads whole pages into scratch: 4 pages + 1 byte span 5 pages.
    assert fit_ops([direct], host_bytes=0, scratch_bytes=5 * PAGE, device_reads=True) == [direct]
    kvikio = fit_ops([direct], host_bytes=0, scratch_bytes=4 * PAGE, device_reads=True)
    assert len(kvikio) > 1 and all(aligned_span(op)[1] <= 4 * PAGE for op in kvikio)
