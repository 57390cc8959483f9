"""Strided-gather kernels, shipped as ``gpuload.kernels``.

A *piece table* is an ``int64`` array of shape ``(n, 6)``; each row moves
``rows`` runs of ``row_bytes`` bytes from ``src`` to ``dst``::

    for r in range(rows):
        dst[dst_off + r*dst_stride : +row_bytes] = src[src_off + r*src_stride : +row_bytes]

Columns are named by the ``SRC_OFF`` ... ``DST_STRIDE`` constants. ``host``
holds the numpy twin; ``cuda`` (imported on demand, it pulls in numba.cuda)
the Numba CUDA kernels. Both give identical bytes.
"""

from .host import DST_OFF, DST_STRIDE, NCOLS, ROW_BYTES, ROWS, SRC_OFF, SRC_STRIDE, gather_host

__all__ = [
    "DST_OFF",
    "DST_STRIDE",
    "NCOLS",
    "ROWS",
    "ROW_BYTES",
    "SRC_OFF",
    "SRC_STRIDE",
    "gather_host",
]
