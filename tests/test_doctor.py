"""``gpuload doctor`` on the CPU tier: no cupy, no numba-cuda, no GPU.

Run as a user runs it, a subprocess of the ``gpuload`` module: on this
machine the CPU path works and is checked (a real load, byte-compared), the
missing GPU packages are information with their install hint, and the exit
status is 0. Asked to check the GPU path (``--gpu``, ``--arch``), they are
problems with a fix and the status is 1. (tests/realpkg runs it with the
real CUDA packages.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpuload import load as loader
from gpuload.cli import doctor
from gpuload.cli.doctor_verdict import CU, Line, bad, info, ok, settle
from gpuload.cli.main import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("cupy") is not None, reason="the CPU tier runs without cupy"
)


def _doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GPULOAD_", "NUMBA_"))}
    return subprocess.run(
        [sys.executable, "-m", "gpuload", "doctor", *args],
        capture_output=True, text=True, timeout=300, env={**clean, **env},
    )  # fmt: skip


def _rows(out: str) -> dict[str, str]:
    """name -> its status mark, for every check line of the text report."""
    return {
        ln[5:].split("  ")[0].strip(): ln[:3]
        for ln in out.splitlines()
        if ln[:3] in ("ok ", "BAD", "-- ")
    }


def _no_fix_under_a_non_problem(out: str) -> None:
    lines = out.splitlines()
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith("fix:"):
            assert lines[i - 1].startswith("BAD"), f"fix under {lines[i - 1]!r}\n{out}"


def test_doctor_on_a_cpu_machine_says_the_cpu_path_works_and_exits_0():
    p = _doctor()
    assert p.returncode == 0, p.stdout + p.stderr
    rows = _rows(p.stdout)
    assert "BAD" not in rows.values(), p.stdout
    assert "fix:" not in p.stdout
    for name in ("cupy", "numba-cuda", "gpus", "kernels", "kvikio", "pinning"):
        assert rows[name] == "-- ", (name, p.stdout)
    cupy = next(ln for ln in p.stdout.splitlines() if ln[5:].startswith("cupy "))
    assert "No module named 'cupy'" in cupy and "pip install 'gpuload[cu13]'" in cupy
    assert p.stdout.count("pip install 'gpuload[cu13]'") == 2  # the first line and the summary
    for name in ("os", "python", "ram", "settings", "numpy", "numba", "cpu load"):
        assert rows[name] == "ok ", (name, p.stdout)
    assert f"GPU path: not installed ({CU})" in p.stdout
    assert "CPU path: ok (load_sharded(device='cpu') byte-checked here" in p.stdout
    load = next(ln for ln in p.stdout.splitlines() if ln[5:].startswith("cpu load "))
    assert "at world 2: every byte matches safetensors + numpy slicing" in load
    assert p.stdout.rstrip().endswith("no problem found")


def test_asked_for_the_gpu_path_the_missing_packages_are_problems():
    p = _doctor("--gpu")
    assert p.returncode == 1, p.stdout + p.stderr
    rows = _rows(p.stdout)
    for name in ("cupy", "numba-cuda", "gpus", "kernels", "kvikio"):
        assert rows[name] == "BAD", (name, p.stdout)
    assert rows["cpu load"] == "ok "
    assert "fix: pip install 'gpuload[cu13]'" in p.stdout
    assert (
        "GPU path: not usable: 5 problem(s) (cupy, numba-cuda, gpus, kernels, kvikio)" in p.stdout
    )
    assert "CPU path: ok" in p.stdout and p.stdout.rstrip().endswith("5 problem(s) found")
    _no_fix_under_a_non_problem(p.stdout)


def test_arch_without_a_device_never_puts_a_fix_under_an_ok():
    p = _doctor("--arch", "sm_90")
    assert p.returncode == 1, p.stdout  # numba-cuda is missing: the kernels cannot build
    rows = _rows(p.stdout)
    assert rows["gpus"] == "-- " and rows["cupy"] == "BAD" and rows["kernels"] == "BAD"
    _no_fix_under_a_non_problem(p.stdout)


def test_a_line_that_is_not_a_problem_cannot_carry_a_fix():
    with pytest.raises(ValueError, match="only a problem carries a fix"):
        Line("gpus", "ok", "none visible", "check CUDA_VISIBLE_DEVICES")
    with pytest.raises(ValueError, match="only a problem carries a fix"):
        Line("torch", "info", "not installed", "pip install torch")
    assert bad("x", "broken", "do this").fix == "do this"


def test_doctor_json_schema_on_a_cpu_machine():
    p = _doctor("--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert set(doc) == {"ok", "arch", "gpu_checked", "problems", "gpu_path", "cpu_path", "checks"}
    assert doc["ok"] is True and doc["problems"] == 0 and doc["gpu_checked"] is False
    assert doc["cpu_path"]["status"] == "ok" and doc["gpu_path"]["status"] == "info"
    assert doc["gpu_path"]["value"].startswith("not installed (pip install")
    for c in doc["checks"]:
        assert set(c) == {"name", "ok", "status", "value", "fix", "path"}
        assert c["status"] in ("ok", "problem", "info") and c["path"] in ("cpu", "gpu")
        assert c["ok"] == (c["status"] == "ok") and c["fix"] is None
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["cupy"]["status"] == "info" and checks["cupy"]["path"] == "gpu"
    assert checks["cpu load"]["status"] == "ok" and checks["cpu load"]["path"] == "cpu"


def test_doctor_json_with_an_arch_and_a_bad_setting():
    p = _doctor("--json", "--arch", "sm_90", GPULOAD_THREADS="many")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert doc["ok"] is False and doc["arch"] == "sm_90" and doc["gpu_checked"] is True
    assert doc["problems"] == sum(c["status"] == "problem" for c in doc["checks"]) > 0
    for c in doc["checks"]:
        assert (c["fix"] is not None) == (c["status"] == "problem"), c  # a problem has its fix
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["settings"]["status"] == "problem"
    assert "GPULOAD_THREADS" in checks["settings"]["value"]
    assert checks["gpus"]["status"] == "info"  # with --arch a missing device is no problem
    assert checks["kernels"]["status"] == "problem"  # numba.cuda is absent here
    assert doc["cpu_path"]["status"] == "problem" and "settings" in doc["cpu_path"]["value"]


def test_a_broken_cpu_load_is_a_problem(monkeypatch, capsys):
    real = loader.load_sharded

    def off_by_one_byte(*a, **kw):
        out = real(*a, **kw)
        name = "model.layers.0.mlp.up_proj.weight"
        flipped = np.array(out[name], copy=True)
        flipped.view(np.uint8).reshape(-1)[0] ^= 1
        return {**out, name: flipped}

    monkeypatch.setattr(loader, "load_sharded", off_by_one_byte)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert _rows(out)["cpu load"] == "BAD", out
    assert "CPU path: not usable: 1 problem(s) (cpu load)" in out
    assert "model.layers.0.mlp.up_proj.weight (rank 0)" in out

    def refuses(*a, **kw):
        raise OSError("no space left on device")

    monkeypatch.setattr(loader, "load_sharded", refuses)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "probe failed: OSError: no space left on device" in out and "CPU path: not usable" in out


def test_where_a_gpu_is_visible_its_path_is_checked_without_asking(monkeypatch, capsys):
    # The driver's device nodes exist, no CUDA package is installed: the user
    # can use the GPU path here, so what it lacks is a problem.
    monkeypatch.setattr(doctor, "gpu_device_nodes", lambda: True)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert _rows(out)["cupy"] == "BAD" and "fix: pip install 'gpuload[cu13]'" in out
    assert "GPU path: not usable" in out and "CPU path: ok" in out


def test_settle_decides_by_what_the_user_can_use():
    lines = [ok("numpy", "2.0"), bad("cupy", "not usable", CU, gpu=True), info("torch", "none")]
    here = settle(lines, gpu_checked=False)
    assert here.exit_code == 0 and here.lines[1].status == "info" and CU in here.lines[1].value
    assert here.gpu_path.status == "info" and here.cpu_path.status == "problem"  # no cpu load
    lines.append(ok("cpu load", "every byte matches"))
    assert settle(lines, gpu_checked=False).cpu_path.status == "ok"
    gpu = settle(lines, gpu_checked=True)
    assert gpu.exit_code == 1 and gpu.lines[1].fix == CU and gpu.gpu_path.status == "problem"
