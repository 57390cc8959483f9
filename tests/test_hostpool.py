"""Huge-page result mappings kept for the next CPU load (gpuload.memory.pool)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from safetensors.numpy import save_file

import gpuload
from gpuload.memory import pool as hostpool
from gpuload.memory.mapping import HUGE_PAGE, HostBuffer


@pytest.fixture
def ckpt(tmp_path):
    rng = np.random.default_rng(3)
    tensors = {
        "a.weight": rng.random((1024, 1030), np.float32),  # ~4 MiB: pooled
        "b.weight": rng.random((515, 1024), np.float32),  # ~2 MiB: pooled
        "c.weight": rng.random((8, 8), np.float32),  # small: np.empty
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    gpuload.release_host_pool()
    yield path, tensors
    gpuload.release_host_pool()


def maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def test_a_second_load_writes_the_mappings_the_first_one_freed(ckpt):
    # Warm loads in a process that does other work between them used to
    # fault fresh huge pages (and compact memory) every time; the freed
    # results' mappings are kept and the next load reuses them, faulted in.
    path, tensors = ckpt
    got = gpuload.load_sharded(path, 0, 1, device="cpu")
    first = {k: v.ctypes.data & ~(HUGE_PAGE - 1) for k, v in got.items() if v.nbytes >= HUGE_PAGE}
    assert len(first) == 2
    del got
    gc.collect()
    assert hostpool.held() >= 6 * (1 << 20)
    reused = hostpool.stats["reused"]
    junk = [np.ones(n, np.uint8) for n in (3 << 20, 5 << 20, 1 << 20)]  # other work between
    got = gpuload.load_sharded(path, 0, 1, device="cpu")
    assert hostpool.stats["reused"] - reused == 2
    again = {k: v.ctypes.data & ~(HUGE_PAGE - 1) for k, v in got.items() if v.nbytes >= HUGE_PAGE}
    assert set(again.values()) == set(first.values())
    for k, v in tensors.items():  # every byte rewritten: nothing of the last load shows
        assert got[k].tobytes() == v.tobytes(), k
    del got, junk
    gc.collect()
    before = maps()
    assert gpuload.release_host_pool() >= 6 * (1 << 20)
    assert hostpool.held() == 0 and maps() < before


def test_the_pool_is_bounded_and_hugepages_0_bypasses_it(ckpt, monkeypatch):
    path, _ = ckpt
    monkeypatch.setattr(hostpool, "cap", lambda: 5 << 20)  # room for one 2 MiB class only
    unmapped = hostpool.stats["unmapped"]
    got = gpuload.load_sharded(path, 0, 1, device="cpu")
    del got
    gc.collect()
    assert hostpool.held() <= 5 << 20 and hostpool.stats["unmapped"] > unmapped
    reused = hostpool.stats["reused"]
    gpuload.load_sharded(path, 0, 1, device="cpu", hugepages=0)
    assert hostpool.stats["reused"] == reused  # np.empty results: the pool is not used


def _mapped(a: np.ndarray) -> bool:
    """Whether a result's memory is one of gpuload's own mappings."""
    while a is not None and not isinstance(a, HostBuffer):
        a = a.base
    return a is not None


def test_results_under_a_huge_page_are_pooled_too(tmp_path):
    # A result of 64 KiB to 2 MiB used to come from np.empty: fresh pages,
    # a fault and a zeroing each, on every load. Now it is a pooled mapping
    # of 4 KiB pages that the next load of the same size class reuses.
    rng = np.random.default_rng(4)
    tensors = {
        "q.weight": rng.random((256, 1024), np.float32),  # 1 MiB
        "k.weight": rng.random((64, 1024), np.float32),  # 256 KiB
        "n.weight": rng.random(1000, np.float32),  # under 64 KiB: np.empty
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    gpuload.release_host_pool()
    try:
        got = gpuload.load_sharded(path, 0, 1, device="cpu")
        first = {k: v.ctypes.data for k, v in got.items()}
        assert [k for k, v in got.items() if not _mapped(v)] == ["n.weight"]
        del got
        gc.collect()
        reused = hostpool.stats["reused"]
        got = gpuload.load_sharded(path, 0, 1, device="cpu")
        assert hostpool.stats["reused"] - reused == 2
        assert {got[k].ctypes.data for k in ("q.weight", "k.weight")} == {
            first["q.weight"],
            first["k.weight"],
        }
        for k, v in tensors.items():  # every byte rewritten
            assert got[k].tobytes() == v.tobytes(), k
    finally:
        gpuload.release_host_pool()


def test_set_aside_times_a_first_load_and_gives_the_pool_back(ckpt):
    # bench/warm_interleaved.py times a first load (an empty pool) in a
    # process whose other loads keep theirs: the kept mappings must survive.
    path, tensors = ckpt
    first = gpuload.load_sharded(path, 0, 1, device="cpu")
    kept = {v.ctypes.data & ~(HUGE_PAGE - 1) for v in first.values() if v.nbytes >= HUGE_PAGE}
    del first
    gc.collect()
    held = hostpool.held()
    reused = hostpool.stats["reused"]
    with hostpool.set_aside():
        assert hostpool.held() == 0
        got = gpuload.load_sharded(path, 0, 1, device="cpu")
        assert hostpool.stats["reused"] == reused  # fresh mappings, as a first load
        assert all(got[k].tobytes() == v.tobytes() for k, v in tensors.items())
        del got
        gc.collect()
    assert hostpool.held() == held  # what the block gave back was unmapped
    got = gpuload.load_sharded(path, 0, 1, device="cpu")
    assert hostpool.stats["reused"] - reused == 2
    assert {v.ctypes.data & ~(HUGE_PAGE - 1) for v in got.values() if v.nbytes >= HUGE_PAGE} == kept
