"""Simulator tier: the CUDA kernels run under Numba's CUDA simulator.

Run alone, as ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim -q``:
numba reads the variable once, when first imported, so it cannot be switched
on from inside a pytest run that may already have imported numba. The main
run passes ``--ignore=tests/cudasim``.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    raise pytest.UsageError(
        "tests/cudasim needs the CUDA simulator: run it on its own as\n"
        "    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cudasim -q\n"
        "and give the main run --ignore=tests/cudasim"
    )

from numba.core import config  # noqa: E402  (only once the variable is known to be set)

if not config.ENABLE_CUDASIM:
    raise pytest.UsageError(
        "NUMBA_ENABLE_CUDASIM=1 is set but numba was imported before it took effect"
    )
