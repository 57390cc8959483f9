"""``gpuload doctor`` with the real CUDA packages installed and no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("cupy", reason="the real-package tier needs the cu13 extra")


def _doctor(*args: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPULOAD_", "NUMBA_"))}
    p = subprocess.run(
        [sys.executable, "-m", "gpuload", "doctor", "--json", *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    doc = json.loads(p.stdout)
    return p, doc, {c["name"]: c for c in doc["checks"]}


def test_doctor_without_arch_or_gpu_says_to_name_an_arch():
    # No GPU here and none asked for: the missing device is information.
    p, doc, checks = _doctor()
    assert p.returncode == 0 and doc["cpu_path"]["status"] == "ok", p.stdout
    assert doc["gpu_path"]["value"].startswith("installed, no GPU visible here"), doc["gpu_path"]
    assert checks["gpus"]["status"] == "info" and "CUDA_VISIBLE_DEVICES" in checks["gpus"]["value"]
    assert "--arch sm_90" in checks["kernels"]["value"]
    # Asked to check the GPU path: problems, with their fixes.
    p, doc, checks = _doctor("--gpu")
    assert p.returncode == 1 and doc["gpu_path"]["status"] == "problem"
    assert checks["gpus"]["status"] == "problem"
    assert "CUDA_VISIBLE_DEVICES" in checks["gpus"]["fix"]
    assert "--arch sm_90" in checks["kernels"]["fix"]
    # the real packages are seen, with their versions
    for name in ("cupy", "numba-cuda", "kvikio", "cufile"):
        assert checks[name]["ok"], checks[name]
    assert (
        "compatibility mode" in checks["kvikio"]["value"]
        or "GPUDirect" in checks["kvikio"]["value"]
    )
