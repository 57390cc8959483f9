"""Column shards on the CPU, warm: the mapped gather against the covering read.

For each model shape, world and column-sharded tensor family, rank 0 loads
only those tensors with ``mapped_gather`` on and off, in turn (A B, B A,
...), each run from fresh memory (``malloc_trim``) with the page cache
checked warm (``mincore``). This is what sets ``MAPPED_MIN_GAP`` in
gpuload/host/pipeline.py: the bytes a covering read skips per row (the row
less its owned segment) from which copying the owned segments out of the
page cache (process_vm_readv, about a microsecond per row) beats reading
whole rows.

Note: the pipeline only maps ops that skip at least ``MAPPED_MIN_GAP`` bytes
a row, so the others take the covering read either way; pass
``--min-gap 0`` to time the mapped path everywhere.

    python bench/mapped_gather.py [--runs 9] [--min-gap BYTES] [--worlds 8 4 2]
"""

from __future__ import annotations

import argparse
import sys

import gpuload
from gpuload import synth
from gpuload.bench.limits import release_freed
from gpuload.bench.residency import ensure_warm
from gpuload.bench.timing import Entry, alternate
from gpuload.host import pipeline
from gpuload.synth.models import ModelSpec

SHAPES = {
    "llama scaled to 1 GiB (hidden 2048)": ("llama", 1 << 30),
    "Llama-3-8B layers x2 (hidden 4096)": (
        ModelSpec("llama", 4096, 32, 8, 128, 14336, 4096, 2),
        None,
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--min-gap", type=int, default=None, help="override MAPPED_MIN_GAP")
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 4, 2])
    args = ap.parse_args()
    if args.min_gap is not None:
        pipeline.MAPPED_MIN_GAP = args.min_gap
    print(f"command: `python bench/mapped_gather.py {' '.join(sys.argv[1:])}`\n")
    print(
        "| model | world | tensors | row bytes | gap a row | mapped s (min-max) "
        "| covering s (min-max) | covering / mapped |"
    )
    print("|---|---:|---|---:|---:|---|---|---:|")
    for label, (preset, size) in SHAPES.items():
        ckpt = gpuload.open_checkpoint(synth.cached_model(preset, size, dtype="F16"))
        files = [f.path for f in ckpt.files]

        def before(files=files):
            release_freed()
            return ensure_warm(files)

        loaders = [gpuload.Loader(device="cpu", progress=False, mapped_gather=m) for m in (1, 0)]
        for world in args.worlds:
            for family in ("o_proj", "down_proj"):
                entries = [
                    Entry(
                        f"{m}",
                        0,
                        lambda ld=ld, c=ckpt, w=world, f=family: ld.load(c, 0, w, include=f),
                        before=before,
                    )
                    for m, ld in zip(("mapped", "covering"), loaders, strict=True)
                ]
                mapped, covering = alternate(entries, args.runs)
                info = ckpt.tensors[next(n for n in ckpt.tensors if family in n)]
                row = info.shape[1] * info.dtype.bits // 8
                print(
                    f"| {label} | {world} | {family} | {row} | {row - row // world} "
                    f"| {mapped.median:.4f} ({mapped.spread}) "
                    f"| {covering.median:.4f} ({covering.spread}) "
                    f"| {covering.median / mapped.median:.2f} |"
                )


if __name__ == "__main__":
    main()
