"""Real-package tier: gpuload's GPU code against the real CUDA packages, no GPU.

The other tiers run the GPU path on fakes (``tests/fake_cuda.py``) or on
Numba's simulator; a fake can invent an API the real package lacks, and
every such mismatch (a submodule ``import kvikio`` does not import, a cupy
constant that is not there) passed them. This tier imports the real
cupy-cuda13x, numba-cuda and kvikio-cu13 (the ``cu13`` extra) on a machine
with no GPU, and checks what gpuload calls on them, and that the fakes
match them.

Run it with ``make test-realpkg``: its own virtual environment
(``.venv-cu13``) has the extra, so that the main one keeps testing the
no-cupy path. Where the packages are missing, the tier is skipped, unless
``TEST_REALPKG=1`` (set by the Makefile) says they must be there.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

PACKAGES = ("cupy", "kvikio", "numba_cuda")
MISSING = [p for p in PACKAGES if importlib.util.find_spec(p) is None]

if MISSING:
    if os.environ.get("TEST_REALPKG") == "1":
        raise pytest.UsageError(
            f"the real-package tier needs {', '.join(MISSING)}: run it as `make test-realpkg` "
            "(a .venv-cu13 with pip install -e '.[cu13,test]')"
        )
    collect_ignore_glob = ["test_*.py"]  # a venv without the cu13 extra: nothing to check here
elif os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    raise pytest.UsageError("the real-package tier checks the real numba-cuda, not the simulator")
