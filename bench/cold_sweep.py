"""Cold full loads (device="cpu", world=1) under reader settings, beside fio.

Every run starts with the checkpoint's pages evicted (fsync + fadvise
DONTNEED, checked with mincore) and with freed memory handed back to the OS
(``malloc_trim``), so results land in fresh pages as in a first load.
Settings and fio run in a shuffled order each repetition, so drift in the
storage under us spreads over all of them.
Prints the median and every run, in GiB/s of file bytes.

    python bench/cold_sweep.py [--size-gib 2] [--reps 4]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import time

import gpuload
from gpuload import pipeline, synth
from gpuload.bench.limits import fio_read, release_freed
from gpuload.pinning import evict

NO_PREFAULT = {"_no_prefault": True}  # a bench-only switch, below

SETTINGS = {
    "default": {},
    "threads=2": {"threads": 2},
    "threads=4": {"threads": 4},
    "chunk 64 MiB": {"chunk_bytes": 64 << 20},
    "chunk 4 MiB": {"chunk_bytes": 4 << 20, "min_chunk_bytes": 1 << 20},
    "prefetch off": {"prefetch": False},  # no WILLNEED hints, no result prefault
    "no result prefault": NO_PREFAULT,  # the hints, without the ResultPrefaulter
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    model = synth.cached_model("llama", int(args.size_gib * (1 << 30)), dtype="BF16")
    ckpt = gpuload.open_checkpoint(model)
    files, total = [f.path for f in ckpt.files], sum(f.size for f in ckpt.files)
    jobs = {f"gpuload {k}": v for k, v in SETTINGS.items()}
    if shutil.which("fio"):
        jobs.update({"fio 2 jobs": 2, "fio 8 jobs": 8})
    runs: dict[str, list[float]] = {k: [] for k in jobs}
    for rep in range(args.reps):
        order = list(jobs.items())
        random.Random(rep).shuffle(order)
        for name, job in order:
            release_freed()  # fresh memory, as a first load
            left = evict(files)
            if left > 0.02:
                raise SystemExit(f"{left:.0%} of a file stayed cached: not a cold run")
            if isinstance(job, int):
                nbytes, seconds = fio_read(files, job, invalidate=True)
            else:
                settings = {k: v for k, v in job.items() if not k.startswith("_")}
                # The prefaulter has no setting of its own (prefetch=False
                # also drops the hints): this variant turns its trigger off.
                cold_check = pipeline.mostly_cold
                if job is NO_PREFAULT:
                    pipeline.mostly_cold = lambda plan, reader, samples=16: False
                try:
                    t0 = time.perf_counter()
                    out = gpuload.load_sharded(
                        model, 0, 1, device="cpu", progress=False, **settings
                    )
                    seconds, nbytes = time.perf_counter() - t0, total
                finally:
                    pipeline.mostly_cold = cold_check
                del out
            runs[name].append(nbytes / seconds / (1 << 30))
    print(f"cold full load, {total / (1 << 30):.2f} GiB, {args.reps} runs each, GiB/s")
    print("| contender | median | runs |\n|---|---|---|")
    for name, v in runs.items():
        print(f"| {name} | {statistics.median(v):.2f} | {' '.join(f'{x:.2f}' for x in v)} |")


if __name__ == "__main__":
    main()
