"""Element loads and stores for the gather kernel, 16-byte vectors included (real GPUs only).

Numba has no 16-byte scalar type: a ``complex128`` element compiles to two
``ld.global.f64``. These intrinsics load and store one ``<2 x i64>`` with
16-byte alignment at element ``i`` of a uint64 array (bytes ``16*i`` to
``16*i+16``), which NVVM emits as ``ld.global.v2.u64`` /
``st.global.v2.u64`` (checked in tests/realpkg by compiling to PTX). The
caller guarantees the alignment (``layout.width_groups``). The simulator
cannot run intrinsics; ``kernels.cuda`` uses plain indexing there.

``load1`` / ``store1`` move one element of any width with the same pair
signature, so one kernel body serves every width. They are intrinsics too:
a call to a device function or a ``register_jitable`` from the kernel makes
Numba initialise the driver at compile time, which ``gpuload doctor
--arch`` must not need (it compiles and links with no GPU).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core.extending import intrinsic

_V2 = ir.VectorType(ir.IntType(64), 2)
_I32 = ir.IntType(32)


def _element(context, builder, arrty, arr, idx):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.gep(builder.bitcast(ary.data, _V2.as_pointer()), [idx])


@intrinsic
def load16(typingctx, arr, idx):
    """``(lo, hi)``: the two uint64 at 16-byte element ``idx`` of ``arr``, one vector load."""
    sig = types.UniTuple(types.uint64, 2)(arr, idx)

    def codegen(context, builder, sig, args):
        v = builder.load(_element(context, builder, sig.args[0], *args), align=16)
        parts = [builder.extract_element(v, ir.Constant(_I32, j)) for j in (0, 1)]
        return context.make_tuple(builder, sig.return_type, parts)

    return sig, codegen


@intrinsic
def store16(typingctx, arr, idx, lo, hi):
    """Store ``lo, hi`` at 16-byte element ``idx`` of ``arr``, one vector store."""
    sig = types.void(arr, idx, types.uint64, types.uint64)

    def codegen(context, builder, sig, args):
        arr, idx, lo, hi = args
        v = ir.Constant(_V2, ir.Undefined)
        v = builder.insert_element(v, lo, ir.Constant(_I32, 0))
        v = builder.insert_element(v, hi, ir.Constant(_I32, 1))
        builder.store(v, _element(context, builder, sig.args[0], arr, idx), align=16)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def load1(typingctx, arr, idx):
    """``(v, v)``: element ``idx`` of ``arr`` (any width), as a pair like ``load16``'s."""
    sig = types.UniTuple(arr.dtype, 2)(arr, idx)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        v = builder.load(builder.gep(ary.data, [args[1]]))
        return context.make_tuple(builder, sig.return_type, (v, v))

    return sig, codegen


@intrinsic
def store1(typingctx, arr, idx, lo, hi):
    """Store ``lo`` at element ``idx`` of ``arr`` (``hi`` is ignored)."""
    sig = types.void(arr, idx, arr.dtype, arr.dtype)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        builder.store(args[2], builder.gep(ary.data, [args[1]]))
        return context.get_dummy_value()

    return sig, codegen
