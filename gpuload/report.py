"""The stage breakdown of one load: what was read, what was wasted, where
the time went. Logged at INFO and returned with ``return_report=True``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

GiB = float(1 << 30)


@dataclasses.dataclass
class LoadReport:
    """What one load did. Every byte figure counts tensor data, not headers.

    Results: ``tensors`` arrays came back, ``bytes_useful`` of them read
    into owned buffers and ``bytes_resident`` mapped (``cpu_resident``, not
    read: their prefault is reported in ``prefault``).
    """

    path: str
    rank: int
    world: int
    device: str
    backend: str
    backend_reason: str = ""
    tensors: int = 0  # arrays returned: read ones + cpu_resident ones
    file_bytes: int = 0  # tensor bytes of the files this load read from or mapped
    bytes_useful: int = 0  # bytes read into results (cpu_resident ones are mapped: not here)
    bytes_read: int = 0  # bytes read from files (remote: received over the network)
    bytes_header: int = 0  # remote: listing, index, header probes and config.json
    bytes_gap: int = 0  # of the wasted: gaps merged over (others' bytes), <= 25% of useful
    bytes_resident: int = 0  # bytes of the cpu_resident arrays returned
    # Bytes gpuload moved from host memory to the device: H2D copies plus the
    # owned segments zero-copy gathers read (kvikio reads are not counted).
    bytes_pcie: int = 0
    ops: int = 0  # read operations
    staged_ops: int = 0  # of which covering reads (staged and gathered, or mapped)
    # of the staged: cached ranges whose owned bytes were copied out of the
    # page cache (mapped_gather); their other bytes are not in bytes_read
    mapped_ops: int = 0
    direct_ops: int = 0  # cold reads done with O_DIRECT into the results
    # CPU: the load was mostly cold and a thread faulted the results in ahead
    # of the reads (gpuload.host.cold.ResultPrefaulter; off with prefetch=False)
    results_prefaulted: bool = False
    cold_reads: bool = False  # most reads missed the page cache: the cold settings ran
    # CPU: reader threads the load ran (cold_threads when cold; when warm, a
    # default threads is capped to the usable cores)
    threads: int = 0
    seconds: float = 0.0  # wall time of the whole load
    header_s: float = 0.0  # parsing headers, index.json, config.json
    plan_s: float = 0.0  # sharding and planning
    read_s: float = 0.0  # summed over reader threads
    h2d_s: float = 0.0  # host-to-device copies (GPU path)
    gather_s: float = 0.0  # summed over threads
    wait_s: float = 0.0  # threads waiting for a free staging slot
    pack_s: float = 0.0  # reader threads packing segments for gather="pack"
    strategies: dict[str, int] = dataclasses.field(default_factory=dict)  # read tensors by plan
    # GPU loads: covering tensor -> "device" | "zerocopy" | "pack" (gpuload.plan.transfer)
    gather: dict[str, str] = dataclasses.field(default_factory=dict)
    unknown: list[str] = dataclasses.field(default_factory=list)  # replicated, no rule
    skipped: list[str] = dataclasses.field(default_factory=list)  # other ranks' experts
    excluded: int = 0  # tensors dropped by include=
    cpu_resident: list[str] = dataclasses.field(default_factory=list)  # mapped, not read
    resident_copies: list[str] = dataclasses.field(default_factory=list)  # of those: copies
    prefault: Any = None  # the PrefaultReport of the cpu_resident tensors, or None
    # gpuload.torch.load_into: state_dict keys the checkpoint lacks, and
    # checkpoint tensors no key asked for (load_state_dict's lists).
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)

    @property
    def bytes_wasted(self) -> int:
        """Bytes read and not delivered: covering reads' other columns, gaps."""
        return self.bytes_read - self.bytes_useful

    @property
    def gib_per_s(self) -> float:
        """Bytes read into results (``bytes_useful``) per wall second of the
        whole load; mapped cpu_resident bytes are not counted."""
        return self.bytes_useful / GiB / self.seconds if self.seconds > 0 else 0.0

    @property
    def gather_counts(self) -> dict[str, int]:
        """Covering tensors per gather strategy."""
        counts: dict[str, int] = {}
        for g in self.gather.values():
            counts[g] = counts.get(g, 0) + 1
        return counts

    @property
    def read_fraction(self) -> float:
        """Bytes this rank read, as a fraction of ``file_bytes``."""
        return self.bytes_read / self.file_bytes if self.file_bytes else 0.0

    def summary(self) -> str:
        return (
            f"gpuload rank {self.rank}/{self.world} on {self.device} ({self.backend}): "
            f"{self.tensors} tensors, {self.bytes_useful / GiB:.3f} GiB in {self.seconds:.3f} s "
            f"= {self.gib_per_s:.2f} GiB/s; read {self.bytes_read / GiB:.3f} GiB "
            f"({100 * self.read_fraction:.1f}% of the files, {self.bytes_wasted} bytes wasted) "
            f"in {self.ops} reads; thread-seconds read {self.read_s:.3f}, h2d {self.h2d_s:.3f}, "
            f"gather {self.gather_s:.3f}, wait {self.wait_s:.3f}"
            + (f"; {self.bytes_pcie / GiB:.3f} GiB over PCIe" if self.bytes_pcie else "")
        )

    @property
    def on_gpu(self) -> bool:
        """The load went to a device (host-to-device copies, gathers, PCIe)."""
        return str(self.device) != "cpu"

    def table(self) -> str:
        """A human table of the stage breakdown; a CPU load leaves out the
        GPU-only rows (gathers, PCIe, host-to-device copies, packing)."""
        gpu = self.on_gpu
        times = (
            ("read / h2d / gather / wait s", (self.read_s, self.h2d_s, self.gather_s, self.wait_s))
            if gpu
            else ("read / gather / wait s", (self.read_s, self.gather_s, self.wait_s))
        )
        rows = [
            ("tensors", f"{self.tensors}"),
            ("bytes delivered", f"{self.bytes_useful:,}"),
            ("bytes cpu_resident", f"{self.bytes_resident:,}"),
            ("bytes read", f"{self.bytes_read:,} ({100 * self.read_fraction:.1f}% of files)"),
            ("bytes wasted (gaps)", f"{self.bytes_wasted:,} ({self.bytes_gap:,})"),
            ("reads (staged, mapped)", f"{self.ops} ({self.staged_ops}, {self.mapped_ops})"),
            ("wall seconds", f"{self.seconds:.4f}"),
            ("GiB/s", f"{self.gib_per_s:.2f}"),
            *([("pack s (host, gather=pack)", f"{self.pack_s:.4f}")] if gpu else []),
            ("header / plan s", f"{self.header_s:.4f} / {self.plan_s:.4f}"),
            (times[0], " / ".join(f"{t:.4f}" for t in times[1])),
            ("strategies", ", ".join(f"{k}={v}" for k, v in sorted(self.strategies.items()))),
            *(
                [
                    (
                        "gathers",
                        ", ".join(f"{k}={v}" for k, v in sorted(self.gather_counts.items())),
                    ),
                    ("bytes over PCIe", f"{self.bytes_pcie:,}"),
                ]
                if gpu
                else []
            ),
            ("unknown (replicated)", f"{len(self.unknown)}"),
            ("not owned (skipped)", f"{len(self.skipped)}"),
        ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(bytes_wasted=self.bytes_wasted, gib_per_s=self.gib_per_s)
        if self.prefault is not None and dataclasses.is_dataclass(self.prefault):
            d["prefault"] = dataclasses.asdict(self.prefault)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
