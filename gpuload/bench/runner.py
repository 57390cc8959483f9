"""The bench's order of work: models, limits, contenders, alternated timed runs.

What it measures and how is described in :mod:`gpuload.bench.args` (the
text of ``gpuload bench --help``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from gpuload.bench import goals as _goals
from gpuload.bench.args import _csv, add_arguments
from gpuload.bench.cold import cold_possible
from gpuload.bench.contenders import Case, Contender, Ctx, Skip, all_contenders
from gpuload.bench.gpu import Gpu, PeakMemory, probe
from gpuload.bench.limits import (
    PROBE_BYTES,
    device_timings,
    fio_available,
    fio_timing,
    pread_timing,
)
from gpuload.bench.oracle import Mismatch, Oracle
from gpuload.bench.presets import PRESETS, BenchPreset, Model
from gpuload.bench.report import Group, Row
from gpuload.bench.residency import ensure_warm
from gpuload.bench.timing import Entry, GiB, Timing, alternate
from gpuload.errors import GpuloadError
from gpuload.loader import Loader
from gpuload.memory.mapping import evict, mem_available
from gpuload.synth import cached_model

FULL, MOE = _goals.FULL, "MoE world=1, experts cpu_resident"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        gpu, why = (None, "--device cpu") if args.device == "cpu" else probe(
            "cuda:0" if args.device == "auto" else args.device
        )  # fmt: skip
        if gpu is None and args.device not in ("auto", "cpu"):
            raise GpuloadError(f"--device {args.device}: no usable CUDA device ({why})")
        self.gpu: Gpu | None = gpu
        self.device = gpu.device if gpu else "cpu"
        self.no_gpu_reason = why
        p = PRESETS[args.preset or ("12gb" if gpu else "cpu-2gb")]
        self.preset: BenchPreset = p
        self.runs = p.runs if args.runs is None else args.runs
        self.warmup = p.warmup if args.warmup is None else args.warmup
        if self.runs < 3 or self.warmup < 0:
            raise ValueError(f"--runs {self.runs} --warmup {self.warmup}: need runs >= 3")
        self.scenarios = _csv(args.scenarios, ("full", "shard", "moe"))
        self.modes = _csv(args.modes, ("warm", "cold"))
        self.worlds = [int(w) for w in _csv(args.worlds)] if args.worlds else list(p.worlds)
        self.dtype = args.dtype or p.dtype
        self.planner = Loader(device="cpu", progress=False)
        self.threads = args.threads or self.planner.config.threads
        self.groups: list[Group] = []
        self.failed: list[str] = []
        self.notes: list[str] = []
        self._cases: dict[tuple, Case] = {}
        self._limits: dict[tuple[str, str], list[Row]] = {}
        self._device_rows: list[Row] | None = None
        self.paths: dict[str, Path] = {}
        self.files: dict[str, list[str]] = {}
        self.oracles: dict[str, Oracle] = {}
        self.models: dict[str, dict] = {}
        self.skipped_everywhere: list[tuple[str, str]] = []
        self.cold_reason: dict[str, str | None] = {}
        self.fio_noted = False
        self.checked: set[tuple[str, str, int, int]] = set()  # (contender, case) byte-checked

    # -- set-up -------------------------------------------------------------

    def say(self, msg: str) -> None:
        print(msg, flush=True)

    def model(self, key: str) -> None:
        m: Model = self.preset.dense if key == "dense" else self.preset.moe
        gib = self.args.dense_gib if key == "dense" else self.args.moe_gib
        if gib is not None:
            m = Model(m.preset, gib)
        t0 = time.perf_counter()
        path = cached_model(
            m.preset, m.target_bytes, dtype=self.dtype, unaligned=self.args.unaligned,
            cache_dir=self.args.cache_dir,
        )  # fmt: skip
        files = sorted(str(f) for f in path.glob("*.safetensors"))
        self.paths[key], self.files[key], self.oracles[key] = path, files, Oracle(files)
        size = sum(Path(f).stat().st_size for f in files)
        self.models[key] = {"preset": m.preset, "path": str(path), "file_bytes": size}
        self.say(
            f"{key} model: {path} ({m.preset}, {size / GiB:.2f} GiB in {len(files)} files, "
            f"{self.dtype}; ready in {time.perf_counter() - t0:.1f} s)"
        )

    def open_contenders(self) -> list[Contender]:
        ctx = Ctx(self.device, self.threads, settings=dict(self.preset.settings))
        ctx.threads_set = bool(self.args.threads) or self.planner.config.threads_set
        if self.device == "cpu" and self.dtype not in ("F16", "F32", "F64"):
            ctx.framework = "pt"  # safetensors.numpy cannot hold bf16 / fp8
        rx = re.compile(self.args.contenders) if self.args.contenders else None
        out = []
        for c in all_contenders():
            if rx is not None and not rx.search(c.name):
                continue
            if c.opt_in and rx is None:  # a variant of gpuload's settings: asked for by name
                continue
            try:
                c.open(ctx)
            except Skip as e:
                self.skipped_everywhere.append((c.name, str(e)))
                self.say(f"skip {c.name}: {e}")
                continue
            out.append(c)
        return out

    def case(self, scenario: str, key: str, rank: int, world: int) -> Case:
        k = (scenario, key, rank, world)
        if k not in self._cases:
            lp = self.planner.plan(
                self.paths[key], rank, world, cpu_resident=True if scenario == "moe" else None
            )
            sels = {t.name: t.selection for t in lp.plan.tensors} | dict(lp.resident)
            o = self.oracles[key]
            self._cases[k] = Case(
                scenario, str(self.paths[key]), tuple(self.files[key]), rank, world, sels,
                frozenset(lp.resident), sum(o.nbytes_of(n, s) for n, s in sels.items()),
            )  # fmt: skip
        return self._cases[k]

    # -- limits -------------------------------------------------------------

    def device_limits(self) -> list[Row]:
        """H2D and D2D, measured once (the cache does not matter to them)."""
        if self._device_rows is None:
            self._device_rows = []
            if self.gpu is not None:
                for t in device_timings(self.gpu, self.runs, self.warmup, PROBE_BYTES):
                    self._device_rows.append(Row("", "", t.name, "limit", [t], note=t.note))
                self.gpu.release()
        return self._device_rows

    def read_limits(self, key: str, mode: str) -> list[Row]:
        if (key, mode) in self._limits:
            return self._limits[(key, mode)]
        files, cold = self.files[key], mode == "cold"
        total = sum(Path(f).stat().st_size for f in files)
        before = (lambda: evict(files)) if cold else (lambda: ensure_warm(files))
        n, w, th = self.runs, self.warmup, self.threads
        ts = [pread_timing(files, th, n, w, before=before, pinned=self.gpu)]
        if self.gpu is None and not cold and 2 * total < mem_available():
            ts.append(pread_timing(files, th, n, w, before=before, fresh=True))
        why = fio_available()
        if why is None:
            try:
                ts.append(fio_timing(files, th, n, w, cold=cold))
            except (OSError, ValueError, KeyError) as e:  # a failed fio is a note, not a crash
                self.notes.append(f"fio limit ({key}, {mode}) failed: {e}")
        elif not self.fio_noted:
            self.fio_noted = True
            self.notes.append(f"fio limit skipped: {why}")
        rows = [Row("", mode, t.name, "limit", [t], note=t.note) for t in ts]
        self._limits[(key, mode)] = rows
        return rows

    # -- scenarios ----------------------------------------------------------

    def group(self, title: str, mode: str, limits: list[Row], primary: str | None) -> Group:
        g = Group(title, mode)
        names = [r.name for r in limits]
        g.limit = primary if primary in names else (names[0] if names else None)
        g.rows = [Row(title, mode, r.name, r.kind, r.timings, r.note) for r in limits]
        self.groups.append(g)
        return g

    def time_contenders(
        self, contenders: list[Contender], cases: list[Case], mode: str
    ) -> dict[str, tuple[list[Timing], int | None] | Exception]:
        """Time every contender on each case (one rank each), in turn (A B A B);
        the first and last case checked. Per contender: (timings, device peak)
        or the exception that stopped it."""
        cold, sync = mode == "cold", self.gpu.sync if self.gpu else None
        out: dict[str, tuple[list[Timing], int | None] | Exception] = {
            c.name: ([], None) for c in contenders
        }
        for i, case in enumerate(cases):
            alive = [c for c in contenders if not isinstance(out[c.name], Exception)]
            entries = [self._entry(c, case, i, len(cases), cold, sync) for c in alive]
            warm = self.warmup if i == 0 else 0  # later ranks reuse the warmed loaders
            try:
                results = alternate(entries, self.runs, warm)
            finally:
                if self.gpu is not None:
                    self.gpu.release()
            for c, t in zip(alive, results, strict=True):
                if isinstance(t, Exception):
                    out[c.name] = t
                    continue
                timings, peak = out[c.name]  # type: ignore[misc]
                t.extra["rank"], t.extra["world"] = case.rank, case.world
                timings.append(t)
                if "peak" in t.extra:
                    peak = max(peak or 0, t.extra.pop("peak"))
                out[c.name] = (timings, peak)
        return out

    def _entry(self, c: Contender, case: Case, i: int, n: int, cold: bool, sync) -> Entry:
        files = case.files
        before = (lambda: evict(files)) if cold else (lambda: ensure_warm(files))
        oracle = self.oracles["moe" if case.scenario == "moe" else "dense"]
        check, key = None, (c.name, case.scenario, case.rank, case.world)
        if i in (0, n - 1) and key not in self.checked:  # once per case

            def check(out, s=case.selections, o=oracle, key=key) -> None:
                o.check(out, s)  # raises Mismatch: then checked again next time
                self.checked.add(key)

        gpu = self.gpu
        wrap = (lambda: PeakMemory(gpu)) if gpu is not None and not cold else None
        return Entry(
            c.name, case.nbytes, lambda: c.load(case), before=before, check=check, sync=sync,
            wrap=wrap,
        )  # fmt: skip

    def contender_rows(
        self,
        c: Contender,
        result: tuple[list[Timing], int | None] | Exception,
        mode: str,
        groups: list[Group],
    ) -> None:
        """Add ``c``'s row to ``groups[0]`` (rank 0) and, when given,
        ``groups[1]`` (the mean over every rank); a failure is noted in both."""
        if isinstance(result, Exception):  # a crashing or wrong peer is reported, never fatal
            e = result
            wrong = isinstance(e, Mismatch)
            why = f"FAILED the byte check: {e}" if wrong else f"error: {type(e).__name__}: {e}"
            for g in groups:
                g.skipped.append((c.name, why))
            if wrong or c.kind == "gpuload":
                self.failed.append(f"{c.name} in {groups[0].title} ({mode}): {why}")
            self.say(f"  {c.name}: {why}")
            return
        timings, peak = result
        for g, ts in zip(groups, (timings[:1], timings), strict=False):
            row = Row(g.title, mode, c.name, c.kind, ts, c.api, peak)
            g.rows.append(row)
            peak_s = f", device peak {peak / GiB:.2f} GiB" if peak else ""
            self.say(f"  {g.title}: {c.name}: {row.seconds:.3f} s, {row.gib_s:.2f} GiB/s{peak_s}")

    def scenario(self, scenario: str, mode: str, contenders: list[Contender]) -> None:
        key = "moe" if scenario == "moe" else "dense"
        if mode == "cold" and self.cold_reason.get(key):
            self.notes.append(f"{scenario}, cold: {self.cold_reason[key]}")
            return
        limits = self.read_limits(key, mode)
        dev = self.device_limits()
        h2d = [r for r in dev if r.name == "H2D pinned"]
        d2d = [r for r in dev if r.name == "D2D copy"]
        read = limits[0].name
        if mode == "cold":  # storage-bound: fio when there is one
            primary, extra = ("fio" if any(r.name == "fio" for r in limits) else read), h2d
        elif scenario == "moe":  # mostly host-bound: the experts stay in RAM
            primary, extra = read, h2d
        else:
            primary = h2d[0].name if h2d else read
            extra = h2d + (d2d if scenario == "full" else [])
        if scenario == "full":
            plan = [(FULL, None, [(0, 1)])]
        elif scenario == "moe":
            plan = [(MOE, None, [(0, 1)])]
        else:
            plan = []
            for w in self.worlds:
                every = mode == "warm" and self.args.ranks == "all" and w > 1
                mean = f"world={w}, mean over ranks" if every else None
                plan.append(
                    (f"world={w}, rank 0", mean, [(r, w) for r in range(w if every else 1)])
                )
        for title, mean_title, ranks in plan:
            shown = extra + (limits if title in (FULL, MOE) or mode == "cold" else limits[:1])
            groups = [self.group(title, mode, shown, primary)]
            if mean_title:
                groups.append(self.group(mean_title, mode, shown, primary))
            self.say(f"{title} — {mode}:")
            runnable = []
            for c in contenders:
                why = c.why_not(scenario)
                if why:
                    for g in groups:
                        g.skipped.append((c.name, why))
                    continue
                runnable.append(c)
            cases = [self.case(scenario, key, r, w) for r, w in ranks]
            results = self.time_contenders(runnable, cases, mode)
            for c in runnable:
                self.contender_rows(c, results[c.name], mode, groups)

    # -- the whole run --------------------------------------------------------

    def run(self) -> int:
        p = self.preset
        self.say(
            f"gpuload bench: preset {p.name} ({p.about}); device {self.device}"
            + ("" if self.gpu else f" (no GPU: {self.no_gpu_reason})")
            + f"; {self.runs} runs after {self.warmup} warm-up; {self.threads} threads"
        )
        if p.device == "cuda" and self.gpu is None:
            self.notes.append(f"preset {p.name} is meant for a GPU; ran on the CPU")
        keys = ["dense"] if {"full", "shard"} & set(self.scenarios) else []
        keys += ["moe"] if "moe" in self.scenarios else []
        for k in keys:
            self.model(k)
        need = sum(m["file_bytes"] for m in self.models.values())
        if "warm" in self.modes and need > 0.8 * mem_available():
            self.notes.append(
                f"the models' files ({need / GiB:.1f} GiB) exceed 80% of available RAM "
                f"({mem_available() / GiB:.1f} GiB): warm runs partly read storage"
            )
        self.cold_reason = (
            {k: cold_possible(self.files[k]) for k in keys} if "cold" in self.modes else {}
        )
        contenders = self.open_contenders()
        try:
            for mode in self.modes:
                for s in self.scenarios:
                    self.scenario(s, mode, contenders)
        finally:
            for c in contenders:
                c.close()
        return self.write()

    def scaling_plans(self) -> dict[int, tuple[int, int]]:
        """World -> (bytes read, bytes owned) by rank 0 of the dense model, as
        gpuload plans it with the preset's settings."""
        if "dense" not in self.paths:
            return {}
        cfg = {k: v for k, v in self.preset.settings.items() if hasattr(self.planner.config, k)}
        with Loader(device="cpu", progress=False, threads=self.threads, **cfg) as planner:
            out = {}
            for w in sorted({1, *self.worlds}):
                plan = planner.plan(self.paths["dense"], 0, w).plan
                out[w] = (plan.bytes_read, plan.bytes_useful)
        return out

    def write(self) -> int:
        from gpuload.bench.output import write_outputs

        return write_outputs(self)


def run(args: argparse.Namespace) -> int:
    if args.clear_cache:
        from gpuload.synth import clear_cache, default_cache_dir

        n, freed = clear_cache(args.cache_dir)
        where = args.cache_dir or default_cache_dir()
        print(f"gpuload bench: removed {n} cached model(s), {freed / GiB:.2f} GiB, from {where}")
        return 0
    return Bench(args).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpuload bench")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (GpuloadError, ValueError, FileNotFoundError) as e:
        print(f"gpuload bench: error: {e}", file=sys.stderr)
        return 2
