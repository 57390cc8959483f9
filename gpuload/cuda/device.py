"""Device resolution: which device a load targets.

CUDA is probed lazily (cupy is an optional dependency): ``import gpuload``
works on machines with no CUDA, no cupy and no kvikio.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import warnings

from gpuload.errors import BackendUnavailable

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


# cudaError_t values that mean "this driver cannot run this CUDA build": a
# cu13 wheel under a CUDA 12 driver says cudaErrorInsufficientDriver (35).
_DRIVER_ERRORS = {
    34: "cudaErrorStubLibrary",
    35: "cudaErrorInsufficientDriver",
    803: "cudaErrorSystemDriverMismatch",
    804: "cudaErrorCompatNotSupportedOnDevice",
}


@functools.cache
def cuda_probe() -> tuple[int, str | None]:
    """(usable CUDA devices, why none) -- the reason is None when cupy is
    simply absent or there is no device, and names the driver problem when
    the driver cannot run the installed CUDA build."""
    try:
        cupy = importlib.import_module("cupy")
    except Exception:  # ImportError: no GPU extra installed, nothing to say
        return 0, None
    rt = cupy.cuda.runtime
    try:
        return int(rt.getDeviceCount()), None
    except Exception as e:  # CUDARuntimeError: no usable CUDA here
        status = getattr(e, "status", None)
        name = _DRIVER_ERRORS.get(status) if isinstance(status, int) else None
        if name is None:
            return 0, None if status == 100 else f"{e}"  # 100: cudaErrorNoDevice
        if _driver_version(rt) == 0:  # no driver at all (a CPU machine): nothing to warn of
            return 0, None
        return 0, f"{name}: {_versions(rt)}; {_fix(rt)}"


def _driver_version(rt) -> int:
    try:
        return int(rt.driverGetVersion())
    except Exception:
        return -1


def _versions(rt) -> str:
    def ver(fn) -> str:
        try:
            v = int(fn())
        except Exception:
            return "?"
        return f"{v // 1000}.{v % 1000 // 10}"

    return (
        f"the driver supports CUDA {ver(rt.driverGetVersion)} but this cupy "
        f"is built for CUDA {ver(rt.runtimeGetVersion)}"
    )


def _fix(rt) -> str:
    if 0 < _driver_version(rt) < 13000:
        return "install gpuload[cu12] (cupy-cuda12x) for this driver, or upgrade the driver"
    return "install the gpuload extra that matches the driver, or upgrade the driver"


def cuda_device_count() -> int:
    """Number of usable CUDA devices; 0 when cupy or the driver is missing."""
    return cuda_probe()[0]


def current_cuda_device() -> int:
    """The calling thread's current CUDA device (``cudaGetDevice``): what
    ``torch.cuda.set_device`` or ``cupy.cuda.Device(n).use()`` selected."""
    cupy = importlib.import_module("cupy")
    return int(cupy.cuda.runtime.getDevice())


def gpu_pipeline_available() -> bool:
    """Whether this build has a GPU pipeline (the cupy device backend)."""
    return importlib.util.find_spec("gpuload.cuda.backend") is not None


_warned: list[str] = []


def _warn_cpu_fallback() -> None:
    """device=None falls back to the CPU; when a driver problem is why, say so once."""
    why = cuda_probe()[1]
    if why and why not in _warned:
        _warned.append(why)
        warnings.warn(
            f"gpuload: device=None loads to the CPU because CUDA is unusable: {why}",
            RuntimeWarning,
            stacklevel=4,
        )


def resolve_device(device: str | None, *, probe: bool = True) -> str:
    """``None`` -> ``"cuda:N"`` (current device) when the GPU path is usable,
    else ``"cpu"``; ``"cuda"`` -> ``"cuda:N"`` of the current device;
    validates the string.

    The index is never derived from a rank: on a multi-node job the global
    rank is not a device index, and the caller (or its launcher, through
    ``CUDA_VISIBLE_DEVICES`` / ``torch.cuda.set_device``) knows the device.

    ``probe=False`` (a caller-supplied CUDA runtime, such as the CPU tests'
    fake one) checks only the string: None and ``"cuda"`` mean ``"cuda:0"``.
    """
    if not probe:
        if device is None:
            return "cuda:0"
        m = _CUDA_RE.match(device) if isinstance(device, str) else None
        if m is None:
            raise ValueError(f"device={device!r}: a CUDA runtime was given, so 'cuda' or 'cuda:N'")
        return f"cuda:{m.group(1) or 0}"
    if device is None:
        if gpu_pipeline_available() and cuda_device_count() > 0:
            return f"cuda:{current_cuda_device()}"
        _warn_cpu_fallback()
        return "cpu"
    if not isinstance(device, str):
        raise TypeError(f"device must be a string like 'cpu' or 'cuda:0', got {device!r}")
    if device == "cpu":
        return "cpu"
    m = _CUDA_RE.match(device)
    if not m:
        raise ValueError(f"device={device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    n = cuda_device_count()
    if n == 0:
        why = cuda_probe()[1]
        raise BackendUnavailable(
            f"device={device!r} but no CUDA device is usable here: {why}"
            if why
            else f"device={device!r} but no CUDA device is usable here "
            "(install gpuload[cu12] or gpuload[cu13], and check the driver)"
        )
    index = current_cuda_device() if m.group(1) is None else int(m.group(1))
    if index >= n:
        raise BackendUnavailable(f"device={device!r} but only {n} CUDA device(s) are visible")
    return f"cuda:{index}"
