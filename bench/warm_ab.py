"""Two settings of gpuload, alternated, on a warm page cache: per-pair ratios.

Each round loads rank 0 with the defaults and with ``--variant`` (in turns,
who goes first alternating), at each ``--worlds`` size, in one process with
the page cache warm (checked with mincore before every run). The first
``--skip`` rounds are dropped (first loads fill the host pool). Prints the
medians and, per pair, defaults' time over the variant's: above 1 means the
variant is faster. This is how a default was chosen (GPULOAD_SCATTER):
a ratio from alternated runs, not a figure from one run.

    python bench/warm_ab.py --variant scatter=0 [--worlds 2 4 8] [--rounds 16]

``--constant MODULE.NAME=INT`` makes the variant run with a module constant
changed (restored for the defaults' runs), for choices that have no setting:
``--constant gpuload.host.backend.POOL_MIN=2097152`` is the host pool as it
was before results under 2 MiB were pooled.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

import gpuload
from gpuload import synth
from gpuload.bench.residency import ensure_warm, resident_fraction, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="", metavar="SETTING=VALUE[,SETTING=VALUE]")
    ap.add_argument("--constant", action="append", default=[], metavar="MODULE.NAME=INT")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument(
        "--check-once",
        action="store_true",
        help="check the page cache before and after each world's rounds, not before every "
        "run: back-to-back loads, as a process that reloads in a loop makes them (the "
        "check maps every file and allocates, which changes what fresh memory costs next)",
    )
    args = ap.parse_args(argv)
    model = synth.cached_model(
        "llama", int(args.size_gib * (1 << 30)), dtype="F16", num_files=args.files
    )
    ckpt = gpuload.open_checkpoint(model)
    files = [f.path for f in ckpt.files]
    settings = dict(kv.partition("=")[::2] for kv in args.variant.split(",") if kv)
    constants = []  # (module, name, the variant's value, the default value)
    for c in args.constant:
        target, _, value = c.partition("=")
        mod_name, _, name = target.rpartition(".")
        mod = importlib.import_module(mod_name)
        constants.append((mod, name, int(value), getattr(mod, name)))
    if not settings and not constants:
        ap.error("give --variant, --constant or both")

    def variant(on: bool) -> None:
        for mod, name, value, default in constants:
            setattr(mod, name, value if on else default)

    a = gpuload.Loader(device="cpu", progress=False)
    b = gpuload.Loader(device="cpu", progress=False, **settings)
    print(f"command: `python bench/warm_ab.py {' '.join(argv or sys.argv[1:])}`")
    print(f"model: {model}; loadavg before: {os.getloadavg()}\n")
    print("| world | defaults, ms (median) | variant, ms (median) | defaults / variant per pair |")
    print("| ---: | ---: | ---: | --- |")
    for w in args.worlds:
        times: dict[str, list[float]] = {"a": [], "b": []}
        warm = []
        if args.check_once:
            warm.append(ensure_warm(files))
        for r in range(args.rounds):
            for name, ld in (("a", a), ("b", b)) if r % 2 else (("b", b), ("a", a)):
                if not args.check_once:
                    warm.append(ensure_warm(files))
                variant(name == "b")
                t0 = time.perf_counter()
                out = ld.load(ckpt, 0, w)
                times[name].append(time.perf_counter() - t0)
                del out
        if args.check_once:
            after = resident_fraction(files)
            warm.append({"found": after, "rewarmed": False, "resident": after})
        ta, tb = times["a"][args.skip :], times["b"][args.skip :]
        pairs = sorted(x / y for x, y in zip(ta, tb, strict=True))
        print(
            f"| {w} | {statistics.median(ta) * 1e3:.1f} | {statistics.median(tb) * 1e3:.1f} | "
            f"median {statistics.median(pairs):.2f}, range {pairs[0]:.2f}-{pairs[-1]:.2f} "
            f"({len(pairs)} pairs) |"
        )
    variant(False)
    what = ", ".join([args.variant] * bool(args.variant) + args.constant)
    print(f"\nvariant: {what}; page cache before the runs: {summary(warm)}")
    print(f"loadavg after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
