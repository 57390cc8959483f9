"""Timing and the machine record: median of N runs after a warm-up, with the
spread, and the facts a figure is meaningless without."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

GiB = float(1 << 30)


@dataclasses.dataclass
class Timing:
    """Wall seconds of ``runs`` timed runs that each delivered ``nbytes``."""

    name: str
    nbytes: int  # bytes delivered per run
    runs: list[float]
    note: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # raw per-run facts

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def gib_s(self) -> float:
        return self.nbytes / GiB / self.median if self.median > 0 else float("inf")

    @property
    def spread(self) -> str:
        return f"{min(self.runs):.3f}-{max(self.runs):.3f}"


def measure(
    name: str,
    nbytes: int,
    fn: Callable[[], object],
    runs: int,
    warmup: int = 1,
    note: str = "",
    *,
    before: Callable[[], object] | None = None,
    check: Callable[[object], None] | None = None,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``runs`` times timed.

    ``before`` runs ahead of every run, untimed (cold runs evict the page
    cache there); what it returns is kept per run in ``Timing.extra["before"]``.
    ``check`` gets the first run's result (the warm-up's when there is one),
    outside the timed window. ``sync`` waits for queued device work and is
    inside it. Each result is dropped before the next run, so memory does not
    pile up.
    """
    e = Entry(name, nbytes, fn, before=before, check=check, sync=sync)
    for _ in range(warmup):
        e.run(timed=False)
    for _ in range(runs):
        e.run(timed=True)
    return e.timing(note)


@dataclasses.dataclass
class Entry:
    """One contender in :func:`alternate`: what :func:`measure` takes, plus
    ``wrap``, a context manager factory around each run, outside its timed
    window, whose ``peak`` (if any) is kept as ``extra["peak"]``."""

    name: str
    nbytes: int
    fn: Callable[[], object]
    before: Callable[[], object] | None = None
    check: Callable[[object], None] | None = None
    sync: Callable[[], None] | None = None
    wrap: Callable[[], Any] | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    befores: list[object] = dataclasses.field(default_factory=list)
    peak: int | None = None

    def run(self, *, timed: bool) -> None:
        if self.before is not None:
            self.befores.append(self.before())
        with self.wrap() if self.wrap is not None else contextlib.nullcontext() as w:
            if self.sync is not None:
                self.sync()  # nothing queued from earlier may land in this run's window
            t0 = time.perf_counter()
            out = self.fn()
            if self.sync is not None:
                self.sync()
            dt = time.perf_counter() - t0
        if getattr(w, "peak", None) is not None:
            self.peak = max(self.peak or 0, w.peak)
        if timed:
            self.times.append(dt)
        if self.check is not None:  # the first result, outside the timed window
            check, self.check = self.check, None
            check(out)
        del out  # dropped before the next run, so memory does not pile up

    def timing(self, note: str = "") -> Timing:
        extra: dict[str, Any] = {"before": self.befores} if self.before is not None else {}
        if self.peak is not None:
            extra["peak"] = self.peak
        return Timing(self.name, self.nbytes, self.times, note, extra)


def alternate(entries: list[Entry], runs: int, warmup: int = 1) -> list[Timing | Exception]:
    """Time ``entries`` in turn (A B C A B C ...), not one after the other.

    Slow drift on the machine (other jobs, the page cache paged out, thermal
    limits) then lands on every contender alike instead of on whichever ran
    last. Warm-ups go first, in turn; then ``runs`` rounds, each starting one
    entry later than the one before (A B C, B C A, C A B), so no contender
    always follows the same one. An entry that raises (its run or its check)
    leaves the later rounds, and its exception takes its place in the result.
    """
    failed: dict[int, Exception] = {}

    def turn(order: list[int], timed: bool) -> None:
        for i in order:
            if i in failed:
                continue
            try:
                entries[i].run(timed=timed)
            except Exception as e:  # reported in place of this entry's timing
                failed[i] = e

    n = len(entries)
    for _ in range(warmup):
        turn(list(range(n)), False)
    for r in range(runs):
        turn([(r + k) % n for k in range(n)], True)
    return [failed[i] if i in failed else e.timing() for i, e in enumerate(entries)]


# --------------------------------------------------------------------------
# the machine


def version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


PACKAGES = (
    "gpuload",
    "numpy",
    "numba",
    "numba-cuda",
    "safetensors",
    "ml_dtypes",
    "torch",
    "cupy-cuda12x",
    "cupy-cuda13x",
    "kvikio-cu12",
    "kvikio-cu13",
    "fastsafetensors",
    "runai-model-streamer",
    "instanttensor",
    "matplotlib",
)


def _first_line(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def storage(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The filesystem under ``path``: mount point, type, device, and what
    sysfs says of the block device (model, rotational)."""
    p = os.path.realpath(path)
    best: tuple[str, str, str] = ("", "", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                    best = (dev, mnt, fstype)
    except OSError:
        pass
    out: dict[str, Any] = {"path": p, "device": best[0], "mount": best[1], "fstype": best[2]}
    try:
        st = os.statvfs(p)
        out["size_bytes"], out["free_bytes"] = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    except OSError:
        pass
    name = Path(best[0]).name
    for base in (Path("/sys/class/block") / name, Path("/sys/class/block") / name / ".."):
        for key, rel in (("model", "device/model"), ("rotational", "queue/rotational")):
            f = base / rel
            if key not in out and f.exists():
                with contextlib.suppress(OSError):
                    out[key] = f.read_text().strip()
    return out


def machine(data_dir: str | os.PathLike[str] | None = None, gpu: dict | None = None) -> dict:
    """CPU, RAM, OS, package versions; the storage under ``data_dir``; the
    GPU facts ``gpu`` (name, driver, CUDA) when a GPU ran."""
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
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "ram_bytes": mem,
        "packages": {p: version(p) for p in PACKAGES},
        "fio": _first_line(["fio", "--version"]),
    }
    if data_dir is not None:
        out["storage"] = storage(data_dir)
    if gpu is not None:
        out["gpu"] = gpu
    return out
