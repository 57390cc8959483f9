"""Every attribute, function and constant gpuload's GPU code uses, on the real packages.

Each entry below is a call gpuload makes (the file and what it passes), and
the test binds those arguments to the real function's signature: a renamed
keyword, a dropped constant or a function that moved fails here, on a
machine with no GPU, instead of on a user's. cupy's functions are Cython
builtins without ``inspect`` signatures; their docstrings' first line is the
signature (``memcpyAsync(intptr_t dst, ...)``), and that is what is read.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import pytest

_P = inspect.Parameter
_FIRST_LINE = re.compile(r"^\s*[\w.]+\((.*)\)")  # "name(...)", "Class.method(self, ...)"


def _split_top(args: str) -> list[str]:
    """Split ``a, b=(1, 2), c`` at top-level commas."""
    out, depth, cur = [], 0, ""
    for ch in args:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur] if cur.strip() else out


def signature(obj: Any) -> inspect.Signature:
    """``inspect.signature``, or the one in a Cython docstring's first line."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        pass
    else:  # a method read off its class: calls below never pass ``self``
        ps = list(sig.parameters.values())
        return sig.replace(parameters=ps[1:] if ps and ps[0].name == "self" else ps)
    doc = (getattr(obj, "__doc__", None) or "").strip().splitlines()
    m = _FIRST_LINE.match(doc[0].split("->")[0].strip()) if doc else None
    if m is None:
        raise AssertionError(f"{obj!r} has no signature to check against")
    params = []
    for part in _split_top(m.group(1)):
        decl, eq, default = part.strip().partition("=")
        name = decl.split()[-1].lstrip("*")
        if name == "self":
            continue
        params.append(_P(name, _P.POSITIONAL_OR_KEYWORD, default=default if eq else _P.empty))
    return inspect.Signature(params)


def resolve(path: str) -> Any:
    """``"cupy.cuda.runtime.memcpyAsync"`` -> the object (modules imported as needed)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


# (object, positional args, keyword args, where gpuload calls it)
CALLS: list[tuple[str, tuple, dict, str]] = [
    # gpuload/device_cuda.py: CupyRuntime
    ("cupy.cuda.Device", (0,), {}, "device_cuda: CupyRuntime.__init__"),
    ("cupy.cuda.memory.Memory", (1,), {}, "device_cuda: device_alloc (cudaMalloc)"),
    ("cupy.cuda.memory.OutOfMemoryError", (1, -1), {}, "device_cuda: device_alloc"),
    ("cupy.cuda.MemoryPointer", (None, 0), {}, "device_cuda: device_alloc"),
    ("cupy.ndarray", ((1,), "u1"), {"memptr": None}, "device_cuda: device_alloc"),
    ("cupy.cuda.pinned_memory.PinnedMemory", (1, 3), {}, "device_cuda: host_alloc (mapped)"),
    ("cupy.cuda.runtime.pointerGetAttributes", (0,), {}, "device_cuda: device_view"),
    ("cupy.cuda.UnownedMemory", (0, 1, None, 0), {}, "device_cuda: device_view"),
    ("cupy.cuda.pinned_memory.PinnedMemoryPointer", (None, 0), {}, "device_cuda: host_alloc"),
    ("cupy.cuda.Stream", (), {"non_blocking": True}, "device_cuda: stream"),
    ("cupy.cuda.Event", (), {"block": True, "disable_timing": True}, "device_cuda: event"),
    ("cupy.cuda.Event.record", (None,), {}, "device_cuda: record"),
    ("cupy.cuda.Event.synchronize", (), {}, "device_cuda: wait"),
    ("cupy.cuda.Stream.synchronize", (), {}, "device_cuda: warm_gathers"),
    ("cupy.cuda.get_elapsed_time", (None, None), {}, "device_cuda: elapsed"),
    ("cupy.cuda.runtime.memcpyAsync", (0, 0, 1, 1, 0), {}, "device_cuda: h2d, d2d"),
    ("cupy.cuda.runtime.memGetInfo", (), {}, "device_cuda: mem_info"),
    ("cupy.get_default_memory_pool", (), {}, "device_cuda: release_cached"),
    ("cupy.ndarray.set", (None,), {"stream": None}, "device_cuda: _to_device"),
    ("cupy.ndarray.get", (), {}, "device_cuda: _to_host"),
    ("cupy.empty", ((0,), "u1"), {}, "outputs: to_cupy"),
    ("cupy.ndarray.view", ("u2",), {}, "outputs: to_cupy"),
    # gpuload/bench/gpu.py (the benchmark's cupy side)
    ("cupy.cuda.Device.use", (), {}, "bench.gpu: GPU.__init__"),
    ("cupy.cuda.Device.synchronize", (), {}, "bench.gpu: sync"),
    ("cupyx.empty_pinned", ((1,), "u1"), {}, "bench.gpu: pinned"),
    ("cupy.cuda.get_current_stream", (), {}, "bench.gpu: h2d"),
    ("cupy.copyto", (None, None), {}, "bench.gpu: d2d"),
    ("cupy.get_default_pinned_memory_pool", (), {}, "bench.gpu: release"),
    ("cupy.cuda.runtime.getDeviceProperties", (0,), {}, "bench.gpu: facts"),
    ("cupy.cuda.runtime.driverGetVersion", (), {}, "bench.gpu: facts"),
    ("cupy.cuda.runtime.runtimeGetVersion", (), {}, "bench.gpu: facts"),
    # gpuload/pinning.py and gpuload/device.py
    ("cupy.cuda.runtime.getDeviceCount", (), {}, "pinning, device: count"),
    ("cupy.cuda.runtime.getDevice", (), {}, "pinning, device: current device"),
    ("cupy.cuda.runtime.deviceGetAttribute", (113, 0), {}, "pinning: _cuda_runtime"),
    ("cupy.cuda.runtime.hostRegister", (0, 4096, 9), {}, "pinning: _cuda_pin"),
    ("cupy.cuda.runtime.hostUnregister", (0,), {}, "pinning: _Release.unpin"),
    # gpuload/io_kvikio.py
    ("kvikio.CuFile", ("/x", "r"), {}, "io_kvikio: KvikioReader._cufile"),
    ("kvikio.CuFile.pread", (None,), {"size": 1, "file_offset": 0}, "io_kvikio: read_device"),
    ("kvikio.CuFile.close", (), {}, "io_kvikio: close"),
    ("kvikio.cufile.IOFuture.get", (), {}, "io_kvikio: read_device waits on pread"),
    ("kvikio.defaults.get", ("num_threads",), {}, "io_kvikio: set_threads"),
    ("kvikio.defaults.set", ("num_threads", 4), {}, "io_kvikio: set_threads"),
    ("kvikio.defaults.is_compat_mode_preferred", (), {}, "io_kvikio: describe_kvikio"),
    # kernels/cuda.py
    ("numba.cuda.jit", ("void(uint8[::1])",), {}, "kernels.cuda: _kernel"),
    ("numba.cuda.as_cuda_array", (None,), {"sync": False}, "kernels.cuda: _as_device"),
    ("numba.cuda.external_stream", (0,), {}, "kernels.cuda: _as_stream"),
    ("numba.cuda.default_stream", (), {}, "kernels.cuda: _as_stream"),
    ("numba.cuda.get_current_device", (), {}, "kernels.cuda: _upload"),
    ("numba.cuda.device_array", (64,), {"dtype": "i8"}, "kernels.cuda: _upload"),
    ("numba.cuda.event", (), {"timing": False}, "kernels.cuda: _event"),
    ("numba.cuda.cudadrv.driver.Event.record", (), {"stream": 0}, "kernels.cuda: _upload"),
    ("numba.cuda.cudadrv.driver.Event.query", (), {}, "kernels.cuda: _reap"),
    ("numba.cuda.cudadrv.driver.Event.synchronize", (), {}, "kernels.cuda: release_stream"),
    (
        "numba.cuda.cudadrv.devicearray.DeviceNDArray.copy_to_device",
        (None,),
        {"stream": 0},
        "kernels.cuda: _upload",
    ),
    ("numba.cuda.cudadrv.devicearray.DeviceNDArray.view", ("u8",), {}, "kernels.cuda"),
    ("numba.cuda.cudadrv.devicearray.DeviceNDArray.is_c_contiguous", (), {}, "_extent"),
    ("numba.cuda.cudadrv.nvvm.is_available", (), {}, "kernels.cuda: compiler_problem"),
]


@pytest.mark.parametrize(("path", "args", "kwargs", "where"), CALLS, ids=[c[0] for c in CALLS])
def test_what_gpuload_calls_exists_with_the_arguments_it_passes(path, args, kwargs, where):
    obj = resolve(path)
    try:
        signature(obj).bind(*args, **kwargs)
    except TypeError as e:
        pytest.fail(f"{where} calls {path}{args}{kwargs}, which does not fit {signature(obj)}: {e}")


# (module path, attribute, value gpuload relies on or None for "present")
CONSTANTS = [
    ("cupy.cuda.runtime", "memcpyHostToDevice", 1),
    ("cupy.cuda.runtime", "memcpyDeviceToDevice", 3),
    ("cupy.cuda.runtime", "CUDARuntimeError", None),
    # device_cuda: _HOST_ALLOC_PORTABLE, _HOST_ALLOC_MAPPED, raw numbers there
    ("cupy.cuda.runtime", "hostAllocPortable", 1),
    ("cupy.cuda.runtime", "hostAllocMapped", 2),
    # pinning: _ATTR_REGISTER_READ_ONLY, a raw number there
    ("cupy.cuda.runtime", "cudaDevAttrHostRegisterReadOnlySupported", 113),
    ("cupy", "uint8", None),
    ("numba.cuda.cudadrv.driver", "Stream", None),
    ("numba.cuda", "blockDim", None),
    ("numba.cuda", "blockIdx", None),
    ("numba.cuda", "threadIdx", None),
    ("numba.cuda", "gridDim", None),
    ("kvikio", "__version__", None),
]


@pytest.mark.parametrize(("module", "name", "value"), CONSTANTS, ids=[c[1] for c in CONSTANTS])
def test_constants_and_classes_gpuload_names(module, name, value):
    got = getattr(importlib.import_module(module), name)
    if value is not None:
        assert got == value, f"{module}.{name} is {got!r}, gpuload assumes {value!r}"


def test_the_constant_the_audit_found_missing_is_still_missing():
    # cupy 14 does not expose cudaErrorMemoryAllocation to Python: gpuload
    # compares the status number (device_cuda.CUDA_ERROR_MEMORY_ALLOCATION).
    # Should cupy grow it again, the two must agree.
    import cupy.cuda.runtime as rt

    from gpuload.cuda.runtime import CUDA_ERROR_MEMORY_ALLOCATION

    assert getattr(rt, "errorMemoryAllocation", 2) == CUDA_ERROR_MEMORY_ALLOCATION == 2
    assert "cudaErrorMemoryAllocation" in str(rt.CUDARuntimeError(CUDA_ERROR_MEMORY_ALLOCATION))


def test_cupy_classes_gpuload_relies_on():
    import cupy

    assert issubclass(cupy.cuda.memory.OutOfMemoryError, MemoryError)  # callers catch MemoryError
    assert issubclass(cupy.cuda.runtime.CUDARuntimeError, RuntimeError)
    for cls, attrs in (
        (cupy.cuda.Device, ("__enter__", "__exit__", "use")),
        (cupy.cuda.Stream, ("synchronize",)),
        (cupy.cuda.Event, ("record", "synchronize", "done")),
        (cupy.ndarray, ("set", "get", "data", "view", "reshape", "nbytes", "__dlpack__")),
        (cupy.cuda.MemoryPointer, ("ptr",)),
        (cupy.cuda.runtime.PointerAttributes, ("devicePointer",)),  # device_view
    ):
        missing = [a for a in attrs if not hasattr(cls, a)]
        assert not missing, f"{cls.__name__} lacks {missing}"


def test_signature_reader_reads_cython_docstrings():
    # The helper above must really check something on cupy's builtins.
    import cupy
    import cupy.cuda.runtime as rt

    sig = signature(rt.memcpyAsync)
    assert list(sig.parameters) == ["dst", "src", "size", "kind", "stream"]
    with pytest.raises(TypeError):
        sig.bind(0, 0, 1, 1)  # one argument short
    with pytest.raises(TypeError):
        signature(rt.hostRegister).bind(0, 4096, 9, flags2=1)
    assert list(signature(cupy.ndarray.set).parameters) == ["arr", "stream"]


def test_the_gather_finds_a_real_cupy_streams_handle():
    # kernels.cuda reads a stream's handle without a CUDA call: from the
    # CUDA stream protocol or cupy's ``ptr`` (an instance attribute).
    import cupy

    from gpuload.kernels.cuda import _handle

    assert _handle(cupy.cuda.Stream.null) == 0  # made without a device
