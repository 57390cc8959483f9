"""Concurrency and interruption: two Loaders at once, one Loader from two
threads, and Ctrl-C in the middle of a load."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from test_faults import RULES, SMALL, as_bytes, expected, fds, gpuload_threads, make_model, maps_of

import gpuload
from gpuload.read.faults import FaultyReaderFactory


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path / "m")


def _spans():
    """A before_read hook that records when reads start, per thread-safe list."""
    times: list[float] = []
    lock = threading.Lock()

    def hook(file, offset, nbytes):
        with lock:
            times.append(time.monotonic())

    return times, hook


def test_two_loaders_in_two_threads_are_byte_exact(model, tmp_path):
    other = make_model(tmp_path / "other", seed=1, files=3)
    jobs = {"a": (model, 1, 2), "b": (other, 3, 4)}
    spans, results, errors = {}, {}, []
    start = threading.Barrier(2)

    def load(key):
        path, rank, world = jobs[key]
        times, hook = _spans()
        spans[key] = times
        factory = FaultyReaderFactory(delay=(0.0005, 0.002), short_reads=0.2, before_read=hook)
        try:
            with gpuload.Loader(device="cpu", reader_factory=factory, **SMALL) as ld:
                start.wait()
                results[key] = ld.load(path, rank, world, rules=RULES)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=load, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    for key, (path, rank, world) in jobs.items():
        assert as_bytes(results[key]) == expected(path, rank, world), key
    a, b = spans["a"], spans["b"]
    assert a[0] < b[-1] and b[0] < a[-1], "the two loads did not overlap"
    assert gpuload_threads() == []


def test_one_loader_from_two_threads_raises_a_clear_error_then_works(model):
    fds0 = fds()
    reading = threading.Event()
    release = threading.Event()

    def hold(file, offset, nbytes):
        reading.set()
        release.wait(10)  # keep the first load in flight while the second tries

    factory = FaultyReaderFactory(before_read=hold)
    loader = gpuload.Loader(device="cpu", reader_factory=factory, **SMALL)
    box = {}

    def first():
        try:
            box["result"] = loader.load(model, 0, 2, rules=RULES)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=first)
    t.start()
    assert reading.wait(10)
    with pytest.raises(RuntimeError, match="already loading in another thread") as e:
        loader.load(model, 1, 2, rules=RULES)
    assert "one Loader per thread" in str(e.value)
    release.set()
    t.join(30)
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert as_bytes(box["result"]) == expected(model, 0, 2)
    # Nothing is stuck: the same Loader loads again, both ranks, byte-exact.
    factory.faults["before_read"] = None
    for rank in (0, 1):
        assert as_bytes(loader.load(model, rank, 2, rules=RULES)) == expected(model, rank, 2)
    loader.close()
    assert gpuload_threads() == [] and fds() == fds0


def test_a_ctrl_c_between_taking_and_guarding_the_busy_mark_does_not_wedge_the_loader(model):
    """The window a lock cannot close: KeyboardInterrupt right after the
    busy mark is taken and before its try. Simulated by entering the mark and
    never leaving it, as that interrupt would."""
    loader = gpuload.Loader(device="cpu", **SMALL)
    busy = loader._backend._pipeline._busy
    stuck = [busy()]
    stuck[0].__enter__()  # taken, and never released
    for rank in (0, 1):  # the interrupted thread goes again
        assert as_bytes(loader.load(model, rank, 2, rules=RULES)) == expected(model, rank, 2)
    stuck.append(busy())
    stuck[1].__enter__()
    box = {}

    def other():  # while the mark names another thread, this one is refused
        try:
            loader.load(model, 0, 2, rules=RULES)
        except RuntimeError as e:
            box["error"] = e

    t = threading.Thread(target=other)
    t.start()
    t.join(30)
    assert "already loading" in str(box.get("error"))
    loader.close()


MANY_OPS = dict(chunk_bytes=64, min_chunk_bytes=64, staging_bytes=4096, threads=4)


@pytest.mark.parametrize(
    "settings,delay",
    [(SMALL, (0.002, 0.004)), (MANY_OPS, (0.0002, 0.0005))],
    ids=["small", "many-ops"],
)
def test_ctrl_c_mid_load_releases_everything(model, settings, delay):
    """Ctrl-C as reads start: with many ops the caller's thread is still
    queueing them (where it once escaped without joining the readers)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here (cannot raise KeyboardInterrupt)")
    assert threading.current_thread() is threading.main_thread()
    sent = threading.Event()
    main = threading.main_thread().ident

    def ctrl_c(file, offset, nbytes):
        if not sent.is_set():
            sent.set()
            signal.pthread_kill(main, signal.SIGINT)

    factory = FaultyReaderFactory(delay=delay, before_read=ctrl_c, seed=9)
    loader = gpuload.Loader(device="cpu", reader_factory=factory, **settings)
    total_ops = len(loader.plan(model, 0, 2, rules=RULES).plan.ops)
    fds0, maps0 = fds(), maps_of(model)
    result = None
    with pytest.raises(KeyboardInterrupt):
        result = loader.load(model, 0, 2, rules=RULES, cpu_resident=r"^rep$")
        time.sleep(5)  # not reached when the interrupt lands mid-load, as it must
    assert sent.is_set() and result is None and loader.last_report is None
    assert factory.stats.ops < total_ops, "the load ran to the end: it was not interrupted"
    assert gpuload_threads() == []
    assert fds() == fds0
    assert maps_of(model) == maps0 == []
    # The same Loader is usable at once, and right.
    factory.faults["before_read"] = None
    for rank in (0, 1):
        got = loader.load(model, rank, 2, rules=RULES, cpu_resident=r"^rep$")
        assert as_bytes(got) == expected(model, rank, 2)
    del got
    loader.close()
    assert gpuload_threads() == []


@pytest.mark.parametrize("where", ["fstat", "set_blocking"])
def test_ctrl_c_between_open_and_store_leaks_no_fd(model, monkeypatch, where):
    """A KeyboardInterrupt landing in the reader's open (after os.open,
    before the fd is stored for close()) closes the fd (issue 23: Ctrl-C
    mid-load leaked the checkpoint's fd in 6 of 190 trials)."""
    import os
    import sys

    real = getattr(os, where)
    armed = [True]

    def interrupted(*a, **k):
        out = real(*a, **k)
        if armed[0] and sys._getframe(1).f_globals.get("__name__") == "gpuload.read.posix":
            armed[0] = False
            raise KeyboardInterrupt
        return out

    before = fds()
    monkeypatch.setattr(os, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpuload.load_sharded(model, 0, 2, device="cpu", rules=RULES, **SMALL)
    monkeypatch.undo()
    assert not armed[0], "the reader never opened a file"
    assert fds() == before
