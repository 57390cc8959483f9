"""How one dimension of a tensor is cut among tensor-parallel ranks: the arithmetic.

Even shares (``torch.chunk``-style when uneven is allowed), whole attention
heads (kv heads replicated when the ranks outnumber them), gpt-oss's
intermediate blocks and expert-parallel blocks of experts, each as
``(start, length)`` ranges placed into a
:class:`~gpuload.sharding.selection.Selection`. No rule tables, no config:
:class:`~gpuload.sharding.sharder.Sharder` decides which cut applies.
"""

from __future__ import annotations

from gpuload.errors import ShardingError
from gpuload.sharding.selection import Selection


def expert_block(num_experts: int, rank: int, world: int) -> tuple[int, int]:
    """The experts a rank owns under expert parallelism, as ``(first, count)``.

    Contiguous blocks, the remainder going to the lowest ranks: 10 experts
    over 4 ranks give 3, 3, 2, 2. ``count`` is 0 when ``num_experts < world``
    leaves the rank without an expert.
    """
    base, extra = divmod(num_experts, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def _chunk(name: str, what: str, size: int, rank: int, world: int, uneven: bool) -> tuple[int, int]:
    """``(start, length)`` of the rank's even share of ``size`` elements."""
    if size % world and not uneven:
        raise ShardingError(
            f"{name!r}: {what} of size {size} does not divide evenly by world size {world}; "
            "pass allow_uneven=True for a torch.chunk-style split",
            keywords=("allow_uneven=True",),
        )
    per = -(-size // world)  # ceil: torch.chunk sizes, the last ranks short or empty
    start = min(size, rank * per)
    return start, min(size, start + per) - start


def _heads(
    name: str, size: int, heads: int, rank: int, world: int, kv: bool, source: str = ""
) -> tuple[int, int]:
    """``(start, length)`` of the rank's whole heads in ``size`` = heads * head_dim.
    ``source`` says where ``heads`` came from, for the errors."""
    label = "kv heads" if kv else "heads"
    whence = f"; the {heads} {label} came from {source}" if source else ""
    if size % heads:
        raise ShardingError(f"{name!r}: size {size} is not a multiple of {heads} {label}{whence}")
    head_dim = size // heads
    if kv and world > heads:
        if world % heads:
            raise ShardingError(
                f"{name!r}: world size {world} is not a multiple of {heads} kv heads, "
                f"so kv heads cannot be replicated evenly{whence}"
            )
        return rank // (world // heads) * head_dim, head_dim
    if heads % world:
        raise ShardingError(
            f"{name!r}: {heads} {label} do not divide by world size {world}{whence}"
        )
    per = heads // world * head_dim
    return rank * per, per


def _selection(shape, dim, sizes, parts, kind: str, rule: str | None) -> Selection:
    """Place each section's ``(start, length)`` at the section's offset along ``dim``."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    # Empty ranges (uneven tails, ranks without experts) are dropped: nothing to read.
    ranges = tuple((off + start, n) for off, (start, n) in zip(offsets, parts, strict=True) if n)
    out = list(shape)
    out[dim] = sum(n for _, n in ranges)
    return Selection(dim, ranges, tuple(out), kind, rule)


def _intermediate(spec, rule, name, shape, dim, rank, world) -> Selection:
    """gpt-oss: whole blocks of the intermediate size, ceil(blocks / world) a rank."""
    size = shape[dim]
    if (size * spec.block) % spec.entries or (size * spec.block // spec.entries) % spec.block:
        raise ShardingError(
            f"{name!r}: dim {dim} of size {size} is not {spec.entries} entries per "
            f"{spec.block} intermediate elements"
        )
    inter = size * spec.block // spec.entries
    per = -(-inter // spec.block // world) * spec.block
    start, end = min(inter, rank * per), min(inter, (rank + 1) * per)
    part = (start * spec.entries // spec.block, (end - start) * spec.entries // spec.block)
    return _selection(shape, dim, (size,), [part], "row" if dim == 0 else "column", rule)
