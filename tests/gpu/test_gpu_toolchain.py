"""GPU tier: making a GPU Loader compiles, links and loads every gather kernel.

Skipped only when no CUDA device is present (as tests/gpu/test_gpu_load.py).
"""

from __future__ import annotations

import pytest
from test_gpu_load import cupy  # noqa: F401  (the fixture: skip, or fail on a broken GPU)

import gpuload
from gpuload.kernels import toolchain

pytestmark = pytest.mark.gpu


def test_loader_checks_the_kernels_on_its_device(cupy):  # noqa: F811
    with gpuload.Loader(device="cuda:0") as loader:
        assert loader.device == "cuda:0"
    tc = toolchain.check(device=0)  # cached by the Loader: the same result
    assert tc.problem is None and tc.loaded, tc
    assert sorted(tc.variants) == [1, 2, 4, 8]
    cc = cupy.cuda.Device(0).compute_capability  # "90"
    assert tc.arch == f"sm_{cc}" and tc.driver and tc.nvvm and tc.ptx_isa


def test_doctor_finds_no_problem_on_a_working_gpu(cupy):  # noqa: F811
    from gpuload.cli import doctor

    rep = doctor.run()
    assert rep.gpu_checked and rep.problems == 0, rep.text()
    assert rep.gpu_path.ok and rep.cpu_path.ok, rep.text()
