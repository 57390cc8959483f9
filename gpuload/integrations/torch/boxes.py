"""Which box of a global tensor a DTensor's local shard is, and how to read it.

A DTensor's placements and this rank's mesh coordinate decide its local
shard. ``Shard(d)`` cuts dim ``d`` as ``torch.chunk`` does (``ceil(n / k)``
a chunk, the last ones short or empty), nested left to right over the mesh
dimensions; ``Replicate`` keeps it; FSDP2's ``_StridedShard`` (a dim sharded
by tensor parallelism first, then by FSDP) is torch's own arithmetic.
torch's ``compute_local_shape_and_global_offset`` is the reference the tests
hold this to. The result is a box, ``(start, stop)`` per dim, when each
dimension's indices are contiguous; anything else (``Partial``, a strided
set of rows) is an error before any I/O.

A box becomes something gpuload's planner reads (:func:`box_read`): with one
cut dimension it is a :class:`~gpuload.sharding.selection.Selection`; with two, the
first of which has nothing but size-1 dims before it (a 2-D weight cut by
rows and columns on a 2-D mesh), it is a contiguous slab of the tensor (a
narrower :class:`~gpuload.format.header.TensorInfo`) and a selection of that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from gpuload.errors import ShardingError
from gpuload.format.header import TensorInfo
from gpuload.sharding.selection import Selection

Box = tuple[tuple[int, int], ...]


def _chunk(indices: Sequence[int], k: int, r: int) -> Sequence[int]:
    """Chunk ``r`` of ``k`` of ``indices``, as ``torch.chunk`` cuts it."""
    per = -(-len(indices) // k)
    start = min(len(indices), r * per)
    return indices[start : min(len(indices), start + per)]


def _strided(placement: Any, indices: Sequence[int], k: int, r: int) -> list[int]:
    """FSDP2's ``_StridedShard``: torch computes the offsets into ``indices``."""
    from torch.distributed.tensor.placement_types import _StridedShardOffsetMode

    size, offsets = placement.local_shard_size_and_offset(
        len(indices), k, r, _StridedShardOffsetMode.ALL
    )
    return [indices[i] for i in (offsets or [])][:size]


def local_box(
    name: str,
    shape: Sequence[int],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int],
    placements: Sequence[Any],
) -> Box:
    """``(start, stop)`` per dim of the local shard at ``coordinate``.

    Raises
    ------
    ShardingError
        A placement with no slice of the checkpoint (``Partial``), or a local
        shard that is not one box.
    """
    # Global indices per dim, cut mesh dim by mesh dim. A strided shard may
    # leave gaps that a later mesh dim closes (FSDP2 over TP), so contiguity
    # is checked at the end only.
    index: list[Sequence[int]] = [range(n) for n in shape]
    for mesh_dim, p in enumerate(placements):
        strided = type(p).__name__ == "_StridedShard"  # is_shard() is False for it
        if p.is_replicate():
            continue
        if not (strided or p.is_shard()):
            raise ShardingError(
                f"{name!r}: placement {p} on mesh dim {mesh_dim} holds no slice of the checkpoint"
            )
        d = p.dim % len(shape) if shape else p.dim
        k, r = mesh_shape[mesh_dim], coordinate[mesh_dim]
        index[d] = _strided(p, index[d], k, r) if strided else _chunk(index[d], k, r)
    box = []
    for d, ix in enumerate(index):
        first = ix[0] if len(ix) else 0
        if list(ix) != list(range(first, first + len(ix))):
            raise ShardingError(
                f"{name!r}: placements {tuple(placements)} give mesh coordinate "
                f"{tuple(coordinate)} non-contiguous indices on dim {d}: not one box"
            )
        box.append((first, first + len(ix)))
    return tuple(box)


def box_read(info: TensorInfo, box: Box) -> tuple[TensorInfo, Selection]:
    """The tensor (or a contiguous slab of it) and the selection that read ``box``.

    Raises
    ------
    ShardingError
        A box cut on two dims with a dim of size > 1 before the first, or on
        three or more dims: gpuload's planner reads one cut dimension of a
        contiguous run.
    """
    shape = info.shape
    cut = [d for d, (a, b) in enumerate(box) if (a, b) != (0, shape[d])]
    if not cut:
        return info, Selection.whole(shape, "dtensor", "dtensor")
    if len(cut) == 2 and math.prod(shape[: cut[0]]) == 1:
        d = cut[0]
        a, b = box[d]
        row = math.prod(shape[d + 1 :]) * info.dtype.bits
        if (a * row) % 8 or (b * row) % 8:
            raise ShardingError(f"{info.file}: {info.name!r}: box {box} cuts a byte")
        slab = list(shape)
        slab[d] = b - a
        info = dataclasses.replace(
            info, shape=tuple(slab), start=info.start + a * row // 8, nbytes=(b - a) * row // 8
        )
        cut = cut[1:]
        if b == a:  # an empty slab: nothing to read
            return info, Selection.whole(info.shape, "dtensor", "dtensor")
    if len(cut) != 1:
        raise ShardingError(
            f"{info.file}: {info.name!r}: local box {box} of shape {shape} is cut on dims {cut}; "
            "gpuload reads boxes cut on one dim, or on two when only size-1 dims precede the first"
        )
    d = cut[0]
    a, b = box[d]
    out = list(info.shape)
    out[d] = b - a
    ranges = ((a, b - a),) if b > a else ()
    return info, Selection(d, ranges, tuple(out), "dtensor", "dtensor")


__all__ = ["Box", "box_read", "local_box"]
