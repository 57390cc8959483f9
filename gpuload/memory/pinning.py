"""Pinning: the pins that keep a mapping's or a buffer's pages in RAM.

Pinning, best first:

- CUDA (cupy importable, a device present): ``cudaHostRegister`` with the
  ReadOnly flag (a ``PROT_READ`` mapping cannot be registered without it), in
  pieces of at most 256 MiB; H2D copies from these pages then run at pinned
  speed. A device or driver that refuses (some VMs do, for file mappings)
  falls back to ``mlock``, and the reason names the CUDA error.
- otherwise ``mlock``, when ``RLIMIT_MEMLOCK`` (or ``CAP_IPC_LOCK``) allows:
  the pages stay resident, which is all a CPU consumer needs.

The finalizer of a :class:`~gpuload.memory.mapping.Mapping` or
:class:`~gpuload.memory.mapping.HostBuffer` undoes these pins before it unmaps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import resource
from collections.abc import Sequence

from gpuload.memory.libc import libc
from gpuload.memory.mapping import HostBuffer, Mapping, Ranges

PIN_PIECE_BYTES = 256 << 20
# cudaHostRegisterPortable | cudaHostRegisterReadOnly (driver API values)
_CUDA_REGISTER_FLAGS = 1 | 8
_ATTR_REGISTER_READ_ONLY = 113  # cudaDevAttrHostRegisterReadOnlySupported
_CAP_IPC_LOCK = 14


def _pieces(ranges: Ranges) -> list[tuple[int, int]]:
    """(offset, length) pieces of at most PIN_PIECE_BYTES, page-aligned."""
    out = []
    for s, e in ranges:
        for a in range(s, e, PIN_PIECE_BYTES):
            out.append((a, min(e, a + PIN_PIECE_BYTES) - a))
    return out


def _cuda_runtime(device: int | None = None):
    """(runtime, "") when cupy and a device (``device``, else the current
    one) that takes read-only registrations are present, else (None, why not)."""
    try:
        from cupy.cuda import runtime
    except ImportError:
        return None, "no CUDA (cupy is not installed)"
    try:
        if runtime.getDeviceCount() < 1:
            return None, "no CUDA device"
        dev = runtime.getDevice() if device is None else device
        if not runtime.deviceGetAttribute(_ATTR_REGISTER_READ_ONLY, dev):
            return None, f"device {dev} cannot register read-only host memory"
    except runtime.CUDARuntimeError as e:
        return None, f"no usable CUDA device ({e})"
    return runtime, ""


def _on_device(device: int | None):
    """Registration runs in ``device``'s context: without it, a process
    loading for cuda:3 would create a context (hundreds of MiB) on cuda:0."""
    if device is None:
        return contextlib.nullcontext()
    from cupy.cuda import Device

    return Device(device)


def _cuda_pin(
    m: Mapping | HostBuffer, ranges: Ranges, runtime, device: int | None = None
) -> str | None:
    """Register every piece; on a refusal undo them all and say why."""
    m._release.cuda = runtime
    with _on_device(device):
        for off, n in _pieces(ranges):
            try:
                runtime.hostRegister(m.addr + off, n, _CUDA_REGISTER_FLAGS)
            except runtime.CUDARuntimeError as e:
                m._release.unpin()
                # Some VMs and drivers refuse read-only registration of a
                # shared file mapping although the device attribute says
                # yes: the report carries the driver's own words.
                return (
                    f"cudaHostRegister refused the read-only registration of {n:,} bytes "
                    f"of {m.path} ({e})"
                )
            m._release.cuda_ptrs.append(m.addr + off)
    return None


def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except OSError:
        pass
    return False


def mlock_allowance() -> int | None:
    """Bytes this process may still lock; None: no limit (CAP_IPC_LOCK or unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or _has_cap_ipc_lock():
        return None
    locked = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    locked = int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(0, soft - locked)


def _mlock(m: Mapping | HostBuffer, ranges: Ranges) -> str | None:
    need = sum(e - s for s, e in ranges)
    room = mlock_allowance()
    if room is not None and need > room:
        return f"RLIMIT_MEMLOCK allows {room} more bytes, {need} needed (raise `ulimit -l`)"
    for s, e in ranges:
        if libc().mlock(m.addr + s, e - s) != 0:
            err = ctypes.get_errno()
            m._release.unpin()
            hint = " (RLIMIT_MEMLOCK)" if err in (errno.ENOMEM, errno.EPERM) else ""
            return f"mlock failed: {os.strerror(err)}{hint}"
        m._release.locked.append((m.addr + s, e - s))
    return None


def pin(
    mappings: Sequence[tuple[Mapping | HostBuffer, Ranges]],
    device: int | None = None,
    *,
    cuda: bool = True,
) -> tuple[str | None, str]:
    """Pin page-aligned ranges of each mapping until it is released.

    ``device``: the CUDA device the pins are for (default: the current one).
    Returns ``(method, reason)``: method is "cuda", "mlock" or None (not
    pinned); reason says why not, or why CUDA fell back to mlock. All or
    nothing: a failure part-way undoes what was pinned.
    """
    if cuda:
        runtime, why = _cuda_runtime(device)
    else:  # a private mapping's twin: registering it would not pin the arrays' addresses
        runtime, why = None, "copy-on-write mapping: not registered with CUDA"
    if runtime is not None:
        for m, ranges in mappings:
            refused = _cuda_pin(m, ranges, runtime, device)
            if refused:
                for m2, _ in mappings:
                    m2._release.unpin()
                why = refused
                break
        else:
            return "cuda", "cudaHostRegister (read-only)"
    for m, ranges in mappings:
        failed = _mlock(m, ranges)
        if failed:
            for m2, _ in mappings:
                m2._release.unpin()
            return None, f"{why}; {failed}"
    if runtime is not None:  # CUDA was there and refused: say it is a fallback
        return "mlock", f"mlock, the fallback: {why}"
    return "mlock", f"mlock ({why})"
