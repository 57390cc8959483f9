"""The numpy gather twin against a naive per-row loop, and the layout helpers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuload.kernels.host import (
    DST_OFF,
    DST_STRIDE,
    ROW_BYTES,
    ROWS,
    SRC_OFF,
    SRC_STRIDE,
    gather_host,
)
from gpuload.kernels.layout import FIRST_TILE, WCOLS, widest_word, word_table


def naive(src: np.ndarray, dst: np.ndarray, table: np.ndarray) -> None:
    for so, do, rows, rb, ss, ds in table.tolist():
        for r in range(rows):
            dst[do + r * ds : do + r * ds + rb] = src[so + r * ss : so + r * ss + rb]


def random_table(rng: np.random.Generator, n: int, src_n: int, dst_n: int) -> np.ndarray:
    """In-bounds pieces of any alignment; pieces may overlap one another in dst
    (both sides apply them in table order), a piece's own rows do not."""
    out = []
    for _ in range(n):
        rows = int(rng.integers(0, 12))
        rb = int(rng.integers(0, 40))
        if rng.random() < 0.3:
            ss = ds = rb
        else:
            ss = int(rng.integers(0, 64))  # src rows may overlap or repeat
            ds = rb + int(rng.integers(0, 16))
        last = max(rows - 1, 0)
        so = int(rng.integers(0, src_n - last * ss - rb + 1))
        do = int(rng.integers(0, dst_n - last * ds - rb + 1))
        out.append((so, do, rows, rb, ss, ds))
    return np.array(out, dtype=np.int64).reshape(-1, 6)


@pytest.mark.parametrize("seed", range(40))
def test_gather_host_matches_naive_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, 1024, dtype=np.uint8)
    dst = rng.integers(0, 256, 1024, dtype=np.uint8)
    table = random_table(rng, int(rng.integers(0, 10)), src.size, dst.size)
    want = dst.copy()
    naive(src, want, table)
    gather_host(src, dst, table)
    np.testing.assert_array_equal(dst, want)


def test_gather_host_edges() -> None:
    src = np.arange(64, dtype=np.uint8)
    dst = np.full(32, 0xEE, dtype=np.uint8)
    gather_host(src, dst, np.zeros((0, 6), dtype=np.int64))
    gather_host(src, dst, np.array([[60, 30, 0, 50, 99, 99], [0, 32, 5, 0, 0, 0]]))
    assert (dst == 0xEE).all()
    gather_host(src, dst, np.array([[56, 24, 1, 8, 0, 0]]))  # ends exactly at both ends
    np.testing.assert_array_equal(dst[24:], src[56:])


@pytest.mark.parametrize(
    "bad",
    [
        [0, 25, 1, 8, 0, 0],  # one byte past dst
        [0, 0, 2, 8, 0, 25],  # past dst through the stride
        [57, 0, 1, 8, 0, 0],  # one byte past src
        [0, 0, 1, -1, 0, 0],  # negative
    ],
)
def test_gather_host_checks_the_whole_table_first(bad: list[int]) -> None:
    src = np.arange(64, dtype=np.uint8)
    dst = np.zeros(32, dtype=np.uint8)
    with pytest.raises(ValueError):
        gather_host(src, dst, np.array([[0, 0, 1, 8, 0, 0], bad]))
    assert not dst.any()


def test_gather_host_rejects_bad_arrays() -> None:
    u8 = np.zeros(16, dtype=np.uint8)
    table = np.zeros((1, 6), dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        gather_host(u8, u8.copy(), np.zeros((1, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="src"):
        gather_host(u8.view(np.uint16), u8.copy(), table)
    with pytest.raises(ValueError, match="dst"):
        gather_host(u8, u8.copy()[::2], table)


# widest_word ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "width", "bases"),
    [
        ([[0, 0, 4, 64, 128, 64]], 8, ()),
        ([[0, 0, 4, 64, 128, 64]], 4, (4096, 260)),
        ([[8, 16, 2, 12, 24, 12]], 4, ()),
        ([[2, 16, 2, 8, 24, 8]], 2, ()),
        ([[0, 0, 3, 8, 8, 9]], 1, ()),  # an odd stride
        ([[0, 0, 1, 8, 3, 5]], 8, ()),  # single row: its strides never count
        ([[8, 8, 1, 8, 0, 0], [1, 3, 0, 8, 8, 8], [5, 7, 3, 0, 1, 1]], 8, ()),  # no-op pieces
        ([], 8, ()),
        ([], 2, (6,)),
    ],
)
def test_widest_word_cases(rows: list[list[int]], width: int, bases: tuple[int, ...]) -> None:
    table = np.array(rows, dtype=np.int64).reshape(-1, 6)
    assert widest_word(table, *bases) == width


def test_widest_word_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        widest_word(np.zeros((2, 5), dtype=np.int64))


@st.composite
def tables(draw: st.DrawFn) -> np.ndarray:
    unit = draw(st.sampled_from([1, 2, 4, 8, 16]))
    cell = st.integers(0, 300).map(lambda v: v * unit)
    n = draw(st.integers(0, 6))
    rows = [
        [draw(cell), draw(cell), draw(st.integers(0, 3)), draw(cell), draw(cell), draw(cell)]
        for _ in range(n)
    ]
    if rows and draw(st.booleans()):  # knock one value off the common unit
        rows[draw(st.integers(0, n - 1))][draw(st.integers(0, 5))] += draw(st.integers(1, 7))
    return np.array(rows, dtype=np.int64).reshape(-1, 6)


@settings(max_examples=200, deadline=None)
@given(tables(), st.lists(st.integers(0, 2**40), max_size=2))
def test_widest_word_is_the_widest_that_divides_every_address(
    table: np.ndarray, bases: list[int]
) -> None:
    width = widest_word(table, *bases)
    assert width in (8, 4, 2, 1)
    values = list(bases)
    for so, do, rows, rb, ss, ds in table.tolist():
        if rows and rb:
            values += [so, do, rb] + ([ss, ds] if rows > 1 else [])

    def divides(w: int) -> bool:
        return all(v % w == 0 for v in values)

    assert divides(width)
    assert width == 8 or not divides(2 * width)


# word_table -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(tables(), st.integers(1, 50))
def test_word_table_round_trips_and_numbers_tiles(table: np.ndarray, tile_words: int) -> None:
    word = widest_word(table)
    flat, n_tiles = word_table(table, word, tile_words)
    pieces = flat.reshape(-1, WCOLS)
    moving = table[(table[:, ROWS] > 0) & (table[:, ROW_BYTES] > 0)]
    assert len(pieces) == len(moving)
    for cols in ([SRC_OFF, DST_OFF, ROW_BYTES], [ROWS]):
        scale = word if cols != [ROWS] else 1
        np.testing.assert_array_equal(pieces[:, cols] * scale, moving[:, cols])
    multi = moving[:, ROWS] > 1
    for c in (SRC_STRIDE, DST_STRIDE):
        np.testing.assert_array_equal(pieces[multi, c] * word, moving[multi, c])
        assert not pieces[~multi, c].any()
    words = pieces[:, ROWS] * pieces[:, ROW_BYTES]
    tiles = -(-words // tile_words)
    assert n_tiles == tiles.sum()
    np.testing.assert_array_equal(pieces[:, FIRST_TILE], np.cumsum(tiles) - tiles)


def test_word_table_rejects_misalignment_and_bad_arguments() -> None:
    table = np.array([[8, 8, 2, 8, 12, 8]], dtype=np.int64)
    with pytest.raises(ValueError, match="aligned"):
        word_table(table, 8, 16)
    with pytest.raises(ValueError, match="word"):
        word_table(table, 3, 16)
    with pytest.raises(ValueError, match="tile_words"):
        word_table(table, 4, 0)
    flat, n_tiles = word_table(np.zeros((0, 6), dtype=np.int64), 8, 16)
    assert flat.size == 0 and n_tiles == 0


# width_groups: the head/tail split ---------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_width_groups_move_exactly_the_tables_bytes_each_at_an_aligned_width(seed: int) -> None:
    from gpuload.kernels.layout import width_groups

    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, 1 << 14, dtype=np.uint8)
    n = int(rng.integers(1, 8))
    rows = []
    dst_at = 0
    for _ in range(n):
        r = int(rng.integers(1, 5))
        rb = int(rng.integers(1, 300))
        ss = rb + int(rng.integers(0, 3)) * 16 + int(rng.integers(0, 2)) * int(rng.integers(1, 9))
        so = int(rng.integers(0, 4000))
        rows.append([so, dst_at, r, rb, ss, rb])
        dst_at += r * rb + int(rng.integers(0, 20))
    table = np.array(rows, np.int64)
    bases = int(rng.integers(0, 16)) * 4096 + int(rng.integers(0, 16)), int(rng.integers(0, 16))
    want = np.zeros(dst_at, np.uint8)
    gather_host(src, want, table)
    got = np.zeros(dst_at, np.uint8)
    for word, part in width_groups(table, *bases):
        for col, base in ((SRC_OFF, bases[0]), (DST_OFF, bases[1])):
            assert ((part[:, col] + base) % word == 0).all()
        assert (part[:, ROW_BYTES] % word == 0).all()
        multi = part[:, ROWS] > 1
        assert (part[multi][:, [SRC_STRIDE, DST_STRIDE]] % word == 0).all()
        gather_host(src, got, part)
    np.testing.assert_array_equal(got, want)


def test_a_misaligned_start_keeps_the_middle_of_a_piece_wide() -> None:
    # One odd offset used to send the whole table to the byte kernel; now
    # only the head and tail bytes go narrow.
    from gpuload.kernels.layout import width_groups

    table = np.array([[3, 3, 4, 4096, 8192, 4096], [16, 1 << 14, 1, 1024, 1024, 1024]], np.int64)
    assert widest_word(table) == 1
    moved = {w: int((p[:, ROWS] * p[:, ROW_BYTES]).sum()) for w, p in width_groups(table, 0, 0)}
    assert sum(moved.values()) == 4 * 4096 + 1024
    assert moved[16] >= 4 * (4096 - 16) + 1024 and moved.get(1, 0) <= 4 * 16
