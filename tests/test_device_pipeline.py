"""The GPU path on a fake asynchronous CUDA runtime (tests/fake_cuda.py).

The code under test is the real one -- ``Loader`` -> ``CudaBackend`` ->
``DevicePipeline`` -> readers -- with only the runtime replaced: streams
are threads that run queued work late, so a missing wait shows up as wrong
bytes. Every loaded byte is compared with safetensors + numpy slicing.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import RULES, expected_shards, write_matrix
from fake_cuda import FakeKvikio, FakeRuntime

import gpuload
import gpuload.loader
from gpuload.cuda import device as device_mod
from gpuload.cuda.backend import CudaBackend
from gpuload.cuda.device import resolve_device
from gpuload.cuda.memory import footprint, raw_bytes
from gpuload.cuda.pipeline import DevicePipeline
from gpuload.errors import BackendUnavailable, PlanError, ReadError
from gpuload.format.dtypes import DTYPES
from gpuload.host import backend as backend_mod
from gpuload.host import outputs
from gpuload.host.pipeline import piece_tables
from gpuload.kernels.host import gather_host
from gpuload.plan.split import split_op
from gpuload.read.kvikio import KvikioReader
from gpuload.read.posix import PosixReader
from gpuload.report import LoadReport

SMALL = dict(chunk_bytes=4096, min_chunk_bytes=512, threads=3)


def as_bytes(a) -> bytes:
    if hasattr(a, "detach"):  # torch (CPU here: the fake's device memory is host memory)
        return a.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
    return np.ascontiguousarray(a).tobytes()


@pytest.fixture
def fake_gpu(monkeypatch):
    """``Loader(device="cuda:N")`` builds a CudaBackend on a fake runtime.

    ``fake_gpu(**runtime_options)`` installs it and returns the list of
    runtimes made so far (one per Loader, newest last)."""
    made: list[FakeRuntime] = []

    def install(**runtime_kw) -> list[FakeRuntime]:
        def make(device, cfg, reader_factory=None, runtime=None):
            made.append(FakeRuntime(**runtime_kw))
            return backend_mod.make_backend(device, cfg, reader_factory, runtime=made[-1])

        monkeypatch.setattr(gpuload.loader, "make_backend", make)
        # The fake device takes torch's CPU tensors: no CUDA build needed.
        monkeypatch.setattr(
            gpuload.loader,
            "resolve_framework",
            lambda f, d, probe=True: outputs.resolve_framework(f, d, probe=False),
        )
        # What Loader(runtime=...) would do: no CUDA probe for a given runtime.
        monkeypatch.setattr(
            gpuload.loader,
            "resolve_device",
            lambda d, probe=True: "cpu" if d == "cpu" else resolve_device(d, probe=False),
        )
        return made

    yield install
    for rt in made:
        assert not rt.streams, "a Loader left its streams running"
        assert not rt.busy()


def mismatched(got: dict, want: dict[str, bytes]) -> list[str]:
    assert set(got) == set(want)
    return [n for n in want if as_bytes(got[n]) != want[n]]


# -- every byte --------------------------------------------------------------


@pytest.mark.parametrize("reader", ["posix", "kvikio"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_dtype_world_rank_matches_oracle(tmp_path, rng, fake_gpu, reader, aligned, world):
    path = write_matrix(tmp_path, rng, aligned=aligned)
    kv = FakeKvikio(compat=False) if reader == "kvikio" else None  # GDS: reads must be aligned
    made = fake_gpu(kvikio=kv)
    with gpuload.Loader(device="cuda:0", framework="cupy", **SMALL) as ld:
        assert ld.backend == reader
        for rank in range(world):
            got, report = ld.load(path, rank, world, rules=RULES, return_report=True)
            want = expected_shards(path, rank, world)
            assert not (bad := mismatched(got, want)), (rank, bad[:5])
            plans = {t.name: t for t in ld.plan(path, rank, world, rules=RULES).plan.tensors}
            for name, a in got.items():  # cupy dtypes: bf16 -> uint16, fp8 -> uint8
                assert a.dtype == outputs.cupy_dtype(plans[name]), name
                assert a.shape == plans[name].out_shape, name
            assert report.bytes_useful == sum(len(b) for b in want.values())
            assert report.backend == reader and report.read_s > 0
    assert made[-1].bound_threads  # every worker made the device current first
    if kv is not None:
        assert kv.reads and all(off % 4096 == 0 for off, _ in kv.reads)


def test_torch_results_dtypes_and_report_stages(tmp_path, rng, fake_gpu):
    torch = pytest.importorskip("torch")
    path = write_matrix(tmp_path, rng, aligned=False)
    fake_gpu()
    got, report = gpuload.load_sharded(
        path, 1, 2, device="cuda:0", rules=RULES, return_report=True, **SMALL
    )  # framework=None on a GPU: torch, since it imports here
    want = expected_shards(path, 1, 2)
    assert not mismatched(got, want)
    for name, t in got.items():
        tname = DTYPES[name.split(".")[0]].torch
        assert t.dtype == (getattr(torch, tname) if tname else torch.uint8), name
    assert report.strategies.get("covering") and report.staged_ops
    assert report.h2d_s > 0 and report.gather_s > 0 and report.wait_s >= 0


# -- budgets -------------------------------------------------------------------

BIG = {  # 32-64 KiB each: larger than every staging budget below
    "big.row": ("F32", (64, 256)),
    "big.col": ("BF16", (128, 256)),
    "big.wide": ("U8", (8, 8192)),  # column rows of 4 KiB and more: wider than tiny scratch
}
BIG_DIMS = {"big.row": 0, "big.col": 1, "big.wide": 1}
BIG_RULES = {r"^big\.row$": 0, r"^big\.(col|wide)$": 1, **RULES}


@pytest.mark.parametrize(
    "reader,staging,scratch",
    [
        ("posix", 16 << 10, 512 << 20),  # pinned budget below every big tensor
        ("posix", 24 << 10, 12 << 10),  # scratch below a row of big.wide: rows read directly
        ("posix", 64 << 10, 40 << 10),
        ("kvikio", 16 << 10, 40 << 10),  # kvikio: scratch is the only budget that counts
        ("kvikio", 64 << 10, 512 << 20),
    ],
)
def test_budgets_smaller_than_largest_tensor(tmp_path, rng, fake_gpu, reader, staging, scratch):
    path = write_matrix(tmp_path, rng, aligned=False, extra=BIG)
    made = fake_gpu(kvikio=FakeKvikio() if reader == "kvikio" else None)
    most = 0
    settings = dict(staging_bytes=staging, device_scratch_bytes=scratch, chunk_bytes=1 << 20)
    settings["backend"] = reader  # kvikio here is in compatibility mode: auto would not pick it
    with gpuload.Loader(device="cuda:0", framework="cupy", threads=2, **settings) as ld:
        rt = made[-1]
        for rank, world in ((0, 1), (1, 2), (3, 4)):
            got = ld.load(path, rank, world, rules=BIG_RULES)
            want = expected_shards(path, rank, world, BIG_DIMS)
            assert not (bad := mismatched(got, want)), (rank, world, bad[:5])
            sizes = [len(b) for b in want.values()]  # each allocator rounds them up
            most = max(most, footprint(sizes, "raw"), footprint(sizes, "torch"))
            del got
    assert rt.host_peak <= staging  # pinned staging within its budget
    # device scratch (beside the results) within its budget, each slot's
    # cudaMalloc rounded to 512 bytes
    assert rt.peak <= most + scratch + 512 * 16
    assert rt.host_live == 0 and rt.allocated == 0  # close() freed staging and scratch


def test_kvikio_scratch_below_three_pages_is_a_plan_error(tmp_path, rng, fake_gpu):
    path = write_matrix(tmp_path, rng, aligned=True)
    fake_gpu(kvikio=FakeKvikio())
    with (
        gpuload.Loader(
            device="cuda:0", device_scratch_bytes=16 << 10, threads=3, backend="kvikio"
        ) as ld,
        pytest.raises(PlanError, match="kvikio read needs"),
    ):
        ld.load(path, 0, 1)


# -- ordering: the event wait is what keeps the bytes right ---------------------


class RefillsWithoutWaiting(DevicePipeline):
    """Broken on purpose: reuses a slot without waiting for its stream."""

    def _reuse(self, slot):
        return 0.0, 0.0


class ReturnsBeforeStreamsFinish(DevicePipeline):
    """Broken on purpose: returns without waiting for the streams."""

    def _drain(self):
        return 0.0, 0.0


def run_pipeline(cls, path: Path, reader: str, rank: int = 1, world: int = 2):
    """Drive one pipeline directly (no backend), on slow fake streams: every
    queued item sleeps up to 3 ms, so a refill that does not wait lands
    before the copy that should have read the old bytes."""
    kv = FakeKvikio() if reader == "kvikio" else None
    rt = FakeRuntime(max_delay=0.003, p_delay=1.0, seed=rank, kvikio=kv)
    plan = gpuload.Loader(device="cpu", **SMALL).plan(path, rank, world, rules=RULES)
    pipe = cls(rt, threads=1, staging_bytes=8 << 10, scratch_bytes=8 << 20, pin=True)
    outputs = {t.name: rt.device_alloc(t.out_nbytes) for t in plan.plan.tensors}
    files = plan.checkpoint.files
    rd = KvikioReader(files, prefetch=False, kvikio=kv, threads=1) if kv else PosixReader(files)
    try:
        pipe.run(plan.plan, outputs, rd, LoadReport(str(path), rank, world, "cuda:0", reader))
        busy_after_run = rt.busy()
        pipe.close()  # waits for the streams, whatever run did
        got = {t.name: rt.to_framework(outputs[t.name], t, "cupy") for t in plan.plan.tensors}
    finally:
        rd.close()
        rt.close()
    return mismatched(got, expected_shards(path, rank, world)), busy_after_run


@pytest.mark.parametrize("reader", ["posix", "kvikio"])
def test_refilling_a_slot_before_its_stream_is_done_corrupts_and_the_wait_prevents_it(
    tmp_path, rng, reader
):
    path = write_matrix(tmp_path, rng, aligned=False)
    # The broken pipeline must produce wrong bytes: this is what makes the
    # test able to fail, and shows the fake runtime exposes the race.
    bad, _ = run_pipeline(RefillsWithoutWaiting, path, reader)
    assert bad, "without the event wait the fake streams should have read refilled slots"
    # The same load, same timing, with the wait: every byte right.
    bad, busy = run_pipeline(DevicePipeline, path, reader)
    assert not bad and not busy


def test_results_are_complete_when_run_returns(tmp_path, rng):
    path = write_matrix(tmp_path, rng, aligned=True)
    _, busy = run_pipeline(ReturnsBeforeStreamsFinish, path, "posix")
    assert busy, "without the final wait, work is still queued when run returns"
    _, busy = run_pipeline(DevicePipeline, path, "posix")
    assert not busy


# -- reuse, ownership, memory -----------------------------------------------------


def test_reused_loader_keeps_slots_and_results_own_their_memory(tmp_path, rng, fake_gpu):
    path = write_matrix(tmp_path, rng, aligned=False)
    made = fake_gpu()
    ld = gpuload.Loader(device="cuda:0", framework="cupy", **SMALL)
    rt = made[-1]
    streams = list(rt.streams)
    first = ld.load(path, 0, 2, rules=RULES)
    snapshot = {k: as_bytes(v) for k, v in first.items()}
    staging_allocs, device_allocs = len(rt.host_allocs), len(rt.device_allocs)
    second = ld.load(path, 1, 2, rules=RULES)
    third = ld.load(path, 0, 2, rules=RULES)
    assert rt.streams == streams  # streams made once per Loader
    assert len(rt.host_allocs) == staging_allocs  # staging reused, not regrown
    assert len(rt.device_allocs) == device_allocs + 2 * len(first)  # only the new results
    assert {k: as_bytes(v) for k, v in first.items()} == snapshot  # not views of staging
    assert not mismatched(second, expected_shards(path, 1, 2))
    assert {k: as_bytes(v) for k, v in third.items()} == snapshot
    results = sum(raw_bytes(a.nbytes) for r in (first, second, third) for a in r.values())
    ld.close()
    assert rt.allocated == results and rt.host_live == 0  # close freed staging and scratch
    del first, second, third
    assert rt.allocated == 0  # results freed with their arrays: back to the baseline


class CountingReader(PosixReader):
    reads = 0

    def readinto(self, file, offset, buffers):
        CountingReader.reads += 1
        super().readinto(file, offset, buffers)


def test_results_that_do_not_fit_fail_before_any_read(tmp_path, rng, fake_gpu):
    path = write_matrix(tmp_path, rng, aligned=True)
    CountingReader.reads = 0
    fake_gpu(total=4096)
    with gpuload.Loader(device="cuda:0", reader_factory=CountingReader, **SMALL) as ld:
        need = sum(t.out_nbytes for t in ld.plan(path, 0, 1).plan.tensors)
        with pytest.raises(PlanError) as e:
            ld.load(path, 0, 1)
    assert f"need {need:,} bytes" in str(e.value) and "only 4,096 of 4,096 are free" in str(e.value)
    assert "nothing was read" in str(e.value) and CountingReader.reads == 0


def test_scratch_that_does_not_fit_fails_before_any_read(tmp_path, rng, fake_gpu):
    path = write_matrix(tmp_path, rng, aligned=True)
    CountingReader.reads = 0
    with gpuload.Loader(device="cpu", **SMALL) as cpu:
        sizes = [t.out_nbytes for t in cpu.plan(path, 1, 2, rules=RULES).plan.tensors]
    need = footprint(
        sizes,
        "torch" if outputs.resolve_framework(None, "cuda:0", probe=False) == "torch" else "raw",
    )
    fake_gpu(total=need + 1000)  # results fit; the slots' scratch does not
    with (  # a device gather is the strategy that needs scratch
        gpuload.Loader(
            device="cuda:0", reader_factory=CountingReader, gather="device", **SMALL
        ) as ld,
        pytest.raises(PlanError, match="results and device scratch need"),
    ):
        ld.load(path, 1, 2, rules=RULES)
    assert CountingReader.reads == 0


class FailingReader(PosixReader):
    armed = True

    def readinto(self, file, offset, buffers):
        if FailingReader.armed and offset > 2000:
            raise ReadError(f"{file}: injected failure at {offset}")
        super().readinto(file, offset, buffers)


def test_a_failed_read_raises_after_the_streams_stop(tmp_path, rng, fake_gpu):
    path = write_matrix(tmp_path, rng, aligned=True)
    FailingReader.armed = True
    made = fake_gpu(max_delay=0.002, p_delay=1.0)
    with gpuload.Loader(device="cuda:0", reader_factory=FailingReader, **SMALL) as ld:
        with pytest.raises(ReadError, match="injected"):
            ld.load(path, 0, 1)
        assert not made[-1].busy()  # nothing still writes into the dropped results
        FailingReader.armed = False
        got = ld.load(path, 0, 1)
    assert not mismatched(got, expected_shards(path, 0, 1))  # and the Loader still works


def test_a_failed_load_frees_its_results_at_once(tmp_path, rng, fake_gpu):
    # The caller keeps the exception (and so its traceback's frames) alive;
    # the results must not wait for it, nor for the cyclic GC.
    path = write_matrix(tmp_path, rng, aligned=True)
    FailingReader.armed = True
    made = fake_gpu()
    gc.disable()
    try:
        ld = gpuload.Loader(device="cuda:0", reader_factory=FailingReader, **SMALL)
        with ld, pytest.raises(ReadError, match="injected") as failure:
            ld.load(path, 0, 1)
        assert made[-1].allocated == 0, "a failed load's results outlived it"
        assert failure.value.__traceback__ is not None
    finally:
        gc.enable()
        FailingReader.armed = False


class SignallingReader(PosixReader):
    started = None  # a threading.Event, set at the first read

    def readinto(self, file, offset, buffers):
        SignallingReader.started.set()
        super().readinto(file, offset, buffers)


def test_a_second_load_while_one_runs_is_refused_without_touching_its_buffers(
    tmp_path, rng, fake_gpu
):
    path = write_matrix(tmp_path, rng, aligned=True)
    fake_gpu(max_delay=0.002, p_delay=1.0)
    SignallingReader.started = threading.Event()
    box = {}
    with gpuload.Loader(device="cuda:0", reader_factory=SignallingReader, **SMALL) as ld:
        t = threading.Thread(target=lambda: box.update(got=ld.load(path, 0, 1)))
        t.start()
        assert SignallingReader.started.wait(30)
        with pytest.raises(RuntimeError, match="already loading"):
            ld.load(path, 0, 1)  # refused before it could regrow the running load's slots
        t.join()
    assert not mismatched(box["got"], expected_shards(path, 0, 1))


# -- backend choice and results ---------------------------------------------------


def test_backend_choice_and_reasons(tmp_path, rng, fake_gpu):
    path = write_matrix(tmp_path, rng, aligned=True)
    fake_gpu(kvikio=FakeKvikio(compat=True))
    with gpuload.Loader(device="cuda:0", threads=5, backend="kvikio") as ld:
        assert ld.backend == "kvikio" and "compatibility mode" in ld.backend_reason
        kv = ld._backend.runtime.kvikio()
        ld.load(path, 0, 1)
        assert kv.defaults.get("num_threads") == 5  # GPULOAD_THREADS sizes kvikio's pool
    fake_gpu(kvikio=FakeKvikio(compat=False))
    with gpuload.Loader(device="cuda:0", backend="kvikio") as ld:
        assert "GPUDirect Storage" in ld.backend_reason
    with gpuload.Loader(device="cuda:0", backend="posix") as ld:
        assert ld.backend == "posix" and "backend='posix'" in ld.backend_reason
    fake_gpu()  # no kvikio
    with gpuload.Loader(device="cuda:0") as ld:
        assert ld.backend == "posix" and "kvikio unusable" in ld.backend_reason
    with pytest.raises(BackendUnavailable, match="kvikio"):
        gpuload.Loader(device="cuda:0", backend="kvikio")


@pytest.mark.parametrize(
    "defaults, picked",
    [
        ({"is_compat_mode_preferred": lambda: True}, "posix"),  # kvikio >= 25.04, no GDS
        ({"is_compat_mode_preferred": lambda: False}, "kvikio"),  # GDS active
        ({"compat_mode": lambda: 1}, "posix"),  # 24.12 - 25.02, CompatMode.ON
        ({"compat_mode": lambda: 2}, "posix"),  # AUTO: unknown, so not worth the device gather
        ({"compat_mode": lambda: 0}, "kvikio"),
    ],
)
def test_auto_picks_kvikio_only_where_gds_is_active(tmp_path, rng, fake_gpu, defaults, picked):
    # Compatibility mode forces the device gather (world x the PCIe bytes
    # for a column shard) and a d2d per row shard: auto reads with posix there.
    path = write_matrix(tmp_path, rng, aligned=True)
    pool = {"num_threads": 1}
    defaults = {
        **defaults,
        "get": pool.get,
        "set": lambda k, v: pool.update({k: v}),
        "get_num_threads": lambda: pool["num_threads"],
        "num_threads_reset": lambda n: pool.update(num_threads=n),
    }
    fake_gpu(kvikio=FakeKvikio(defaults=defaults))
    with gpuload.Loader(device="cuda:0") as ld:
        assert ld.backend == picked and "auto" in ld.backend_reason
        if picked == "posix":
            assert "no GDS" in ld.backend_reason
        ld.load(path, 0, 2)


def test_frameworks_on_a_gpu(monkeypatch):
    assert outputs.resolve_framework(None, "cpu") == "numpy"
    with pytest.raises(ValueError, match="host arrays"):
        outputs.resolve_framework("numpy", "cuda:0")
    with pytest.raises(ValueError, match="cuda"):
        outputs.resolve_framework("cupy", "cpu")
    assert outputs.resolve_framework("cupy", "cuda:1") == "cupy"

    def no_torch(**_):
        raise BackendUnavailable("no torch")

    monkeypatch.setattr(outputs, "_torch", no_torch)
    assert outputs.resolve_framework(None, "cuda:0") == "cupy"


def test_torch_without_cuda_is_refused_before_any_read(monkeypatch):
    # A CPU build of torch cannot take CUDA memory by DLPack: the default on
    # a GPU falls back to cupy, and asking for torch fails at once.
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert outputs.resolve_framework(None, "cuda:0") == "cupy"
    with pytest.raises(BackendUnavailable, match="CUDA build of PyTorch"):
        outputs.resolve_framework("torch", "cuda:0")
    assert outputs.resolve_framework("torch", "cpu") == "torch"
    assert outputs.resolve_framework("torch", "cuda:0", probe=False) == "torch"


def test_cuda_means_the_current_device_never_the_rank(monkeypatch):
    monkeypatch.setattr(device_mod, "cuda_device_count", lambda: 4)
    monkeypatch.setattr(device_mod, "current_cuda_device", lambda: 2)
    assert device_mod.resolve_device("cuda") == "cuda:2"
    assert device_mod.resolve_device(None) == "cuda:2"
    assert device_mod.resolve_device("cuda:3") == "cuda:3"
    with pytest.raises(BackendUnavailable, match="4 CUDA"):
        device_mod.resolve_device("cuda:4")
    # A caller-supplied runtime: the string is checked, CUDA is not probed.
    assert device_mod.resolve_device(None, probe=False) == "cuda:0"
    assert device_mod.resolve_device("cuda:5", probe=False) == "cuda:5"
    with pytest.raises(ValueError, match="runtime"):
        device_mod.resolve_device("cpu", probe=False)
    rt = FakeRuntime()
    b = CudaBackend("cuda:3", gpuload.Config(threads=1), runtime=rt)
    assert b.index == 3 and b.device == "cuda:3"
    b.close()
    with pytest.raises(ValueError, match="resolved"):
        CudaBackend("cuda", gpuload.Config(), runtime=rt)


# -- splitting reads to fit slots ---------------------------------------------------


def test_split_ops_deliver_the_same_bytes(tmp_path, rng):
    path = write_matrix(tmp_path, rng, aligned=False, extra=BIG)
    data = np.frombuffer(path.read_bytes(), np.uint8)
    windows = rows_read_directly = 0
    for rank, world, limit in ((0, 1, 97), (1, 2, 700), (3, 4, 4096), (1, 8, 5000), (0, 2, 9999)):
        plan = gpuload.Loader(device="cpu", chunk_bytes=1 << 16, min_chunk_bytes=512).plan(
            path, rank, world, rules=BIG_RULES
        )
        want = run_host(plan.plan, plan.plan.ops, data)
        ops = []
        for op in plan.plan.ops:
            parts = split_op(op, limit)
            assert all(part.length <= limit for part in parts)
            if op.staged and len(parts) > 1:
                windows += all(part.staged for part in parts)
                rows_read_directly += not any(part.staged for part in parts)
            ops += parts
        assert sum(op.useful_bytes for op in ops) == plan.plan.bytes_useful
        got = run_host(plan.plan, ops, data)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want), (rank, world, limit)
    assert windows and rows_read_directly  # both ways of splitting a covering read ran


def run_host(plan, ops, data: np.ndarray) -> dict[str, np.ndarray]:
    """Execute ops with numpy: the reference for what a split must preserve."""
    out = {t.name: np.zeros(t.out_nbytes, np.uint8) for t in plan.tensors}
    for op in ops:
        block = data[op.offset : op.offset + op.length]
        for tensor, table in piece_tables(op).items():
            gather_host(block, out[tensor], table)
    return out


def test_import_and_fake_load_never_touch_cupy_or_numba_cuda(tmp_path, rng):
    path = write_matrix(tmp_path, rng, aligned=True)
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import gpuload
        from fake_cuda import FakeRuntime
        from gpuload.cuda.backend import CudaBackend
        ld = gpuload.Loader(device="cpu")
        lp = ld.plan({str(path)!r}, 0, 1)
        b = CudaBackend("cuda:0", ld.config, runtime=FakeRuntime())
        bufs = b.allocate(lp.plan)
        r = b.reader(lp.checkpoint.files, prefetch=True)
        b.run(lp.plan, bufs, r, gpuload.LoadReport("x", 0, 1, "cuda:0", b.name), None)
        r.close()
        b.close()
        bad = [m for m in sys.modules if m.startswith(("cupy", "kvikio", "numba.cuda"))]
        assert not bad, bad
        """
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=120)


def test_kvikio_mode_is_described_on_every_api_generation():
    from gpuload.read.kvikio import describe_kvikio

    def kv(**defaults):
        return FakeKvikio(defaults=defaults)

    assert "GPUDirect" in describe_kvikio(kv(is_compat_mode_preferred=lambda: False))
    assert "compatibility mode" in describe_kvikio(kv(is_compat_mode_preferred=lambda: True))
    # 24.12 - 25.02: compat_mode() is the configured CompatMode, AUTO (2) by default.
    assert "GPUDirect" in describe_kvikio(kv(compat_mode=lambda: 0))
    assert "compatibility mode (no GDS" in describe_kvikio(kv(compat_mode=lambda: 1))
    assert "compatibility mode auto" in describe_kvikio(kv(compat_mode=lambda: 2))


def test_a_missing_kernel_compiler_is_named():
    # A GPU Loader asks this before any load (CupyRuntime); here libNVVM is
    # made to look absent, in a fresh process so numba.cuda stays out of this one.
    code = textwrap.dedent(
        """
        from numba.cuda.cudadrv import nvvm
        nvvm.is_available = lambda: False
        from gpuload.kernels import cuda
        assert "libNVVM" in cuda.compiler_problem(), cuda.compiler_problem()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


class _CudaRuntimeError(RuntimeError):
    def __init__(self, status: int) -> None:
        super().__init__("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
        self.status = status  # as cupy.cuda.runtime.CUDARuntimeError has it


@pytest.mark.parametrize("driver, told", [(12080, "12.8"), (0, None)])
def test_a_cuda_build_newer_than_the_driver_is_named(monkeypatch, driver, told):
    # A cu13 wheel under a CUDA 12 driver: getDeviceCount fails with
    # cudaErrorInsufficientDriver (35). device=None says why once, and an
    # explicit device says it in its error; with no driver at all (a CPU
    # machine with cupy installed) device=None stays quiet.
    import types
    import warnings

    def count():
        raise _CudaRuntimeError(35)

    rt = types.SimpleNamespace(
        getDeviceCount=count, driverGetVersion=lambda: driver, runtimeGetVersion=lambda: 13000
    )
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(runtime=rt)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(device_mod, "_warned", [])
    device_mod.cuda_probe.cache_clear()
    monkeypatch.setattr(device_mod, "gpu_pipeline_available", lambda: True)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert resolve_device(None) == "cpu"
            assert resolve_device(None) == "cpu"
        said = [str(w.message) for w in seen if "gpuload" in str(w.message)]
        if told is None:
            assert said == []
        else:
            assert len(said) == 1, said
            assert "cudaErrorInsufficientDriver" in said[0] and told in said[0]
            assert "gpuload[cu12]" in said[0]
            with pytest.raises(BackendUnavailable, match="cudaErrorInsufficientDriver.*13.0"):
                resolve_device("cuda:0")
    finally:
        device_mod.cuda_probe.cache_clear()


def test_one_shot_gpu_loads_share_warm_up_streams_and_pinned_staging(tmp_path, rng, monkeypatch):
    # load_sharded on a GPU paid kernel warm-up, K streams and K pinned
    # staging allocations on every call. The process keeps them per device
    # now; release_gpu_cache frees the staging and streams.
    from gpuload.cuda import backend as device_cuda
    from gpuload.cuda import cache as gpu_cache

    path = write_matrix(tmp_path, rng, aligned=False)
    made: list[FakeRuntime] = []

    def runtime(index):
        made.append(FakeRuntime(seed=index))
        return made[-1]

    gpu_cache.forget_runtimes()
    monkeypatch.setattr(device_cuda, "CupyRuntime", runtime)
    monkeypatch.setattr(gpuload.loader, "resolve_device", lambda d, probe=True: "cuda:0")
    monkeypatch.setattr(
        gpuload.loader,
        "resolve_framework",
        lambda f, d, probe=True: outputs.resolve_framework(f, d, probe=False),
    )
    try:
        want = expected_shards(path, 1, 2)
        pinned = []
        for _ in range(3):
            got = gpuload.load_sharded(path, 1, 2, device="cuda:0", rules=RULES, framework="cupy")
            assert not mismatched(got, want)
            del got
            pinned.append(len([n for n, p in made[0].host_allocs if p]))
        (rt,) = made  # one runtime (one warm-up) for the three loads
        assert 2 <= len(rt.streams) <= 16  # one pipeline's slots, not three
        assert pinned[0] > 0 and pinned[1] == pinned[2] == pinned[0]  # staging pinned once
        assert gpu_cache.held()["pipelines"] == 1 and gpu_cache.held()["pinned_bytes"] > 0
        assert rt.allocated < 1 << 20  # no device scratch parked, only what GC has not freed
        gpuload.release_gpu_cache()
        assert not rt.streams and rt.host_live == 0
        assert gpu_cache.held()["pipelines"] == 0
    finally:
        gpu_cache.forget_runtimes()


@pytest.mark.parametrize("framework", ["torch", "cupy"])
def test_results_come_from_torchs_allocator_and_the_fit_check_counts_rounding(
    tmp_path, rng, fake_gpu, framework
):
    # framework="torch": results through torch's caching allocator (seen by
    # torch.cuda.memory_allocated, freed without a device-wide cudaFree);
    # cupy keeps raw cudaMallocs. Either way the fit check counts what the
    # allocator rounds each result up to: on a device with room for the
    # results' sizes but not their rounded blocks, nothing is allocated or read.
    if framework == "torch":
        pytest.importorskip("torch")
    path = write_matrix(tmp_path, rng, aligned=False)
    made = fake_gpu()
    with gpuload.Loader(device="cuda:0", framework=framework, **SMALL) as ld:
        got = ld.load(path, 1, 2, rules=RULES)
        assert not mismatched(got, expected_shards(path, 1, 2))
        sizes = [t.out_nbytes for t in ld.plan(path, 1, 2, rules=RULES).plan.tensors]
    rt = made[-1]
    if framework == "torch":
        assert sorted(rt.torch_allocs) == sorted(sizes) and not set(sizes) & set(rt.device_allocs)
    else:
        assert not rt.torch_allocs
    del got
    rounded = sum(-(-n // 512) * 512 for n in sizes)  # what the blocks alone take
    assert rounded > sum(sizes)  # odd sizes: the rounding is what this checks
    CountingReader.reads = 0
    made = fake_gpu(total=rounded - 1)
    with (
        gpuload.Loader(
            device="cuda:0", framework=framework, reader_factory=CountingReader, **SMALL
        ) as ld,
        pytest.raises(PlanError, match=r"results need [\d,]+ bytes .* only"),
    ):
        ld.load(path, 1, 2, rules=RULES)
    assert not made[-1].torch_allocs and not [n for n in made[-1].device_allocs if n in sizes]
    assert CountingReader.reads == 0
