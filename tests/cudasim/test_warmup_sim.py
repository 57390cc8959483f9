"""A GPU Loader compiles every gather variant in its own thread, before any read.

A first compile inside a reader thread would put the compile (and any
warning NVVM or the linker gives, an error under ``filterwarnings=error``)
in the middle of a load; ``CupyRuntime`` runs each variant once when made.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
from numba import cuda

from gpuload.cuda.runtime import CupyRuntime
from gpuload.errors import BackendUnavailable
from gpuload.kernels import cuda as kernels_cuda
from gpuload.kernels import gather_kernel
from gpuload.kernels.cuda import Launch, gather

pytestmark = pytest.mark.cudasim

SMALL = dict(launch=Launch(threads=8, tile_words=8, min_blocks=1, max_blocks=2))


def sim_runtime() -> CupyRuntime:
    # No cupy here: a CupyRuntime with just what the warm-up uses.
    rt = object.__new__(CupyRuntime)
    rt._kernels, rt._device = kernels_cuda, contextlib.nullcontext()
    rt.stream = cuda.stream
    rt._to_device = lambda a, stream: cuda.to_device(a, stream=stream)
    rt._to_host = lambda a: a.copy_to_host()
    return rt


def test_every_variant_compiles_in_the_callers_thread(monkeypatch):
    monkeypatch.setattr(gather_kernel, "_cache", {})  # as in a fresh process
    monkeypatch.setattr(gather_kernel, "_compiles", {})
    jit, threads = cuda.jit, []

    def recording_jit(*args, **kwargs):
        threads.append(threading.get_ident())
        return jit(*args, **kwargs)

    monkeypatch.setattr(kernels_cuda.cuda, "jit", recording_jit)
    sim_runtime()._warm(**SMALL)
    assert kernels_cuda.variants() == {16: 1, 8: 1, 4: 1, 2: 1, 1: 1}
    assert set(threads) == {threading.get_ident()}

    # A load's gathers, on a reader thread: every width, no compile there.
    def gathers() -> None:
        rng = np.random.default_rng(1)
        for off in (8, 4, 2, 1):
            table = np.array([[off, 0, 3, off, 4 * off, off]], dtype=np.int64)
            src = cuda.to_device(rng.integers(0, 256, 128, np.uint8))
            gather(src, cuda.to_device(np.zeros(64, np.uint8)), table, **SMALL)

    t = threading.Thread(target=gathers)
    t.start()
    t.join()
    assert set(threads) == {threading.get_ident()}
    assert kernels_cuda.variants() == {16: 1, 8: 1, 4: 1, 2: 1, 1: 1}


def test_a_kernel_that_moves_wrong_bytes_fails_the_warm_up(monkeypatch):
    monkeypatch.setattr(kernels_cuda, "gather", lambda *a, **k: None)  # a kernel that does nothing
    with pytest.raises(BackendUnavailable, match="warming up the gather kernels failed: .*wrong"):
        sim_runtime()._warm(**SMALL)
