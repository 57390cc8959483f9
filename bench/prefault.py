"""Prefault throughput and first-touch latency of CPU-resident experts.

    python bench/prefault.py --size-gib 2 [--dir /var/tmp] [--repeat 5] [--keep]

Writes a safetensors file of routed experts (BF16, 8 MiB each) into a
disk-backed directory, then, evicting the file from the page cache (fsync +
POSIX_FADV_DONTNEED) before each run:

1. throughput: gpuload's prefault vs ``vmtouch -t`` vs a sequential read
   (``cat > /dev/null`` and a Python ``readinto`` loop into a reused buffer);
2. first-touch latency of one random expert (one byte per 4 KiB page, in
   random order): evicted; page-cached but freshly mapped; after
   ``map_resident`` prefaulted every expert; warm (touched before, then every
   other expert touched, so CPU caches and TLB are cold again); hot (touched
   twice in a row).

Prints Markdown tables. On a VM the "disk" may itself be the host's page
cache: read the evicted GiB/s as this machine's storage, not a drive's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gpuload.config import Config
from gpuload.host.resident import map_resident
from gpuload.memory import mapping
from gpuload.read.open import open_checkpoint
from gpuload.sharding.selection import Selection

pf = importlib.import_module("gpuload.host.prefault")  # the module, not the function
MiB, GiB = 1 << 20, 1 << 30
EXPERT = (2048, 2048)  # BF16: 8 MiB


def write_experts(path: Path, size_gib: float) -> int:
    n = max(1, int(size_gib * GiB) // (3 * 8 * MiB))
    names = [
        f"model.layers.0.mlp.experts.{i}.{w}.weight" for i in range(n) for w in ("w1", "w2", "w3")
    ]
    header, off = {}, 0
    for name in names:
        header[name] = {
            "dtype": "BF16",
            "shape": list(EXPERT),
            "data_offsets": [off, off + 8 * MiB],
        }
        off += 8 * MiB
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    block = np.random.default_rng(0).integers(0, 256, 8 * MiB, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for i in range(len(names)):
            block[:8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)  # no two alike
            f.write(block.data)
        f.flush()
        os.fsync(f.fileno())
    return len(names)


def evict(path: Path) -> float:
    """Drop the file's pages; the fraction still resident."""
    return mapping.evict([path])


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def read_loop(path: Path) -> None:
    buf = bytearray(16 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def throughput(
    path: Path, repeat: int, threads: int | None
) -> list[tuple[str, list[float], float]]:
    size = path.stat().st_size
    rows: dict[str, list[float]] = {}
    contenders = [
        ("gpuload prefault", lambda: pf.prefault(path, pin=False, threads=threads, setting=True))
    ]
    if shutil.which("vmtouch"):
        contenders.append(
            ("vmtouch -t", lambda: subprocess.run(["vmtouch", "-tq", str(path)], check=True))
        )
    else:
        print("vmtouch not installed (apt-get install -y vmtouch): its row is skipped\n")
    contenders += [
        (
            "cat > /dev/null",
            lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True),
        ),
        ("python readinto loop", lambda: read_loop(path)),
    ]
    left, after = [], {}
    for _ in range(repeat):
        for name, fn in contenders:
            left.append(evict(path))
            rows.setdefault(name, []).append(size / GiB / timed(fn))
            got, total = pf.residency(path)
            after[name] = min(after.get(name, 1.0), got / total)
    print(f"eviction: at most {max(left):.2%} of the file was resident before any run\n")
    return [(name, v, after[name]) for name, v in rows.items()]


def touch(a: np.ndarray, order: np.ndarray) -> float:
    flat = a.reshape(-1).view(np.uint8)
    return timed(lambda: flat[order].max())


def latency(path: Path, repeat: int) -> dict[str, list[float]]:
    ck = open_checkpoint(path)
    names = list(ck.tensors)
    rng = np.random.default_rng(1)
    out: dict[str, list[float]] = {}
    sels = {n: Selection.whole(EXPERT, "expert") for n in names}
    for _ in range(repeat):
        name = names[rng.integers(len(names))]
        order = rng.permutation(8 * MiB // 4096) * 4096  # one byte per page, random order

        def fresh(prefault: bool, name: str = name) -> np.ndarray:
            cfg = Config(prefault=prefault, pin=False)
            arrays, _ = map_resident(ck, sels if prefault else {name: sels[name]}, cfg)
            return arrays[name]

        evict(path)
        out.setdefault("evicted (fresh mapping)", []).append(touch(fresh(False), order))
        out.setdefault("page-cached, fresh mapping", []).append(touch(fresh(False), order))
        evict(path)
        a = fresh(True)  # every expert prefaulted
        out.setdefault("after gpuload prefault", []).append(touch(a, order))
        flush = fresh(True)  # touches every other expert: CPU caches and TLB go cold
        out.setdefault("warm (touched before, caches cold)", []).append(touch(a, order))
        out.setdefault("hot (immediate second touch)", []).append(touch(a, order))
        del a, flush
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--dir", default="/var/tmp", help="a disk-backed directory (not tmpfs)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="default: GPULOAD_THREADS")
    p.add_argument("--keep", action="store_true", help="keep the generated file")
    args = p.parse_args()

    path = Path(args.dir) / f"gpuload-bench-experts-{args.size_gib:g}g.safetensors"
    if not path.exists() or abs(path.stat().st_size - args.size_gib * GiB) > 64 * MiB:
        print(f"writing {path} ...", flush=True)
        write_experts(path, args.size_gib)
    try:
        size = path.stat().st_size
        left = evict(path)
        if left > 0.01:
            print(f"cannot evict {path} ({left:.0%} stays resident: tmpfs?); use --dir on a disk")
            return 1
        cfg = Config().replace(threads=args.threads)
        print(
            f"`{' '.join(sys.argv)}` on {platform.node()}: Linux {platform.release()}, "
            f"{os.cpu_count()} CPUs, {pf.mem_available() / GiB:.1f} GiB available, "
            f"file {size / GiB:.2f} GiB, gpuload threads {cfg.threads}, repeat {args.repeat}\n"
        )
        rows = throughput(path, args.repeat, args.threads)
        ref = {name: v for name, v, _ in rows}.get("vmtouch -t")
        print("| from evicted page cache | GiB/s (median) | best | / vmtouch | resident after |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, v, res in rows:
            ratio = f"{statistics.median(v) / statistics.median(ref):.2f}x" if ref else "n/a"
            print(f"| {name} | {statistics.median(v):.2f} | {max(v):.2f} | {ratio} | {res:.0%} |")

        lat = latency(path, args.repeat)
        warm = statistics.median(lat["warm (touched before, caches cold)"])
        print(
            "\n| first touch of a random 8 MiB expert (2048 pages, random order) "
            "| ms (median) | us/page | / warm |"
        )
        print("| --- | ---: | ---: | ---: |")
        for name, v in lat.items():
            m = statistics.median(v)
            print(f"| {name} | {m * 1e3:.2f} | {m * 1e6 / 2048:.2f} | {m / warm:.1f}x |")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
