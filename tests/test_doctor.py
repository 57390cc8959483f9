"""``gpuload doctor`` on the CPU tier: no cupy, no numba-cuda, no GPU.

Run as a user runs it, a subprocess of the ``gpuload`` module: the missing GPU
packages must be problems with a fix, the exit status non-zero, and --json a
document of that shape. (tests/realpkg runs it with the real CUDA packages.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("cupy") is not None, reason="the CPU tier runs without cupy"
)


def _doctor(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPULOAD_", "NUMBA_"))}
    return subprocess.run(
        [sys.executable, "-m", "gpuload", "doctor", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def test_doctor_names_the_missing_gpu_packages_and_fails():
    p = _doctor()
    assert p.returncode == 1, p.stdout + p.stderr
    bad = [ln for ln in p.stdout.splitlines() if ln.startswith("BAD")]
    assert any(" cupy " in ln and "No module named 'cupy'" in ln for ln in bad), p.stdout
    assert any(" numba-cuda " in ln for ln in bad), p.stdout
    assert "fix: pip install 'gpuload[cu13]'" in p.stdout
    assert p.stdout.rstrip().endswith("problem(s) found")
    for name in ("os", "python", "ram", "settings", "numpy", "numba", "torch", "kvikio"):
        assert any(
            ln[5:].split()[0] == name for ln in p.stdout.splitlines() if ln[:3] in ("ok ", "BAD")
        ), name


def test_doctor_json_schema_and_a_bad_setting():
    p = _doctor("--json", "--arch", "sm_90")
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert set(doc) == {"ok", "arch", "problems", "checks"}
    assert doc["ok"] is False and doc["arch"] == "sm_90"
    assert doc["problems"] == sum(not c["ok"] for c in doc["checks"]) > 0
    for c in doc["checks"]:
        assert set(c) == {"name", "ok", "value", "fix"}
        assert isinstance(c["ok"], bool) and isinstance(c["value"], str)
        assert c["ok"] or c["fix"], c  # every problem comes with its fix
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["settings"]["ok"] and "threads=8" in checks["settings"]["value"]
    # A probe that fails is a problem line, not a crash (numba.cuda is absent here).
    assert not checks["kernels"]["ok"], checks["kernels"]


def test_doctor_reports_a_bad_environment_flag():
    env_bad = {**os.environ, "GPULOAD_THREADS": "many"}
    p = subprocess.run(
        [sys.executable, "-m", "gpuload", "doctor", "--json"],
        capture_output=True, text=True, timeout=300, env=env_bad,
    )  # fmt: skip
    checks = {c["name"]: c for c in json.loads(p.stdout)["checks"]}
    assert not checks["settings"]["ok"] and "GPULOAD_THREADS" in checks["settings"]["value"]
