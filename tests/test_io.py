"""The posix reader and the host pipeline's failure paths."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import write_raw

import gpuload
from gpuload.errors import ReadError
from gpuload.format.header import parse_header
from gpuload.read.posix import PosixReader


def _file(tmp_path, n=1 << 16):
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    f = write_raw(
        tmp_path / "x.safetensors",
        {"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}},
        data,
    )
    return f, data


def test_preadv_scatters_and_survives_short_reads(tmp_path, monkeypatch):
    f, data = _file(tmp_path)
    h = parse_header(f)
    real = __import__("os").preadv
    calls = []

    def short(fd, bufs, off):  # never more than 1000 bytes per call
        calls.append(off)
        first = bufs[0][: min(1000, len(bufs[0]))]
        return real(fd, [first], off)

    monkeypatch.setattr("gpuload.read.posix.os.preadv", short)
    a, b = bytearray(3000), bytearray(5)
    with PosixReader([h]) as r:
        r.readinto(str(f), h.data_start + 7, [memoryview(a), memoryview(b)])
    assert bytes(a) + bytes(b) == data[7 : 7 + 3005] and len(calls) >= 4


def test_eof_short_read_is_an_error(tmp_path):
    f, _ = _file(tmp_path)
    h = parse_header(f)
    with PosixReader([h]) as r, pytest.raises(ReadError, match="end of file"):
        r.readinto(str(f), h.size - 10, [memoryview(bytearray(20))])


def test_failed_load_raises_leaves_no_threads_and_returns_nothing(tmp_path, monkeypatch):
    f, _ = _file(tmp_path, 1 << 20)
    calls = {"n": 0}
    real = __import__("os").preadv

    def flaky(fd, bufs, off):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(5, "Input/output error")
        return real(fd, bufs, off)

    monkeypatch.setattr("gpuload.read.posix.os.preadv", flaky)
    with pytest.raises(ReadError, match="Input/output error") as e:
        gpuload.load_sharded(
            f, 0, 1, device="cpu", chunk_bytes=16384, min_chunk_bytes=4096, threads=4
        )
    assert str(f) in str(e.value)
    # (tqdm keeps a monitor thread of its own; ours are named gpuload-*)
    assert not [t for t in threading.enumerate() if t.name.startswith("gpuload")]


def counting_reader(delay: float) -> type:
    """A fresh PosixReader subclass that records each read's size and the
    most reads in flight at once; each read sleeps ``delay`` seconds first,
    long enough that concurrent reads overlap."""
    import time

    class Counting(PosixReader):
        sizes: list[int] = []
        active = most = 0
        lock = threading.Lock()

        def readinto(self, file, offset, buffers):
            with Counting.lock:
                Counting.active += 1
                Counting.most = max(Counting.most, Counting.active)
                Counting.sizes.append(sum(len(b) for b in buffers))
            try:
                time.sleep(delay)
                super().readinto(file, offset, buffers)
            finally:
                with Counting.lock:
                    Counting.active -= 1

    return Counting


def test_a_cold_load_reads_with_a_deeper_queue_and_a_warm_one_does_not(tmp_path):
    # mincore decides per load: most reads missing the page cache means
    # cold_threads readers and direct reads of at most cold_chunk_bytes.
    from safetensors.numpy import save_file

    from gpuload.memory.mapping import evict

    rng = np.random.default_rng(0)
    tensors = {f"t{i}": rng.random((1 << 20) // 4 * 6, np.float32) for i in range(4)}  # 24 MiB
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))

    Counting = counting_reader(delay=0.01)
    settings = dict(threads=2, cold_threads=6, cold_chunk_bytes="1MiB", chunk_bytes="16MiB")
    settings["cold_direct"] = False  # the buffered reads are what this counts
    with gpuload.Loader(device="cpu", reader_factory=Counting, **settings) as ld:
        if evict([str(path)]) > 0.02:
            pytest.skip("the page cache keeps this file (tmpfs?): no cold load possible")
        got, rep = ld.load(path, 0, 1, return_report=True)
        assert rep.cold_reads and max(Counting.sizes) <= 1 << 20
        assert Counting.most > 2  # more than `threads` reads in flight
        assert all(got[k].tobytes() == v.tobytes() for k, v in tensors.items())
        Counting.sizes.clear()
        got, rep = ld.load(path, 0, 1, return_report=True)  # warm now
        assert not rep.cold_reads and max(Counting.sizes) > 1 << 20


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("rank_world", [(0, 1), (1, 2), (2, 4)])
def test_cold_loads_read_whole_tensors_with_o_direct_byte_exact(tmp_path, rng, aligned, rank_world):
    # Cold: whole tensors and row-shard runs go O_DIRECT into gpuload's own
    # huge-page result mappings, widened to 4 KiB blocks; the widening lands
    # where the result mirrors the file or in the mapping's slack, never in
    # another row's bytes (column shards stay buffered). Every byte checked.
    from conftest import RULES, expected_shards, write_matrix

    import gpuload
    from gpuload.memory.mapping import evict

    big = {
        "big.row": ("BF16", (2048, 1030)),
        "big.col": ("F32", (600, 2048)),
        "big.w": ("U8", (3, 1 << 20)),
    }
    dims = {"big.row": 0, "big.col": 1, "big.w": None}
    path = write_matrix(tmp_path, rng, aligned=aligned, extra=big)
    rules = {r"^big\.row$": 0, r"^big\.col$": 1, **RULES}
    rank, world = rank_world
    gpuload.release_host_pool()  # fresh mappings: nothing left from another test's load
    if evict([str(path)]) > 0.02:
        pytest.skip("the page cache keeps this file (tmpfs?): no cold load possible")
    got, rep = gpuload.load_sharded(
        path, rank, world, device="cpu", rules=rules, return_report=True, cold_chunk_bytes="1MiB"
    )
    want = expected_shards(path, rank, world, dims)
    bad = [k for k in want if np.ascontiguousarray(got[k]).tobytes() != want[k]]
    assert not bad, bad
    assert rep.cold_reads
    if aligned:
        assert rep.direct_ops > 0  # the big row runs at least
    evict([str(path)])
    got, rep = gpuload.load_sharded(
        path, rank, world, device="cpu", rules=rules, return_report=True, cold_direct=False
    )
    assert rep.direct_ops == 0
    assert not [k for k in want if np.ascontiguousarray(got[k]).tobytes() != want[k]]


@pytest.mark.parametrize("cpus", [1, 2, 64])
def test_a_warm_load_runs_at_most_one_reader_per_core_unless_threads_is_chosen(
    tmp_path, monkeypatch, cpus
):
    # A warm load's reads are page-cache copies that each keep a core busy:
    # with the default threads it runs min(threads, usable cores) readers; a
    # threads the caller chose (keyword or GPULOAD_THREADS) stands.
    from safetensors.numpy import save_file

    monkeypatch.setattr("gpuload.host.pipeline.usable_cpus", lambda: cpus)
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": rng.random(1 << 18, np.float32) for i in range(16)}  # 16 x 1 MiB
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    path.read_bytes()  # warm

    Counting = counting_reader(delay=0.02)

    def load(**settings):
        Counting.most = 0
        with gpuload.Loader(
            device="cpu", reader_factory=Counting, chunk_bytes="1MiB", progress=False, **settings
        ) as ld:
            got, rep = ld.load(path, 0, 1, return_report=True)
        assert not rep.cold_reads
        assert all(got[k].tobytes() == v.tobytes() for k, v in tensors.items())
        return rep.threads, Counting.most

    default = gpuload.config.get().threads
    assert load() == (min(default, cpus),) * 2
    assert load(threads=6) == (6, 6)
    monkeypatch.setenv("GPULOAD_THREADS", "5")
    monkeypatch.setattr(gpuload.config, "_current", None)
    assert load() == (5, 5)


def test_read_ahead_hints_go_out_on_a_cold_load_only_and_never_with_prefetch_off(tmp_path):
    # On cached pages a WILLNEED hint walks the page cache for nothing, so a
    # load mincore finds warm sends none; a cold one hints the read a thread
    # takes next; GPULOAD_PREFETCH=0 (prefetch=False) sends none, cold or not.
    from safetensors.numpy import save_file

    from gpuload.memory.mapping import evict

    rng = np.random.default_rng(2)
    tensors = {f"t{i}": rng.random(1 << 18, np.float32) for i in range(12)}  # 12 x 1 MiB
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))

    class Hinted(PosixReader):
        hints = 0

        def advise(self, file, offset, length):
            if self.prefetch:
                Hinted.hints += 1
            super().advise(file, offset, length)

    def load(cold: bool, **settings) -> int:
        Hinted.hints = 0
        with gpuload.Loader(
            device="cpu",
            reader_factory=Hinted,
            chunk_bytes="1MiB",
            cold_direct=False,
            cold_chunk_bytes="1MiB",
            threads=2,
            cold_threads=2,
            progress=False,
            **settings,
        ) as ld:
            if cold and evict([str(path)]) > 0.02:
                pytest.skip("the page cache keeps this file (tmpfs?): no cold load possible")
            got, rep = ld.load(path, 0, 1, return_report=True)
        assert rep.cold_reads == cold
        assert all(got[k].tobytes() == v.tobytes() for k, v in tensors.items())
        return Hinted.hints

    assert load(cold=True) > 0
    assert load(cold=False) == 0
    assert load(cold=True, prefetch=False) == 0
