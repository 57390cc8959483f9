"""What one rank takes of one tensor: the contract between sharding and plan."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Selection:
    """The part of a tensor that one rank owns.

    ``dim`` is the split dimension, or None when the rank takes the whole
    tensor (replicated, or a whole expert under expert parallelism).
    ``ranges`` are ``(start, length)`` index ranges along ``dim``, in source
    order of *output*: the output holds them side by side along ``dim`` (a
    fused ``gate_up`` tensor gives two ranges, one per section). ``shape``
    is the output shape: the source shape with ``dim`` set to the sum of the
    lengths. ``kind`` names the split for reports ("replicated", "row",
    "column", "expert", "fused", "kv-replicated") and ``rule`` the rule that
    matched (None: no rule matched, the tensor is replicated as unknown).
    """

    dim: int | None
    ranges: tuple[tuple[int, int], ...]
    shape: tuple[int, ...]
    kind: str
    rule: str | None = None

    def __post_init__(self) -> None:
        if self.dim is None:
            if self.ranges:
                raise ValueError("a whole-tensor selection has no ranges")
            return
        if not 0 <= self.dim < len(self.shape):
            raise ValueError(f"dim={self.dim} is out of range for shape {self.shape}")
        if any(start < 0 or length < 0 for start, length in self.ranges):
            raise ValueError(f"ranges={self.ranges} has negative entries")
        if sum(length for _, length in self.ranges) != self.shape[self.dim]:
            raise ValueError(f"ranges={self.ranges} do not add up to shape[{self.dim}]")

    @staticmethod
    def whole(shape: tuple[int, ...], kind: str = "replicated", rule: str | None = None):
        return Selection(None, (), tuple(shape), kind, rule)
