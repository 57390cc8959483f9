"""The CUDA gather under Numba's simulator, byte for byte against the numpy twin.

Every case starts ``dst`` as random bytes and compares the whole buffer with
``gather_host`` run on the same bytes, so a write outside the pieces shows.
Launch shapes are tiny (a few threads, tiles of a few words) so KiB buffers
still cross tile, row and grid-stride boundaries, and the simulator, which
runs each thread as a Python thread, stays fast.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from numba import cuda

from gpuload.kernels.cuda import Launch, gather, variants, word_size
from gpuload.kernels.host import gather_host

pytestmark = pytest.mark.cudasim

SMALL = Launch(threads=8, tile_words=24, min_blocks=1, max_blocks=3)
LAUNCHES = [
    SMALL,
    Launch(threads=32, tile_words=64, min_blocks=1, max_blocks=64),
    Launch(threads=3, tile_words=5, min_blocks=1, max_blocks=2),
]
SRC_BYTES = 4096


def random_table(rng: np.random.Generator, align: int, n: int) -> tuple[np.ndarray, int]:
    """``n`` pieces on ``align``-byte multiples, disjoint in dst; the size dst needs.

    The first piece moves bytes and has a ``src_off`` that is an odd multiple
    of ``align``, so ``align`` is exactly the widest word the table allows.
    """
    rows_out, cursor = [], 0
    for i in range(n):
        rows = int(rng.integers(1 if i == 0 else 0, 9))
        row_bytes = align * int(rng.integers(1 if i == 0 else 0, 21))
        if rng.random() < 0.3:  # contiguous on both sides
            src_stride = dst_stride = row_bytes
        else:
            src_stride = align * int(rng.integers(0, 25))  # may be < row_bytes, or 0
            dst_stride = row_bytes + align * int(rng.integers(0, 4))
        dst_off = cursor + align * int(rng.integers(0, 4))
        # _check bounds a zero-length piece with rows too: reserve its extent.
        src_extent = (rows - 1) * src_stride + row_bytes if rows else 0
        if rows:
            cursor = max(cursor, dst_off + (rows - 1) * dst_stride + row_bytes)
        k = int(rng.integers(0, (SRC_BYTES - src_extent) // align + 1))
        if i == 0 and k % 2 == 0:
            k = k + 1 if (k + 1) * align + src_extent <= SRC_BYTES else k - 1
        rows_out.append((k * align, dst_off, rows, row_bytes, src_stride, dst_stride))
    return np.array(rows_out, dtype=np.int64).reshape(-1, 6), cursor


def run_both(src: np.ndarray, dst: np.ndarray, table: np.ndarray, launch: Launch = SMALL):
    """(device result, host result) of gathering ``table`` from ``src`` into copies of ``dst``."""
    d_src, d_dst = cuda.to_device(src), cuda.to_device(dst)
    gather(d_src, d_dst, table, launch=launch)
    want = dst.copy()
    gather_host(src, want, table)
    return d_dst.copy_to_host(), want


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def bytes_(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("align", [8, 4, 2, 1])
def test_random_tables_match_host(align: int, seed: int) -> None:
    rng = np.random.default_rng(1000 * align + seed)
    table, need = random_table(rng, align, n=int(rng.integers(1, 12)))
    src = bytes_(rng, SRC_BYTES)
    dst = bytes_(rng, need + int(rng.integers(1, 14)))  # odd sizes: a partial last word
    d_src, d_dst = cuda.to_device(src), cuda.to_device(dst)
    assert word_size(d_src, d_dst, table) == align
    got, want = run_both(src, dst, table, LAUNCHES[seed % len(LAUNCHES)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("launch", LAUNCHES, ids=["small", "warp", "odd"])
def test_one_covering_piece(rng: np.random.Generator, launch: Launch) -> None:
    # The covering-read case: many rows, gathered out of a wider source row
    # (a dim-1 shard), rows both shorter and longer than a block.
    for row_bytes in (8, 40, 8 * 37):
        table = np.array([[24, 0, 20, row_bytes, row_bytes * 3, row_bytes]], dtype=np.int64)
        src, dst = bytes_(rng, 24 + 60 * row_bytes), bytes_(rng, 20 * row_bytes + 5)
        got, want = run_both(src, dst, table, launch)
        np.testing.assert_array_equal(got, want)


def test_interleaved_pieces(rng: np.random.Generator) -> None:
    # Three pieces share dst rows, each owning one column band: the bytes
    # between pieces of one row belong to another piece, never overwritten.
    rb, rows = 24, 10
    table = np.array(
        [[i * 400, i * rb + 8, rows, rb, 32, 3 * rb + 16] for i in range(3)], dtype=np.int64
    )
    src, dst = bytes_(rng, SRC_BYTES), bytes_(rng, 8 + rows * (3 * rb + 16))
    got, want = run_both(src, dst, table)
    np.testing.assert_array_equal(got, want)


def test_many_small_pieces(rng: np.random.Generator) -> None:
    table = np.array([[i * 24, i * 16, 1, 16, 0, 0] for i in range(60)], dtype=np.int64)
    src, dst = bytes_(rng, SRC_BYTES), bytes_(rng, 60 * 16 + 3)
    got, want = run_both(
        src, dst, table, Launch(threads=4, tile_words=2, max_blocks=7, min_blocks=1)
    )
    np.testing.assert_array_equal(got, want)


def test_contiguous_strides(rng: np.random.Generator) -> None:
    table = np.array([[8, 16, 12, 32, 32, 32], [1000, 500, 7, 5, 5, 5]], dtype=np.int64)
    src, dst = bytes_(rng, SRC_BYTES), bytes_(rng, 600)
    got, want = run_both(src, dst, table)
    np.testing.assert_array_equal(got, want)


def test_pieces_that_move_nothing(rng: np.random.Generator) -> None:
    # Zero rows, zero row_bytes: no-ops that also leave the word width alone,
    # even when their offsets and strides are odd.
    table = np.array(
        [[3, 5, 0, 7, 9, 11], [8, 64, 4, 0, 3, 5], [16, 8, 3, 16, 24, 16]], dtype=np.int64
    )
    src, dst = bytes_(rng, 256), bytes_(rng, 128)
    d_src, d_dst = cuda.to_device(src), cuda.to_device(dst)
    assert word_size(d_src, d_dst, table) == 8
    got, want = run_both(src, dst, table)
    np.testing.assert_array_equal(got, want)
    nothing = table[:2]
    got, _ = run_both(src, dst, nothing)
    np.testing.assert_array_equal(got, dst)


def test_empty_table(rng: np.random.Generator) -> None:
    dst = bytes_(rng, 64)
    got, _ = run_both(bytes_(rng, 64), dst, np.zeros((0, 6), dtype=np.int64))
    np.testing.assert_array_equal(got, dst)


@pytest.mark.parametrize(
    ("src_at", "dst_at", "width"), [(3, 0, 1), (0, 5, 1), (4, 0, 4), (2, 6, 2)]
)
def test_buffer_slices_narrow_the_word(
    rng: np.random.Generator, src_at: int, dst_at: int, width: int
) -> None:
    # A table aligned to 8 bytes, but a buffer that starts mid-word: the word
    # must follow the buffers' addresses, not only the table.
    table = np.array([[0, 0, 6, 16, 48, 24], [304, 160, 2, 40, 40, 40]], dtype=np.int64)
    src, dst = bytes_(rng, 512), bytes_(rng, 300)
    d_src, d_dst = cuda.to_device(src), cuda.to_device(dst)
    s, d = d_src[src_at:], d_dst[dst_at:]
    assert word_size(s, d, table) == width
    gather(s, d, table, launch=SMALL)
    want = dst.copy()
    gather_host(src[src_at:], want[dst_at:], table)
    np.testing.assert_array_equal(d_dst.copy_to_host(), want)


def test_out_of_bounds_raises_before_any_write(rng: np.random.Generator) -> None:
    src, dst = bytes_(rng, 256), bytes_(rng, 128)
    d_src, d_dst = cuda.to_device(src), cuda.to_device(dst)
    ok = [0, 0, 2, 64, 64, 64]  # ends exactly at dst's end: allowed
    got, want = run_both(src, dst, np.array([ok], dtype=np.int64))
    np.testing.assert_array_equal(got, want)
    bad = [
        [0, 8, 2, 64, 64, 64],  # one word past dst
        [0, 0, 2, 64, 64, 65],  # one byte past dst, through the stride
        [193, 0, 1, 64, 0, 0],  # one byte past src
        [0, 0, 1, -8, 0, 0],  # negative
    ]
    for row in bad:
        with pytest.raises(ValueError):
            gather(d_src, d_dst, np.array([ok, row], dtype=np.int64), launch=SMALL)
        np.testing.assert_array_equal(d_dst.copy_to_host(), dst)


def test_bad_arguments(rng: np.random.Generator) -> None:
    d_src, d_dst = cuda.to_device(bytes_(rng, 64)), cuda.to_device(bytes_(rng, 64))
    table = np.array([[0, 0, 1, 8, 0, 0]], dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        gather(d_src, d_dst, table[:, :5])
    with pytest.raises(ValueError, match="src"):
        gather(d_src.view(np.uint32), d_dst, table)
    with pytest.raises(ValueError, match="dst"):
        gather(d_src, d_dst.reshape(8, 8), table)
    with pytest.raises(TypeError, match="device array"):
        gather(np.zeros(64, np.uint8), d_dst, table)
    with pytest.raises(ValueError, match="threads"):
        Launch(threads=0)
    with pytest.raises(ValueError, match="min_blocks"):
        Launch(min_blocks=10, max_blocks=5)


def test_stream_and_surplus_blocks(rng: np.random.Generator) -> None:
    # A stream object is accepted; a grid larger than the tiles (min_blocks,
    # as the default launch has) leaves the surplus blocks idle.
    table = np.array([[8, 0, 5, 24, 40, 24]], dtype=np.int64)
    src, dst = bytes_(rng, 256), bytes_(rng, 130)
    d_src, d_dst = cuda.to_device(src), cuda.to_device(dst)
    gather(d_src, d_dst, table, stream=cuda.stream(), launch=Launch(4, 8, 32, 32))
    want = dst.copy()
    gather_host(src, want, table)
    np.testing.assert_array_equal(d_dst.copy_to_host(), want)


def test_each_width_compiles_once(rng: np.random.Generator) -> None:
    src, dst = bytes_(rng, 256), bytes_(rng, 256)
    d_src, d_dst = cuda.to_device(src), cuda.to_device(dst)
    for _ in range(2):
        for width in (8, 4, 2, 1):
            table = np.array([[width, 0, 3, width * 5, width * 7, width * 6]], dtype=np.int64)
            assert word_size(d_src, d_dst, table) == width
            gather(d_src, d_dst, table, launch=SMALL)
    assert set(variants().values()) == {1} and {8, 4, 2, 1} <= set(variants())


@pytest.mark.parametrize(
    ("table", "wide"),
    [
        ([[3, 3, 3, 200, 1024, 208]], 16),  # odd start, strides multiples of 16
        ([[5, 13, 3, 300, 1000, 304]], 8),  # starts agree mod 8 only
        ([[1, 0, 2, 64, 64, 64]], 1),  # src and dst disagree mod 2: bytes
    ],
)
def test_misaligned_starts_split_head_and_tail_and_keep_the_middle_wide(
    rng: np.random.Generator, monkeypatch, table, wide: int
) -> None:
    # The head/tail split under the simulator: byte-exact against the host
    # twin, and the bulk of the piece launched at the wide width.
    from gpuload.kernels import cuda as kernels_cuda

    launched: list[int] = []
    real = kernels_cuda._kernel

    def spy(word):
        launched.append(word)
        return real(word)

    monkeypatch.setattr(kernels_cuda, "_kernel", spy)
    table = np.array(table, np.int64)
    src, dst = bytes_(rng, 4096), bytes_(rng, 2048)
    d_src, d_dst = cuda.to_device(src), cuda.to_device(dst)
    assert word_size(d_src, d_dst, table) == 1  # the whole table's common width
    gather(d_src, d_dst, table, launch=SMALL)
    gather_host(src, dst, table)
    np.testing.assert_array_equal(d_dst.copy_to_host(), dst)
    assert max(launched) == wide
