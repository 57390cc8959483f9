"""The fakes the CPU tiers use cannot invent an API: what they offer, the real packages have.

``tests/fake_cuda.py`` stands in for kvikio (and, through ``FakeRuntime``,
for ``CupyRuntime``); ``tests/test_prefault.py`` for cupy's host
registration. A fake method gpuload calls that the real package lacks, or
that takes other arguments, would let a CPU test pass over a call that
fails on a GPU (as ``kvikio.defaults`` did).
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

from fake_cuda import FakeDeviceBuffer, FakeKvikio, FakeRuntime, _CuFile, _Future
from test_contract import signature
from test_prefault import FakeRuntime as FakeHostRegistration

from gpuload.cuda.runtime import CupyRuntime


def public(cls) -> set[str]:
    return {n for n in vars(cls) if not n.startswith("_")}


def params(fn) -> list[str]:
    return [p for p in signature(fn).parameters if p != "self"]


def test_fake_kvikio_offers_only_what_kvikio_has():
    import kvikio
    import kvikio.cufile
    import kvikio.defaults

    fake = FakeKvikio()
    fake_defaults = importlib.import_module(f"{fake.__name__}.defaults")
    for name in ("CuFile", "__version__"):
        assert hasattr(fake, name) and hasattr(kvikio, name), name
    for name in public(type(fake_defaults)) | {
        n for n in vars(fake_defaults) if not n.startswith("_")
    }:
        real = getattr(kvikio.defaults, name, None)
        assert real is not None, f"the fake kvikio.defaults has {name}, kvikio's does not"
        assert params(getattr(fake_defaults, name)) == params(real)[: len(params(real))], name
    assert public(_CuFile) <= set(dir(kvikio.CuFile)), public(_CuFile) - set(dir(kvikio.CuFile))
    # pread(buf, size, file_offset, task_size): the same names, in the same order
    assert params(_CuFile.pread) == params(kvikio.CuFile.pread)
    assert public(_Future) <= set(dir(kvikio.cufile.IOFuture))


def test_the_fake_and_the_real_kvikio_both_lack_defaults_until_imported():
    code = "import kvikio; print(hasattr(kvikio, 'defaults'))"
    real = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    fake = FakeKvikio()
    assert real.stdout.strip() == str(hasattr(fake, "defaults"))
    importlib.import_module(f"{fake.__name__}.defaults")
    assert hasattr(fake, "defaults")


def test_fake_runtime_matches_the_cupy_runtime():
    # FakeRuntime stands in for CupyRuntime under the device pipeline: each
    # method the pipeline and backend call has the same parameters on both.
    for name in sorted(public(CupyRuntime)):
        fake = getattr(FakeRuntime, name, None)
        assert fake is not None, f"FakeRuntime lacks {name}"
        assert params(fake) == params(getattr(CupyRuntime, name)), name


def test_fake_device_buffer_is_shaped_like_a_cupy_array():
    import cupy

    for name in public(FakeDeviceBuffer) | {"__getitem__"}:
        assert hasattr(cupy.ndarray, name), f"cupy.ndarray has no {name}"


def test_fake_host_registration_matches_cupy_runtime():
    import cupy.cuda.runtime as rt

    for name in ("hostRegister", "hostUnregister"):
        assert params(getattr(FakeHostRegistration, name)) == params(getattr(rt, name)), name
    for status in FakeHostRegistration.CUDARuntimeError.NAMES:
        fake, real = FakeHostRegistration.CUDARuntimeError(status), rt.CUDARuntimeError(status)
        assert str(fake) == str(real) and fake.status == real.status


def test_signature_helper_sees_python_and_cython_alike():
    assert params(_CuFile.pread) == ["buf", "size", "file_offset", "task_size"]
    assert inspect.isclass(FakeKvikio)
