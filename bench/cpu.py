"""CPU benchmark: gpuload's host path against the pread limit and safetensors.

In one run, on one generated checkpoint (default 2 GiB, F16 so that
safetensors.numpy can load it, page cache warm):

* limit: multi-threaded ``pread`` of every file into one reused buffer, and
  into a freshly allocated buffer (the page-zeroing floor of owned results);
* gpuload ``load_sharded(device="cpu")`` world=1 vs ``safetensors.numpy.load_file``;
* world=8 rank 0: gpuload vs safetensors ``get_slice`` (mmap + numpy slicing).

Targets (ratios in this run): full load >= 0.9x the pread limit and >= 2x
load_file; world=8 >= 2x get_slice. Every gpuload result is checked against
the peer's bytes once before timing.

    python bench/cpu.py [--size-gib 2] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown, measure  # noqa: E402

import gpuload  # noqa: E402
from gpuload import synth  # noqa: E402
from gpuload.bench.contenders import get_slice_shard as _get_slice_shard  # noqa: E402
from gpuload.bench.limits import pread_all  # noqa: E402
from gpuload.verify import as_bytes  # noqa: E402


def get_slice_shard(files, lp) -> dict[str, np.ndarray]:
    """safetensors' own way to read part of a tensor: get_slice + numpy slicing."""
    return _get_slice_shard(files, {t.name: t.selection for t in lp.plan.tensors})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="reader threads (default: flag)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="write raw runs and the machine here")
    args = ap.parse_args(argv)

    model = synth.cached_model(
        "llama", int(args.size_gib * (1 << 30)), dtype="F16", cache_dir=args.cache_dir
    )
    ckpt = gpuload.open_checkpoint(model)
    files = [f.path for f in ckpt.files]
    total = sum(f.size for f in ckpt.files)
    data = sum(t.nbytes for t in ckpt.tensors.values())
    settings = {"threads": args.threads} if args.threads else {}
    loader = gpuload.Loader(device="cpu", progress=False, **settings)
    threads = loader.config.threads
    print(
        f"model: {model} ({total / 2**30:.2f} GiB in {len(files)} files), "
        f"threads={threads}, runs={args.runs}"
    )

    # Correctness first: gpuload vs the peers' bytes.
    full = loader.load(ckpt, 0, 1)
    ref = {}
    for f in files:
        ref.update(load_file(f))
    assert all(as_bytes(full[k]) == ref[k].tobytes() for k in ref), "world=1 bytes differ"
    del full, ref
    lp = loader.plan(ckpt, 0, args.world)
    shard = loader.load(ckpt, 0, args.world)
    peer = get_slice_shard(files, lp)
    assert all(as_bytes(shard[k]) == np.ascontiguousarray(peer[k]).tobytes() for k in peer)
    shard_bytes = sum(a.nbytes for a in shard.values())
    del shard, peer

    buf = np.empty(total, np.uint8)
    limit = measure(
        "pread limit (all files)", total, lambda: pread_all(files, buf, threads), args.runs
    )
    buf = None  # free the 2 GiB before the contenders allocate theirs
    # A loader that returns arrays it owns writes into fresh pages, which the
    # kernel zeroes on first touch: this is the floor for any such loader.
    fresh = measure(
        "pread limit, fresh buffer",
        total,
        lambda: pread_all(files, np.empty(total, np.uint8), threads),
        args.runs,
    )
    rows = [
        limit,
        fresh,
        measure("gpuload world=1", data, lambda: loader.load(ckpt, 0, 1), args.runs),
        measure("safetensors load_file", data, lambda: [load_file(f) for f in files], args.runs),
        measure(
            f"gpuload world={args.world} rank 0",
            shard_bytes,
            lambda: loader.load(ckpt, 0, args.world),
            args.runs,
        ),
        measure(
            f"safetensors get_slice world={args.world} rank 0",
            shard_bytes,
            lambda: get_slice_shard(files, lp),
            args.runs,
        ),
    ]
    peers = {
        "gpuload world=1": "safetensors load_file",
        f"gpuload world={args.world} rank 0": f"safetensors get_slice world={args.world} rank 0",
    }
    table = markdown(rows, limit, peers)
    print()
    print(table)
    g1, lf, g8, gs = rows[2], rows[3], rows[4], rows[5]
    checks = [
        ("full load >= 0.9x pread limit", g1.gib_s / limit.gib_s, 0.9),
        ("full load >= 0.9x pread into fresh buffers", g1.gib_s / fresh.gib_s, 0.9),
        ("full load >= 2x load_file", lf.median / g1.median, 2.0),
        (f"world={args.world} >= 2x get_slice", gs.median / g8.median, 2.0),
    ]
    print()
    for what, ratio, target in checks:
        print(f"- {what}: {ratio:.2f} ({'met' if ratio >= target else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": " ".join(["python", "bench/cpu.py", *(argv or sys.argv[1:])]),
                    "machine": machine(),
                    "model": str(model),
                    "file_bytes": total,
                    "runs": {r.name: {"bytes": r.nbytes, "seconds": r.runs} for r in rows},
                    "checks": {w: r for w, r, _ in checks},
                    "table": table,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
