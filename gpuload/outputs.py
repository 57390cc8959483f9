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
