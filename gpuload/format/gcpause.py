"""Pause Python's cyclic garbage collector while building the plan.

Header parsing and planning allocate a few objects per tensor (hundreds of
thousands for a large MoE checkpoint) and create no reference cycles. With
the collector on, every few hundred allocations it scans the young objects,
and now and then the whole heap of the caller's process (torch's objects,
the previous load's plan): in ``bench/plan_scale.py`` that took parsing from
1.0 to 2.6 s and planning from 1.5 to 2.9 s once an earlier plan was alive.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # pauses in progress, over all threads
_resume = False  # whether the collector was on when the first pause began


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Collector off inside (nested and concurrent uses count); back on at the
    end only if it was on at the start: a caller's own gc.disable() stands."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()


__all__ = ["paused"]
