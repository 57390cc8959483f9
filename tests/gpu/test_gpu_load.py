"""GPU tier: the cupy backend on a real device, byte for byte against the oracle.

Skipped only when no CUDA device is present. If a GPU is there (the
``/dev/nvidia*`` nodes or ``nvidia-smi`` say so) but cupy does not import or
cannot see it, that is a failure, not a skip: the GPU path is broken.

Comparisons copy results to the host with ``.get()`` / ``.cpu()`` (plain
memcpys): no cupy kernel is compiled, so no NVRTC is needed.
"""

from __future__ import annotations

import gc
import glob
import shutil
import subprocess

import pytest
from conftest import RULES as MATRIX_RULES
from conftest import expected_shards, write_matrix

import gpuload
from gpuload.errors import PlanError
from gpuload.format.dtypes import DTYPES
from gpuload.host.outputs import cupy_dtype
from gpuload.read.posix import PosixReader

pytestmark = pytest.mark.gpu

RULES = {**MATRIX_RULES, r"^big\.row": 0, r"^big\.col": 1}
SMALL = dict(chunk_bytes=4096, min_chunk_bytes=512, threads=3)
MiB = 1 << 20


def _gpu_present() -> bool:
    if glob.glob("/dev/nvidia[0-9]*"):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    return out.returncode == 0 and "GPU" in out.stdout


@pytest.fixture(scope="module")
def cupy():
    present = _gpu_present()
    try:
        import cupy
    except ImportError as e:
        if present:
            pytest.fail(f"a GPU is present but cupy does not import: {e}")
        pytest.skip("no CUDA device here (and cupy is not installed)")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        if present:
            pytest.fail(f"a GPU is present but CUDA does not work: {e}")
        pytest.skip(f"no CUDA device here ({e})")
    if n == 0:
        pytest.skip("no CUDA device here")
    return cupy


@pytest.fixture(params=["posix", "kvikio"])
def backend(request, cupy):
    if request.param == "kvikio":
        pytest.importorskip("kvikio", reason="kvikio is not installed: pip install kvikio-cu12")
    return request.param


def host_bytes(a) -> bytes:
    if hasattr(a, "detach"):  # torch
        import torch

        return a.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()
    return a.get().tobytes()  # cupy: a D2H memcpy


def check(got: dict, want: dict[str, bytes], device: int) -> None:
    assert set(got) == set(want)
    bad = [n for n in want if host_bytes(got[n]) != want[n]]
    assert not bad, bad[:10]
    for a in got.values():
        dev = a.device.index if hasattr(a, "detach") else a.device.id
        assert dev == device


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_dtype_world_rank_matches_oracle(tmp_path, rng, cupy, backend, aligned, world):
    path = write_matrix(tmp_path, rng, aligned=aligned)
    with gpuload.Loader(device="cuda:0", framework="cupy", backend=backend, **SMALL) as ld:
        assert ld.backend == backend, ld.backend_reason
        for rank in range(world):
            got, report = ld.load(path, rank, world, rules=RULES, return_report=True)
            check(got, expected_shards(path, rank, world), 0)
            plans = {t.name: t for t in ld.plan(path, rank, world, rules=RULES).plan.tensors}
            for name, a in got.items():
                assert a.dtype == cupy_dtype(plans[name]) and a.shape == plans[name].out_shape
            assert report.backend == backend and report.bytes_read >= report.bytes_useful


def test_torch_results_by_dlpack(tmp_path, rng, cupy, backend):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    path = write_matrix(tmp_path, rng, aligned=False)
    got = gpuload.load_sharded(
        path, 1, 2, device="cuda", rules=RULES, framework="torch", backend=backend, **SMALL
    )
    check(got, expected_shards(path, 1, 2), cupy.cuda.runtime.getDevice())
    for name, t in got.items():
        tname = DTYPES[name.split(".")[0]].torch
        assert t.dtype == (getattr(torch, tname) if tname else torch.uint8), name
        assert t.is_cuda


BIG = {"big.row": ("BF16", (2048, 4096)), "big.col": ("F32", (1024, 4096))}  # 16 MiB each


def test_budgets_smaller_than_largest_tensor_and_reuse(tmp_path, rng, cupy, backend):
    path = write_matrix(tmp_path, rng, aligned=False, extra=BIG)
    settings = dict(staging_bytes=4 * MiB, device_scratch_bytes=3 * MiB, threads=4)
    with gpuload.Loader(device="cuda:0", framework="cupy", backend=backend, **settings) as ld:
        first = ld.load(path, 0, 2, rules=RULES)
        snapshot = {k: host_bytes(v) for k, v in first.items()}
        check(first, expected_shards(path, 0, 2), 0)
        for rank, world in ((1, 2), (3, 4), (0, 1)):  # reused: slots, streams, scratch
            got, report = ld.load(path, rank, world, rules=RULES, return_report=True)
            check(got, expected_shards(path, rank, world), 0)
            assert report.read_s > 0
            if world > 1:  # big.col's column shard is gathered
                assert report.staged_ops and report.gather_s > 0
        pipe = ld._backend._pipeline  # the slots stayed inside both budgets
        assert pipe.host_size * len(pipe.slots) <= settings["staging_bytes"]
        assert pipe.scratch_size * len(pipe.slots) <= settings["device_scratch_bytes"]
        assert {k: host_bytes(v) for k, v in first.items()} == snapshot  # owned, not staging


def test_device_memory_returns_to_baseline(tmp_path, rng, cupy):
    path = write_matrix(tmp_path, rng, aligned=True, extra=BIG)
    rt = cupy.cuda.runtime
    warm = gpuload.load_sharded(path, 0, 1, device="cuda:0", framework="cupy", rules=RULES)
    del warm  # kernels compiled, numba's small table buffers made
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    base = rt.memGetInfo()[0]
    got = gpuload.load_sharded(path, 0, 1, device="cuda:0", framework="cupy", rules=RULES)
    held = sum(a.nbytes for a in got.values())
    assert base - rt.memGetInfo()[0] >= held - 2 * MiB  # results in device memory
    del got
    gc.collect()
    # Results are cudaMalloc'd outside cupy's pool: no free_all_blocks needed.
    assert abs(rt.memGetInfo()[0] - base) <= 8 * MiB


class CountingReader(PosixReader):
    reads = 0

    def readinto(self, file, offset, buffers):
        CountingReader.reads += 1
        super().readinto(file, offset, buffers)


def test_out_of_device_memory_fails_before_io(tmp_path, rng, cupy):
    path = write_matrix(tmp_path, rng, aligned=True, extra=BIG)
    cupy.get_default_memory_pool().free_all_blocks()
    free = cupy.cuda.runtime.memGetInfo()[0]
    hog, n = None, free - 16 * MiB  # leave less than the 32 MiB of results
    while hog is None and n > 0:
        try:
            hog = cupy.cuda.memory.Memory(n)
        except (cupy.cuda.memory.OutOfMemoryError, cupy.cuda.runtime.CUDARuntimeError):
            n -= 64 * MiB
    try:
        CountingReader.reads = 0
        with (
            gpuload.Loader(device="cuda:0", reader_factory=CountingReader) as ld,
            pytest.raises(PlanError, match=r"need [\d,]+ bytes .* only [\d,]+ of"),
        ):
            ld.load(path, 0, 1, rules=RULES)
        assert CountingReader.reads == 0
    finally:
        del hog


def test_memory_torch_keeps_cached_is_given_back_for_a_load(tmp_path, rng, cupy):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    path = write_matrix(tmp_path, rng, aligned=True, extra=BIG)
    cupy.get_default_memory_pool().free_all_blocks()
    free = cupy.cuda.runtime.memGetInfo()[0]
    # torch caches all but 16 MiB of the device: free to torch, used to CUDA.
    cached = torch.empty(free - 16 * MiB, dtype=torch.uint8, device="cuda:0")
    del cached
    assert torch.cuda.memory_reserved(0) >= free - 16 * MiB
    try:
        got = gpuload.load_sharded(path, 0, 1, device="cuda:0", framework="cupy", rules=RULES)
        check(got, expected_shards(path, 0, 1), 0)
    finally:
        torch.cuda.empty_cache()


def test_cuda_means_the_current_device(tmp_path, rng, cupy):
    n = cupy.cuda.runtime.getDeviceCount()
    if n < 2:
        pytest.skip("needs two GPUs to tell the current device from device 0")
    path = write_matrix(tmp_path, rng, aligned=True)
    with cupy.cuda.Device(n - 1):
        got = gpuload.load_sharded(path, 0, 2, device="cuda", framework="cupy", rules=RULES)
    check(got, expected_shards(path, 0, 2), n - 1)


@pytest.mark.parametrize("gather", ["device", "zerocopy", "pack"])
@pytest.mark.parametrize("world", [2, 8])
def test_every_gather_strategy_matches_oracle(tmp_path, rng, cupy, gather, world):
    # zerocopy: the Numba kernel reads mapped pinned staging over PCIe (real
    # cudaHostAllocMapped memory and its device pointer, no scratch).
    path = write_matrix(tmp_path, rng, aligned=False)
    with gpuload.Loader(
        device="cuda:0", framework="cupy", backend="posix", gather=gather, **SMALL
    ) as ld:
        for rank in range(world):
            got, report = ld.load(path, rank, world, rules=RULES, return_report=True)
            check(got, expected_shards(path, rank, world), 0)
            assert report.gather and set(report.gather.values()) == {gather}
            if gather != "device":
                assert report.bytes_pcie == report.bytes_useful


def test_torch_results_are_seen_by_torchs_allocator(tmp_path, rng, cupy):
    # framework="torch": vLLM plans its KV cache from memory_allocated.
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    path = write_matrix(tmp_path, rng, aligned=True, extra=BIG)
    before = torch.cuda.memory_allocated(0)
    got = gpuload.load_sharded(path, 0, 1, device="cuda:0", framework="torch", rules=RULES)
    held = sum(t.numel() * t.element_size() for t in got.values())
    assert torch.cuda.memory_allocated(0) - before >= held
    del got
    assert torch.cuda.memory_allocated(0) == before
