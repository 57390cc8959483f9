"""The wheel ships every gpuload package, kernels/ as gpuload.kernels, and py.typed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(out),
                str(ROOT),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.CalledProcessError as e:
        if "No module named" in e.stderr and "setuptools" in e.stderr:
            pytest.skip(f"setuptools missing from the test environment: {e.stderr[-200:]}")
        raise
    return zipfile.ZipFile(next(out.glob("gpuload-*.whl")))


def test_every_package_is_in_the_wheel(wheel):
    names = set(wheel.namelist())
    packages = {p.parent.relative_to(ROOT) for p in (ROOT / "gpuload").rglob("__init__.py")}
    for pkg in packages:
        assert f"{pkg.as_posix()}/__init__.py" in names, f"{pkg} is missing from the wheel"
    for module in (ROOT / "kernels").glob("*.py"):
        assert f"gpuload/kernels/{module.name}" in names
    assert "gpuload/py.typed" in names
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level kernels
