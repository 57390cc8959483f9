"""Quantization scales follow their weight's shard.

FP8 and FP4 checkpoints store, beside a quantized ``X.weight``, a scale
tensor: ``X.weight_scale_inv`` (block FP8, DeepSeek-V3 and Qwen3 FP8:
``[ceil(out/128), ceil(in/128)]``), ``X.weight_scale`` (per tensor ``[]``,
per output channel ``[out]`` / ``[out, 1]``, or NVFP4 groups
``[out, in/16]`` beside a packed ``[out, in/2]`` weight) and
``X.weight_scale_2`` (per tensor). A rank needs exactly the scales of the
weight elements it owns, as vLLM's ``BlockQuantScaleParameter`` and
``ChannelQuantScaleParameter`` load them:

* along the weight's split dim, a scale dim of the same size takes the same
  ranges (per channel); a dim of size 1 is replicated (per tensor);
* a shorter dim holds blocks of ``b`` elements, ``ceil(W / b) = S``: each
  weight range ``[start, start + n)`` takes blocks ``[start / b,
  ceil((start + n) / b))``, which needs ``start`` on a block boundary and
  ``n`` whole blocks (or the tensor's tail), as vLLM requires;
* a 1-D scale beside a 2-D or 3-D weight is per output channel (the weight's
  dim -2): it follows a split of that dim and is whole otherwise;
* a MoE expert's blocks that a rank's share cuts are refined by vLLM (see
  :func:`_refined`): the rank takes every block its elements touch.

``b`` comes from ``weight_block_size`` (``[out, in]``: the caller's, else
``quantization_config.weight_block_size`` in config.json), else from the
shapes when they allow one block size only; when several fit and a rank
boundary falls inside the tensor, that is an error rather than a guess.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gpuload.errors import ShardingError
from gpuload.sharding.selection import Selection

SUFFIXES = ("_scale_inv", "_scale_2", "_scale")
INPUT = ".input_scale"


def weight_of(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The weight tensor whose scale ``name`` is, when the checkpoint has it."""
    # X.input_scale (static activation scale, per tensor) goes where X.weight
    # goes: another rank's expert's scale is not this rank's (vLLM FusedMoE
    # weight_loader skips experts the rank does not hold).
    if name.endswith(INPUT) and (base := name[: -len(INPUT)] + ".weight") in shapes:
        return base
    for suffix in SUFFIXES:
        if name.endswith(suffix) and (base := name[: -len(suffix)]) in shapes:
            return base if base.endswith("weight") else None
    return None


def block_sizes(config: Mapping[str, Any], given: Any = None) -> tuple[int, int] | None:
    """``given``, else ``quantization_config.weight_block_size``, as ``(out, in)``."""
    sizes, where = given, "weight_block_size"
    if sizes is None:
        quant = config.get("quantization_config")
        sizes = quant.get("weight_block_size") if isinstance(quant, Mapping) else None
        where = "config.json quantization_config.weight_block_size"
    if sizes is None:
        return None
    if (
        not isinstance(sizes, list | tuple)
        or len(sizes) != 2
        or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes)
    ):
        bad = ValueError if given is not None else ShardingError  # the caller's, or the file's
        raise bad(f"{where}={sizes!r} has to be two positive ints [out, in]")
    return sizes[0], sizes[1]


def block_source(given: Any) -> str:
    """Where the block sizes came from, for error messages."""
    if given is not None:
        return "weight_block_size= argument"
    return "config.json quantization_config.weight_block_size"


def follow(
    name: str,
    shape: tuple[int, ...],
    weight: str,
    weight_shape: tuple[int, ...],
    sel: Selection | None,
    blocks: tuple[int, int] | None = None,
    experts: bool = False,
    blocks_from: str = "config.json quantization_config.weight_block_size",
) -> Selection | None:
    """The part of scale ``name`` (``shape``) that goes with ``sel`` of ``weight``.

    ``experts``: ``weight`` is a MoE expert's, whose block scales vLLM refines
    when a rank's share cuts blocks (see :func:`_refined`)."""
    rule = f"scale of {weight}" + (f" ({sel.rule})" if sel is not None and sel.rule else "")
    if sel is None:  # another rank's expert: its scales go with it
        return None
    if sel.dim is None:  # a whole weight, and whole scales (unknown if the weight is)
        return Selection.whole(shape, sel.kind, rule if sel.rule else None)
    if all(n == 1 for n in shape) or name.endswith(INPUT):  # per tensor
        return Selection.whole(shape, "replicated", rule)
    d, nd = sel.dim, len(weight_shape)
    if len(shape) == nd:
        sd = d
    elif len(shape) == 1 and nd >= 2:  # per output channel
        if d != nd - 2:
            return Selection.whole(shape, "replicated", rule)
        sd = 0
    else:
        raise ShardingError(
            f"{name!r}: cannot tell how a scale of shape {shape} maps onto {weight!r} "
            f"of shape {weight_shape}; pass a rule for it"
        )
    size, wsize = shape[sd], weight_shape[d]
    if size == 1:
        return Selection.whole(shape, "replicated", rule)
    if size == wsize:
        ranges = sel.ranges
    else:
        known = None
        if blocks is not None and d >= nd - 2:
            known = blocks[d - (nd - 2)]
        b = _block(name, weight, d, wsize, size, known, sel.ranges, blocks_from)
        other = weight_shape[nd - 1] if d == nd - 2 else weight_shape[nd - 2]
        refine = (blocks or (b, b)) + (other,) if experts else None
        ranges = tuple(_blocks(name, weight, d, wsize, b, r, refine) for r in sel.ranges)
    out = list(shape)
    out[sd] = sum(n for _, n in ranges)
    return Selection(sd, ranges, tuple(out), sel.kind, rule)


def _block(name, weight, d, wsize, size, known, ranges, blocks_from) -> int:
    """The block size along weight dim ``d`` that makes ``wsize`` into ``size`` blocks."""
    if size > wsize:
        raise ShardingError(
            f"{name!r}: {size} scales along dim {d} but {weight!r} has only {wsize} elements there"
        )
    lo = -(-wsize // size)  # the smallest block giving `size` blocks
    hi = -(-wsize // (size - 1)) - 1  # the largest
    if known is not None:
        if not lo <= known <= hi:
            raise ShardingError(
                f"{name!r}: {size} scales along dim {d} do not match block size {known} "
                f"({blocks_from}) for {wsize} elements of {weight!r}"
            )
        return known
    # Without the config, trust the shapes only when no rank boundary falls
    # inside the tensor or a single block size fits: 300 rows in 3 blocks
    # could be blocks of 100 or of 128, and rank 1 of 3 would get the wrong
    # scales under the wrong guess.
    if lo != hi and any(0 < x < wsize for s, n in ranges for x in (s, s + n)):
        raise ShardingError(
            f"{name!r}: {size} scales for {wsize} elements of {weight!r} fit block sizes "
            f"{lo} to {hi}, and the split depends on which; set "
            "quantization_config.weight_block_size in config.json or pass weight_block_size="
        )
    return lo


def _blocks(name, weight, d, wsize, b, r, refine=None) -> tuple[int, int]:
    start, n = r
    if (start % b or (n % b and start + n != wsize)) and not _refined(n, refine):
        raise ShardingError(
            f"{name!r}: the rank's elements [{start}, {start + n}) of {weight!r} dim {d} "
            f"cut through quantization blocks of {b}; the world size does not fit the blocks"
        )
    first = start // b  # every block the rank's elements touch
    return first, -(-(start + n) // b) - first


def _refined(n: int, refine: tuple[int, int, int] | None) -> bool:
    """Whether vLLM refines an expert's blocks for a rank share of ``n``.

    vLLM fused_moe/oracle/fp8.py refine_fp8_moe_block_shape: when a rank's
    intermediate size cuts the checkpoint's (block_n, block_k) blocks, the
    block becomes gcd(block_n, block_k, n, hidden) if that is at least 32,
    and routed_experts.py upsamples the scales (repeat_interleave) before
    the usual split: a rank then holds the scales of every checkpoint block
    its elements touch, shared with its neighbours. Below 32 vLLM refuses
    (validate_fp8_block_shape_moe). ``refine``: (block_n, block_k, hidden).
    """
    if refine is None:
        return False
    block_n, block_k, hidden = refine
    return math.gcd(block_n, block_k, n, hidden) >= 32


__all__ = ["SUFFIXES", "block_sizes", "block_source", "follow", "weight_of"]
