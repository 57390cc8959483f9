"""Device resolution: which device a load targets.

CUDA is probed lazily (cupy is an optional dependency): ``import gpuload``
works on machines with no CUDA, no cupy and no kvikio.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re

from .errors import BackendUnavailable

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


@functools.cache
def cuda_device_count() -> int:
    """Number of usable CUDA devices; 0 when cupy or the driver is missing."""
    try:
        cupy = importlib.import_module("cupy")
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # ImportError, CUDARuntimeError: no usable CUDA here
        return 0


def current_cuda_device() -> int:
    """The calling thread's current CUDA device (``cudaGetDevice``): what
    ``torch.cuda.set_device`` or ``cupy.cuda.Device(n).use()`` selected."""
    cupy = importlib.import_module("cupy")
    return int(cupy.cuda.runtime.getDevice())


def gpu_pipeline_available() -> bool:
    """Whether this build has a GPU pipeline (the cupy device backend)."""
    return importlib.util.find_spec("gpuload.device_cuda") is not None


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
        raise BackendUnavailable(
            f"device={device!r} but no CUDA device is usable here "
            "(install gpuload[cu12] or gpuload[cu13], and check the driver)"
        )
    index = current_cuda_device() if m.group(1) is None else int(m.group(1))
    if index >= n:
        raise BackendUnavailable(f"device={device!r} but only {n} CUDA device(s) are visible")
    return f"cuda:{index}"
