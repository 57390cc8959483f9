"""What a ``gpuload bench`` preset costs before it runs: disk, bytes moved, time.

An estimate, not a measurement: it walks the plan ``gpuload bench`` follows
(gpuload/bench/runner.py: every scenario and mode, warm-up plus timed runs,
every rank of a warm shard, which contender takes which scenario) over the
preset's model sizes (gpuload/bench/presets.py), and prices each load at the
GiB/s a committed bench run measured for the same contender, group and mode
(``--rates``, by default the 2026-11-23 CPU run). Contenders that run only on
a GPU borrow a stand-in's rate (``STAND_IN``); a shard rank is counted as the
model's bytes over the world size (replicated norms ignored). Left out: the
H2D/D2D probes (a few GiB on the device, seconds), page-cache evictions,
process start-up.

    python bench/preset_cost.py --preset 12gb
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpuload.bench.contenders import all_contenders
from gpuload.bench.presets import PRESETS, footprint
from gpuload.bench.runner import FULL, MOE

GiB = float(1 << 30)
ROOT = Path(__file__).resolve().parents[1]
RATES = ROOT / "bench/results/2026-11-23-cpu/gpuload-bench-cpu-2gb-cpu.json"
# GPU-only rows priced at a CPU run's rows: the same reads, minus the H2D copy.
STAND_IN = {
    "gpuload (kvikio)": "gpuload (posix)",
    "InstantTensor": "fastsafetensors",
    "pread → pinned": "pread → host",
}
LIMITS = ("pread → pinned", "fio")  # read once per model and mode, as the runner does


def rates(path: Path) -> dict[tuple[str, str, str], float]:
    doc = json.loads(path.read_text())
    return {
        (g["title"], g["mode"], r["contender"]): r["gib_s"]
        for g in doc["groups"]
        for r in g["rows"]
    }


def plan(preset: str, modes: list[str], worlds: list[int] | None) -> list[tuple]:
    """``(mode, group, contender, GiB per load, loads)`` for every load the
    bench makes on a GPU with every contender installed."""
    p = PRESETS[preset]
    dense = footprint(p.dense, p.dtype)[0] / GiB
    moe = footprint(p.moe, p.dtype)[0] / GiB
    loads, later = p.warmup + p.runs, p.runs  # later ranks reuse the warmed loader
    default = [c for c in all_contenders() if not c.opt_in]  # what runs without --contenders
    names = {s: [c.name for c in default if not c.why_not(s)] for s in ("full", "shard", "moe")}
    out = []
    for mode in modes:
        for key, gib in (("dense", dense), ("moe", moe)):
            title = FULL if key == "dense" else MOE
            out += [(mode, title, lim, gib, loads) for lim in LIMITS]
        out += [(mode, FULL, c, dense, loads) for c in names["full"]]
        for w in worlds or p.worlds:
            for c in names["shard"]:
                out.append((mode, f"world={w}, rank 0", c, dense / w, loads))
                if mode == "warm":  # every other rank, for the mean over ranks
                    out.append((mode, f"world={w}, mean over ranks", c, dense / w, later * (w - 1)))
        out += [(mode, MOE, c, moe, loads) for c in names["moe"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="12gb", choices=sorted(PRESETS))
    ap.add_argument("--modes", default="warm,cold")
    ap.add_argument("--rates", type=Path, default=RATES, help="a gpuload bench JSON")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    measured = rates(args.rates)
    dense, _ = footprint(p.dense, p.dtype)
    moe, experts = footprint(p.moe, p.dtype)
    print(f"preset {p.name}: {p.about}")
    print(f"rates from {args.rates}")
    print(
        f"disk (--cache-dir): {dense / GiB:.2f} GiB dense + {moe / GiB:.2f} GiB MoE = "
        f"{(dense + moe) / GiB:.2f} GiB of synthetic files, written once and reused"
    )
    total: dict[str, float] = {}
    moved: dict[str, float] = {}
    print("\n| mode | group | contender | GiB/load | loads | GiB/s (rate of) | s |")
    print("|---|---|---|---|---|---|---|")
    for mode, group, name, gib, n in plan(p.name, args.modes.split(","), None):
        src = STAND_IN.get(name, name)
        rate = measured.get((group, mode, src))
        if rate is None:
            print(f"| {mode} | {group} | {name} | {gib:.2f} | {n} | no rate | ? |")
            continue
        s = gib * n / rate
        total[mode] = total.get(mode, 0.0) + s
        moved[mode] = moved.get(mode, 0.0) + gib * n
        print(f"| {mode} | {group} | {name} | {gib:.2f} | {n} | {rate:.2f} ({src}) | {s:.0f} |")
    print()
    for mode in total:
        print(f"{mode}: {moved[mode]:.0f} GiB delivered, about {total[mode] / 60:.0f} min")
    print(f"all: about {sum(total.values()) / 60:.0f} min, plus writing the files on a first run")


if __name__ == "__main__":
    main()
