"""The Numba CUDA strided gather kernel: one launch moves every piece of a table.

Work distribution
-----------------
Each piece is ``rows * row_words`` words, numbered row-major. It is cut into
*tiles* of ``tile_words`` consecutive words; tiles of all pieces are numbered
one after the other (``layout.word_table``). The grid is 1-D and each block
takes tiles in a grid-stride loop: it finds the tile's piece by a binary
search over the pieces' first-tile column (log2(n) cached loads, once per
tile, not per word), then its threads stride over the tile's words, so
consecutive threads touch consecutive words of a row and loads and stores
coalesce.

Why: a table may hold one covering piece of thousands of 1-16 KiB rows, many
small pieces, or both at once. Tiles give a huge piece as many blocks as its
size needs and a small piece one block, with no idle blocks sized for the
largest piece (the cost of a 2-D pieces x blocks grid) and no per-word
search (the cost of a flat prefix sum). Rows shorter than a block do not
idle threads: a tile runs across row boundaries. Each thread turns its word
index into (row, word-in-row) with one division per tile, then steps with
adds and a carry.

Element width: ``layout.width_groups`` splits the table per piece. A piece
whose source and destination agree modulo 16 (8, 4, 2) moves its middle in
16-byte (8-, 4-, 2-byte) elements; the head bytes before the first aligned
address and the tail after the last whole element go to narrower groups, so
one odd offset no longer sends a whole table to the byte kernel. Each group
is one launch (usually one or two per gather). 16-byte elements are one
``ld.global.v2.u64`` / ``st.global.v2.u64`` each (``_vec16``'s intrinsics;
Numba has no 16-byte scalar). Each thread issues ``UNROLL`` (4) loads before
its stores, so several are in flight. One kernel is compiled per width, on
first use, and cached (``variants``).

Launching it (tables, streams, width groups) is :mod:`gpuload.kernels.cuda`.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from numba import config, cuda

from .host import DST_OFF, DST_STRIDE, ROW_BYTES, ROWS, SRC_OFF, SRC_STRIDE
from .layout import FIRST_TILE, WCOLS

# 16-byte elements are uint64 pairs, moved with one vector load and store.
_DTYPES = {16: np.uint64, 8: np.uint64, 4: np.uint32, 2: np.uint16, 1: np.uint8}
_SIM = bool(config.ENABLE_CUDASIM)


UNROLL = 4
"""Words each thread loads before it stores any: loads in flight per thread."""


def _load1_sim(a, i):
    v = a[i]
    return v, v  # one element; the pair keeps one signature with the 16-byte load


def _store1_sim(a, i, lo, hi):
    a[i] = lo


def _load16_sim(a, i):
    return a[2 * i], a[2 * i + 1]


def _store16_sim(a, i, lo, hi):
    a[2 * i] = lo
    a[2 * i + 1] = hi


def _make_body(load, store):
    """The kernel body for one element width, ``load``/``store`` moving one element."""

    def body(src, dst, pieces, n_tiles, tile_words):
        """Move the words of tiles blockIdx.x, +gridDim.x, ... (see module doc)."""
        n_pieces = pieces.shape[0] // WCOLS
        step = cuda.blockDim.x
        tile = cuda.blockIdx.x
        while tile < n_tiles:
            lo = 0
            hi = n_pieces
            while hi - lo > 1:  # last piece whose first tile is <= tile
                mid = (lo + hi) // 2
                if pieces[mid * WCOLS + FIRST_TILE] <= tile:
                    lo = mid
                else:
                    hi = mid
            p = lo * WCOLS
            row_words = pieces[p + ROW_BYTES]
            src_stride = pieces[p + SRC_STRIDE]
            dst_stride = pieces[p + DST_STRIDE]
            k = (tile - pieces[p + FIRST_TILE]) * tile_words
            end = pieces[p + ROWS] * row_words
            if end > k + tile_words:
                end = k + tile_words
            # Word k of the piece is (row r, word w); step by `step` words with
            # adds and one carry instead of a division per word.
            k += cuda.threadIdx.x
            r = k // row_words
            w = k - r * row_words
            s = pieces[p + SRC_OFF] + r * src_stride + w
            d = pieces[p + DST_OFF] + r * dst_stride + w
            dr = step // row_words
            dw = step - dr * row_words
            s_step = dr * src_stride + dw
            d_step = dr * dst_stride + dw
            while k < end:
                # UNROLL (4) words per thread: every load issued before any
                # store, so several are in flight. Words past the end load
                # word 0's address again (valid) and are not stored.
                s0 = s
                d0 = d
                w += dw  # step one block of words, carrying into the next row
                s += s_step
                d += d_step
                if w >= row_words:
                    w -= row_words
                    s += src_stride - row_words
                    d += dst_stride - row_words
                s1 = s if k + step < end else s0
                d1 = d
                w += dw  # step one block of words, carrying into the next row
                s += s_step
                d += d_step
                if w >= row_words:
                    w -= row_words
                    s += src_stride - row_words
                    d += dst_stride - row_words
                s2 = s if k + 2 * step < end else s0
                d2 = d
                w += dw  # step one block of words, carrying into the next row
                s += s_step
                d += d_step
                if w >= row_words:
                    w -= row_words
                    s += src_stride - row_words
                    d += dst_stride - row_words
                s3 = s if k + 3 * step < end else s0
                d3 = d
                w += dw  # step one block of words, carrying into the next row
                s += s_step
                d += d_step
                if w >= row_words:
                    w -= row_words
                    s += src_stride - row_words
                    d += dst_stride - row_words
                a0, b0 = load(src, s0)
                a1, b1 = load(src, s1)
                a2, b2 = load(src, s2)
                a3, b3 = load(src, s3)
                store(dst, d0, a0, b0)
                if k + step < end:
                    store(dst, d1, a1, b1)
                if k + 2 * step < end:
                    store(dst, d2, a2, b2)
                if k + 3 * step < end:
                    store(dst, d3, a3, b3)
                k += UNROLL * step
            tile += cuda.gridDim.x

    return body


if _SIM:
    _load16, _store16, _load1, _store1 = _load16_sim, _store16_sim, _load1_sim, _store1_sim
else:
    from ._vec16 import load1 as _load1
    from ._vec16 import load16 as _load16
    from ._vec16 import store1 as _store1
    from ._vec16 import store16 as _store16

_bodies = {
    16: _make_body(_load16, _store16),
    **{w: _make_body(_load1, _store1) for w in (8, 4, 2, 1)},
}


def _body(word: int):
    """The Python kernel body for ``word``-byte elements (compiled by ``_kernel``)."""
    return _bodies[word]


_gather_body = _bodies[8]  # the 8-byte body, as before


_cache: dict[int, Any] = {}
_compiles: dict[int, int] = {}
_lock = threading.Lock()


def _kernel(word: int):
    kernel = _cache.get(word)
    if kernel is None:
        with _lock:
            kernel = _cache.get(word)
            if kernel is None:
                ty = np.dtype(_DTYPES[word]).name
                sig = f"void({ty}[::1], {ty}[::1], int64[::1], int64, int64)"
                kernel = _cache[word] = cuda.jit(sig)(_body(word))
                _compiles[word] = _compiles.get(word, 0) + 1
    return kernel


def variants() -> dict[int, int]:
    """Element widths compiled so far in this process, each with its compile count (1)."""
    return dict(_compiles)
