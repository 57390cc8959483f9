"""The gather's per-stream table buffer is freed by ``release_stream``."""

from __future__ import annotations

import contextlib
import gc
import weakref

import numpy as np
import pytest
from numba import cuda

from gpuload.cuda.runtime import CupyRuntime
from gpuload.kernels import cuda as kernels_cuda
from gpuload.kernels.cuda import Launch, gather, release_stream, workspace_bytes
from gpuload.kernels.host import gather_host

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


class HeldEvent:
    """An event the test completes by hand: the stream "passes" it when told."""

    made: list[HeldEvent] = []

    def __init__(self) -> None:
        self.passed = self.synchronized = False
        self.stream = None
        HeldEvent.made.append(self)

    def record(self, stream=0) -> None:
        self.stream = stream

    def query(self) -> bool:
        return self.passed

    def synchronize(self) -> None:
        self.synchronized = self.passed = True


def table_of(n: int) -> np.ndarray:
    """``n`` one-row pieces of 8 bytes: a word table of ``n`` rows."""
    t = np.zeros((n, 6), np.int64)
    t[:, 0] = t[:, 1] = np.arange(n) * 8  # src_off, dst_off
    t[:, 2], t[:, 3], t[:, 4], t[:, 5] = 1, 8, 8, 8
    return t


def gather_table(n: int, stream) -> None:
    rng = np.random.default_rng(n)
    src = rng.integers(0, 256, 8 * n, np.uint8)
    dst = np.zeros(8 * n, np.uint8)
    d_dst = cuda.to_device(dst)
    gather(cuda.to_device(src), d_dst, table_of(n), stream=stream, launch=SMALL)
    np.testing.assert_array_equal(d_dst.copy_to_host(), src)


def test_an_outgrown_table_buffer_lives_until_the_stream_passes_its_event(monkeypatch):
    # A launch queued before the table outgrew its buffer may still read the
    # old one: it is freed only once the stream has passed an event recorded
    # behind that launch, never at the moment it is replaced.
    monkeypatch.setattr(kernels_cuda, "_event", HeldEvent)
    HeldEvent.made.clear()
    s = cuda.stream()
    key = (0, kernels_cuda._handle(s))
    gather_table(8, s)
    old = weakref.ref(kernels_cuda._workspaces[key])
    gather_table(100, s)  # more pieces than the first buffer holds: it grows
    gc.collect()
    assert old() is not None, "the old table buffer was freed while the stream may read it"
    (ev,) = HeldEvent.made
    assert ev.stream is s  # recorded on the stream that used the old buffer
    gather_table(100, s)  # the stream has not passed the event: still held
    gc.collect()
    assert old() is not None
    ev.passed = True
    gather_table(100, s)  # passed now: the next upload frees it
    gc.collect()
    assert old() is None

    newer = weakref.ref(kernels_cuda._workspaces[key])
    gather_table(400, s)  # grows again; release_stream waits for the event, then frees
    ev2 = HeldEvent.made[-1]
    assert not ev2.passed and newer() is not None
    release_stream(s)
    gc.collect()
    assert ev2.synchronized and newer() is None
    assert key not in kernels_cuda._workspaces and key not in kernels_cuda._retired


def test_tables_go_up_from_pinned_buffers_reused_once_their_event_passes(monkeypatch):
    # A pageable table makes its H2D synchronous; the upload reads a pinned
    # copy instead, reused per stream only once the stream has passed the
    # event recorded behind the upload that last read it.
    monkeypatch.setattr(kernels_cuda, "_staging_event", HeldEvent)
    HeldEvent.made.clear()
    sources: list = []
    pinned: list = []
    real_pinned = cuda.pinned_array

    def counting_pinned(*a, **kw):
        pinned.append(real_pinned(*a, **kw))
        return pinned[-1]

    monkeypatch.setattr(kernels_cuda.cuda, "pinned_array", counting_pinned)
    real_copy = type(cuda.device_array(1)).copy_to_device

    def spy(self, ary, stream=0):
        sources.append(ary)
        return real_copy(self, ary, stream=stream)

    monkeypatch.setattr(type(cuda.device_array(1)), "copy_to_device", spy)
    s = cuda.stream()
    gather_table(8, s)
    gather_table(8, s)  # the first upload's event is not passed: a second buffer
    assert len(pinned) == 2 and len(sources) == 2  # one table upload per gather
    assert all(any(np.shares_memory(src, p) for p in pinned) for src in sources)
    for ev in HeldEvent.made:
        ev.passed = True
    gather_table(8, s)  # passed: reused, nothing new pinned
    assert len(pinned) == 2 and kernels_cuda.pinned_table_bytes() > 0
    for _ in range(6):  # never more than a few per stream: the oldest is waited for
        gather_table(8, s)
    assert len(pinned) <= kernels_cuda._PINNED_PER_STREAM
    release_stream(s)
    assert kernels_cuda._handle(s) not in {k[1] for k in kernels_cuda._pinned}
