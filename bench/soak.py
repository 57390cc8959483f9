"""Randomised soak: many random load plans on the host backend, every byte
checked against an oracle that does not use gpuload's sharding or planner.

    python bench/soak.py --plans 10000            # the full run
    python bench/soak.py --plans 300 --seed 7     # a quick one
    python bench/soak.py --only 4711 --seed 7     # replay one plan

Each plan draws: tensors (every safetensors dtype, bf16/fp8/F4/F6 included;
0-3 dims, empty ones too), a caller rule per tensor (replicate, row, column,
a split of the last dim, fused sections), world in {1, 2, 3, 4, 8} and a
rank, uneven splits, 1-3 files (aligned or not, index.json or a list),
reader threads, ``chunk_bytes`` / ``min_chunk_bytes`` caps, a
``staging_bytes`` budget smaller than the tensors, and injected faults
(short reads, EINTR, delays; EIO in a few plans, which must raise
ReadError). The oracle reads each file with ``safetensors.deserialize`` and
cuts each tensor with numpy slicing of its raw bytes, from the rule's
definition (even split, or ``torch.chunk`` sizes when uneven).

Prints (and with ``--json`` writes) plans run, bytes checked, wrong bytes
(must be 0), faults injected and unexpected errors; exits 1 on any wrong byte
or unexpected error.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors

import gpuload
from gpuload.format.dtypes import DTYPES
from gpuload.read.faults import FaultyReaderFactory
from gpuload.sharding import Replicate, Split
from gpuload.synth import write_safetensors

WORLDS = (1, 2, 3, 4, 8)
SIZES = (64, 256, 1000, 4096, 16384, 65536, 1 << 20)


# ---------------------------------------------------------------- drawing a plan


def _granule(bits: int, inner: int) -> int:
    """Elements of the split dim per whole byte: cuts must fall on multiples."""
    return 8 // math.gcd(inner * bits % 8 or 8, 8)


def _draw_tensor(r: random.Random, world: int, uneven: bool, budget: int) -> dict:
    dtype = r.choice(sorted(DTYPES))
    bits = DTYPES[dtype].bits
    kind = r.choice(["replicate", "row", "column", "last", "fused", "fused"])
    if kind == "replicate":
        ndim = r.randint(0 if bits % 8 == 0 else 1, 3)  # no 4- or 6-bit scalars
        shape = [r.choice([0, 1, 2, 3, 5, 8, 13, 32]) if r.random() < 0.1 else r.randint(1, 40)]
        shape = (shape + [r.randint(1, 40) for _ in range(ndim)])[:ndim]
        while math.prod(shape) * bits % 8:  # the format needs whole bytes
            shape[-1] += 1
        return {"dtype": dtype, "shape": shape, "dim": None, "sections": None}
    ndim = {"row": r.randint(1, 3), "column": r.randint(2, 3)}.get(kind, r.randint(1, 3))
    dim = {"row": 0, "column": 1}.get(kind, ndim - 1 if kind == "last" else r.randrange(ndim))
    shape = [
        r.choice([r.randint(1, 24), r.randint(1, 24), r.randint(24, 700)]) for _ in range(ndim)
    ]
    if r.random() < 0.05:
        shape[r.randrange(ndim)] = 0  # empty tensors split too
    inner = math.prod(shape[dim + 1 :])
    g = _granule(bits, inner)
    sections = [None] if kind != "fused" else [None] * r.randint(2, 3)
    sizes = []
    for _ in sections:
        low = 1 if kind == "fused" else 0  # a fused section has a size
        if uneven and g == 1:
            sizes.append(r.randint(low, 4 * world + 3))
        else:
            sizes.append(world * g * r.randint(low if r.random() < 0.05 else 1, 6))
    shape[dim] = sum(sizes)
    # keep inside the byte budget by shrinking the other dims
    while math.prod(shape) * bits // 8 > budget and any(
        s > 1 for i, s in enumerate(shape) if i != dim
    ):
        i = max((i for i in range(ndim) if i != dim), key=lambda i: shape[i])
        shape[i] = max(1, shape[i] // 2)
        g2 = _granule(bits, math.prod(shape[dim + 1 :]))
        if g2 != g:  # the split's byte grain changed: re-draw
            return _draw_tensor(r, world, uneven, budget)
    if math.prod(shape) * bits % 8:
        return _draw_tensor(r, world, uneven, budget)
    return {
        "dtype": dtype,
        "shape": shape,
        "dim": dim,
        "sections": sizes if kind == "fused" else None,
    }


def draw_plan(seed: int, index: int, max_tensor_bytes: int) -> dict:
    r = random.Random(f"{seed}-{index}")
    world = r.choice(WORLDS)
    uneven = r.random() < 0.25
    tensors = {}
    for i in range(r.randint(1, 8)):
        budget = r.choice([1024, max_tensor_bytes, max_tensor_bytes])
        tensors[f"layers.{i}.{r.choice(['w', 'b', 'x', 'qkv'])}"] = _draw_tensor(
            r, world, uneven, budget
        )
    names = list(tensors)
    r.shuffle(names)
    nfiles = r.randint(1, min(3, len(names)))
    files = [names[i::nfiles] for i in range(nfiles)]
    chunk = r.choice(SIZES)
    eio = r.random() < 0.05
    return {
        "index": index,
        "world": world,
        "rank": r.randrange(world),
        "uneven": uneven,
        "tensors": tensors,
        "files": files,
        "unaligned": r.random() < 0.5,
        "layout": r.choice(["index", "list", "dir"]) if nfiles > 1 else r.choice(["file", "dir"]),
        "settings": {
            "threads": r.randint(1, 4),
            "chunk_bytes": chunk,
            "min_chunk_bytes": r.choice(
                [s for s in (64, 256, 1024, 4096) if s <= chunk] or [chunk]
            ),
            "staging_bytes": r.choice([512, 4096, 16384, 1 << 20]),
            "prefetch": r.random() < 0.5,
            "progress": False,
        },
        "faults": {
            "short_reads": r.choice([0.0, 0.1, 0.5, 0.9]),
            "eintr": r.choice([0.0, 0.05, 0.2]),
            "delay": r.choice([(0.0, 0.0)] * 3 + [(0.0, 0.0005)]),
            "eio": 0.2 if eio else 0.0,
            "seed": r.randrange(1 << 30),
        },
        "reload": r.random() < 0.2,  # a second rank through the same Loader
    }


# ---------------------------------------------------------------- writing and the oracle


def write_plan(plan: dict, root: Path) -> tuple[object, list[Path], dict[str, bytes]]:
    """Write the plan's files; returns the load path, the files and raw bytes per tensor."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    rng = np.random.default_rng(plan["index"])
    raw = {}
    paths = []
    for k, group in enumerate(plan["files"]):
        tensors = {}
        for name in group:
            t = plan["tensors"][name]
            nbytes = math.prod(t["shape"]) * DTYPES[t["dtype"]].bits // 8
            data = rng.integers(1, 256, nbytes, dtype=np.uint8).tobytes()
            tensors[name] = (t["dtype"], tuple(t["shape"]), data)
        p = root / f"model-{k:05d}.safetensors"
        write_safetensors(p, tensors, {"format": "pt"}, unaligned=plan["unaligned"])
        paths.append(p)
    for p in paths:  # what the oracle knows comes from safetensors, not from us
        for name, v in safetensors.deserialize(p.read_bytes()):
            raw[name] = bytes(v["data"])
    layout = plan["layout"]
    if layout == "index":
        wm = {n: f"model-{k:05d}.safetensors" for k, g in enumerate(plan["files"]) for n in g}
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        return root, paths, raw
    if layout == "list":
        return [str(p) for p in paths], paths, raw
    if layout == "dir":
        return root, paths, raw
    return paths[0], paths, raw


def _ranges(size: int, rank: int, world: int, uneven: bool) -> tuple[int, int]:
    if uneven:
        per = -(-size // world)
        start = min(size, rank * per)
        return start, min(size, start + per) - start
    per = size // world
    return rank * per, per


def oracle(t: dict, raw: bytes, rank: int, world: int, uneven: bool) -> tuple[tuple, bytes]:
    """Expected (numpy shape, bytes) of one tensor's shard, by slicing raw bytes."""
    d = DTYPES[t["dtype"]]
    shape = list(t["shape"])
    out_shape = list(shape)
    if t["dim"] is None:
        data = raw
    else:
        dim = t["dim"]
        sizes = t["sections"] or [shape[dim]]
        outer = math.prod(shape[:dim])
        inner_bits = math.prod(shape[dim + 1 :]) * d.bits
        row = shape[dim] * inner_bits // 8
        rows = np.frombuffer(raw, np.uint8).reshape(outer, row) if outer and row else None
        parts, off, total = [], 0, 0
        for s in sizes:
            a, n = _ranges(s, rank, world, uneven)
            lo, hi = (off + a) * inner_bits // 8, (off + a + n) * inner_bits // 8
            if rows is not None:
                parts.append(rows[:, lo:hi])
            off += s
            total += n
        out_shape[dim] = total
        data = np.concatenate(parts, axis=1).tobytes() if parts else b""
    if d.packed:  # the documented carrier: uint8 bytes, last dim in bytes if whole
        nbits = math.prod(out_shape) * d.bits
        if not out_shape:
            out_shape = [(d.bits + 7) // 8]
        elif out_shape[-1] * d.bits % 8 == 0:
            out_shape = [*out_shape[:-1], out_shape[-1] * d.bits // 8]
        else:
            out_shape = [nbits // 8]
    return tuple(out_shape), data


def rules_of(plan: dict, r: random.Random) -> dict:
    rules = {}
    for name, t in plan["tensors"].items():
        if t["dim"] is None:
            spec = r.choice([Replicate(), "replicate"])
        elif t["sections"]:
            spec = Split(t["dim"], sections=tuple(t["sections"]))
        elif t["dim"] == 0:
            spec = r.choice([Split(0), "row", 0])
        elif t["dim"] == 1:
            spec = r.choice([Split(1), "column", 1, Split(1 - len(t["shape"]))])
        else:
            spec = r.choice([Split(t["dim"]), Split(-1)])
        rules[f"^{re.escape(name)}$"] = spec
    return rules


# ---------------------------------------------------------------- running


def _wrong(got: np.ndarray, want_shape: tuple, want: bytes) -> int:
    a = np.frombuffer(np.ascontiguousarray(got).tobytes(), np.uint8)
    b = np.frombuffer(want, np.uint8)
    if a.size != b.size:
        return max(a.size, b.size)
    wrong = int(np.count_nonzero(a != b))
    return wrong if tuple(got.shape) == want_shape else max(wrong, 1)


def run_plan(plan: dict, root: Path, summary: dict) -> None:
    path, _files, raw = write_plan(plan, root)
    r = random.Random(plan["index"] * 7919)
    rules = rules_of(plan, r)
    faults = dict(plan["faults"])
    factory = FaultyReaderFactory(**faults)
    ranks = [plan["rank"]]
    if plan["reload"]:
        ranks.append((plan["rank"] + 1) % plan["world"])
    with gpuload.Loader(device="cpu", reader_factory=factory, **plan["settings"]) as loader:
        for rank in ranks:
            eio_before = factory.stats.eio
            try:
                got = loader.load(
                    path, rank, plan["world"], rules=rules, allow_uneven=plan["uneven"]
                )
            except gpuload.ReadError as e:
                if factory.stats.eio > eio_before:
                    summary["eio_raised"] += 1
                    continue
                summary["unexpected_errors"].append(f"plan {plan['index']}: {e!r}")
                continue
            except Exception as e:  # noqa: BLE001 - a soak reports, it does not stop
                summary["unexpected_errors"].append(f"plan {plan['index']}: {e!r}")
                continue
            if factory.stats.eio > eio_before:
                summary["unexpected_errors"].append(f"plan {plan['index']}: EIO but no ReadError")
            summary["loads"] += 1
            if sorted(got) != sorted(plan["tensors"]):
                summary["wrong_tensors"].append(f"plan {plan['index']}: names {sorted(got)}")
            for name, t in plan["tensors"].items():
                shape, want = oracle(t, raw[name], rank, plan["world"], plan["uneven"])
                if name not in got:
                    summary["wrong_bytes"] += len(want)
                    continue
                bad = _wrong(got[name], shape, want)
                summary["bytes_checked"] += len(want)
                if bad:
                    summary["wrong_bytes"] += bad
                    summary["wrong_tensors"].append(
                        f"plan {plan['index']} rank {rank}: {name} {t} {bad} wrong bytes"
                    )
    summary["eio_plans"] += faults["eio"] > 0
    for k, v in factory.stats.as_dict().items():
        summary["faults"][k] = summary["faults"].get(k, 0) + v


def run(
    plans: int = 300,
    seed: int = 0,
    workdir: str | Path | None = None,
    max_tensor_bytes: int = 256 << 10,
    only: int | None = None,
    progress: bool = False,
) -> dict:
    """Run ``plans`` random plans (or plan ``only``); returns the summary."""
    summary: dict = {
        "plans": 0,
        "loads": 0,
        "bytes_checked": 0,
        "wrong_bytes": 0,
        "wrong_tensors": [],
        "unexpected_errors": [],
        "eio_plans": 0,
        "eio_raised": 0,
        "faults": {},
        "seed": seed,
    }
    t0 = time.perf_counter()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gpuload-soak-")
        workdir = tmp.name
    root = Path(workdir) / "plan"
    try:
        for i in [only] if only is not None else range(plans):
            plan = draw_plan(seed, i, max_tensor_bytes)
            run_plan(plan, root, summary)
            summary["plans"] += 1
            if progress and summary["plans"] % 500 == 0:
                el = time.perf_counter() - t0
                print(
                    f"{summary['plans']} plans, {summary['bytes_checked'] / 2**20:.0f} MiB "
                    f"checked, {summary['wrong_bytes']} wrong, {el:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if tmp is not None:
            tmp.cleanup()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["faults"]["injected"] = sum(
        summary["faults"].get(k, 0) for k in ("short_reads", "eintr", "eio", "delays")
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="gpuload randomised soak against the oracle")
    ap.add_argument("--plans", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=int, default=None, help="run plan number ONLY alone")
    ap.add_argument("--max-tensor-bytes", type=int, default=256 << 10)
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args(argv)
    s = run(args.plans, args.seed, args.workdir, args.max_tensor_bytes, args.only, progress=True)
    text = json.dumps(s, indent=1, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if s["wrong_bytes"] or s["wrong_tensors"] or s["unexpected_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
