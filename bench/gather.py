"""Gather kernel micro-benchmark: ``kernels.cuda.gather`` against a
device-to-device copy of the same bytes, by segment size.

Each case packs ``--mib`` MiB of useful bytes: rows of ``seg`` bytes taken
every ``2 * seg`` bytes of the source (a world-2 column shard) into a
contiguous destination, in one launch. The reference is ``cudaMemcpyAsync``
device to device of the same number of bytes: the bandwidth a gather could
at best reach. Both are timed with CUDA events over ``--reps`` launches on
one non-blocking stream, after a warm-up that also checks the gather's
bytes against the numpy twin. A last row repeats 4 KiB segments with the
source one byte off alignment, which forces byte-wide words.

A second table compares the three gather strategies of a covering read
(``gpuload.plan.transfer``) on the real runtime (``CupyRuntime``: mapped pinned
staging, its device view, the Numba kernel): a column shard of rank 1 at
world 2, 4 and 8, segments of 256 B to 64 KiB, ``--strategy-mib`` MiB owned.
``device`` copies the covering range H2D into scratch and gathers on the
device; ``zerocopy`` gathers straight from the mapped staging; ``pack``
packs on the host into pinned memory, then one H2D. Each is timed wall-clock
from the first host action to the stream's end (the host pack included),
median of ``--reps``, bytes checked first. It prints the bytes each moves over
PCIe, the owned GB/s, and the cost model's prediction and choice beside the
measurement, so ``GatherModel``'s constants can be tuned from the table.

    python bench/gather.py [--mib 256] [--strategy-mib 64] [--reps 20] [--device 0]
    python bench/gather.py --model-only   # the model's table alone, no GPU needed
    python bench/gather.py --write-model [PATH]  # also write the measured constants

``--write-model`` measures ``GatherModel``'s constants here (pinned H2D
bandwidth, host time per gather launch, device gather and zero-copy
bandwidth, host pack bandwidth) and writes them to PATH (default
``~/.cache/gpuload/gather-model.json``), which every later GPU ``Loader``
reads (``GPULOAD_GATHER_MODEL``).

Prints Markdown tables with the GPU's name, the driver and CUDA runtime
versions and the command. Without a usable GPU it says why and exits 0.
No cupy kernel is compiled (copies and memcpys only), so NVRTC is not needed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

SEGMENTS = (64, 256, 1024, 4096, 16384, 65536)
STRATEGY_SEGMENTS = (256, 1024, 4096, 16384, 65536)
WORLDS = (2, 4, 8)


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _timed(cupy, stream, fn, reps: int) -> float:
    """Seconds per call of ``fn``, queued ``reps`` times between two events."""
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for _ in range(reps):
        fn()
    end.record(stream)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / reps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="useful bytes per case, MiB")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--strategy-mib", type=int, default=64, help="owned bytes per strategy case")
    ap.add_argument("--model-only", action="store_true", help="print the cost model's table")
    ap.add_argument(
        "--write-model",
        nargs="?",
        const="auto",
        default=None,
        help="write the measured GatherModel constants (default path: gpuload's cache file)",
    )
    args = ap.parse_args(argv)
    if args.model_only:
        print_model(args.strategy_mib << 20)
        return 0
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() <= args.device:
            raise RuntimeError(f"no CUDA device {args.device}")
    except Exception as e:  # ImportError, CUDARuntimeError: nothing to measure here
        print(f"bench/gather.py: no usable GPU, nothing measured ({type(e).__name__}: {e})")
        return 0
    from gpuload.kernels.cuda import gather, word_size
    from gpuload.kernels.host import gather_host

    rt = cupy.cuda.runtime
    cupy.cuda.Device(args.device).use()
    props = rt.getDeviceProperties(args.device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    nbytes = args.mib << 20
    host_src = np.random.default_rng(0).integers(0, 256, 2 * nbytes + 1, dtype=np.uint8)
    src = cupy.asarray(host_src)  # an H2D copy
    dst = cupy.empty(nbytes, cupy.uint8)
    stream = cupy.cuda.Stream(non_blocking=True)

    def copy() -> None:
        rt.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, rt.memcpyDeviceToDevice, stream.ptr)

    copy_s = _timed(cupy, stream, copy, args.reps)
    cases = [(seg, 0) for seg in SEGMENTS] + [(4096, 1)]
    rows = []
    measured: dict[str, float] = {}
    for seg, shift in cases:
        table = np.array([[shift, 0, nbytes // seg, seg, 2 * seg, seg]], np.int64)
        gather(src, dst, table, stream=stream)  # warm-up: compiles this word width
        stream.synchronize()
        want = np.empty(nbytes, np.uint8)
        gather_host(host_src, want, table)
        if not np.array_equal(dst.get(), want):
            print(f"gather of {seg}-byte segments gave wrong bytes", file=sys.stderr)
            return 1
        s = _timed(cupy, stream, lambda t=table: gather(src, dst, t, stream=stream), args.reps)
        rows.append((seg, shift, word_size(src, dst, table), s))
        if seg == max(SEGMENTS) and not shift:
            measured["device_gather_bytes_per_s"] = nbytes / s

    print(f"## gather vs device copy: {name}\n")
    print(
        f"driver {_version(rt.driverGetVersion())}, CUDA runtime {_version(rt.runtimeGetVersion())}"
        f", cupy {cupy.__version__}; {args.mib} MiB useful per launch, {args.reps} reps\n"
    )
    print(f"command: `python bench/gather.py {' '.join(argv or sys.argv[1:])}`\n")
    print("| segment | source offset | word | gather GB/s | D2D copy GB/s | gather / copy |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    copy_gbs = nbytes / copy_s / 1e9
    for seg, shift, word, s in rows:
        gbs = nbytes / s / 1e9
        print(
            f"| {seg} B | {shift} | {word} B | {gbs:.1f} | {copy_gbs:.1f} | {gbs / copy_gbs:.2f} |"
        )
    return strategies(cupy, args, measured)


def case(seg: int, world: int, useful: int) -> tuple[np.ndarray, int, int]:
    """Rank 1's column shard: (piece table, covering bytes, rows)."""
    rows = useful // seg
    return np.array([[seg, 0, rows, seg, world * seg, seg]], np.int64), rows * world * seg, rows


def print_model(useful: int) -> None:
    from gpuload.plan.transfer import GATHERS, GatherModel

    m = GatherModel()
    print(f"## gather strategies: cost model ({useful >> 20} MiB owned per case)\n")
    print(f"constants: `{m}`\n")
    print("| world | segment | " + " | ".join(f"{g} GB/s" for g in GATHERS) + " | choice |")
    print("| ---: | ---: |" + " ---: |" * len(GATHERS) + " --- |")
    for world in WORLDS:
        for seg in STRATEGY_SEGMENTS:
            table, covering, rows = case(seg, world, useful)
            kw = dict(
                rows=rows, seg=seg, useful=rows * seg, covering=covering, aligned=seg % 128 == 0
            )
            c = m.costs(**kw)
            gbs = " | ".join(f"{rows * seg / c[g] / 1e9:.1f}" for g in GATHERS)
            print(f"| {world} | {seg} B | {gbs} | {m.choose(**kw)} |")
    print()


def strategies(cupy, args, measured: dict[str, float]) -> int:
    """The three gather strategies on the real runtime, by world and segment size."""
    from gpuload.cuda.runtime import CupyRuntime
    from gpuload.kernels.host import gather_host
    from gpuload.plan.transfer import GATHERS, GatherModel, pack_layout

    rt = CupyRuntime(args.device)
    model = GatherModel()
    useful = args.strategy_mib << 20
    most = max(WORLDS) * useful + max(STRATEGY_SEGMENTS)
    staging = rt.host_alloc(most, pinned=True)  # mapped pinned, as the pipeline's slots
    staging[:] = np.random.default_rng(1).integers(0, 256, most, dtype=np.uint8)
    mapped = rt.device_view(staging)
    pack = rt.host_alloc(useful, pinned=True)
    scratch = rt.device_alloc(most)
    dst = rt.device_alloc(useful)
    stream = rt.stream()
    print(
        f"\n## gather strategies: {args.strategy_mib} MiB owned per case, "
        "rank 1 of a column shard\n"
    )
    print(
        "wall time from the first host action to the stream's end, median of "
        f"{args.reps}; model: `GatherModel()` defaults\n"
    )
    print(
        "| world | segment | strategy | bytes over PCIe | owned GB/s | model GB/s | model choice |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | --- |")
    for world in WORLDS:
        for seg in STRATEGY_SEGMENTS:
            table, covering, rows = case(seg, world, useful)
            n = rows * seg
            src_len = covering + seg
            want = np.empty(n, np.uint8)
            gather_host(staging[:src_len], want, table)
            packed, copies = pack_layout(table, 0)
            kw = dict(rows=rows, seg=seg, useful=n, covering=covering, aligned=seg % 128 == 0)
            costs, choice = model.costs(**kw), model.choose(**kw)

            def device(table=table, src_len=src_len):
                rt.h2d(scratch, 0, staging, 0, src_len, stream)
                rt.gather(scratch, dst, table, stream)

            def zerocopy(table=table):
                rt.gather(mapped, dst, table, stream)

            def packed_h2d(packed=packed, copies=copies, src_len=src_len):
                gather_host(staging[:src_len], pack, packed)
                for dst_off, pack_off, k in copies:
                    rt.h2d(dst, dst_off, pack, pack_off, k, stream)

            moved = {"device": src_len, "zerocopy": n, "pack": n}
            for name, fn in zip(GATHERS, (device, zerocopy, packed_h2d), strict=True):
                cupy.cuda.runtime.memsetAsync(dst.data.ptr, 0, n, stream.ptr)  # no NVRTC
                fn()
                stream.synchronize()
                if not np.array_equal(dst[:n].get(), want):
                    print(f"{name} gather of {seg}-byte segments gave wrong bytes", file=sys.stderr)
                    return 1
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    fn()
                    stream.synchronize()
                    times.append(time.perf_counter() - t0)
                s = statistics.median(times)
                if name == "zerocopy" and world == 2 and seg == max(STRATEGY_SEGMENTS):
                    measured["_zerocopy_bytes_per_s"] = n / s
                print(
                    f"| {world} | {seg} B | {name} | {moved[name]:,} | {n / s / 1e9:.1f} "
                    f"| {n / costs[name] / 1e9:.1f} | {choice} |"
                )
    if args.write_model:
        write_model(cupy, rt, stream, staging, scratch, useful, measured, args)
    rt.destroy_stream(stream)
    return 0


def write_model(cupy, rt, stream, staging, scratch, useful: int, measured, args) -> None:
    """Measure what the strategy table did not, and write ``GatherModel``'s constants."""
    from pathlib import Path

    from gpuload.plan import gather_model
    from gpuload.plan.transfer import GatherModel

    h2d = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        rt.h2d(scratch, 0, staging, 0, useful, stream)
        stream.synchronize()
        h2d.append(time.perf_counter() - t0)
    h2d_bps = useful / statistics.median(h2d)
    tiny = np.array([[0, 0, 1, 64, 64, 64]], np.int64)
    launches = 200
    rt.gather(scratch, scratch[4096:], tiny, stream)  # compiled already; one more to settle
    stream.synchronize()
    t0 = time.perf_counter()
    for _ in range(launches):
        rt.gather(scratch, scratch[4096:], tiny, stream)
    launch_s = (time.perf_counter() - t0) / launches  # host side, as the model counts it
    stream.synchronize()
    from gpuload.kernels.host import gather_host

    src = np.asarray(staging[: 2 * useful])
    out = np.empty(useful, np.uint8)
    table, _, _ = case(4096, 2, useful)
    t0 = time.perf_counter()
    gather_host(src, out, table)
    pack_bps = useful / (time.perf_counter() - t0)
    values = dict(
        h2d_bytes_per_s=h2d_bps,
        launch_s=launch_s,
        host_pack_bytes_per_s=pack_bps,
        device_gather_bytes_per_s=measured["device_gather_bytes_per_s"],
    )
    zc = measured.get("_zerocopy_bytes_per_s")
    if zc:
        values["zerocopy_efficiency"] = min(1.0, zc / h2d_bps)
    model = GatherModel(**values)
    path = gather_model.default_path() if args.write_model == "auto" else Path(args.write_model)
    props = cupy.cuda.runtime.getDeviceProperties(args.device)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    gather_model.write(
        path, model, {"gpu": name, "command": "python bench/gather.py " + " ".join(sys.argv[1:])}
    )
    print(f"\nwrote {path}: `{model}`")


if __name__ == "__main__":
    sys.exit(main())
