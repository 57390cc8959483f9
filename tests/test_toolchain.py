"""The kernel toolchain check, as a GPU Loader meets it, on the CPU tier.

The real compile and link run in tests/realpkg (they need the CUDA wheels);
here: a problem the check finds stops the CUDA backend when it is made, before
any read, naming the versions and the fix; and the version arithmetic.
"""

from __future__ import annotations

import sys
import types

import pytest
from fake_cuda import FakeRuntime

from gpuload import config
from gpuload.errors import BackendUnavailable
from gpuload.host.backend import make_backend
from gpuload.kernels import toolchain

FOUND = toolchain.Toolchain(
    arch="sm_90", nvvm="13.5", ptx_isa="9.5", nvjitlink="13.0", nvjitlink_isa="9.0",
    driver="13.0", driver_isa="9.0",
)  # fmt: skip


@pytest.fixture
def real_runtime_is_fake(monkeypatch):
    """make_backend as for a real GPU (runtime=None): the real ``CupyRuntime``
    constructor runs its checks over a stand-in cupy (with libNVVM present and
    the warm-up skipped), then the fake runtime serves the backend."""
    from numba.cuda.cudadrv import nvvm

    import gpuload.cuda.backend as dc
    from gpuload.cuda.runtime import CupyRuntime

    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(
        Device=lambda index: None, runtime=types.SimpleNamespace(getDeviceCount=lambda: 8)
    )
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(nvvm, "is_available", lambda: True)
    monkeypatch.setattr(CupyRuntime, "_warm", lambda self: None)
    real, made = CupyRuntime, []

    def runtime(index):
        real(index)  # raises BackendUnavailable for a toolchain problem
        made.append(FakeRuntime())
        return made[-1]

    monkeypatch.setattr(dc, "CupyRuntime", runtime)
    return made


def test_a_toolchain_problem_stops_the_gpu_backend_before_any_read(
    monkeypatch, real_runtime_is_fake
):
    asked = []

    def check(arch=None, device=None):
        asked.append(device)
        problem = toolchain.explain(FOUND, "nvJitLinkError: Unsupported .version 9.5", "link")
        return toolchain.Toolchain(**{**FOUND.__dict__, "problem": problem})

    monkeypatch.setattr(toolchain, "check", check)
    with pytest.raises(BackendUnavailable) as e:
        make_backend("cuda:3", config.Config(backend="posix"))
    msg = str(e.value)
    assert asked == [3]  # the Loader's device, not the current one
    assert "cuda:3" in msg and "NVVM 13.5 emits PTX ISA 9.5" in msg and "nvJitLink 13.0" in msg
    assert "pip install 'nvidia-nvvm==13.0.*'" in msg, msg


def test_a_working_toolchain_lets_the_backend_through(monkeypatch, real_runtime_is_fake):
    monkeypatch.setattr(toolchain, "check", lambda arch=None, device=None: FOUND)
    backend = make_backend("cuda:0", config.Config(backend="posix"))
    backend.close()


def test_a_fake_runtime_is_not_checked(monkeypatch):
    def check(**kw):
        raise AssertionError("the toolchain is checked only for the real runtime")

    monkeypatch.setattr(toolchain, "check", check)
    make_backend("cuda:0", config.Config(backend="posix"), runtime=FakeRuntime()).close()


def test_isa_table_and_ptx_header():
    assert toolchain.isa_for((13, 0)) == (9, 0) and toolchain.isa_for((13, 5)) == (9, 5)
    assert toolchain.isa_for((12, 4)) == (8, 4) and toolchain.isa_for((12, 6)) == (8, 5)
    assert toolchain.isa_for((12, 8)) == (8, 7) and toolchain.isa_for((12, 9)) == (8, 8)
    ptx = "//\n// Cuda compilation tools, release 13.5, V13.5.37\n//\n.version 9.5\n.target sm_90\n"
    assert toolchain.ptx_facts(ptx) == ("13.5", "9.5")


def test_the_fix_fits_the_mismatch():
    cu12 = toolchain.Toolchain(arch="sm_80", nvvm="12.9", ptx_isa="8.8", nvjitlink="12.6")
    cu12.nvjitlink_isa = "8.5"
    msg = toolchain.explain(cu12, "x", "link")
    assert "'nvidia-cuda-nvcc-cu12==12.6.*'" in msg and "'nvidia-nvjitlink-cu12>=12.9'" in msg
    old_driver = toolchain.Toolchain(arch="sm_90", nvvm="13.0", ptx_isa="9.0", nvjitlink="13.0")
    old_driver.nvjitlink_isa, old_driver.driver, old_driver.driver_isa = "9.0", "12.4", "8.4"
    msg = toolchain.explain(old_driver, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "link and load")
    assert "update the NVIDIA driver to CUDA 13, or pip install 'gpuload[cu12]'" in msg
    with pytest.raises(ValueError, match="exactly one"):
        toolchain.check()
