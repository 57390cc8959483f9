"""``gpuload doctor`` with the real CUDA packages installed and no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("cupy", reason="the real-package tier needs the cu13 extra")


def test_doctor_without_arch_or_gpu_says_to_name_an_arch():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPULOAD_", "NUMBA_"))}
    p = subprocess.run(
        [sys.executable, "-m", "gpuload", "doctor", "--json"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    doc = json.loads(p.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    assert p.returncode == 1
    assert not checks["gpus"]["ok"] and "CUDA_VISIBLE_DEVICES" in checks["gpus"]["fix"]
    assert "--arch sm_90" in checks["kernels"]["fix"]
    # the real packages are seen, with their versions
    for name in ("cupy", "numba-cuda", "kvikio", "cufile"):
        assert checks[name]["ok"], checks[name]
    assert (
        "compatibility mode" in checks["kvikio"]["value"]
        or "GPUDirect" in checks["kvikio"]["value"]
    )
