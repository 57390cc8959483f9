"""The plan's data types: pieces, read ops, tensor plans, the plan and its options.

Frozen dataclasses that check their own invariants on construction; the
planner (:func:`gpuload.plan.planner.plan_reads`) builds them, the readers
and the host and CUDA pipelines consume them. A :class:`Piece` is a 2-D
strided byte region of one tensor; a :class:`ReadOp` is one contiguous
file range holding pieces, read either straight into their destinations
(``staged=False``) or into staging and gathered from there (``staged=True``).
:class:`PlanOptions` (with its :class:`CostModel`) sizes and shapes the reads.
"""

from __future__ import annotations

import dataclasses
import math

from gpuload.errors import PlanError
from gpuload.format.header import TensorInfo
from gpuload.plan.transfer import GatherOptions
from gpuload.sharding.selection import Selection

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096  # split points are rounded to pages: the OS and GDS work in 4 KiB


@dataclasses.dataclass(frozen=True)
class Piece:
    """``rows`` runs of ``row_bytes``: file ``src + r*src_stride`` to output
    ``dst + r*dst_stride`` of tensor ``tensor``."""

    tensor: str
    src: int
    rows: int
    row_bytes: int
    src_stride: int
    dst: int
    dst_stride: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.row_bytes < 1 or self.src < 0 or self.dst < 0:
            raise PlanError(f"bad piece for {self.tensor!r}: {self}")
        if self.rows > 1 and (self.src_stride < self.row_bytes or self.dst_stride < self.row_bytes):
            raise PlanError(f"piece rows overlap for {self.tensor!r}: {self}")

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def src_end(self) -> int:
        return self.src + (self.rows - 1) * self.src_stride + self.row_bytes

    @property
    def dst_end(self) -> int:
        return self.dst + (self.rows - 1) * self.dst_stride + self.row_bytes

    def row_range(self, first: int, count: int) -> Piece:
        """Rows ``first .. first+count`` of this piece, as a piece."""
        return dataclasses.replace(
            self,
            src=self.src + first * self.src_stride,
            dst=self.dst + first * self.dst_stride,
            rows=count,
        )


@dataclasses.dataclass(frozen=True)
class ReadOp:
    """One contiguous read of ``length`` bytes at ``offset`` of ``file``."""

    file: str
    offset: int
    length: int
    pieces: tuple[Piece, ...]
    staged: bool
    gap_bytes: int = 0  # bytes between the reads merged into this one (see _coalesce)

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length < 1 or not self.pieces:
            raise PlanError(f"empty or negative read of {self.file}: {self.offset}+{self.length}")
        end = self.offset + self.length
        pos = self.offset
        for p in self.pieces:
            if p.src < self.offset or p.src_end > end:
                raise PlanError(f"piece of {p.tensor!r} lies outside its read of {self.file}")
            if not self.staged:
                # Direct reads scatter one contiguous run per piece, in order.
                if p.rows != 1 or p.src < pos:
                    raise PlanError(f"direct read of {self.file} has a strided or unordered piece")
                pos = p.src_end

    @property
    def useful_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    @property
    def wasted_bytes(self) -> int:
        return self.length - self.useful_bytes


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """How one tensor is loaded: its selection, output size and strategy."""

    info: TensorInfo
    selection: Selection
    out_nbytes: int
    out_shape: tuple[int, ...]  # shape of the numpy array carrying the result
    strategy: str  # "whole" | "contiguous" | "direct" | "covering" | "empty"
    # How a covering tensor's segments reach a GPU (gpuload.plan.transfer): "device",
    # "zerocopy" or "pack"; None when not covering or the load is on the CPU.
    gather: str | None = None

    @property
    def name(self) -> str:
        return self.info.name


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Chooses between reading each row of a column shard (direct) and
    reading the covering block then gathering (covering).

    The defaults come from TensorCast PR 161's measurements: a per-row read
    costs ~12 us of fixed overhead (4 KiB rows reached 0.33 GiB/s), a block
    read streams at ~9 GiB/s, and packing runs at memory speed.
    """

    op_seconds: float = 12e-6
    read_bytes_per_s: float = 9 * GiB
    gather_bytes_per_s: float = 10 * GiB

    def prefer_direct(self, runs: int, useful: int, covering: int, chunk: int) -> bool:
        """``runs`` reads of ``useful`` bytes in all, against covering reads
        (of at most ``chunk`` bytes each) of ``covering`` bytes plus a gather."""
        direct = runs * self.op_seconds + useful / self.read_bytes_per_s
        block = (
            math.ceil(covering / chunk) * self.op_seconds
            + covering / self.read_bytes_per_s
            + useful / self.gather_bytes_per_s
        )
        return direct < block


@dataclasses.dataclass(frozen=True)
class PlanOptions:
    chunk_bytes: int = 16 * MiB  # cap on one read (GPULOAD_CHUNK_BYTES default)
    min_chunk_bytes: int = 4 * MiB  # never split a range into reads smaller than this
    coalesce_gap: int = 256 * KiB  # merge neighbouring reads across gaps up to this
    # ... while a merged read's gap bytes stay under this fraction of its
    # useful bytes: 256 KiB of other tensors is cheap beside megabytes, not
    # beside a 4 KiB norm (tiny-mixtral read 94% of its files without it).
    max_overread: float = 0.25
    cost: CostModel = CostModel()
    gather: GatherOptions | None = None  # None: a host load, gathered by the numpy twin

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1 or self.min_chunk_bytes < 1 or self.coalesce_gap < 0:
            raise ValueError(f"plan options must be positive: {self}")
        if not self.max_overread >= 0:
            raise ValueError(f"max_overread={self.max_overread!r} has to be >= 0")
        if self.min_chunk_bytes > self.chunk_bytes:
            raise ValueError(
                f"min_chunk_bytes={self.min_chunk_bytes} > chunk_bytes={self.chunk_bytes}"
            )


@dataclasses.dataclass(frozen=True)
class Plan:
    tensors: tuple[TensorPlan, ...]
    ops: tuple[ReadOp, ...]

    @property
    def bytes_read(self) -> int:
        return sum(op.length for op in self.ops)

    @property
    def bytes_useful(self) -> int:
        return sum(op.useful_bytes for op in self.ops)

    @property
    def bytes_wasted(self) -> int:
        return self.bytes_read - self.bytes_useful

    @property
    def gathers(self) -> dict[str, str]:
        """Tensor name -> gather strategy, for the covering tensors of a GPU plan."""
        return {t.name: t.gather for t in self.tensors if t.gather is not None}

    @property
    def max_staged_bytes(self) -> int:
        return max((op.length for op in self.ops if op.staged), default=0)

    @property
    def bytes_gap(self) -> int:
        """Bytes read only because neighbouring reads were merged across them
        (other tensors' bytes, or other ranks' parts of a row)."""
        return sum(op.gap_bytes for op in self.ops)

    @property
    def max_gap_bytes(self) -> int:
        gaps = [0]
        for op in self.ops:
            if not op.staged:
                pos = op.offset
                for p in op.pieces:
                    gaps.append(p.src - pos)
                    pos = p.src_end
        return max(gaps)
