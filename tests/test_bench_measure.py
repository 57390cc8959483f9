"""How ``gpuload bench`` measures: contenders in turn, residency before warm
runs, the scaling table. The end-to-end run is tests/test_bench.py's smoke test."""

from __future__ import annotations

import os

import pytest

from gpuload.bench import residency, scaling
from gpuload.bench.report import Group, Row
from gpuload.bench.timing import Entry, Timing, alternate
from gpuload.memory.mapping import evict


def test_contenders_run_in_turn_with_a_rotating_order():
    calls: list[str] = []
    checked: list[object] = []

    def entry(name: str) -> Entry:
        def fn() -> str:
            calls.append(name)
            return name

        return Entry(name, 10, fn, before=lambda: f"before {name}", check=checked.append)

    timings = alternate([entry("A"), entry("B"), entry("C")], runs=3, warmup=1)
    # warm-up round, then A B C, B C A, C A B: nobody always follows the same one
    assert "".join(calls) == "ABC" + "ABC" + "BCA" + "CAB"
    assert checked == ["A", "B", "C"]  # each checked once, on its first (warm-up) result
    for t, name in zip(timings, "ABC", strict=True):
        assert isinstance(t, Timing) and t.name == name and len(t.runs) == 3
        assert t.extra["before"] == [f"before {name}"] * 4  # every run, warm-up included


def test_a_failing_contender_leaves_the_rounds_and_the_rest_go_on():
    calls: list[str] = []

    def ok() -> None:
        calls.append("ok")

    def flaky() -> None:
        calls.append("flaky")
        if calls.count("flaky") == 2:
            raise OSError("second run failed")

    def wrong_bytes(out) -> None:
        raise ValueError("mismatch")

    ok_t, flaky_t, wrong_t = alternate(
        [Entry("ok", 1, ok), Entry("flaky", 1, flaky), Entry("wrong", 1, ok, check=wrong_bytes)],
        runs=4,
        warmup=0,
    )
    assert isinstance(ok_t, Timing) and len(ok_t.runs) == 4
    assert isinstance(flaky_t, OSError) and calls.count("flaky") == 2
    assert isinstance(wrong_t, ValueError)


def test_ensure_warm_reads_missing_pages_back_and_says_so(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(os.urandom(1 << 20))
    assert residency.ensure_warm([str(f)])["resident"] >= residency.WARM
    if evict([str(f)]) > 0.5:
        pytest.skip(f"{tmp_path} keeps pages resident (tmpfs): nothing to evict")
    found = residency.ensure_warm([str(f)])
    assert found["rewarmed"] and found["found"] < residency.WARM
    assert found["resident"] >= residency.WARM
    again = residency.ensure_warm([str(f)])
    assert not again["rewarmed"] and again["found"] == again["resident"]


def test_residency_cells():
    warm = [
        {"found": 1.0, "rewarmed": False, "resident": 1.0},
        {"found": 0.4, "rewarmed": True, "resident": 0.9995},
    ]
    assert residency.summary(warm) == "≥100.0% (1 re-warmed)"  # 99.95% rounds to 100.0
    assert residency.summary([0.0, 0.015]) == "≤1.5%"
    assert residency.summary([]) == "—"


def _group(title: str, mode: str, seconds: list[float]) -> Group:
    g = Group(title, mode)
    g.rows = [
        Row(title, mode, "pread", "limit", [Timing("pread", 1, [0.001] * 3)]),
        Row(title, mode, "gpuload (posix)", "gpuload", [Timing("g", 100, seconds)]),
    ]
    return g


def test_scaling_rows_against_world_one_over_world():
    groups = [
        _group("full", "warm", [0.8, 0.8, 0.9]),
        _group("world=2, rank 0", "warm", [0.5, 0.4, 0.6]),
        _group("world=8, rank 0", "warm", [0.3, 0.3, 0.3]),
        _group("world=8, rank 0", "cold", [1.0, 1.0, 1.0]),  # no cold world-1 figure
    ]
    plans = {1: (1000, 1000), 2: (600, 500), 4: (400, 250), 8: (330, 125)}
    table = scaling.rows(groups, "full", plans)
    assert [(t["mode"], t["world"]) for t in table] == [("warm", 1), ("warm", 2), ("warm", 8)]
    w8 = table[-1]
    assert w8["ideal_s"] == pytest.approx(0.8 / 8) and w8["over_ideal"] == pytest.approx(3.0)
    assert w8["read_over_owned"] == pytest.approx(330 / 125)
    assert (w8["min_s"], w8["max_s"]) == (0.3, 0.3)
    md = scaling.markdown(table)
    assert "| warm | 8 |" in md and "3.00" in md and "2.64" in md
    assert scaling.markdown([]) == ""


def test_gpuload_variants_run_only_when_named_and_in_turn(tmp_path, capsys):
    import json

    from gpuload.cli.main import main

    out = tmp_path / "out"
    rc = main(
        ["bench", "--preset", "tiny", "--device", "cpu", "--out", str(out), "--no-plot"]
        + ["--cache-dir", str(tmp_path / "cache"), "--contenders", r"gpuload \(posix"]
        + ["--scenarios", "shard", "--modes", "warm", "--worlds", "2", "--ranks", "0"]
    )
    assert rc == 0, capsys.readouterr().out
    doc = json.loads((out / "gpuload-bench-tiny-cpu.json").read_text())
    group = next(g for g in doc["groups"] if g["title"] == "world=2, rank 0")
    names = {r["contender"] for r in group["rows"]}
    assert {
        "gpuload (posix)",
        "gpuload (posix, scatter=False)",
        "gpuload (posix, mapped_gather=False)",
        "gpuload (posix, hugepages=False)",
    } <= names
    skipped = {s["contender"]: s["reason"] for s in doc["skipped"]}
    assert "cuda variant" in skipped["gpuload (posix, gather=zerocopy)"]
