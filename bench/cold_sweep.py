"""Cold full loads (device="cpu", world=1): gpuload beside its peers and fio.

Every run starts with the checkpoint's pages evicted (fsync + fadvise
DONTNEED) and *checked* with mincore (a run refuses to start above 2%
resident), and with freed memory handed back to the OS (``malloc_trim``),
so results land in fresh pages as in a first load. Contenders run in a
shuffled order each repetition, so drift in the storage under us spreads
over all of them. Two checkpoints of the same size: one file and
``--files`` files (many published checkpoints have 5-10 GB shards, so
per-file concurrency matters).

Contenders: gpuload's defaults (a cold load takes ``cold_threads`` readers
and ``cold_chunk_bytes`` reads, chosen per load from mincore, and reads whole
tensors with O_DIRECT into its results), the same without O_DIRECT
(``cold_direct=0``), gpuload with the warm settings forced
(``cold_threads=threads, cold_chunk_bytes=16MiB, cold_direct=0``: what every
load did before issue 24), ``--sweep`` settings, the Run:ai
streamer (``runai-model-streamer``) and fastsafetensors (``nogds=True``) when
installed, fio when on PATH. Prints every run and the median, in GiB/s of
file bytes, and the ratios of gpuload's defaults to the fastest peer.

    python bench/cold_sweep.py [--size-gib 1] [--reps 3] [--files 4] [--sweep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import sys
import time

import gpuload
from gpuload import synth
from gpuload.bench.limits import fio_read, release_freed
from gpuload.host import pipeline
from gpuload.memory.mapping import evict

NO_PREFAULT = {"_no_prefault": True}  # a bench-only switch, below

SETTINGS = {
    "defaults": {},
    "cold buffered (cold_direct=0)": {"cold_direct": False},
    "warm settings forced": {
        "cold_threads": 8,
        "cold_chunk_bytes": 16 << 20,
        "cold_direct": False,
    },
}
# fio O_DIRECT io_uring runs: (jobs, iodepth per job, block size)
FIO_DEEP = ((1, 32, 4 << 20), (2, 64, 1 << 20), (4, 16, 8 << 20))
SWEEP = {
    "cold_threads=32": {"cold_threads": 32},
    "cold_chunk 8 MiB": {"cold_chunk_bytes": 8 << 20},
    "prefetch off": {"prefetch": False},  # no WILLNEED hints, no result prefault
    "no result prefault": NO_PREFAULT,  # the hints, without the ResultPrefaulter
}


def _peers() -> dict:
    """The peers that import here: name -> load(files)."""
    peers = {}
    try:
        from runai_model_streamer import SafetensorsStreamer

        def runai(files):
            with SafetensorsStreamer() as s:
                s.stream_files(list(files), device="cpu")
                return dict(s.get_tensors())

        peers["Run:ai streamer"] = runai
    except ImportError:
        print("no runai-model-streamer here: Run:ai skipped")
    try:
        from fastsafetensors import fastsafe_open

        def fst(files):
            with fastsafe_open(list(files), framework="pt", device="cpu", nogds=True) as f:
                return {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118

        peers["fastsafetensors (nogds)"] = fst
    except ImportError:
        print("no fastsafetensors here: skipped")
    return peers


def sweep(model, reps: int, jobs: dict, label: str) -> dict[str, list[float]]:
    ckpt = gpuload.open_checkpoint(model)
    files, total = [f.path for f in ckpt.files], sum(f.size for f in ckpt.files)
    runs: dict[str, list[float]] = {k: [] for k in jobs}
    for rep in range(reps):
        order = list(jobs.items())
        random.Random(rep).shuffle(order)
        for name, job in order:
            release_freed()  # fresh memory, as a first load
            left = evict(files)
            if left > 0.02:
                raise SystemExit(f"{left:.0%} of a file stayed cached: not a cold run")
            if isinstance(job, int):
                nbytes, seconds = fio_read(files, job, invalidate=True)
            elif isinstance(job, tuple):  # (jobs, iodepth, bs): O_DIRECT io_uring
                jobs_, depth, bs = job
                nbytes, seconds = fio_read(files, jobs_, invalidate=True, iodepth=depth, bs=bs)
            elif callable(job):
                t0 = time.perf_counter()
                out = job(files)
                seconds, nbytes = time.perf_counter() - t0, total
                del out
            else:
                settings = {k: v for k, v in job.items() if not k.startswith("_")}
                # The prefaulter has no setting of its own (prefetch=False
                # also drops the hints): this variant swaps it for a no-op,
                # and the load keeps its cold settings otherwise.
                prefaulter = pipeline.ResultPrefaulter
                if job is NO_PREFAULT:
                    pipeline.ResultPrefaulter = lambda plan, outputs: contextlib.nullcontext()
                try:
                    t0 = time.perf_counter()
                    out = gpuload.load_sharded(
                        model, 0, 1, device="cpu", progress=False, **settings
                    )
                    seconds, nbytes = time.perf_counter() - t0, total
                finally:
                    pipeline.ResultPrefaulter = prefaulter
                del out
            runs[name].append(nbytes / seconds / (1 << 30))
    print(f"\n## {label}: cold full load, {total / (1 << 30):.2f} GiB in {len(files)} file(s)")
    print(f"{reps} runs each, GiB/s; load average {os.getloadavg()}; every run evicted and checked")
    print("\n| contender | median | runs |\n|---|---|---|")
    for name, v in runs.items():
        print(f"| {name} | {statistics.median(v):.2f} | {' '.join(f'{x:.2f}' for x in v)} |")
    peers = [n for n in runs if not n.startswith(("gpuload", "fio"))]
    if peers:
        best = max(peers, key=lambda n: statistics.median(runs[n]))
        g = runs["gpuload defaults"]
        ratio = statistics.median(g) / statistics.median(runs[best])
        per_run = [a / b for a, b in zip(g, runs[best], strict=True)]
        print(
            f"\ngpuload defaults / {best} (fastest peer), medians: {ratio:.2f}; "
            f"per repetition: {', '.join(f'{r:.2f}' for r in per_run)} (goal >= 1.1)"
        )
    fios = [n for n in runs if n.startswith("fio")]
    if fios:
        best = max(fios, key=lambda n: statistics.median(runs[n]))
        ratio = statistics.median(runs["gpuload defaults"]) / statistics.median(runs[best])
        print(f"gpuload defaults / {best}, medians: {ratio:.2f} (goal >= 1.0)")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--files", type=int, default=4, help="files of the many-file checkpoint")
    ap.add_argument("--sweep", action="store_true", help="also the SWEEP settings")
    args = ap.parse_args()
    print(f"command: `python bench/cold_sweep.py {' '.join(sys.argv[1:])}`")
    size = int(args.size_gib * (1 << 30))
    settings = {**SETTINGS, **(SWEEP if args.sweep else {})}
    jobs: dict = {f"gpuload {k}": v for k, v in settings.items()}
    jobs.update(_peers())
    if shutil.which("fio"):
        jobs.update({"fio 2 jobs": 2, "fio 8 jobs": 8, "fio 16 jobs": 16})
        # O_DIRECT through io_uring at a deep queue: what the device gives
        # (the goal is >= 1.0x fio at the best depth found).
        jobs.update(
            {
                f"fio io_uring direct, {j} x depth {d}, {bs >> 20} MiB": (j, d, bs)
                for j, d, bs in FIO_DEEP
            }
        )
    for files in (1, args.files):
        model = synth.cached_model("llama", size, dtype="BF16", num_files=files)
        sweep(model, args.reps, jobs, f"{files} file(s)")


if __name__ == "__main__":
    main()
