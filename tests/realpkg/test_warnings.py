"""The project's warning filters let the CUDA packages' benign warnings through, and nothing else.

pytest runs with warnings as errors, process-wide: reader threads too. A
benign warning of a package (NVVM's compile log, cuda.core's linker
fallback, numba-cuda's low-occupancy hint) would otherwise become an
exception in the middle of a load in the gpu tier. The filters in
pyproject.toml name each by module or text; these tests raise each warning
as its package does (same category, same module) under those filters.
"""

from __future__ import annotations

import threading
import warnings

import pytest


def warn_from(module, message: str, category: type[Warning]) -> None:
    """``warnings.warn`` as if called inside ``module`` (its real ``__name__``)."""
    warnings.warn_explicit(message, category, module.__file__, 1, module=module.__name__)


def benign():
    import numba.cuda.cudadrv.nvvm as nvvm
    import numba.cuda.dispatcher as dispatcher
    from numba.cuda.core.errors import NumbaPerformanceWarning

    return [
        (nvvm, "warning: some NVVM compile log line", nvvm.NvvmWarning),
        (
            dispatcher,
            "Grid size 1 will likely result in GPU under-utilization due to low occupancy.",
            NumbaPerformanceWarning,
        ),
        (
            dispatcher,  # stacklevel=2 attributes it to cuda.core's caller
            "cuda.bindings.nvjitlink is not available, therefore the driver APIs will be used "
            "instead, which do not support minor version compatibility or linking LTO IRs.",
            RuntimeWarning,
        ),
    ]


def test_benign_package_warnings_are_not_errors_in_a_reader_thread():
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for module, message, category in benign():
                warn_from(module, message, category)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    t.join()
    assert not errors, errors


def test_other_warnings_stay_errors():
    import numba.cuda.dispatcher as dispatcher
    from numba.cuda.core.errors import NumbaPerformanceWarning

    with pytest.raises(NumbaPerformanceWarning):  # same module, another message
        warn_from(dispatcher, "Host array used in a CUDA kernel", NumbaPerformanceWarning)
    with pytest.raises(RuntimeWarning):
        warnings.warn("a RuntimeWarning of any other text", RuntimeWarning, stacklevel=1)
