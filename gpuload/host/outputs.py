"""Results as the caller's framework: numpy, torch or cupy.

Every result owns its memory: it is a view of a buffer allocated for that
tensor alone, never of staging. numpy results carry real dtypes (bf16 and
fp8 from ``ml_dtypes``); packed sub-byte dtypes (F4, F6_*) are ``uint8``
arrays of their bytes, shaped by :func:`gpuload.format.dtypes.numpy_shape`. torch
results share the same buffer (no copy: ``from_numpy`` on the CPU, DLPack on
a GPU) and use torch's own dtypes; those torch lacks come back as ``uint8``
bytes the same way.

cupy has no bfloat16 or float8 dtypes, so cupy results of those dtypes are
*raw integer views* of the same bytes: ``uint16`` for BF16, ``uint8`` for the
F8 family (packed F4/F6: ``uint8`` bytes, as everywhere). ``arr.view(...)``
or ``torch.from_dlpack(arr).view(torch.bfloat16)`` recovers the real type.

Defaults: ``numpy`` on the CPU; on a GPU ``torch`` when a CUDA build of it
sees the device, else ``cupy``.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from gpuload.errors import BackendUnavailable
from gpuload.format.dtypes import DTYPES
from gpuload.plan.ops import TensorPlan

FRAMEWORKS = ("numpy", "torch", "cupy")


def resolve_framework(framework: str | None, device: str, *, probe: bool = True) -> str:
    """The framework results come back in, for a resolved device string.

    Decided before any I/O: torch on a GPU needs a CUDA build that sees the
    device (DLPack import asks torch for the device's stream), else a load
    would read everything and fail handing it over. ``probe=False`` skips
    that CUDA check (a caller-supplied runtime: the CPU tests' fake GPU).
    """
    on_gpu = device != "cpu"
    if framework is None:
        if not on_gpu:
            return "numpy"
        try:
            _torch(cuda=probe)
        except BackendUnavailable:
            return "cupy"
        return "torch"
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework={framework!r} is not one of {', '.join(FRAMEWORKS)}")
    if framework == "numpy" and on_gpu:
        raise ValueError(
            f"framework='numpy' returns host arrays but device={device!r}: "
            "use framework='torch' or 'cupy', or device='cpu'"
        )
    if framework == "cupy" and not on_gpu:
        raise ValueError("framework='cupy' returns GPU arrays: use a 'cuda' device")
    if framework == "torch":
        _torch(cuda=on_gpu and probe)
    return framework


def _torch(*, cuda: bool = False):
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        raise BackendUnavailable(
            "framework='torch' needs PyTorch: pip install 'gpuload[torch]'"
        ) from None
    if cuda and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"framework='torch' on a GPU needs a CUDA build of PyTorch that sees the device; "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) does not: "
            "install a CUDA build or use framework='cupy'"
        )
    return torch


def to_numpy(buf: np.ndarray, t: TensorPlan) -> np.ndarray:
    """View the tensor's own uint8 buffer with its dtype and shape."""
    dtype = t.info.dtype.numpy if t.info.dtype.numpy is not None else np.dtype(np.uint8)
    return buf.view(dtype).reshape(t.out_shape)


def to_torch(buf: np.ndarray, t: TensorPlan) -> Any:
    torch = _torch()
    # shares memory; buf is owned by this tensor only
    return _torch_view(torch, torch.from_numpy(buf), t)


def to_torch_dlpack(buf: Any, t: TensorPlan) -> Any:
    """A torch tensor over a device uint8 buffer (cupy), through DLPack: no copy,
    on the buffer's own device. The buffer is exported as bytes and viewed in
    torch, so bf16 and fp8 need no DLPack dtype support."""
    torch = _torch()
    return _torch_view(torch, torch.from_dlpack(buf), t)


def _torch_view(torch: Any, raw: Any, t: TensorPlan) -> Any:
    name = t.info.dtype.torch
    tdtype = getattr(torch, name, None) if name else None
    if tdtype is None:
        return raw.reshape(t.out_shape)
    if tdtype.itemsize == 1 and tdtype is not torch.uint8:
        out = raw.view(tdtype)
    elif tdtype is torch.uint8:
        out = raw
    else:
        out = raw.view(tdtype) if raw.numel() else torch.empty(0, dtype=tdtype, device=raw.device)
    return out.reshape(t.out_shape)


def cupy_dtype(t: TensorPlan) -> np.dtype:
    """The dtype of a cupy result: the numpy dtype when cupy has it, else an
    unsigned integer of the element width (bf16 -> uint16, fp8 -> uint8), and
    uint8 bytes for packed sub-byte dtypes."""
    d = t.info.dtype
    if d.numpy is None:
        return np.dtype(np.uint8)
    if d.numpy.kind in "biufc":  # bool, int, uint, float, complex: cupy has them
        return d.numpy
    return np.dtype(f"u{d.numpy.itemsize}")  # ml_dtypes (bf16, fp8): raw bits


def to_cupy(buf: Any, t: TensorPlan, xp: Any = None) -> Any:
    """View a tensor's own uint8 device buffer with its cupy dtype and shape.

    ``xp`` is the array module (cupy by default; numpy for CPU tests of the
    dtype mapping)."""
    if xp is None:
        xp = importlib.import_module("cupy")
    dtype = cupy_dtype(t)
    if buf.size == 0:  # a zero-byte view cannot change its itemsize in every version
        return xp.empty(t.out_shape, dtype)
    return buf.view(dtype).reshape(t.out_shape)


def convert(buffers: dict[str, np.ndarray], plans: list[TensorPlan], framework: str) -> dict:
    fn = to_torch if framework == "torch" else to_numpy
    return {t.name: fn(buffers[t.name], t) for t in plans}


def resident_as(arrays: dict[str, np.ndarray], framework: str) -> dict:
    """CPU-resident arrays in the caller's framework, sharing their memory.

    For torch they are writable views of a private copy-on-write mapping
    (torch has no read-only tensors: a write to a read-only mapping would
    kill the process with SIGSEGV); see :func:`gpuload.host.resident.map_resident`.
    """
    if framework != "torch":
        return arrays
    return {name: _raw_torch(a) for name, a in arrays.items()}


# numpy dtype name -> torch dtype name, from the safetensors dtype table.
_TORCH_NAMES = {d.numpy.name: d.torch for d in DTYPES.values() if d.numpy is not None and d.torch}


def _raw_torch(a: np.ndarray):
    """A numpy array as a torch tensor of the same memory, strides kept
    (column cuts stay views): ml_dtypes (bf16, fp8), which torch cannot
    import, go through an integer of the same width."""
    torch = _torch()
    if a.dtype.kind in "biufc":
        return torch.from_numpy(a)
    tdtype = getattr(torch, _TORCH_NAMES.get(a.dtype.name, ""), None)
    if tdtype is None:  # a dtype torch lacks: its bytes, as elsewhere
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8))
    # signed: torch < 2.3 cannot import numpy uint16 arrays
    return torch.from_numpy(a.view(f"i{a.dtype.itemsize}")).view(tdtype)
