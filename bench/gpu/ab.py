"""The GPU path's open questions as A/B runs, alternated, for session.sh's ``ab`` step.

1. ``backend``: auto vs posix vs kvikio on the same checkpoint, world 2,
   rank 0 and rank 1 (row and column shards), warm page cache;
2. results through torch's caching allocator (``framework="torch"``) vs raw
   ``cudaMalloc`` (``framework="cupy"``), with ``torch.cuda.memory_allocated``;
3. the gather kernel against ``cudaMemcpyAsync`` device to device of the same
   bytes, aligned and with the source 3 bytes off (the head/tail split).

Each contender runs ``--runs`` times, in turn (A B C A B C ...); every run's
seconds are printed, then the median. Loads' bytes are checked once against
safetensors first. Without a usable GPU it says so and exits 0.

    python bench/gpu/ab.py [--mib 256] [--runs 3] [--dir /tmp/gpuload-ab]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RULES = {r"up_proj": 0, r"down_proj": 1}  # a row shard and a column shard


def _checkpoint(where: Path, mib: int) -> Path:
    from safetensors.numpy import save_file

    path = where / "ab.safetensors"
    if path.exists():
        return path
    where.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    cols = 4096
    rows = (mib << 20) // (4 * cols * 2 * 2)  # f32, two kinds of tensor, two of each
    tensors = {}
    for i in range(2):
        tensors[f"layers.{i}.mlp.up_proj.weight"] = rng.random((rows, cols), np.float32)
        tensors[f"layers.{i}.mlp.down_proj.weight"] = rng.random((cols, rows), np.float32)
    save_file(tensors, str(path))
    return path


def _alternate(contenders: dict, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(runs):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _table(title: str, times: dict[str, list[float]], nbytes: int) -> None:
    print(f"\n## {title}\n\n| contender | runs, s | median GiB/s |\n| --- | --- | ---: |")
    for name, ts in times.items():
        runs = ", ".join(f"{t:.4f}" for t in ts)
        print(f"| {name} | {runs} | {nbytes / statistics.median(ts) / (1 << 30):.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/gpuload-ab")
    args = ap.parse_args(argv)
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as e:  # ImportError, CUDARuntimeError
        print(f"bench/gpu/ab.py: no usable GPU, nothing measured ({type(e).__name__}: {e})")
        return 0
    import gpuload

    path = _checkpoint(Path(args.dir), args.mib)
    print(f"command: `python bench/gpu/ab.py {' '.join(argv or sys.argv[1:])}`; {path}")
    from safetensors.numpy import load_file

    want = load_file(str(path))
    for rank in (0, 1):
        got = gpuload.load_sharded(path, rank, 2, device="cuda:0", framework="cupy", rules=RULES)
        for name, a in got.items():
            full = want[name]
            cut = np.array_split(full, 2, axis=0 if "up_proj" in name else 1)[rank]
            if not np.array_equal(cupy.asnumpy(a), cut):
                print(f"wrong bytes in {name} at rank {rank}", file=sys.stderr)
                return 1
        del got
    shard = sum(a.nbytes for a in want.values()) // 2

    def load(**kw):
        def run():
            for rank in (0, 1):
                got = gpuload.load_sharded(path, rank, 2, device="cuda:0", rules=RULES, **kw)
                cupy.cuda.runtime.deviceSynchronize()
                del got

        return run

    backends = {b: load(backend=b, framework="cupy") for b in ("auto", "posix", "kvikio")}
    with gpuload.Loader(device="cuda:0") as ld:
        print(f"\nbackend=auto here: {ld.backend} ({ld.backend_reason})")
    try:
        _table("backend, world 2, ranks 0 and 1", _alternate(backends, args.runs), 2 * shard)
    except gpuload.BackendUnavailable as e:
        print(f"\nbackend A/B: kvikio unavailable ({e})")
        del backends["kvikio"]
        _table("backend, world 2, ranks 0 and 1", _alternate(backends, args.runs), 2 * shard)
    try:
        import torch

        before = torch.cuda.memory_allocated(0)
        got = gpuload.load_sharded(path, 0, 2, device="cuda:0", framework="torch", rules=RULES)
        seen = torch.cuda.memory_allocated(0) - before
        print(f"\nframework='torch': memory_allocated grew {seen:,} bytes for {shard:,} of results")
        del got
        frameworks = {
            "torch allocator": load(framework="torch"),
            "raw cudaMalloc": load(framework="cupy"),
        }
        _table("results: torch's allocator vs raw", _alternate(frameworks, args.runs), 2 * shard)
    except ImportError:
        print("\nno torch here: the allocator A/B is skipped")
    return kernel_vs_memcpy(cupy, args.runs)


def kernel_vs_memcpy(cupy, runs: int) -> int:
    from gpuload.kernels.cuda import gather

    n = 256 << 20
    src, dst = cupy.arange(n + 64, dtype=cupy.uint8), cupy.empty(n + 64, cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)
    rt = cupy.cuda.runtime
    cases = {}
    for shift in (0, 3):
        table = np.array([[shift, shift, 1, n, n, n]], np.int64)
        cases[f"gather, offset {shift}"] = lambda t=table: gather(src, dst, t, stream=stream)
        cases[f"memcpy D2D, offset {shift}"] = lambda s=shift: rt.memcpyAsync(
            dst.data.ptr + s, src.data.ptr + s, n, rt.memcpyDeviceToDevice, stream.ptr
        )
    for fn in cases.values():  # warm-up, and the kernel's bytes checked
        fn()
    stream.synchronize()
    if not bool((dst[3 : n + 3] == src[3 : n + 3]).all()):
        print("the gather moved wrong bytes", file=sys.stderr)
        return 1

    def timed(fn):
        def run():
            fn()
            stream.synchronize()

        return run

    _table(
        "gather kernel vs device memcpy, 256 MiB",
        _alternate({k: timed(f) for k, f in cases.items()}, 5 * runs),
        n,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
