"""Resources running out under a load: the process's mappings, its address
space, its threads. Each case runs in a child process (the limits are
per-process) through load_sharded; a GpuloadError subclass comes back (that
is also the MemoryError / RuntimeError Python raises), or, where gpuload can
do without the resource, the right bytes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

PRELUDE = textwrap.dedent(
    """
    import ctypes, hashlib, os, resource, sys, threading
    import numpy as np
    import gpuload

    path = sys.argv[1]

    def fds():
        return sorted(os.listdir("/proc/self/fd"))

    def digest(got):
        h = hashlib.sha256()
        for name in sorted(got):
            h.update(name.encode())
            h.update(np.ascontiguousarray(got[name]).view(np.uint8).tobytes())
        return h.hexdigest()

    def outcome(call):
        before = fds()
        try:
            got = call()
        except gpuload.GpuloadError as e:
            after = fds()
            print("ERROR", type(e).__name__, "MemoryError" if isinstance(e, MemoryError) else "",
                  "RuntimeError" if isinstance(e, RuntimeError) else "",
                  "LEAK" if after != before else "NOLEAK", "|", e, flush=True)
        except BaseException as e:
            print("RAW", type(e).__name__, e, flush=True)
        else:
            print("RETURNED", digest(got), flush=True)
    """
)


def run_child(body: str, path, timeout: float = 300) -> str:
    code = PRELUDE + textwrap.dedent(body)
    p = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def big_results(tmp_path_factory):
    """120 tensors of 2 MiB + 1 KiB: each a result gpuload would map."""
    rng = np.random.default_rng(0)
    n = (2 << 20) + 1024
    tensors = {f"t{i:03d}": rng.integers(0, 256, n, dtype=np.uint8) for i in range(120)}
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    save_file(tensors, str(path))
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].tobytes())
    return path, h.hexdigest()


def test_mapping_limit_nearly_reached_falls_back_to_heap(big_results):
    """With 64 mappings left in the process, 120 results of 2 MiB each (one
    mapping each) used to fail at about the 64th with a bare MemoryError;
    they now fall back to np.empty and the bytes are right."""
    path, want = big_results
    out = run_child(
        """
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        gpuload.load_sharded(path, 0, 1, device="cpu", include=["t000"], threads=2)  # warm
        limit = int(open("/proc/sys/vm/max_map_count").read())
        used = len(open("/proc/self/maps").readlines())
        take = (limit - used - 64) // 2  # each mprotect splits off two mappings
        page = 4096
        base = libc.mmap(None, 2 * take * page, 3, 0x22, -1, 0)  # PROT_RW, PRIVATE|ANON
        for i in range(take):  # every other page read-only: one mapping each
            assert libc.mprotect(base + 2 * i * page, page, 1) == 0
        left = limit - len(open("/proc/self/maps").readlines())
        print("LEFT", left, flush=True)
        outcome(lambda: gpuload.load_sharded(path, 0, 1, device="cpu", threads=2))
        """,
        path,
    )
    left = int(out.split("LEFT ")[1].split()[0])
    assert left < 120, out  # fewer mappings left than results: the case
    assert f"RETURNED {want}" in out, out


def test_address_space_limit_is_out_of_memory_error(big_results):
    path, _ = big_results
    out = run_child(
        """
        gpuload.load_sharded(path, 0, 1, device="cpu", include=["t000"], threads=1)  # warm
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
        room = vm * 1024 + (96 << 20)  # 96 MiB more: the threads start, 250 MiB of results do not
        resource.setrlimit(resource.RLIMIT_AS, (room, room))
        outcome(lambda: gpuload.load_sharded(path, 0, 1, device="cpu", threads=1))
        """,
        path,
    )
    assert "ERROR OutOfMemoryError MemoryError" in out and "NOLEAK" in out, out
    assert "big.safetensors" in out, out


def test_thread_start_failure_is_resource_error(big_results):
    path, _ = big_results
    out = run_child(
        """
        gpuload.load_sharded(path, 0, 1, device="cpu", include=["t000"], threads=1)  # warm
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
        room = vm * 1024 + (256 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (room, room))
        threading.stack_size(512 << 20)  # no thread fits; the small load's memory does
        outcome(lambda: gpuload.load_sharded(
            path, 0, 1, device="cpu", threads=4, include=["t001", "t002", "t003", "t004"]))
        """,
        path,
    )
    assert "ERROR ResourceError  RuntimeError NOLEAK" in out, out
    assert "cannot start a thread" in out, out
