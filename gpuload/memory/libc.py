"""libc's memory calls (mmap, munmap, madvise, mincore, mlock) through ctypes,
with their argument types declared once, and the OSError their errno means."""

from __future__ import annotations

import ctypes
import functools
import os


@functools.cache
def libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    lib.mmap.restype = vp
    lib.mmap.argtypes = [vp, sz, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    for name, args in (
        ("munmap", [vp, sz]),
        ("madvise", [vp, sz, ctypes.c_int]),
        ("mincore", [vp, sz, vp]),
        ("mlock", [vp, sz]),
        ("munlock", [vp, sz]),
    ):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = ctypes.c_int
    return lib


def _os_error(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")
