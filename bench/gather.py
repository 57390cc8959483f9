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

    python bench/gather.py [--mib 256] [--reps 20] [--device 0]

Prints a Markdown table with the GPU's name, the driver and CUDA runtime
versions and the command. Without a usable GPU it says why and exits 0.
No cupy kernel is compiled (copies and memcpys only), so NVRTC is not needed.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

SEGMENTS = (64, 256, 1024, 4096, 16384, 65536)


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
    args = ap.parse_args(argv)
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() <= args.device:
            raise RuntimeError(f"no CUDA device {args.device}")
    except Exception as e:  # ImportError, CUDARuntimeError: nothing to measure here
        print(f"bench/gather.py: no usable GPU, nothing measured ({type(e).__name__}: {e})")
        return 0
    from gpuload.kernels import gather_host
    from gpuload.kernels.cuda import gather, word_size

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
