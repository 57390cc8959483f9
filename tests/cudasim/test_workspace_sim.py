"""The gather's per-stream table buffer is freed by ``release_stream``."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from gpuload.kernels import cuda as kernels_cuda
from gpuload.kernels import gather_host
from gpuload.kernels.cuda import Launch, gather, release_stream, workspace_bytes
from numba import cuda

from gpuload.device_cuda import CupyRuntime

pytestmark = pytest.mark.cudasim

SMALL = Launch(threads=8, tile_words=24, min_blocks=1, max_blocks=3)
TABLE = np.array([[8, 0, 5, 24, 40, 24]], dtype=np.int64)  # 5 rows of 24 bytes


def gather_on(stream) -> None:
    """Gather ``TABLE`` on ``stream`` and check the bytes against the host twin."""
    rng = np.random.default_rng(0)
    src, dst = rng.integers(0, 256, 256, np.uint8), rng.integers(0, 256, 130, np.uint8)
    d_dst = cuda.to_device(dst)
    gather(cuda.to_device(src), d_dst, TABLE, stream=stream, launch=SMALL)
    gather_host(src, dst, TABLE)
    np.testing.assert_array_equal(d_dst.copy_to_host(), dst)


def test_release_stream_frees_only_that_streams_buffer() -> None:
    a, b = cuda.stream(), cuda.stream()
    base = workspace_bytes()  # other tests' streams keep theirs
    gather_on(a)
    one = workspace_bytes() - base
    assert one > 0
    gather_on(a)  # reused, not grown
    gather_on(b)
    assert workspace_bytes() == base + 2 * one
    release_stream(a)
    assert workspace_bytes() == base + one
    release_stream(a)  # released twice, or never used: nothing to free
    release_stream(cuda.stream())
    assert workspace_bytes() == base + one
    gather_on(a)  # a released stream gathers again, with a fresh buffer
    release_stream(a)
    release_stream(b)
    assert workspace_bytes() == base


def test_cupy_runtime_destroy_stream_releases_the_buffer() -> None:
    # No cupy here: a CupyRuntime with just what destroy_stream uses, the
    # kernel module and a device context.
    rt = object.__new__(CupyRuntime)
    rt._kernels, rt._device = kernels_cuda, contextlib.nullcontext()
    s = cuda.stream()
    base = workspace_bytes()
    gather_on(s)
    assert workspace_bytes() > base
    rt.destroy_stream(s)
    assert workspace_bytes() == base
