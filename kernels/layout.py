"""Integer helpers for the CUDA gather: element width and launch tiles.

Pure numpy, no CUDA import, so the arithmetic the kernels rely on is tested
on the CPU. A piece that moves no bytes (``rows == 0`` or ``row_bytes == 0``)
takes no part in either: it never touches memory, so it neither narrows the
element width nor gets a tile.
"""

from __future__ import annotations

import numpy as np

from .host import DST_OFF, DST_STRIDE, NCOLS, ROW_BYTES, ROWS, SRC_OFF, SRC_STRIDE

WORD_SIZES = (8, 4, 2, 1)
"""Element widths in bytes, widest first. 8 is the widest load Numba emits reliably."""

VECTOR_WORDS = (16, 8, 4, 2, 1)
"""Widths the gather kernel moves: 16 bytes is one ``ld.global.v2.u64`` per element."""

FIRST_TILE = NCOLS
"""Column of a word table holding the index of the piece's first tile."""

WCOLS = NCOLS + 1
"""Columns of a word table: the six piece-table columns in words, then ``FIRST_TILE``."""


def _as_table(table: np.ndarray) -> np.ndarray:
    t = np.asarray(table)
    if t.ndim != 2 or t.shape[1] != NCOLS:
        raise ValueError(f"piece table must have shape (n, {NCOLS}), got {t.shape}")
    return t.astype(np.int64, copy=False)


def _moving(t: np.ndarray) -> np.ndarray:
    return t[(t[:, ROWS] > 0) & (t[:, ROW_BYTES] > 0)]


def widest_word(table: np.ndarray, *base_offsets: int) -> int:
    """The widest element (8, 4, 2 or 1 bytes) that every address in ``table`` is a multiple of.

    Parameters
    ----------
    table : (n, 6) integer array
        A piece table (columns ``SRC_OFF`` ... ``DST_STRIDE``), in bytes.
    *base_offsets : int
        Extra byte quantities that must be multiples too, typically the base
        pointers of the source and destination buffers.

    Returns
    -------
    int
        8, 4, 2 or 1; 8 for an empty table with no base offsets.

    Notes
    -----
    Only values that reach an address count: pieces that move no bytes are
    skipped, and so are the strides of single-row pieces (row 0 never
    multiplies its stride). Everything else -- ``src_off``, ``dst_off``,
    ``row_bytes`` and the strides -- must be a multiple of the result, so
    every row starts and ends on a word boundary on both sides.
    """
    t = _moving(_as_table(table))
    acc = int(np.bitwise_or.reduce(t[:, [SRC_OFF, DST_OFF, ROW_BYTES]], axis=None))
    strided = t[t[:, ROWS] > 1]
    acc |= int(np.bitwise_or.reduce(strided[:, [SRC_STRIDE, DST_STRIDE]], axis=None))
    for b in base_offsets:
        acc |= int(b)
    return next(w for w in WORD_SIZES if acc % w == 0)


def word_table(table: np.ndarray, word: int, tile_words: int) -> tuple[np.ndarray, int]:
    """Convert a byte piece table into the flat word table the CUDA kernel reads.

    Parameters
    ----------
    table : (n, 6) integer array
        A piece table in bytes; every address must be a multiple of ``word``
        (see ``widest_word``).
    word : int
        Element width in bytes: 8, 4, 2 or 1.
    tile_words : int
        Words per tile: the unit of work one thread block takes at a time.

    Returns
    -------
    pieces : (m * WCOLS,) int64 array
        One row of ``WCOLS`` per piece that moves bytes, flattened: offsets,
        row length and strides in words (``ROWS`` unchanged, strides of
        single-row pieces zeroed), then ``FIRST_TILE``, the running count of
        tiles of the pieces before it.
    n_tiles : int
        Total tiles; tile ``i`` belongs to the last piece whose
        ``FIRST_TILE`` is ``<= i``. Each piece has at least one.
    """
    if word not in VECTOR_WORDS:
        raise ValueError(f"{word=} must be one of {VECTOR_WORDS}")
    if tile_words < 1:
        raise ValueError(f"{tile_words=} must be positive")
    t = _moving(_as_table(table)).copy()
    t[t[:, ROWS] == 1, SRC_STRIDE] = 0
    t[t[:, ROWS] == 1, DST_STRIDE] = 0
    addr = [SRC_OFF, DST_OFF, ROW_BYTES, SRC_STRIDE, DST_STRIDE]
    if (t[:, addr] % word).any():
        raise ValueError(f"piece table is not aligned to {word}-byte words")
    out = np.empty((len(t), WCOLS), dtype=np.int64)
    out[:, :NCOLS] = t
    out[:, addr] //= word
    tiles = -(-(out[:, ROWS] * out[:, ROW_BYTES]) // tile_words)
    out[:, FIRST_TILE] = np.cumsum(tiles) - tiles
    return out.ravel(), int(tiles.sum())


def _widest(sa: np.ndarray, da: np.ndarray, n: np.ndarray, strides: np.ndarray) -> np.ndarray:
    """Per piece, the widest of VECTOR_WORDS dividing its source and
    destination addresses, its row length and (``strides``, 0 when single-row) strides."""
    acc = sa | da | n | strides
    w = np.ones(len(acc), np.int64)
    for cand in VECTOR_WORDS[-2::-1]:  # 2, 4, 8, 16: each implies the narrower
        w = np.where(acc % cand == 0, cand, w)
    return w


def width_groups(table: np.ndarray, src_base: int, dst_base: int) -> list[tuple[int, np.ndarray]]:
    """Split a byte piece table by element width, with a head/tail split.

    A piece whose source and destination addresses agree modulo ``w`` (and
    whose strides are multiples of ``w``) moves its middle in ``w``-byte
    words: the bytes before the first aligned address (head) and after the
    last whole word (tail) go to narrower groups. Without the split one
    misaligned start would send the whole table to the byte kernel.

    Returns ``(word, table)`` pairs, widest first, each table's offsets
    still relative to the buffers' starts (the caller shifts its views);
    together they move exactly the bytes of ``table``.
    """
    t = _moving(_as_table(table))
    if not len(t):
        return []
    so, do, rows, rb = (t[:, c] for c in (SRC_OFF, DST_OFF, ROWS, ROW_BYTES))
    ss, ds = t[:, SRC_STRIDE], t[:, DST_STRIDE]
    multi = rows > 1
    strides = np.where(multi, ss | ds, 0)
    sa, da = so + src_base, do + dst_base
    # Widest w with (sa - da) % w == 0 and the strides multiples of w.
    rel = np.abs(sa - da) | strides
    w = np.ones(len(t), np.int64)
    for cand in VECTOR_WORDS[-2::-1]:
        w = np.where(rel % cand == 0, cand, w)
    head = np.minimum((-sa) % w, rb)
    mid = (rb - head) // w * w
    tail = rb - head - mid
    parts = []  # (piece rows, start shift, length, width)
    whole = mid == 0  # shorter than a word: one part, the widest that divides it
    parts.append((t[whole], np.zeros(whole.sum(), np.int64), rb[whole], None))
    split = ~whole
    parts.append((t[split], head[split], mid[split], w[split]))
    h = split & (head > 0)
    parts.append((t[h], np.zeros(h.sum(), np.int64), head[h], None))
    e = split & (tail > 0)
    parts.append((t[e], (head + mid)[e], tail[e], None))
    pieces, widths = [], []
    for rows_, shift, length, width in parts:
        if not len(rows_):
            continue
        p = rows_.copy()
        p[:, SRC_OFF] += shift
        p[:, DST_OFF] += shift
        p[:, ROW_BYTES] = length
        if width is None:
            st = np.where(p[:, ROWS] > 1, p[:, SRC_STRIDE] | p[:, DST_STRIDE], 0)
            width = _widest(p[:, SRC_OFF] + src_base, p[:, DST_OFF] + dst_base, length, st)
        pieces.append(p)
        widths.append(width)
    allp, allw = np.concatenate(pieces), np.concatenate(widths)
    return [(int(word), allp[allw == word]) for word in VECTOR_WORDS if (allw == word).any()]
