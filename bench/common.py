"""Timing and reporting shared by the benchmarks: median of N runs after a
warm-up, with the spread, and machine facts for the record."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata

GiB = float(1 << 30)


@dataclasses.dataclass
class Timing:
    name: str
    nbytes: int  # bytes delivered per run
    runs: list[float]
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def gib_s(self) -> float:
        return self.nbytes / GiB / self.median

    @property
    def spread(self) -> str:
        return f"{min(self.runs):.3f}-{max(self.runs):.3f}"


def measure(
    name: str, nbytes: int, fn: Callable[[], object], runs: int, warmup: int = 1, note: str = ""
) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``runs`` times timed. Each
    result is dropped before the next run so memory does not pile up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return Timing(name, nbytes, times, note)


def machine() -> dict[str, object]:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "ram_bytes": mem,
        "packages": {
            p: version(p)
            for p in (
                "gpuload",
                "numpy",
                "numba",
                "safetensors",
                "ml_dtypes",
                "torch",
                "cupy-cuda12x",
                "cupy-cuda13x",
                "kvikio-cu12",
                "kvikio-cu13",
            )
        },
    }


def markdown(rows: list[Timing], limit: Timing | None, peers: dict[str, str]) -> str:
    """A Markdown table; ``peers`` maps a contender to the peer it is compared with."""
    by = {r.name: r for r in rows}
    out = ["| contender | median s (min-max) | GiB/s | × limit | × peer |", "|---|---|---|---|---|"]
    for r in rows:
        lim = f"{r.gib_s / limit.gib_s:.2f}" if limit and r is not limit else "—"
        peer = peers.get(r.name)
        vs = f"{by[peer].median / r.median:.2f} (vs {peer})" if peer in by else "—"
        out.append(f"| {r.name} | {r.median:.3f} ({r.spread}) | {r.gib_s:.2f} | {lim} | {vs} |")
    return "\n".join(out)
