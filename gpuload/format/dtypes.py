"""The safetensors dtypes: their widths and the numpy dtypes that carry them.

bf16 and the fp8 family come from ``ml_dtypes`` so numpy outputs keep real
dtypes. The sub-byte dtypes (F4, F6_*) pack several elements per byte and have
no numpy dtype: they are returned as ``uint8`` arrays of their packed bytes
(see :func:`numpy_shape`).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True)
class DType:
    name: str
    bits: int  # width of one element
    numpy: np.dtype | None  # None: sub-byte, delivered as packed uint8 bytes
    torch: str | None  # attribute of the torch module, or None: uint8 bytes

    @property
    def packed(self) -> bool:
        return self.numpy is None


def _d(name: str, bits: int, np_dtype, torch_name: str | None) -> DType:
    return DType(name, bits, None if np_dtype is None else np.dtype(np_dtype), torch_name)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        _d("BOOL", 8, np.bool_, "bool"),
        _d("U8", 8, np.uint8, "uint8"),
        _d("I8", 8, np.int8, "int8"),
        _d("F8_E5M2", 8, ml_dtypes.float8_e5m2, "float8_e5m2"),
        _d("F8_E4M3", 8, ml_dtypes.float8_e4m3fn, "float8_e4m3fn"),
        _d("F8_E8M0", 8, ml_dtypes.float8_e8m0fnu, "float8_e8m0fnu"),
        _d("F8_E4M3FNUZ", 8, ml_dtypes.float8_e4m3fnuz, "float8_e4m3fnuz"),
        _d("F8_E5M2FNUZ", 8, ml_dtypes.float8_e5m2fnuz, "float8_e5m2fnuz"),
        _d("I16", 16, np.int16, "int16"),
        _d("U16", 16, np.uint16, "uint16"),
        _d("F16", 16, np.float16, "float16"),
        _d("BF16", 16, ml_dtypes.bfloat16, "bfloat16"),
        _d("I32", 32, np.int32, "int32"),
        _d("U32", 32, np.uint32, "uint32"),
        _d("F32", 32, np.float32, "float32"),
        _d("C64", 64, np.complex64, "complex64"),
        _d("F64", 64, np.float64, "float64"),
        _d("I64", 64, np.int64, "int64"),
        _d("U64", 64, np.uint64, "uint64"),
        _d("F4", 4, None, None),
        _d("F6_E2M3", 6, None, None),
        _d("F6_E3M2", 6, None, None),
    )
}


def numpy_shape(dtype: DType, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the numpy array that carries a tensor of ``shape``.

    Byte-wide dtypes keep their shape. A packed (sub-byte) tensor becomes
    ``uint8`` bytes: its last dimension is measured in bytes when its rows
    end on byte boundaries, otherwise the whole tensor is one flat byte run.
    """
    if not dtype.packed:
        return shape
    if not shape:
        return ((dtype.bits + 7) // 8,)
    last_bits = shape[-1] * dtype.bits
    if last_bits % 8 == 0:
        return (*shape[:-1], last_bits // 8)
    total = dtype.bits
    for s in shape:
        total *= s
    return ((total + 7) // 8,)
