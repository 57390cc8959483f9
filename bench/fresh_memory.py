"""What fresh result memory costs a CPU load, warm and cold.

Three measurements, each in turn (A B C, B C A, ...) with freed memory handed
back to the OS (``malloc_trim``) before every run:

* warm: ``pread`` of the whole checkpoint (8 threads, 64 MiB reads) into a
  new buffer that is a plain ``np.empty`` (16 bytes into a page), a
  page-aligned 4 KiB-page mapping, or a page-aligned ``MADV_HUGEPAGE``
  mapping (what gpuload's large results are);
* cold: ``Loader.load`` world=1 into fresh results against the same load
  into results allocated and written once before the runs (no page faults);
* cold, when fio is installed: fio, 8 jobs over the file, buffered and
  ``--direct=1`` (the peers' O_DIRECT reads), and io_uring at depth 32.

    python bench/fresh_memory.py [--size-gib 2] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time

import numpy as np

import gpuload
from gpuload import synth
from gpuload.bench.limits import pread_all, release_freed
from gpuload.bench.residency import ensure_warm
from gpuload.bench.timing import Entry, alternate
from gpuload.memory.mapping import PAGE, HostBuffer, evict


def _misaligned(n: int) -> np.ndarray:
    return np.empty(n, np.uint8)  # a large np.empty: 16 bytes into a page


def _aligned(n: int, huge: bool) -> np.ndarray:
    return np.asarray(HostBuffer(n, "probe", huge=huge))


def fio(path: str, size: int, direct: bool, engine: str) -> float:
    """GiB/s of one cold fio read of ``path`` (page cache dropped first)."""
    evict([path])
    jobs = (
        ["--numjobs=8", f"--size={size // 8 // PAGE * PAGE}"]
        + [f"--offset_increment={size // 8 // PAGE * PAGE}"]
        if engine == "psync"
        else ["--iodepth=32"]
    )
    cmd = ["fio", "--name=probe", f"--filename={path}", "--rw=read", "--bs=4M", "--readonly"]
    cmd += [f"--direct={int(direct)}", f"--ioengine={engine}", "--group_reporting"]
    cmd += ["--output-format=json", *jobs]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    read = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    return read["io_bytes"] / (read["runtime"] / 1000) / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model = synth.cached_model("llama", int(args.size_gib * (1 << 30)), dtype="BF16")
    ckpt = gpuload.open_checkpoint(model)
    files = [f.path for f in ckpt.files]
    total = sum(f.size for f in ckpt.files)
    print(f"model: {model} ({total / 2**30:.2f} GiB), runs={args.runs}\n")

    def warm() -> dict:
        release_freed()
        return ensure_warm(files)

    def cold() -> float:
        release_freed()
        return evict(files)

    buffers = {
        "np.empty (16 bytes into a page)": _misaligned,
        "page-aligned, 4 KiB pages": lambda n: _aligned(n, False),
        "page-aligned, MADV_HUGEPAGE": lambda n: _aligned(n, True),
    }
    entries = [
        Entry(name, total, lambda make=make: pread_all(files, make(total), 8), before=warm)
        for name, make in buffers.items()
    ]
    print("| warm: pread into a new buffer | median s (min-max) | GiB/s |\n|---|---|---|")
    for t in alternate(entries, args.runs):
        print(f"| {t.name} | {t.median:.3f} ({t.spread}) | {t.gib_s:.2f} |")

    loader = gpuload.Loader(device="cpu", progress=False)
    reused = gpuload.Loader(device="cpu", progress=False)
    held = reused._backend.allocate(reused.plan(ckpt, 0, 1).plan)
    for b in held.values():
        b[:] = 0  # every page faulted in once, before any timed run
    reused._backend.allocate = lambda plan: dict(held)  # the same buffers every run
    entries = [
        Entry("fresh results (a load as it is)", total, lambda: loader.load(ckpt, 0, 1)),
        Entry("results written once before", total, lambda: reused.load(ckpt, 0, 1)),
    ]
    for e in entries:
        e.before = cold
    print("\n| cold: gpuload world=1 | median s (min-max) | GiB/s |\n|---|---|---|")
    for t in alternate(entries, args.runs):
        print(f"| {t.name} | {t.median:.3f} ({t.spread}) | {t.gib_s:.2f} |")

    if shutil.which("fio") and len(files) == 1:
        variants = {
            "8 jobs, buffered": (False, "psync"),
            "8 jobs, O_DIRECT": (True, "psync"),
            "io_uring depth 32, buffered": (False, "io_uring"),
            "io_uring depth 32, O_DIRECT": (True, "io_uring"),
        }
        runs: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.runs):
            for name, (direct, engine) in variants.items():
                runs[name].append(fio(files[0], total, direct, engine))
        print("\n| cold: fio, 4 MiB reads | median GiB/s | runs |\n|---|---|---|")
        for name, v in runs.items():
            print(f"| {name} | {statistics.median(v):.2f} | {' '.join(f'{x:.2f}' for x in v)} |")
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
