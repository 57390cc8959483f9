"""The ``gpuload`` command line: inspect, plan, demo, bench, doctor.

Human tables by default, ``--json`` for machines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from gpuload import __version__
from gpuload import config as _config
from gpuload.errors import GpuloadError
from gpuload.loader import Loader, touched_bytes
from gpuload.read.open import open_checkpoint

DESCRIPTION = (
    "Load safetensors checkpoints cut into one tensor-parallel rank's shard. "
    "Human tables by default, --json for machines."
)


def _alignment(offset: int) -> int:
    """Largest power of two (up to 4096) dividing an absolute file offset."""
    a = 1
    while a < 4096 and offset % (a * 2) == 0:
        a *= 2
    return a


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    ck = open_checkpoint(args.path)
    files = [
        {
            "path": f.path,
            "size": f.size,
            "header_bytes": f.header_len,
            "tensors": len(f.tensors),
            "metadata": f.metadata,
        }
        for f in ck.files
    ]
    tensors = [
        {
            "name": t.name,
            "dtype": t.dtype.name,
            "shape": list(t.shape),
            "bytes": t.nbytes,
            "file": Path(t.file).name,
            "offset": t.start,
            "alignment": _alignment(t.start),
        }
        for t in ck.tensors.values()
    ]
    if args.json:
        print(json.dumps({"files": files, "tensors": tensors, "config": ck.config}, indent=2))
        return 0
    for f in files:
        print(
            f"{f['path']}: {f['size']:,} bytes, header {f['header_bytes']:,} bytes, "
            f"{f['tensors']} tensors, metadata {f['metadata']}"
        )
    rows = [
        [
            t["name"],
            t["dtype"],
            "x".join(map(str, t["shape"])) or "()",
            f"{t['bytes']:,}",
            t["file"],
            t["offset"],
            t["alignment"],
        ]
        for t in tensors
    ]
    print(_table(rows, ["tensor", "dtype", "shape", "bytes", "file", "offset", "align"]))
    print(f"{len(tensors)} tensors, {sum(t['bytes'] for t in tensors):,} bytes of data")
    return 0


def _sharding_kwargs(args: argparse.Namespace) -> dict:
    kw = {"expert_parallel": args.expert_parallel, "allow_uneven": args.allow_uneven}
    for name in ("num_heads", "num_kv_heads", "num_experts", "qkv_sections", "cpu_resident"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    return kw


def cmd_plan(args: argparse.Namespace) -> int:
    settings = {"chunk_bytes": args.chunk_bytes} if args.chunk_bytes else {}
    loader = Loader(device="cpu", **settings)
    lp = loader.plan(
        args.path, args.rank, args.world, include=args.include, **_sharding_kwargs(args)
    )
    plan = lp.plan
    per = {t.name: 0 for t in plan.tensors}
    reads = {t.name: 0 for t in plan.tensors}
    for op in plan.ops:
        for p in op.pieces:
            per[p.tensor] += p.nbytes
        names = {p.tensor for p in op.pieces}
        for n in names:  # a shared read is charged to each tensor in it once
            reads[n] += 1
    file_bytes = touched_bytes(lp.checkpoint, plan, lp.resident)
    tensors = [
        {
            "name": t.name,
            "split": t.selection.kind,
            "dim": t.selection.dim,
            "rule": t.selection.rule,
            "strategy": t.strategy,
            "shape": list(t.selection.shape),
            "rank_bytes": t.out_nbytes,
            "tensor_bytes": t.info.nbytes,
            "reads": reads[t.name],
        }
        for t in plan.tensors
    ]
    summary = {
        "rank": args.rank,
        "world": args.world,
        "file_bytes": file_bytes,
        "bytes_read": plan.bytes_read,
        "bytes_useful": plan.bytes_useful,
        "bytes_wasted": plan.bytes_wasted,
        "bytes_gap": plan.bytes_gap,
        "cpu_resident": sorted(lp.resident),
        "read_ops": len(plan.ops),
        "staged_ops": sum(op.staged for op in plan.ops),
        "unknown": list(lp.unknown),
        "skipped": list(lp.skipped),
    }
    ops = [
        {
            "file": Path(op.file).name,
            "offset": op.offset,
            "length": op.length,
            "staged": op.staged,
            "pieces": len(op.pieces),
        }
        for op in plan.ops
    ]
    if args.json:
        print(json.dumps({"summary": summary, "tensors": tensors, "ops": ops}, indent=2))
        return 0
    rows = [
        [
            t["name"],
            t["split"],
            "-" if t["dim"] is None else t["dim"],
            t["strategy"],
            "x".join(map(str, t["shape"])) or "()",
            f"{t['rank_bytes']:,}",
            f"{t['tensor_bytes']:,}",
            t["reads"],
        ]
        for t in tensors
    ]
    print(
        _table(
            rows,
            [
                "tensor",
                "split",
                "dim",
                "strategy",
                "rank shape",
                "rank bytes",
                "tensor bytes",
                "reads",
            ],
        )
    )
    pct = 100 * plan.bytes_read / file_bytes if file_bytes else 0.0
    print(
        f"\nrank {args.rank}/{args.world}: reads {plan.bytes_read:,} of {file_bytes:,} bytes "
        f"({pct:.1f}%), {plan.bytes_wasted:,} wasted, in {len(plan.ops)} reads "
        f"({summary['staged_ops']} staged)"
    )
    if lp.unknown:
        print(f"unknown tensors, replicated: {', '.join(lp.unknown)}")
    if lp.skipped:
        print(f"not owned by this rank: {len(lp.skipped)} tensors")
    if lp.resident:
        print(f"cpu_resident (mapped, not read): {len(lp.resident)} tensors")
    if args.ops:
        print()
        print(
            _table(
                [
                    [o["file"], o["offset"], f"{o['length']:,}", o["staged"], o["pieces"]]
                    for o in ops
                ],
                ["file", "offset", "length", "staged", "pieces"],
            )
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gpuload.cli.demo import run_demo

    with tempfile.TemporaryDirectory(prefix="gpuload-demo-") as tmp:
        ok = run_demo(Path(args.dir or tmp), device=args.device, world=args.world)
    return 0 if ok else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from gpuload.cli import doctor

    rep = doctor.run(arch=args.arch, gpu=args.gpu)
    print(json.dumps(rep.as_json(), indent=2) if args.json else rep.text())
    return rep.exit_code


def cmd_bench(args: argparse.Namespace) -> int:
    from gpuload.bench import run

    return run(args)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is less than {low}")
        return n

    parse.__name__ = f"int >= {low}"
    return parse


def _sections(text: str) -> tuple[int, int, int]:
    try:
        q, k, v = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not Q,K,V (three integers)") from None
    return q, k, v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpuload", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"gpuload {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("inspect", help="tensors, dtypes, shapes, bytes, alignment, metadata")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("plan", help="per-tensor split and the reads one rank would do")
    s.add_argument("path")
    s.add_argument("--rank", type=_int_at_least(0), required=True)
    s.add_argument("--world", type=_int_at_least(1), required=True)
    s.add_argument("--include", help="regex: plan only matching tensors")
    s.add_argument("--expert-parallel", action="store_true")
    s.add_argument("--allow-uneven", action="store_true")
    s.add_argument("--num-heads", type=_int_at_least(1))
    s.add_argument("--num-kv-heads", type=_int_at_least(1))
    s.add_argument("--num-experts", type=_int_at_least(1), help="routed experts (no config.json)")
    s.add_argument("--qkv-sections", type=_sections, help="fused q,k,v sizes, e.g. 512,128,128")
    s.add_argument(
        "--cpu-resident",
        nargs="?",
        const=True,
        metavar="REGEX",
        help="tensors kept in host memory, mapped not read (no REGEX: routed experts)",
    )
    s.add_argument("--chunk-bytes", help="cap on one read, e.g. 64MiB")
    s.add_argument("--ops", action="store_true", help="also list every read op")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("demo", help="write a small checkpoint, load every rank, check bytes")
    s.add_argument("--device", default=None, help="cpu or cuda:N (default: best available)")
    s.add_argument("--world", type=_int_at_least(1), default=2)
    s.add_argument("--dir", help="write the checkpoint here instead of a temp dir")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser(
        "doctor",
        help="check what works here: the CPU path, and the GPU path's packages and devices",
    )
    s.add_argument(
        "--arch", help="compile and link the kernels for this architecture (e.g. sm_90), no GPU"
    )
    s.add_argument(
        "--gpu",
        action="store_true",
        help="check the GPU path even where no GPU is visible (its failures are problems)",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_doctor, reports_env=True)  # a bad flag is one of its findings

    from gpuload.bench import add_arguments  # argparse only: the bench imports nothing heavy

    s = sub.add_parser("bench", help="gpuload vs peers and the hardware limits, in one run")
    add_arguments(s)
    s.set_defaults(fn=cmd_bench)
    return p


def _flags(parser: argparse.ArgumentParser, cmd: str) -> dict[str, argparse.Action]:
    """The command's options by the keyword they stand for (``allow_uneven``)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[cmd]._actions if a.option_strings}


def say_as_flags(e: Exception, flags: dict[str, argparse.Action]) -> str:
    """The error's message, with the keyword arguments it names
    (:attr:`GpuloadError.keywords`) spelled as this command's flags:
    ``allow_uneven=True`` -> ``--allow-uneven``, ``num_heads=`` -> ``--num-heads``."""
    text = str(e)
    for kw in getattr(e, "keywords", ()):
        name, _, value = kw.partition("=")
        action = flags.get(name)
        if action is None:  # no flag for it: the keyword is still the truth
            continue
        flag = max(action.option_strings, key=len)
        said = flag if action.nargs == 0 or not value else f"{flag} {value}"
        text = re.sub(rf"(?<![\w-]){re.escape(kw)}", lambda _m, said=said: said, text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not getattr(args, "reports_env", False):
            _config.get()  # every GPULOAD_* flag, checked before the command runs
        rc = args.fn(args)
        sys.stdout.flush()  # inside the try: a closed pipe raises here, not at exit
        return rc
    except (GpuloadError, FileNotFoundError, ValueError) as e:
        print(f"gpuload: error: {say_as_flags(e, _flags(parser, args.cmd))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `gpuload inspect m | head`: the reader left. Quiet, like a tool
        # killed by SIGPIPE; stdout goes to /dev/null so the exit flush
        # cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
