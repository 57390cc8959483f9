"""gpuload.torch.load_into against PyTorch's own path for the same job,
``torch.distributed.checkpoint.load(state_dict, storage_reader=HuggingFaceStorageReader(path))``,
which reads each slice through safetensors' ``get_slice`` and copies it.

    python bench/dcp_load.py [--size-mib 512] [--worlds 2 4] [--runs 3] [--out DIR]

For each world size, ``torchrun`` starts that many gloo ranks on 127.0.0.1.
Each builds the same DTensor state dict over a Llama-shaped bf16 checkpoint
(gpuload.synth), in two layouts: ``fsdp`` (every tensor ``Shard(0)``, what
FSDP2 holds) and ``tp`` (q/k/v/gate/up/embed/lm_head ``Shard(0)``,
o/down ``Shard(1)``, norms replicated). Each run, cold (rank 0 drops the
files from the page cache, checked) then warm, loads with each contender in
turn, alternating which goes first; per rank: wall seconds and the bytes
the process read from storage (``/proc/self/io`` ``read_bytes``: block
I/O, so cold runs only; DCP reads through mmap, which ``rchar`` misses).
Both contenders' local shards are compared byte for byte before any number
is kept. Results: ``dcp_load.json`` (every run) and ``dcp_load.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def placements_for(name: str, shape, layout: str):
    from torch.distributed.tensor import Replicate, Shard

    if len(shape) < 2 or "norm" in name:
        return [Replicate()] if layout == "tp" else [Shard(0)]
    if layout == "tp" and any(k in name for k in ("o_proj", "down_proj")):
        return [Shard(1)]
    return [Shard(0)]


def empty_state(ckpt, mesh, layout: str) -> dict:
    """DTensors over ``mesh``, local tensors allocated (never the full ones)."""
    import torch
    from torch.distributed.tensor import DTensor

    from gpuload.integrations.torch.boxes import local_box

    state = {}
    coord = mesh.get_coordinate()
    for name, info in ckpt.tensors.items():
        pl = placements_for(name, info.shape, layout)
        box = local_box(name, info.shape, mesh.shape, coord, pl)
        local = torch.empty(
            tuple(b - a for a, b in box), dtype=getattr(torch, info.dtype.torch or "uint8")
        )
        stride = torch.empty(info.shape, device="meta").stride()
        state[name] = DTensor.from_local(
            local, mesh, pl, run_check=False, shape=torch.Size(info.shape), stride=stride
        )
    return state


def as_module(state: dict):
    """A module whose parameters are ``state`` (dotted names as submodules)."""
    from torch import nn

    root = nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
    return root


def worker(path: str, runs: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.device_mesh import init_device_mesh

    import gpuload.torch
    from gpuload import open_checkpoint
    from gpuload.memory.mapping import evict

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ckpt = open_checkpoint(path)
    files = [f.path for f in ckpt.files]

    def dcp_load(state):
        dcp.load(state, storage_reader=HuggingFaceStorageReader(path))

    def gpuload_load(state):
        gpuload.torch.load_into(as_module(state), path)

    contenders = {"dcp-hf": dcp_load, "gpuload": gpuload_load}
    rows = []
    for layout in ("fsdp", "tp"):
        states = {c: empty_state(ckpt, mesh, layout) for c in contenders}
        for run in range(runs):
            order = list(contenders) if run % 2 == 0 else list(contenders)[::-1]
            for cache in ("cold", "warm"):
                for c in order:
                    if cache == "cold" and rank == 0:
                        left = evict(files)
                        if left > 0.01:
                            raise SystemExit(f"eviction left {left:.0%} of a file resident")
                    dist.barrier()
                    io0, t0 = proc_io(), time.perf_counter()
                    contenders[c](states[c])
                    seconds = time.perf_counter() - t0
                    io1 = proc_io()
                    dist.barrier()
                    rows.append(
                        dict(
                            layout=layout,
                            run=run,
                            cache=cache,
                            contender=c,
                            rank=rank,
                            seconds=seconds,
                            read_bytes=io1["read_bytes"] - io0["read_bytes"],
                            rchar=io1["rchar"] - io0["rchar"],
                        )
                    )
        # Same bytes from both, or no numbers at all.
        a, b = states["dcp-hf"], states["gpuload"]
        for name in a:
            x, y = a[name].to_local(), b[name].to_local()
            if not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
                raise SystemExit(f"rank {rank}: {layout} {name}: contenders differ")
        local = sum(t.to_local().nbytes for t in a.values())
        rows.append(dict(layout=layout, rank=rank, local_bytes=local))
    out = [None] * world
    dist.all_gather_object(out, rows)
    if rank == 0:
        print(json.dumps([r for rs in out for r in rs]))
    dist.destroy_process_group()


def summarize(rows: list[dict], file_bytes: int) -> str:
    MiB = 1 << 20
    lines = [
        "| world | layout | contender | cache | median s (slowest rank) | "
        "read_bytes / rank MiB (mean) | local shard MiB / rank |",
        "|---|---|---|---|---|---|---|",
    ]
    key = ("world", "layout", "contender", "cache")
    groups: dict[tuple, list[dict]] = {}
    local = {}
    for r in rows:
        if "local_bytes" in r:
            local.setdefault((r["world"], r["layout"]), []).append(r["local_bytes"])
        else:
            groups.setdefault(tuple(r[k] for k in key), []).append(r)
    for k, rs in sorted(groups.items()):
        per_run: dict[int, float] = {}
        for r in rs:
            per_run[r["run"]] = max(per_run.get(r["run"], 0.0), r["seconds"])
        med = statistics.median(per_run.values())
        rb = statistics.mean(r["read_bytes"] for r in rs) / MiB
        lb = statistics.mean(local[(k[0], k[1])]) / MiB
        cold_rb = f"{rb:.1f}" if k[3] == "cold" else "—"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {med:.3f} | {cold_rb} | {lb:.1f} |")
    lines.append(f"\nCheckpoint tensor bytes: {file_bytes / MiB:.1f} MiB.")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.runs)

    from gpuload import open_checkpoint
    from gpuload.bench.timing import machine
    from gpuload.synth import cached_model

    model = cached_model("tiny", args.size_mib << 20, num_files=4)
    file_bytes = sum(i.nbytes for i in open_checkpoint(model).tensors.values())
    rows = []
    for world in args.worlds:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={world}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            str(Path(__file__).resolve()),
            "--worker",
            str(model),
            "--runs",
            str(args.runs),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(proc.stdout + proc.stderr[-4000:])
        for r in json.loads(proc.stdout.strip().splitlines()[-1]):
            rows.append({"world": world, **r})
    table = summarize(rows, file_bytes)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"command": sys.argv, "model": str(model), "machine": machine(), "rows": rows}
        (args.out / "dcp_load.json").write_text(json.dumps(record, indent=1, default=str))
        (args.out / "dcp_load.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
