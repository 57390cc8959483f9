"""gpuload's GPU code paths driven with the real packages, as far as no GPU allows.

Each test goes through gpuload's own code (the reader, the backend choice,
the allocator's error mapping, pinning) with the real kvikio and cupy
underneath, up to the first call that needs a device; the bugs the audit
found all lived before that point.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gpuload
from gpuload.config import Config
from gpuload.cuda.backend import CudaBackend, _choose_reader
from gpuload.cuda.runtime import CupyRuntime
from gpuload.errors import PlanError
from gpuload.memory import mapping, pinning

REPO = Path(__file__).resolve().parents[2]


def write_checkpoint(path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file({"w": np.arange(3 * 4096, dtype=np.float32).reshape(3, 4096)}, str(path))
    return path


def test_kvikio_reader_with_real_kvikio_in_a_fresh_process(tmp_path):
    # A fresh interpreter: nothing has imported kvikio.defaults yet, as in a
    # user's process. ``import kvikio`` alone does not (kvikio 26), and the
    # old reader read ``kvikio.defaults`` and crashed every GPU Loader.
    path = write_checkpoint(tmp_path / "m.safetensors")
    code = textwrap.dedent(
        f"""
        import sys
        import kvikio
        print("defaults imported by `import kvikio`:", hasattr(kvikio, "defaults"))
        import gpuload
        from gpuload.config import Config
        from gpuload.cuda.backend import _choose_reader
        from gpuload.cuda.runtime import CupyRuntime
        from gpuload.errors import ReadError
        from gpuload.read.kvikio import KvikioReader

        rt = object.__new__(CupyRuntime)  # kvikio() needs no device
        kv, name, why = _choose_reader(Config(backend="kvikio"), rt, None)
        assert kv is kvikio and name == "kvikio", (name, why)
        print(why)
        files = gpuload.Loader(device="cpu").plan({str(path)!r}, 0, 1).checkpoint.files
        reader = KvikioReader(files, prefetch=True, kvikio=kv, threads=3)
        import kvikio.defaults
        assert kvikio.defaults.get("num_threads") == 3  # GPULOAD_THREADS reached kvikio
        reader._cufile({str(path)!r})  # CuFile opens without a device
        dst = __import__("numpy").zeros(8 * 4096, "u1")
        try:
            reader.read_device({str(path)!r}, 8, 100, dst)
        except ReadError as e:  # the first CUDA call: no driver on this machine
            assert {str(path)!r} in str(e), e
            print("read:", e)
        else:
            print("read: worked (a CUDA driver is present)")
        reader.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "backend='kvikio'" in out.stdout


def test_a_cuda_runtime_that_cannot_start_is_backend_unavailable():
    # The real constructor, as CudaBackend makes it: with no driver the first
    # CUDA call fails, and that is a BackendUnavailable naming the CUDA error
    # when the Loader is made, not a raw CUDARuntimeError (or a failure at
    # the first gather, half way through a load's reads).
    from gpuload.errors import BackendUnavailable

    try:
        rt = CupyRuntime(0)
    except BackendUnavailable as e:
        assert "cudaError" in str(e), e
    else:  # a machine with a GPU: every variant was compiled in this thread
        from gpuload.kernels.cuda import variants

        assert set(variants()) == {16, 8, 4, 2, 1}, rt


def test_auto_backend_describes_real_kvikio():
    # No GDS on this machine: the real kvikio 26 says compatibility mode, so
    # auto reads with posix and says why; backend='kvikio' still takes it.
    from gpuload.read.kvikio import gds_active

    rt = object.__new__(CupyRuntime)
    kv, name, why = _choose_reader(Config(backend="auto"), rt, None)
    real = importlib.import_module("kvikio")
    assert gds_active(real) is False
    assert name == "posix" and kv is None and "no GDS" in why, why
    assert "compatibility mode" in why and "GDS state unknown" not in why, why
    kv, name, why = _choose_reader(Config(backend="kvikio"), rt, None)
    assert name == "kvikio" and kv.__name__ == "kvikio" and "kvikio 26" in why


@pytest.fixture
def cupy_runtime(monkeypatch):
    """A CupyRuntime over the real cupy, without the device its constructor needs."""
    import cupy

    rt = object.__new__(CupyRuntime)
    rt.cupy, rt.index, rt._device = cupy, 0, contextlib.nullcontext()
    rt._rt = cupy.cuda.runtime
    return rt


def failing_malloc(monkeypatch, status: int):
    import cupy

    def malloc(nbytes):
        raise cupy.cuda.runtime.CUDARuntimeError(status)  # what a failed cudaMalloc raises

    monkeypatch.setattr(cupy.cuda.memory, "Memory", malloc)


def test_a_failed_cudamalloc_is_out_of_memory(cupy_runtime, monkeypatch):
    import cupy

    failing_malloc(monkeypatch, 2)  # cudaErrorMemoryAllocation
    with pytest.raises(cupy.cuda.memory.OutOfMemoryError) as e:
        cupy_runtime.device_alloc(1 << 20)
    assert isinstance(e.value, MemoryError)
    failing_malloc(monkeypatch, 100)  # cudaErrorNoDevice: not ours to translate
    with pytest.raises(cupy.cuda.runtime.CUDARuntimeError, match="cudaErrorNoDevice"):
        cupy_runtime.device_alloc(1 << 20)


def test_out_of_memory_allocating_results_is_a_plan_error(tmp_path, cupy_runtime, monkeypatch):
    # Through the backend, as a load calls it: the promised PlanError, not an
    # AttributeError from a constant cupy 14 does not have.
    path = write_checkpoint(tmp_path / "m.safetensors")
    failing_malloc(monkeypatch, 2)
    import cupy

    from gpuload.kernels import cuda as kernels_cuda

    # What needs a device besides cudaMalloc, stood in for: cudaMemGetInfo
    # says the results fit, and streams and events are placeholders.
    rt = cupy_runtime
    rt.mem_info = lambda: (1 << 40, 1 << 40)
    rt.release_cached = lambda: None
    rt.stream = lambda: cupy.cuda.Stream.null
    rt.event = lambda timing: None
    rt._kernels = kernels_cuda
    backend = CudaBackend("cuda:0", Config(backend="posix", pin=False, threads=1), runtime=rt)
    plan = gpuload.Loader(device="cpu").plan(path, 0, 1).plan
    with pytest.raises(PlanError, match="out of memory on cuda:0"):
        backend.allocate(plan)
    backend.close()


def test_pinning_without_a_device_says_why(tmp_path):
    # The real cupy imports here, but CUDA has no driver: pin() must fall
    # back to mlock (or nothing) and say that CUDA is unusable.
    path = write_checkpoint(tmp_path / "m.safetensors")
    m = mapping.Mapping(str(path))
    method, why = pinning.pin([(m, [(0, mapping.PAGE)])])
    assert method in ("mlock", None)
    assert "no usable CUDA device (cudaError" in why, why
    m._release.unpin()


def test_a_refused_registration_names_the_cuda_error(tmp_path, monkeypatch):
    # As a VM may: the device says it takes read-only registrations, and
    # cudaHostRegister refuses anyway. The real cupy's error, as raised.
    import cupy.cuda.runtime as rt

    class Refusing:
        CUDARuntimeError = rt.CUDARuntimeError

        @staticmethod
        def hostRegister(ptr, size, flags):  # noqa: N802
            raise rt.CUDARuntimeError(801)

    monkeypatch.setattr(pinning, "_cuda_runtime", lambda device=None: (Refusing, ""))
    monkeypatch.setattr(pinning, "mlock_allowance", lambda: None)
    path = write_checkpoint(tmp_path / "m.safetensors")
    m = mapping.Mapping(str(path))
    method, why = pinning.pin([(m, [(0, mapping.PAGE)])])
    assert method == "mlock", why
    assert why.startswith("mlock, the fallback: cudaHostRegister refused"), why
    assert "cudaErrorNotSupported: operation not supported" in why and str(path) in why
    m._release.unpin()
