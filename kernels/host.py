"""The piece table and the numpy twin of the CUDA gather: same bytes, on the CPU.

A *piece table* is an ``int64`` array of shape ``(n, 6)``; each row moves
``rows`` runs of ``row_bytes`` bytes from ``src`` to ``dst``::

    for r in range(rows):
        dst[dst_off + r*dst_stride : +row_bytes] = src[src_off + r*src_stride : +row_bytes]

Columns are named by the ``SRC_OFF`` ... ``DST_STRIDE`` constants. The host
backend uses ``gather_host`` to pack covering reads into their destinations,
and the simulator tests use it as the reference for the CUDA kernels
(``gpuload.kernels.cuda``, imported on demand: it pulls in numba.cuda).

``kernels/`` has no ``__init__.py`` on purpose. It ships as ``gpuload.kernels``
(a package-dir mapping in pyproject.toml), and any Python started in the
repository root has that root on ``sys.path``: a regular package there would
shadow the PyPI package ``kernels`` (which transformers imports), while an
implicit namespace portion never shadows a regular package found later.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

SRC_OFF, DST_OFF, ROWS, ROW_BYTES, SRC_STRIDE, DST_STRIDE = range(6)
NCOLS = 6


def _check(table: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    if table.ndim != 2 or table.shape[1] != NCOLS:
        raise ValueError(f"piece table must have shape (n, {NCOLS}), got {table.shape}")
    for name, a in (("src", src), ("dst", dst)):
        if a.dtype != np.uint8 or a.ndim != 1 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a contiguous 1-D uint8 array")
    if len(table) == 0:
        return
    t = table.astype(np.int64, copy=False)
    if (t < 0).any():
        raise ValueError("piece table has negative entries")
    has = t[:, ROWS] > 0
    last = np.where(has, t[:, ROWS] - 1, 0)
    src_end = np.where(has, t[:, SRC_OFF] + last * t[:, SRC_STRIDE] + t[:, ROW_BYTES], 0)
    dst_end = np.where(has, t[:, DST_OFF] + last * t[:, DST_STRIDE] + t[:, ROW_BYTES], 0)
    if src_end.max() > src.size or dst_end.max() > dst.size:
        raise ValueError("piece table reaches past the end of src or dst")


def gather_host(src: np.ndarray, dst: np.ndarray, table: np.ndarray) -> None:
    """Copy every piece of ``table`` from ``src`` into ``dst`` (both uint8, 1-D).

    Bounds are checked for the whole table before any byte moves, so a bad
    table never writes a partial result.
    """
    _check(table, src, dst)
    for src_off, dst_off, rows, row_bytes, src_stride, dst_stride in table.tolist():
        if rows == 0 or row_bytes == 0:
            continue
        if rows == 1 or (src_stride == row_bytes and dst_stride == row_bytes):
            n = rows * row_bytes if rows > 1 else row_bytes
            dst[dst_off : dst_off + n] = src[src_off : src_off + n]
            continue
        # A 2-D strided view on each side: numpy copies it row by row with
        # memcpy-speed inner loops, no Python loop over rows.
        s = as_strided(src[src_off:], shape=(rows, row_bytes), strides=(src_stride, 1))
        d = as_strided(dst[dst_off:], shape=(rows, row_bytes), strides=(dst_stride, 1))
        d[...] = s
