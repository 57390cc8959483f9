"""Warm CPU loads in a process that does other work between them (issue 24, A2).

One process, page cache warm (checked with ``mincore`` before every run),
``--rounds`` rounds; in each round every contender runs once, in turn, and
before each run the process does "other work": it allocates and touches
``--other-mib`` MiB in blocks of 1-48 MiB, keeps half of them until the next
run and frees the rest (``malloc_trim``), as a server that loads between
other work would. Nothing of gpuload's is reset between runs: the process
keeps what it keeps (its pool of result mappings, glibc's arenas). The
"pool emptied" contenders time a first load in such a process: each runs
with the pool set aside (``gpuload.memory.pool.set_aside``), so it maps
fresh results while the other contenders keep their pooled ones.

Contenders: ``pread`` of every file into a fresh ``np.empty`` with 2 threads
(the fresh-buffer limit of issue 24), gpuload world 1 with its defaults,
with its defaults but the host pool emptied before each run (what the
defaults did before the pool),
with ``hugepages=0`` and with ``hugepages=0, threads=2``,
``safetensors.numpy.load_file``, and gpuload world ``--world`` rank 0 (pool
kept, and pool emptied) against safetensors ``get_slice``. Every run is
printed, with the medians.

Goal (issue 24): warm world 1 >= 0.9x the fresh-buffer limit's median in
EVERY run; world W >= 1.5x get_slice (medians).

    python bench/warm_interleaved.py [--size-gib 1] [--rounds 5] [--other-mib 512]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import gpuload  # noqa: E402
from gpuload import synth  # noqa: E402
from gpuload.bench.contenders import get_slice_shard  # noqa: E402
from gpuload.bench.limits import release_freed  # noqa: E402
from gpuload.bench.residency import ensure_warm, summary  # noqa: E402
from gpuload.memory import pool as hostpool  # noqa: E402
from gpuload.sharding.verify import as_bytes  # noqa: E402

CHUNK = 16 << 20


def pread_fresh(files: list[str], threads: int) -> int:
    """Every file into one fresh ``np.empty`` with ``threads`` threads."""
    sizes = [os.path.getsize(f) for f in files]
    buf = np.empty(sum(sizes), np.uint8)
    jobs, pos = [], 0
    for f, size in zip(files, sizes, strict=True):
        jobs += [(f, off, pos + off, min(CHUNK, size - off)) for off in range(0, size, CHUNK)]
        pos += size
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    mv = memoryview(buf)
    try:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda j: os.preadv(fds[j[0]], [mv[j[2] : j[2] + j[3]]], j[1]), jobs))
    finally:
        for fd in fds.values():
            os.close(fd)
    return buf.nbytes


class OtherWork:
    """Allocations between loads: half kept until the next run, half freed."""

    def __init__(self, mib: int, seed: int = 0) -> None:
        self.mib, self.rng, self.kept = mib, np.random.default_rng(seed), []

    def __call__(self) -> None:
        self.kept.clear()
        left, blocks = self.mib << 20, []
        while left > 0:
            n = min(left, int(self.rng.integers(1, 49)) << 20)
            a = np.empty(n, np.uint8)
            a[::4096] = 1  # touch every page
            blocks.append(a)
            left -= n
        self.kept = blocks[::2]
        del blocks
        release_freed(pool=False)  # the process's own malloc arenas; gpuload keeps its pool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--other-mib", type=int, default=512)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--variant", action="append", default=[], metavar="SETTING=VALUE")
    args = ap.parse_args(argv)
    size = int(args.size_gib * (1 << 30))
    model = synth.cached_model(
        "llama", size, dtype="F16", cache_dir=args.cache_dir, num_files=args.files
    )
    ckpt = gpuload.open_checkpoint(model)
    files = [f.path for f in ckpt.files]
    total = sum(f.size for f in ckpt.files)
    data = sum(t.nbytes for t in ckpt.tensors.values())
    w = args.world
    loaders = {
        "gpuload world=1 (defaults)": gpuload.Loader(device="cpu", progress=False),
        "gpuload world=1 (hugepages=0)": gpuload.Loader(device="cpu", progress=False, hugepages=0),
        "gpuload world=1 (hugepages=0, threads=2)": gpuload.Loader(
            device="cpu", progress=False, hugepages=0, threads=2
        ),
    }
    variants = {}  # --variant "a=1,b=2": one more Loader, at world 1 and at world W
    for v in args.variant:
        settings = dict(kv.partition("=")[::2] for kv in v.split(","))
        variants[v] = gpuload.Loader(device="cpu", progress=False, **settings)
        loaders[f"gpuload world=1 ({v})"] = variants[v]
    default = loaders["gpuload world=1 (defaults)"]
    ref = {}
    for f in files:
        ref.update(load_file(f))
    for name, ld in loaders.items():
        got = ld.load(ckpt, 0, 1)
        assert all(as_bytes(got[k]) == ref[k].tobytes() for k in ref), name
        del got
    lp = default.plan(ckpt, 0, w)
    selections = {t.name: t.selection for t in lp.plan.tensors}
    shard = default.load(ckpt, 0, w)
    peer = get_slice_shard(files, selections)
    assert all(as_bytes(shard[k]) == np.ascontiguousarray(peer[k]).tobytes() for k in peer)
    shard_bytes = sum(a.nbytes for a in shard.values())
    del ref, shard, peer
    contenders = {
        "pread → fresh np.empty, 2 threads": (total, lambda: pread_fresh(files, 2)),
        **{n: (data, lambda ld=ld: ld.load(ckpt, 0, 1)) for n, ld in loaders.items()},
        # What the default did before the pool: fresh huge-page mappings.
        "gpuload world=1 (defaults, pool emptied before each run)": (
            data,
            lambda: default.load(ckpt, 0, 1),
        ),
        "safetensors load_file": (data, lambda: [load_file(f) for f in files]),
        f"gpuload world={w} rank 0": (shard_bytes, lambda: default.load(ckpt, 0, w)),
        f"gpuload world={w} rank 0 (pool emptied before each run)": (
            shard_bytes,
            lambda: default.load(ckpt, 0, w),
        ),
        **{
            f"gpuload world={w} rank 0 ({v})": (shard_bytes, lambda ld=ld: ld.load(ckpt, 0, w))
            for v, ld in variants.items()
        },
        f"safetensors get_slice world={w} rank 0": (
            shard_bytes,
            lambda: get_slice_shard(files, selections),
        ),
    }
    other = OtherWork(args.other_mib)
    runs: dict[str, list[float]] = {n: [] for n in contenders}
    warm: dict[str, list] = {n: [] for n in contenders}
    order = list(contenders)
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:  # rotate who goes first
            nbytes, fn = contenders[name]
            other()
            warm[name].append(ensure_warm(files))
            # A first load: the pool set aside (outside the timed window)
            # and given back after, so the other contenders keep theirs.
            fresh = hostpool.set_aside() if "pool emptied" in name else contextlib.nullcontext()
            with fresh:
                t0 = time.perf_counter()
                out = fn()
                runs[name].append(nbytes / (time.perf_counter() - t0) / (1 << 30))
                del out
    print(f"command: `python bench/warm_interleaved.py {' '.join(argv or sys.argv[1:])}`")
    print(f"model: {model} ({total / 2**30:.2f} GiB in {len(files)} files)")
    print(f"machine: {machine()}\nloadavg: {os.getloadavg()}")
    print(f"host pool after the runs: {hostpool.stats}, {hostpool.held() >> 20} MiB kept\n")
    print("| contender | every run, GiB/s (in round order) | median GiB/s |")
    print("| --- | --- | ---: |")
    for name, gbs in runs.items():
        print(f"| {name} | {', '.join(f'{g:.2f}' for g in gbs)} | {statistics.median(gbs):.2f} |")
    limit = statistics.median(runs["pread → fresh np.empty, 2 threads"])
    print("\npage cache before each contender's runs: ")
    for name in runs:
        print(f"- {name}: {summary(warm[name])}")
    print()
    g1 = runs["gpuload world=1 (defaults)"]
    lf = statistics.median(runs["safetensors load_file"])
    gw = statistics.median(runs[f"gpuload world={w} rank 0"])
    gs = statistics.median(runs[f"safetensors get_slice world={w} rank 0"])
    worst = min(g1) / limit
    print(
        f"- world=1 >= 0.9x the fresh-buffer limit ({limit:.2f} GiB/s median) in every run: "
        f"worst {worst:.2f}, runs {', '.join(f'{g / limit:.2f}' for g in g1)} "
        f"({'met' if worst >= 0.9 else 'NOT met'})"
    )
    print(f"- world=1 vs load_file (medians): {statistics.median(g1) / lf:.2f}x")
    gf = statistics.median(runs[f"gpuload world={w} rank 0 (pool emptied before each run)"])
    met = "met" if gw / gs >= 1.5 else "NOT met"
    print(f"- world={w} >= 1.5x get_slice (medians): {gw / gs:.2f} ({met})")
    print(f"- world={w}, a first load (pool emptied), vs get_slice (medians): {gf / gs:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
