"""The gather kernel reading its source through a mapped host buffer (zero-copy).

With ``gather="zerocopy"`` the kernel's ``src`` is pinned host staging seen
through its device-mapped address: no H2D copy, no scratch. Numba's
``cuda.mapped_array`` is that kind of buffer (``cudaHostAllocMapped``; on a
GPU one array is both the host ndarray and the device array), so these
cases run unchanged on a GPU. Under the simulator they check the kernel
against the numpy twin with a mapped source, and that a launch reads the
host bytes as they are when it runs, not a copy taken earlier.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda
from test_gather_sim import LAUNCHES, SRC_BYTES, random_table

from gpuload.kernels.cuda import Launch, gather, word_size
from gpuload.kernels.host import gather_host

pytestmark = pytest.mark.cudasim


def mapped(data: np.ndarray):
    m = cuda.mapped_array(data.size, np.uint8)
    m[:] = data  # a host write: no copy to the device follows
    return m


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("align", [8, 4, 1])
def test_mapped_source_matches_host(align: int, seed: int) -> None:
    rng = np.random.default_rng(7000 + 10 * align + seed)
    table, need = random_table(rng, align, n=int(rng.integers(1, 10)))
    src = rng.integers(0, 256, SRC_BYTES, dtype=np.uint8)
    dst = rng.integers(0, 256, need + 5, dtype=np.uint8)
    m_src, d_dst = mapped(src), cuda.to_device(dst)
    assert word_size(m_src, d_dst, table) == align
    gather(m_src, d_dst, table, launch=LAUNCHES[seed % len(LAUNCHES)])
    want = dst.copy()
    gather_host(src, want, table)
    np.testing.assert_array_equal(d_dst.copy_to_host(), want)


def test_a_column_shard_from_mapped_staging_sees_the_latest_bytes() -> None:
    # A covering read of 32 rows of 96 bytes, the rank's 24-byte segment of
    # each: staging is refilled between two launches, as the next read refills
    # a slot, and the second launch must see the new bytes.
    rng = np.random.default_rng(3)
    table = np.array([[40, 0, 32, 24, 96, 24]], dtype=np.int64)
    staging = mapped(rng.integers(0, 256, 32 * 96 + 40, dtype=np.uint8))
    d_dst = cuda.device_array(32 * 24, np.uint8)
    launch = Launch(threads=8, tile_words=5, min_blocks=1, max_blocks=4)
    for _ in range(2):
        fresh = rng.integers(0, 256, staging.size, dtype=np.uint8)
        staging[:] = fresh
        gather(staging, d_dst, table, launch=launch)
        want = np.zeros(32 * 24, np.uint8)
        gather_host(fresh, want, table)
        np.testing.assert_array_equal(d_dst.copy_to_host(), want)
