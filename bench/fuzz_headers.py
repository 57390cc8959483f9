"""Fuzz whole safetensors files through ``gpuload.load_sharded``.

    python bench/fuzz_headers.py --iterations 200000            # atheris if installed
    python bench/fuzz_headers.py --seconds 300 --engine random  # plain mutation loop

Every input is written as a file and loaded (rank 0 of 1, the host backend).
The contract: a :class:`gpuload.GpuloadError` whose message names the file,
or a result equal, byte for byte, to an independent reading of the file
(``json.loads`` of the header and slicing); never another exception, never
a hang (``--timeout`` seconds per input). A breach is a *crash*: atheris
stops on it and writes the input; the random engine saves it and goes on.

Also counted, not crashes: inputs gpuload accepts that ``safetensors``
rejects ("lenient") and the reverse ("stricter"), by safetensors' message.
The summary (iterations, crashes, discrepancies) is written to
``OUT/summary.json`` every 5 s and at the end (libFuzzer ends the process
itself, so with atheris that file is the report).

Seeds: the hostile corpus (``tests/hostile/files``) and valid files of every
dtype. The engines: atheris (coverage-guided, libFuzzer; ``pip install
atheris``), else a random loop of byte flips, inserts, deletes, splices,
number rewrites and length-prefix changes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = ROOT / "tests" / "hostile" / "files"


class Fuzz:
    def __init__(self, out: Path, timeout: float) -> None:
        import numpy as np
        import safetensors

        import gpuload  # noqa: F401  - coverage-guided over gpuload's own code

        self.np, self.safetensors, self.gpuload = np, safetensors, gpuload
        self.out = out
        self.timeout = timeout
        scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        self.dir = Path(tempfile.mkdtemp(prefix="gpuload-fuzz-", dir=scratch))
        self.path = self.dir / "input.safetensors"
        self.iterations = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.lenient: collections.Counter[str] = collections.Counter()
        self.stricter: collections.Counter[str] = collections.Counter()
        self.crashes: list[dict] = []
        self.t0 = self.saved = time.perf_counter()
        self.limit = 0  # iterations asked for (0: none)

    # -- one input ---------------------------------------------------------

    def oracle(self, blob: bytes) -> dict[str, bytes] | None:
        try:
            n = struct.unpack("<Q", blob[:8])[0]
            doc = json.loads(blob[8 : 8 + n])
            return {
                k: blob[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]]
                for k, v in doc.items()
                if k != "__metadata__"
            }
        except Exception:  # noqa: BLE001 - no oracle for this input
            return None

    def check(self, blob: bytes) -> None:
        """Raise AssertionError when gpuload breaks its contract on ``blob``."""
        self.path.write_bytes(blob)
        try:
            got = self.gpuload.load_sharded(self.path, 0, 1, device="cpu", threads=1)
            err = None
        except self.gpuload.GpuloadError as e:
            got, err = None, e
        try:
            theirs = {k: bytes(v["data"]) for k, v in self.safetensors.deserialize(blob)}
            their_err = None
        except Exception as e:  # noqa: BLE001 - safetensors' verdict, compared below
            theirs, their_err = None, e
        if err is not None:
            assert str(self.path) in str(err), f"message does not name the file: {err}"
            self.outcomes[type(err).__name__] += 1
            if their_err is None:
                self.stricter[re.sub(r"\d+", "N", str(err).split(": ", 1)[-1])[:70]] += 1
            return
        self.outcomes["loaded"] += 1
        want = self.oracle(blob)
        assert want is not None, "loaded a file whose header json.loads rejects"
        assert sorted(got) == sorted(want), f"names {sorted(got)} != {sorted(want)}"
        for name, raw in want.items():
            mine = self.np.ascontiguousarray(got[name]).tobytes()
            assert mine == raw, f"{name!r}: loaded bytes differ from the file's"
        if their_err is not None:
            self.lenient[re.sub(r"\d+", "N", str(their_err))[:70]] += 1
        else:
            assert theirs == want, "safetensors and gpuload disagree on the bytes"

    def one(self, blob: bytes) -> None:
        """Run one input under the per-input timeout; count it."""
        self.iterations += 1
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            self.check(blob)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        now = time.perf_counter()
        if self.iterations == self.limit or now - self.saved > 5:
            self.save()  # libFuzzer ends the process without returning to us

    # -- reporting ---------------------------------------------------------

    def crash(self, blob: bytes, exc: BaseException) -> None:
        name = f"crash-{len(self.crashes):04d}.safetensors"
        (self.out / name).write_bytes(blob)
        self.crashes.append(
            {"input": name, "error": "".join(traceback.format_exception_only(exc)).strip()}
        )
        self.save()

    def summary(self) -> dict:
        el = time.perf_counter() - self.t0
        return {
            "iterations": self.iterations,
            "seconds": round(el, 1),
            "per_second": round(self.iterations / el, 1) if el else 0,
            "crashes": self.crashes,
            "outcomes": dict(self.outcomes.most_common()),
            "lenient_vs_safetensors": dict(self.lenient.most_common(20)),
            "stricter_than_safetensors": dict(self.stricter.most_common(20)),
        }

    def save(self) -> None:
        self.saved = time.perf_counter()
        (self.out / "summary.json").write_text(json.dumps(self.summary(), indent=1) + "\n")


def _timeout(signum, frame):
    raise TimeoutError("input took longer than --timeout: a hang")


# ---------------------------------------------------------------- seeds


def seeds() -> list[bytes]:
    import numpy as np

    from gpuload.format.dtypes import DTYPES
    from gpuload.synth import write_safetensors

    out = [p.read_bytes() for p in sorted(HOSTILE.glob("*.safetensors"))]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for i, (name, dt) in enumerate(sorted(DTYPES.items())):
            shape = (2, 8) if i % 2 else (3, 4)
            tensors = {
                "w": (name, shape, rng.bytes(2 * 8 * dt.bits // 8 if i % 2 else 12 * dt.bits // 8)),
                "b": ("F32", (3,), rng.bytes(12)),
                "s": ("U8", (), rng.bytes(1)),
            }
            p = Path(d) / "s.safetensors"
            write_safetensors(p, tensors, {"format": "pt"}, unaligned=bool(i % 3))
            out.append(p.read_bytes())
    return out


# ---------------------------------------------------------------- engines


def mutate(r: random.Random, blob: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(blob)
    for _ in range(r.choice([1, 1, 2, 3, 6])):
        op = r.randrange(9)
        if op == 0 and b:  # flip
            b[r.randrange(len(b))] = r.randrange(256)
        elif op == 1:  # insert
            i = r.randint(0, len(b))
            b[i:i] = r.randbytes(r.randint(1, 8))
        elif op == 2 and b:  # delete
            i = r.randrange(len(b))
            del b[i : i + r.randint(1, 16)]
        elif op == 3:  # splice another seed in
            other = r.choice(pool)
            i, j = r.randint(0, len(b)), r.randint(0, len(other))
            b[i:] = other[j:]
        elif op == 4:  # rewrite a number of the JSON
            nums = [m.span() for m in re.finditer(rb"-?\d+", b[8:])]
            if nums:
                lo, hi = r.choice(nums)
                v = r.choice([0, 1, -1, 2**32, 2**63, 2**64 - 1, 2**64, r.randint(-9, 300)])
                b[8 + lo : 8 + hi] = str(v).encode()
        elif op == 5:  # the length prefix
            n = len(b) - 8 if r.random() < 0.5 else r.choice([0, 1, 2**27, 2**64 - 1])
            b[:8] = struct.pack("<Q", max(0, n) % 2**64)
        elif op == 6:  # keep the prefix consistent after an edit
            b[:8] = struct.pack("<Q", max(0, b.find(b"}", 8) - 7))
        elif op == 7:  # data section grows or shrinks
            if r.random() < 0.5:
                b += r.randbytes(r.randint(1, 32))
            else:
                del b[max(0, len(b) - r.randint(1, 32)) :]
        elif op == 8:  # swap a dtype name
            m = list(re.finditer(rb'"dtype": ?"(\w+)"', b))
            if m:
                s = r.choice(m).span(1)
                b[s[0] : s[1]] = r.choice([b"BF16", b"F4", b"F6_E2M3", b"F64", b"U8", b"X"])
    return bytes(b)


def run_random(fz: Fuzz, iterations: int, seconds: float, seed: int) -> None:
    r = random.Random(seed)
    pool = seeds()
    end = time.perf_counter() + seconds if seconds else float("inf")
    i = 0
    while (iterations == 0 or i < iterations) and time.perf_counter() < end:
        i += 1
        blob = mutate(r, r.choice(pool), pool)
        try:
            fz.one(blob)
        except Exception as e:  # noqa: BLE001 - a finding: save it, go on
            fz.crash(blob, e)
            continue
        if r.random() < 0.01 and len(pool) < 5000:
            pool.append(blob)  # keep some mutants as seeds of their own


def run_atheris(fz: Fuzz, iterations: int, seconds: float, out: Path) -> None:
    import atheris

    corpus = out / "corpus"
    corpus.mkdir(exist_ok=True)
    for i, s in enumerate(seeds()):
        (corpus / f"seed-{i:04d}").write_bytes(s)

    def target(data: bytes) -> None:
        try:
            fz.one(data)
        except Exception as e:
            fz.crash(data, e)
            raise

    args = [sys.argv[0], f"-artifact_prefix={out}/", "-rss_limit_mb=4096", "-max_len=65536"]
    if iterations:
        args.append(f"-runs={iterations}")
    if seconds:
        args.append(f"-max_total_time={int(seconds)}")
    args.append(str(corpus))
    atheris.Setup(args, target)
    try:
        atheris.Fuzz()
    finally:
        fz.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="fuzz safetensors files through load_sharded")
    ap.add_argument("--iterations", type=int, default=20000, help="0: no limit")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: none)")
    ap.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per input (a hang)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/out/fuzz_headers"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "random"
        else:
            engine = "atheris"
    signal.signal(signal.SIGALRM, _timeout)
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["gpuload"]):
            pass
    fz = Fuzz(args.out, args.timeout)
    fz.limit = args.iterations
    print(f"engine: {engine}; summary in {args.out / 'summary.json'}", flush=True)
    if engine == "atheris":
        run_atheris(fz, args.iterations, args.seconds, args.out)
    else:
        run_random(fz, args.iterations, args.seconds, args.seed)
    fz.save()
    print(json.dumps({"engine": engine, **fz.summary()}, indent=1))
    return 1 if fz.crashes else 0


if __name__ == "__main__":
    os.environ.setdefault("GPULOAD_PROGRESS", "0")
    sys.exit(main())
