"""Fused MoE expert parameters for ``load_into``: transformers 5 modules hold
``mlp.experts.gate_up_proj [E, 2I, H]`` and ``mlp.experts.down_proj [E, H, I]``
while checkpoints (including the ones transformers 5 itself saves) keep one
tensor per expert and projection.

This is transformers' own conversion (``conversion_mapping.py``: for
``qwen2_moe`` and the families mapped to it, ``MergeModulelist(dim=0)`` then
``Concatenate(dim=1)`` of ``experts.*.gate_proj`` / ``up_proj``, and
``MergeModulelist(dim=0)`` of ``experts.*.down_proj``; for ``mixtral``, the
same over ``block_sparse_moe.experts.*.w1`` / ``w3`` and ``w2``), done per
rank: a parameter's local box (its DTensor placements) becomes one box read
of each per-expert tensor it overlaps, so a rank reads only the rows and
columns it holds.
"""

from __future__ import annotations

from collections.abc import Container
from typing import NamedTuple

__all__ = ["Piece", "fused_sources", "pieces", "renamed"]

Box = tuple[tuple[int, int], ...]


class Piece(NamedTuple):
    """One box of one checkpoint tensor, and where it goes in the local shard."""

    source: str  # checkpoint name
    box: Box  # in the source tensor
    dest: tuple  # index into the local tensor (expert, rows slice, cols slice)


# (parameter suffix, per-expert sources: (module rename, projection names))
_LAYOUTS = (
    ("", ("gate_proj", "up_proj", "down_proj")),  # qwen2_moe, qwen3_moe, deepseek...
    (".block_sparse_moe", ("w1", "w3", "w2")),  # mixtral
)


def renamed(name: str, names: Container[str]) -> str | None:
    """transformers' renaming of Mixtral's ``block_sparse_moe`` to ``mlp``
    (its router gate, ``mlp.gate.weight``), undone: the checkpoint's name
    for module key ``name``, or None."""
    if ".mlp." in name:
        alt = name.replace(".mlp.", ".block_sparse_moe.", 1)
        if alt in names:
            return alt
    return None


def fused_sources(key: str, names: Container[str]) -> tuple[list[list[str]], str] | None:
    """For a fused parameter ``key`` (``...experts.gate_up_proj`` or
    ``...experts.down_proj``) the per-expert checkpoint names it is made of,
    ``[[gate_e, up_e] per expert]`` or ``[[down_e] per expert]``, and which
    ("gate_up" or "down"); None when ``key`` is not one or the checkpoint
    lacks expert 0's tensors."""
    for kind in ("gate_up", "down"):
        suffix = f".experts.{kind}_proj"
        if key.endswith(suffix):
            break
    else:
        return None
    prefix = key[: -len(suffix)]  # e.g. model.layers.0.mlp
    for module, (gate, up, down) in _LAYOUTS:
        base = prefix
        if module:
            if not prefix.endswith(".mlp"):
                continue
            base = prefix[: -len(".mlp")] + module
        projs = (gate, up) if kind == "gate_up" else (down,)

        def name(e: int, p: str, base: str = base) -> str:
            return f"{base}.experts.{e}.{p}.weight"

        if all(name(0, p) in names for p in projs):
            out, e = [], 0
            while all(name(e, p) in names for p in projs):
                out.append([name(e, p) for p in projs])
                e += 1
            return out, kind
    return None


def pieces(sources: list[list[str]], kind: str, box: Box, shape: tuple[int, ...]) -> list[Piece]:
    """The box reads that fill the local ``box`` of a fused parameter of
    global ``shape``: ``[E, 2I, H]`` (gate_up: gate's I rows, then up's) or
    ``[E, H, I]`` (down), from ``sources`` (see :func:`fused_sources`).
    Empty overlaps are skipped."""
    (e0, e1), (r0, r1), (c0, c1) = box
    half = shape[1] // 2
    out = []
    for e in range(e0, e1):
        if kind == "down":
            out.append(Piece(sources[e][0], ((r0, r1), (c0, c1)), (e - e0,)))
            continue
        for i, src in enumerate(sources[e]):
            lo = i * half
            a, b = max(r0, lo), min(r1, lo + half)
            if a < b:
                dest = (e - e0, slice(a - r0, b - r0))
                out.append(Piece(src, ((a - lo, b - lo), (c0, c1)), dest))
    return out
