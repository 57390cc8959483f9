"""Reader threads: numbered jobs on a few threads, results handed back to the
caller's thread. Both pipelines (host and device) run their read ops here."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


def join(t: threading.Thread, patience: float = 1.0) -> None:
    """Join ``t``, also when a Ctrl-C cut its ``start()`` short: the thread
    may still be starting (``join`` refuses until it has)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            t.join()
            return
        except RuntimeError:  # not started yet
            if time.monotonic() > deadline:  # start() was cut before the thread existed
                return
            time.sleep(0.001)


def run_jobs(
    count: int,
    threads: int,
    job: Callable[[int], Any],
    on_result: Callable[[Any], None],
    *,
    name: str,
    setup: Callable[[], None] | None = None,
) -> None:
    """Run ``job(i)`` for ``i in range(count)`` on up to ``threads`` threads.

    ``on_result`` gets each job's return value in the caller's thread. The
    first exception of a job, or a Ctrl-C in the caller's thread, stops the
    rest: no job starts after it, running jobs finish, every thread is
    joined, then it is raised. ``setup`` runs first on each thread (binding
    a CUDA device, say).

    Every job is queued before any thread starts, so the caller's thread only
    starts workers and waits: a Ctrl-C lands there, never half way through
    queueing thousands of futures, whose locks an asynchronous
    KeyboardInterrupt can leave broken.
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(count):
        todo.put(i)
    done: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    stop = threading.Event()

    def worker() -> None:
        try:
            if setup is not None:
                setup()
            while not stop.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                done.put((True, job(i)))
        except BaseException as e:  # handed to the caller's thread
            stop.set()
            done.put((False, e))

    started: list[threading.Thread] = []
    try:
        for k in range(min(threads, count)):
            started.append(threading.Thread(target=worker, name=f"{name}_{k}"))
            started[-1].start()
        for _ in range(count):
            ok, item = done.get()
            if not ok:
                raise item
            on_result(item)
    finally:
        stop.set()
        for t in started:
            join(t)


class Busy:
    """One run at a time: ``with busy():`` raises RuntimeError while another
    thread is inside.

    It records the owning thread rather than holding a lock across the run:
    a Ctrl-C landing between taking a lock and entering its ``try`` would
    leave the lock held and the Loader refusing every later load. Here such
    a leftover names the interrupted thread, which may simply go again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held only to test-and-set the owner
        self._owner: int | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            if self._owner not in (None, me):
                raise RuntimeError(
                    "this Loader is already loading in another thread; use one Loader per thread"
                )
            self._owner = me
        try:
            yield
        finally:
            self._owner = None
