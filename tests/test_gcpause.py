"""gpuload.format.gcpause: the collector is off while a checkpoint is parsed and
planned, and left as the caller had it afterwards, errors included."""

from __future__ import annotations

import gc
import threading

import pytest
from conftest import write_matrix

import gpuload
from gpuload.format import gcpause


def test_off_inside_and_restored_after_nesting_and_errors():
    assert gc.isenabled()
    with gcpause.paused():
        assert not gc.isenabled()
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()
    with pytest.raises(KeyError), gcpause.paused():
        raise KeyError("x")
    assert gc.isenabled()


def test_a_callers_own_disable_stands():
    gc.disable()
    try:
        with gcpause.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_concurrent_pauses_end_with_the_last(tmp_path, rng):
    path = write_matrix(tmp_path, rng)
    inside, release = threading.Event(), threading.Event()

    def hold():
        with gcpause.paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(10)
    gpuload.Loader(device="cpu").plan(path, 0, 2)  # pauses and ends its own pause
    assert not gc.isenabled()  # the other thread's pause is still on
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_parsing_and_planning_run_paused(tmp_path, rng, monkeypatch):
    path = write_matrix(tmp_path, rng)
    seen = []
    real = gpuload.load_plan.plan_reads

    def spy(*a, **k):
        seen.append(gc.isenabled())
        return real(*a, **k)

    monkeypatch.setattr(gpuload.load_plan, "plan_reads", spy)
    gpuload.load_sharded(path, 0, 2, device="cpu")
    assert seen == [False] and gc.isenabled()
