"""``bench/gpu/session.sh all`` on a CPU machine, run as on the lent GPU machine.

There gpuload is not installed: the script lays it out in a folder of its
own. An editable install here would hide import-path bugs (run from the
repository root, ./gpuload, which has no kernels/, once shadowed that copy
and the gpu tier collected nothing but errors), so the script runs under a
``python3`` that sees this venv's packages but not the editable gpuload:
``-S`` skips the .pth files that install it, PYTHONPATH adds site-packages.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bare_python(tmp_path):
    """A bin/ whose python3 has numpy, numba, torch, pytest but not gpuload."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    site = sysconfig.get_paths()["purelib"]
    wrapper = bindir / "python3"
    path = f'PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}"'
    wrapper.write_text(f'#!/bin/sh\n{path} exec {sys.executable} -S "$@"\n')
    wrapper.chmod(0o755)
    return bindir


def test_session_all_runs_the_gpu_tier_without_gpuload_installed(tmp_path, bare_python):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("GPULOAD_", "NUMBA_", "PYTHON"))
    }
    env |= {"PATH": f"{bare_python}:{env['PATH']}", "OUT": str(tmp_path / "out")}
    env["SESSION_DIR"] = str(tmp_path / "gl")
    env["SESSION_WHEELS"] = str(tmp_path)  # none: .whl/ holds Python 3.12 wheels
    probe = subprocess.run(
        ["python3", "-c", "import numpy, numba, pytest, torch; import gpuload"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert "No module named 'gpuload'" in probe.stderr, probe.stderr  # really not installed

    p = subprocess.run(
        ["bash", str(ROOT / "bench/gpu/session.sh"), "all"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    out = tmp_path / "out"
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert len(list(out.iterdir())) <= 8, sorted(x.name for x in out.iterdir())

    tests = (out / "gpu-tests.txt").read_text()
    summary = tests.strip().splitlines()[-1]
    assert "error" not in summary.lower() and "ModuleNotFoundError" not in tests, tests[-3000:]
    skipped = re.search(r"(\d+) skipped", summary)
    assert skipped and int(skipped.group(1)) > 0, summary
    assert "no CUDA device" in tests, tests[-3000:]  # skipped for want of a device

    assert "problem(s) found" in (out / "doctor.txt").read_text()
    assert "no usable GPU" in (out / "gather.md").read_text()
    assert "no usable GPU" in (out / "ab.md").read_text()  # the A/B runs: skipped here
    for mode in ("strategies", "warm", "cold"):
        assert "skipped" in (out / mode / "bench.txt").read_text()
    machine = (out / "machine.txt").read_text()
    assert f"gpuload 0.1.0 {tmp_path / 'gl'}" in machine, machine  # the laid-out copy ran
