"""Results as the caller's framework: numpy (default on the CPU) or torch.

Every result owns its memory: it is a view of a buffer allocated for that
tensor alone, never of staging. numpy results carry real dtypes (bf16 and
fp8 from ``ml_dtypes``); packed sub-byte dtypes (F4, F6_*) are ``uint8``
arrays of their bytes, shaped by :func:`gpuload.dtypes.numpy_shape`. torch
results share the same buffer (no copy) and use torch's own dtypes; those
torch lacks come back as ``uint8`` bytes the same way.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import numpy as np

from .errors import BackendUnavailable
from .plan import TensorPlan

FRAMEWORKS = ("numpy", "torch")


def resolve_framework(framework: str | None, device: str) -> str:
    if framework is None:
        return "numpy"
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework={framework!r} is not one of {', '.join(FRAMEWORKS)}")
    if framework == "torch":
        _torch()
    return framework


def _torch():
    try:
        return importlib.import_module("torch")
    except ImportError:
        raise BackendUnavailable(
            "framework='torch' needs PyTorch: pip install 'gpuload[torch]'"
        ) from None


def to_numpy(buf: np.ndarray, t: TensorPlan) -> np.ndarray:
    """View the tensor's own uint8 buffer with its dtype and shape."""
    dtype = t.info.dtype.numpy if t.info.dtype.numpy is not None else np.dtype(np.uint8)
    return buf.view(dtype).reshape(t.out_shape)


def to_torch(buf: np.ndarray, t: TensorPlan) -> Any:
    torch = _torch()
    raw = torch.from_numpy(buf)  # shares memory; buf is owned by this tensor only
    name = t.info.dtype.torch
    tdtype = getattr(torch, name, None) if name else None
    if tdtype is None:
        return raw.reshape(t.out_shape)
    if tdtype.itemsize == 1 and tdtype is not torch.uint8:
        out = raw.view(tdtype)
    elif tdtype is torch.uint8:
        out = raw
    else:
        out = raw.view(tdtype) if buf.size else torch.empty(0, dtype=tdtype)
    return out.reshape(t.out_shape)


def convert(buffers: dict[str, np.ndarray], plans: list[TensorPlan], framework: str) -> dict:
    fn = to_torch if framework == "torch" else to_numpy
    return {t.name: fn(buffers[t.name], t) for t in plans}


def resident_as(arrays: dict[str, np.ndarray], framework: str) -> dict:
    """CPU-resident (mapped, read-only) arrays in the caller's framework."""
    if framework != "torch":
        return arrays
    torch = _torch()
    out = {}
    for name, a in arrays.items():
        with warnings.catch_warnings():
            # torch warns that the array is not writable: it is a read-only
            # mapping of the checkpoint by design (zero-copy); writing to it
            # would fault, as with safetensors' own mmap'd tensors.
            warnings.simplefilter("ignore", UserWarning)
            out[name] = torch.from_numpy(a) if a.dtype.kind in "biufc" else _raw_torch(a)
    return out


def _raw_torch(a: np.ndarray):
    """ml_dtypes arrays (bf16, fp8) as torch tensors of the same bytes."""
    torch = _torch()
    raw = torch.from_numpy(np.ascontiguousarray(a).view(np.uint8))
    name = {
        "bfloat16": "bfloat16",
        "float8_e4m3fn": "float8_e4m3fn",
        "float8_e5m2": "float8_e5m2",
        "float8_e8m0fnu": "float8_e8m0fnu",
        "float8_e4m3fnuz": "float8_e4m3fnuz",
        "float8_e5m2fnuz": "float8_e5m2fnuz",
    }
    tdtype = getattr(torch, name.get(a.dtype.name, ""), None)
    return raw.view(tdtype).reshape(a.shape) if tdtype is not None else raw
