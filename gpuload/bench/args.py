"""``gpuload bench``: gpuload against its peers and the hardware limits, in one run.

Scenarios, each warm (page cache) and cold (pages evicted before every run):

* ``full``: the dense model, world=1;
* ``shard``: the dense model at each world size, rank 0, and (warm) the mean
  over all ranks; cold runs take rank 0 only, since every cold run rereads
  from storage;
* ``moe``: the MoE model at world=1 with routed experts ``cpu_resident``.

Every contender's output is checked against the files (sampled for big
models) before it is timed. Figures are the median of ``--runs`` (>= 3)
after a warm-up, with the spread. Contenders run in turn (A B C A B C, the
order rotating each round: ``timing.alternate``), and before every warm run
the files' residency is checked with ``mincore`` and restored if pages went
missing (``residency.ensure_warm``); each run's finding is recorded. Outputs:
a Markdown table, a JSON record of every raw run and the machine, a PNG
plot, and the scaling table (``scaling``) with its own plot.
"""

# This docstring is the text of ``gpuload bench --help``. This module holds the
# command line and the command that reproduces a run; gpuload.bench.runner does
# the work.

from __future__ import annotations

import argparse
import shlex

from gpuload.bench.presets import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's options, on ``p`` (``gpuload bench`` and ``bench/run.py``)."""
    p.description = p.description or __doc__.replace("``", "")  # --help is plain text
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: 12gb on a GPU, else cpu-2gb")
    p.add_argument("--device", default="auto", help="auto (a GPU when usable), cpu, cuda[:N]")
    p.add_argument("--runs", type=int, help="timed runs per figure, >= 3 (default: preset's)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default: preset's)")
    p.add_argument("--scenarios", default="full,shard,moe", help="comma list of full,shard,moe")
    p.add_argument("--modes", default="warm,cold", help="comma list of warm,cold")
    p.add_argument("--worlds", help="shard world sizes, comma list (default: 2,4,8)")
    p.add_argument(
        "--ranks", choices=("all", "0"), default="all",
        help="shard: 'all' also times every rank for the mean (warm); '0': rank 0 only",
    )  # fmt: skip
    p.add_argument("--contenders", help="regex: run only contenders whose name matches")
    p.add_argument("--threads", type=int, help="reader threads (gpuload and the pread limit)")
    p.add_argument("--dense-gib", type=float, help="override the preset's dense model size")
    p.add_argument("--moe-gib", type=float, help="override the preset's MoE model size")
    p.add_argument("--dtype", help="override the preset's dtype (BF16, F16, ...)")
    p.add_argument("--unaligned", action="store_true", help="odd tensor offsets in the files")
    p.add_argument("--cache-dir", help="synthetic model cache (default ~/.cache/gpuload/synth)")
    p.add_argument(
        "--clear-cache", action="store_true",
        help="delete the cached synthetic models (of --cache-dir) and exit",
    )  # fmt: skip
    p.add_argument("--out", default=".", help="directory for the .md, .json and .png")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def _csv(s: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if allowed and x not in allowed]
    if bad or not items:
        raise ValueError(f"{s!r}: expected a comma list of {', '.join(allowed or ('values',))}")
    return items


def command(args: argparse.Namespace) -> str:
    """The run's command line, every option spelled out (reproducible)."""
    parts = ["gpuload", "bench"]
    for k, v in sorted(vars(args).items()):
        if k in ("fn", "cmd") or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts += [flag] if v is True else [flag, str(v)]
    return shlex.join(parts)
