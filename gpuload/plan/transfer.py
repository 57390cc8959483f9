"""How a covering read's bytes reach device memory: three gather strategies.

A column shard is planned as a *covering* read (``gpuload.plan.planner``): whole
rows of the file land in pinned host staging, and only the rank's segments
of each row belong to it. On a GPU the segments reach their destination in
one of three ways, chosen per tensor by :class:`GatherModel`:

``device``
    H2D of the whole covering range into device scratch, then the Numba
    gather kernel packs it on the device. PCIe carries every covering byte
    (``world`` times the shard for a plain column split).
``zerocopy``
    The gather kernel reads the segments straight from the pinned staging
    through its device-mapped address (``cudaHostAllocMapped``) and writes
    the shard into its destination. PCIe carries only the owned segments, in
    32-128-byte transactions; no scratch, no second copy.
``pack``
    The reader thread packs the segments into a second pinned buffer laid
    out like the destination (``gather_host``), then one contiguous H2D per
    destination run. PCIe carries only the owned bytes; the host pays one
    memory copy of them.

Pure: integers in, decisions and piece tables out; no I/O, no CUDA. Every
constant of the model is in :class:`GatherModel`, so a GPU session can tune
them in one place (``bench/gather.py`` measures the three side by side).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from gpuload.kernels.host import DST_OFF, DST_STRIDE, NCOLS, ROW_BYTES, ROWS

GATHERS = ("device", "zerocopy", "pack")
"""The strategies a covering read can use on a GPU (``GPULOAD_GATHER`` forces one)."""


@dataclasses.dataclass(frozen=True)
class GatherModel:
    """Seconds each strategy costs for one covering tensor; the cheapest wins.

    The inputs are what the planner knows: ``rows`` segments of ``seg``
    bytes each (a rank's part of one row; fused sections count one segment
    each), ``useful`` owned bytes and ``covering`` bytes read. For a plain
    column split ``covering / useful`` is the world size, so the model
    chooses by segment size and world.

    The constants are first guesses from public figures, to be tuned on a GPU
    (``bench/gather.py`` prints measured GB/s per strategy beside them):
    pinned H2D on PCIe 4.0 x16 reaches ~25 GB/s; zero-copy reads of
    coalesced 128-byte lines reach ~75% of it; a segment not aligned to a
    line costs one more line; a device gather runs at HBM speed; a
    numpy-twin pack on the host runs near memory-copy speed per thread.
    """

    h2d_bytes_per_s: float = 25e9  # pinned host -> device copy (PCIe Gen4 x16; Gen5 ~50e9)
    zerocopy_efficiency: float = 0.75  # mapped reads, as a fraction of H2D bandwidth
    line_bytes: int = 128  # PCIe read granularity of a coalesced warp load
    device_gather_bytes_per_s: float = 1000e9  # device scratch -> destination
    host_pack_bytes_per_s: float = 8e9  # gather_host into pinned memory
    host_row_s: float = 20e-9  # numpy's per-row step in a strided copy
    # One kernel launch or one async copy, host side: numba-cuda 0.30 takes
    # 10-15 us per launch with three array arguments (read of its dispatcher).
    launch_s: float = 12e-6

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "gather model") -> GatherModel:
        """A model from ``{constant: value}`` (what ``bench/gather.py`` writes);
        constants missing keep their defaults, unknown or non-positive ones
        raise ValueError naming ``source``."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: expected a JSON object of constants, got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kept = {}
        for k, v in values.items():
            if k.startswith("_"):  # provenance (GPU name, driver, command): not a constant
                continue
            if k not in fields:
                raise ValueError(f"{source}: unknown constant {k!r}; known: {', '.join(fields)}")
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"{source}: {k} has to be a positive number, got {v!r}")
            kept[k] = int(v) if fields[k].type in (int, "int") else float(v)
        return cls(**kept)

    def costs(
        self, *, rows: int, seg: int, useful: int, covering: int, aligned: bool
    ) -> dict[str, float]:
        """Seconds per strategy for one tensor's covering reads.

        ``aligned``: every segment starts on a ``line_bytes`` boundary of
        the staging buffer (zero-copy then reads no partial line at the start).
        """
        lines = math.ceil(seg / self.line_bytes) + (0 if aligned else 1)
        zerocopy_bytes = rows * lines * self.line_bytes
        return {
            "device": self.launch_s * 2
            + covering / self.h2d_bytes_per_s
            + useful / self.device_gather_bytes_per_s,
            "zerocopy": self.launch_s
            + zerocopy_bytes / (self.h2d_bytes_per_s * self.zerocopy_efficiency),
            "pack": self.launch_s
            + useful / self.host_pack_bytes_per_s
            + rows * self.host_row_s
            + useful / self.h2d_bytes_per_s,
        }

    def choose(
        self,
        *,
        rows: int,
        seg: int,
        useful: int,
        covering: int,
        aligned: bool,
        allowed: tuple[str, ...] = GATHERS,
    ) -> str:
        """The cheapest of ``allowed`` (ties go to the earlier in ``GATHERS``)."""
        c = self.costs(rows=rows, seg=seg, useful=useful, covering=covering, aligned=aligned)
        return min(allowed, key=lambda g: (c[g], GATHERS.index(g)))


@dataclasses.dataclass(frozen=True)
class GatherOptions:
    """What the planner may choose from for a device load.

    ``force``: ``"auto"`` or one of :data:`GATHERS`. ``mapped``: staging is
    pinned, so it can be device-mapped (``pin=0`` rules zero-copy out).
    ``device_reads``: kvikio reads land in device scratch, where only the
    device gather applies.
    """

    force: str = "auto"
    mapped: bool = True
    device_reads: bool = False
    model: GatherModel = GatherModel()

    def __post_init__(self) -> None:
        if self.force not in ("auto", *GATHERS):
            raise ValueError(f"gather={self.force!r} must be auto or one of {GATHERS}")
        if self.force == "zerocopy" and not self.mapped:
            raise ValueError(
                "gather='zerocopy' reads mapped pinned staging, but pin=0 leaves it pageable"
            )
        if self.force in ("zerocopy", "pack") and self.device_reads:
            raise ValueError(
                f"gather={self.force!r} gathers from pinned host staging, but kvikio "
                "reads into device scratch: use backend='posix'"
            )

    def choose(self, *, rows: int, seg: int, useful: int, covering: int, aligned: bool) -> str:
        if self.device_reads:
            return "device"
        if self.force != "auto":
            return self.force
        allowed = GATHERS if self.mapped else ("device", "pack")
        return self.model.choose(
            rows=rows, seg=seg, useful=useful, covering=covering, aligned=aligned, allowed=allowed
        )


# --------------------------------------------------------------------------
# host pack


def pack_layout(table: np.ndarray, at: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Where one tensor's pieces go in a pack buffer, and the H2D copies after.

    Parameters
    ----------
    table
        The tensor's piece table for one staged read (``gpuload.kernels``
        columns; sources relative to the read, destinations in the tensor).
    at
        Offset in the pack buffer where this tensor's bytes start.

    Returns
    -------
    pack_table
        The same pieces with destinations in the pack buffer: gathering
        staging -> pack buffer with it packs the bytes.
    copies
        ``(dst_off, pack_off, nbytes)`` H2D copies, pack buffer -> tensor,
        that deliver exactly the pieces' bytes and nothing else; they take
        ``sum(rows * row_bytes)`` bytes of pack buffer from ``at``.

    Notes
    -----
    When the pieces tile one contiguous destination span (a column shard's
    rows, or every section of a fused tensor for the same rows) the pack
    buffer mirrors that span and one copy moves it. Otherwise each piece
    whose rows are contiguous in the destination is one copy, and a piece
    with gaps between its destination rows (a section whose neighbours this
    read does not hold) is one copy per row: never a byte another read owns.
    """
    t = np.asarray(table, np.int64).reshape(-1, NCOLS)
    t = t[(t[:, ROWS] > 0) & (t[:, ROW_BYTES] > 0)]
    nbytes = t[:, ROWS] * t[:, ROW_BYTES]
    if not len(t):
        return t.copy(), []
    last = t[:, DST_OFF] + (t[:, ROWS] - 1) * t[:, DST_STRIDE] + t[:, ROW_BYTES]
    lo, hi = int(t[:, DST_OFF].min()), int(last.max())
    out = t.copy()
    if hi - lo == int(nbytes.sum()):  # the pieces tile [lo, hi): mirror it
        out[:, DST_OFF] += at - lo
        return out, [(lo, at, hi - lo)]
    copies: list[tuple[int, int, int]] = []
    pos = at
    for i, (rows, row_bytes, dst, stride) in enumerate(
        t[:, [ROWS, ROW_BYTES, DST_OFF, DST_STRIDE]].tolist()
    ):
        out[i, DST_OFF], out[i, DST_STRIDE] = pos, row_bytes
        if rows == 1 or stride == row_bytes:
            copies.append((dst, pos, rows * row_bytes))
        else:
            copies.extend((dst + r * stride, pos + r * row_bytes, row_bytes) for r in range(rows))
        pos += rows * row_bytes
    return out, copies


MAX_PITCH = 1 << 31  # cudaMemcpy2D refuses pitches past the device's maxPitch (2^31 - 1 here)


def copy_blocks(copies: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int, int, int]]:
    """Consecutive ``(dst_off, src_off, nbytes)`` copies as 2-D blocks.

    Returns ``(dst_off, dst_pitch, src_off, src_pitch, width, height)``
    tuples: a run of copies of one width whose destinations and sources
    advance by fixed steps (each at least the width) becomes one block that
    one ``cudaMemcpy2DAsync`` moves; a copy that fits no run is a block of
    height 1 (a plain copy). The blocks move exactly the copies' bytes, in order.
    """
    blocks: list[list[int]] = []
    for dst, src, n in copies:
        if blocks:
            b = blocks[-1]
            d0, dp, s0, sp, w, h = b
            if w == n:
                if h == 1:
                    step_d, step_s = dst - d0, src - s0
                    if n <= step_d < MAX_PITCH and n <= step_s < MAX_PITCH:
                        b[1], b[3], b[5] = step_d, step_s, 2
                        continue
                elif dst == d0 + h * dp and src == s0 + h * sp:
                    b[5] = h + 1
                    continue
        blocks.append([dst, n, src, n, n, 1])
    return [tuple(b) for b in blocks]  # type: ignore[misc]


__all__ = ["GATHERS", "GatherModel", "GatherOptions", "copy_blocks", "pack_layout"]
