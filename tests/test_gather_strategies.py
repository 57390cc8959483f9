"""The three ways a covering read reaches a GPU (gpuload.plan.transfer), byte for byte.

Each strategy is forced through the public entry point,
``gpuload.Loader(device="cuda:0", gather=...)``, on the fake asynchronous
runtime (tests/fake_cuda.py), whose mapped pinned memory aliases the host
bytes as ``cudaHostAllocMapped`` does: a zero-copy gather reads them when
its stream runs, so a refill that does not wait shows up as wrong bytes.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_device_pipeline
from conftest import RULES, carrier, expected_shards, oracle, write_matrix
from fake_cuda import FakeKvikio, FakeRuntime
from test_device_pipeline import SMALL, RefillsWithoutWaiting, mismatched

import gpuload
from gpuload import config
from gpuload.cuda.pipeline import DevicePipeline
from gpuload.kernels.host import gather_host
from gpuload.plan.ops import PlanOptions
from gpuload.plan.planner import plan_reads
from gpuload.plan.transfer import GATHERS, GatherModel, GatherOptions, pack_layout
from gpuload.read.posix import PosixReader
from gpuload.report import LoadReport
from gpuload.sharding import Split

# fused sections on dim 1: each rank holds its part of both sections, side by
# side -- the case where a read window can hold one section's rows and not the other's
FUSED = {"fused.cols": ("F32", (16, 64)), "wide.col": ("U8", (8, 4096))}
FUSED_RULES = {r"^fused\.cols$": Split(1, sections=2), r"^wide\.col$": 1, **RULES}


def fused_expected(path, rank: int, world: int) -> dict[str, bytes]:
    want = expected_shards(path, rank, world, {"fused.cols": None, "wide.col": 1})
    full = carrier(*oracle(path)["fused.cols"])
    parts = [np.split(sec, world, axis=1)[rank] for sec in np.split(full, 2, axis=1)]
    want["fused.cols"] = np.concatenate(parts, axis=1).tobytes()
    return want


fake_gpu = test_device_pipeline.fake_gpu  # the same fixture: Loader(device="cuda:0") on a fake


@pytest.mark.parametrize("gather", GATHERS)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_strategy_every_dtype_world_rank(tmp_path, rng, fake_gpu, gather, aligned, world):
    path = write_matrix(tmp_path, rng, aligned=aligned)
    made = fake_gpu()
    with gpuload.Loader(device="cuda:0", framework="cupy", gather=gather, **SMALL) as ld:
        rt = made[-1]
        for rank in range(world):
            allocs = len(rt.device_allocs)
            got, report = ld.load(path, rank, world, rules=RULES, return_report=True)
            assert not (bad := mismatched(got, expected_shards(path, rank, world))), (rank, bad)
            covering = {
                t.name
                for t in ld.plan(path, rank, world, rules=RULES).plan.tensors
                if t.strategy == "covering"
            }
            assert set(report.gather) == covering and bool(covering) == (world > 1)
            assert set(report.gather.values()) <= {gather}
            if gather == "device":  # every covering byte crosses PCIe
                assert report.bytes_pcie >= report.bytes_useful
            else:  # only the owned bytes do, and no device scratch is made for them
                assert report.bytes_pcie == report.bytes_useful
                assert len(rt.device_allocs) - allocs == len(got)
    if gather == "zerocopy" and world > 1:
        assert rt.device_views  # the kernel read the mapped staging


def test_auto_chooses_per_tensor_and_reports_it(tmp_path, rng, fake_gpu):
    path = write_matrix(tmp_path, rng, aligned=False)
    fake_gpu()
    got, report = gpuload.load_sharded(
        path, 1, 4, device="cuda:0", framework="cupy", rules=RULES, return_report=True, **SMALL
    )
    assert not mismatched(got, expected_shards(path, 1, 4))
    assert report.gather and set(report.gather.values()) <= set(GATHERS)
    assert sum(report.gather_counts.values()) == report.strategies["covering"]
    assert "gathers" in report.table() and report.to_dict()["gather"] == report.gather
    for gpu_row in ("bytes over PCIe", "read / h2d / gather / wait s", "pack s"):
        assert gpu_row in report.table(), gpu_row  # the rows a CPU load leaves out


@pytest.mark.parametrize("gather", GATHERS)
@pytest.mark.parametrize("staging,scratch", [(16 << 10, 512 << 20), (24 << 10, 12 << 10)])
def test_fused_sections_and_small_budgets(tmp_path, rng, fake_gpu, gather, staging, scratch):
    # Budgets below the tensors split covering reads into windows, some of which
    # hold one section's rows and not the other's: pack then copies row by row.
    path = write_matrix(tmp_path, rng, aligned=False, extra=FUSED)
    made = fake_gpu()
    settings = dict(staging_bytes=staging, device_scratch_bytes=scratch, chunk_bytes=1 << 20)
    with gpuload.Loader(
        device="cuda:0", framework="cupy", threads=2, gather=gather, **settings
    ) as ld:
        rt = made[-1]
        for rank, world in ((0, 2), (1, 2), (3, 4), (5, 8)):
            got, report = ld.load(path, rank, world, rules=FUSED_RULES, return_report=True)
            want = fused_expected(path, rank, world)
            assert not (bad := mismatched(got, want)), (rank, world, bad[:5])
            assert report.gather["fused.cols"] == gather
            del got
    assert rt.host_peak <= staging  # pack buffers included
    assert rt.host_live == 0 and rt.allocated == 0


def run_forced(cls, path, gather: str):
    """One pipeline on slow fake streams, driven directly with a GPU plan."""
    rt = FakeRuntime(max_delay=0.003, p_delay=1.0, seed=7)
    ld = gpuload.Loader(device="cuda:0", runtime=rt, gather=gather, **SMALL)
    lp = ld.plan(path, 1, 2, rules=RULES)
    pipe = cls(rt, threads=1, staging_bytes=8 << 10, scratch_bytes=8 << 20, pin=True)
    outputs = {t.name: rt.device_alloc(t.out_nbytes) for t in lp.plan.tensors}
    rd = PosixReader(lp.checkpoint.files)
    try:
        pipe.run(lp.plan, outputs, rd, LoadReport(str(path), 1, 2, "cuda:0", "posix"))
        pipe.close()
        got = {t.name: rt.to_framework(outputs[t.name], t, "cupy") for t in lp.plan.tensors}
    finally:
        rd.close()
        ld.close()
        rt.close()
    return mismatched(got, expected_shards(path, 1, 2))


@pytest.mark.parametrize("gather", ["zerocopy", "pack"])
def test_refilling_staging_early_corrupts_every_strategy(tmp_path, rng, gather):
    # A zero-copy kernel reads staging when it runs, an H2D from the pack
    # buffer too: without the slot's event wait both read refilled bytes.
    path = write_matrix(tmp_path, rng, aligned=False)
    assert run_forced(RefillsWithoutWaiting, path, gather), "the race should have shown"
    assert not run_forced(DevicePipeline, path, gather)


# -- settings and the fake's fidelity ------------------------------------------


def test_gather_setting_env_keyword_and_bad_values(monkeypatch, tmp_path, rng, fake_gpu):
    assert config.from_env({"GPULOAD_GATHER": "zerocopy"}).gather == "zerocopy"
    with pytest.raises(ValueError, match="GPULOAD_GATHER"):
        config.from_env({"GPULOAD_GATHER": "fast"})
    with pytest.raises(ValueError, match="gather"):
        gpuload.Loader(device="cpu", gather="sideways")
    fake_gpu(kvikio=FakeKvikio())
    with pytest.raises(ValueError, match="pin=0"):
        gpuload.Loader(device="cuda:0", gather="zerocopy", pin=False)
    with pytest.raises(ValueError, match="kvikio"):
        gpuload.Loader(device="cuda:0", gather="pack", backend="kvikio")
    with gpuload.Loader(device="cuda:0", gather="pack") as ld:  # auto backend: posix
        assert ld.backend == "posix" and "pinned staging" in ld.backend_reason
    with gpuload.Loader(device="cuda:0", backend="kvikio") as ld:  # device gathers only
        path = write_matrix(tmp_path, rng, aligned=True)
        assert set(ld.plan(path, 0, 2, rules=RULES).plan.gathers.values()) == {"device"}
    monkeypatch.setenv("GPULOAD_GATHER", "pack")
    config.reload()
    try:
        fake_gpu()
        with gpuload.Loader(device="cuda:0") as ld:
            assert set(ld.plan(path, 0, 2, rules=RULES).plan.gathers.values()) == {"pack"}
    finally:
        monkeypatch.delenv("GPULOAD_GATHER")
        config.reload()


def test_unpinned_staging_is_never_read_zero_copy(tmp_path, rng, fake_gpu):
    path = write_matrix(tmp_path, rng, aligned=False)
    made = fake_gpu()
    with gpuload.Loader(device="cuda:0", framework="cupy", pin=False, **SMALL) as ld:
        got, report = ld.load(path, 1, 2, rules=RULES, return_report=True)
    assert not mismatched(got, expected_shards(path, 1, 2))
    assert "zerocopy" not in report.gather.values() and made[-1].device_views == 0


def test_fake_mapping_aliases_pinned_memory_and_refuses_the_rest():
    rt = FakeRuntime()
    try:
        pinned = rt.host_alloc(64, pinned=True)
        view = rt.device_view(pinned)
        pinned[:] = 7  # written after the view was made: the device sees it
        dst = rt.device_alloc(64)
        s = rt.stream()
        rt.gather(view, dst, np.array([[0, 0, 4, 8, 16, 8]], np.int64), s)
        ev = rt.event(timing=False)
        rt.record(ev, s)
        rt.wait(ev)
        assert (dst.array[:32] == 7).all()
        inner = rt.device_view(pinned[8:])  # inside a mapped allocation: mapped too
        assert np.shares_memory(inner.array, pinned) and inner.size == 56
        for not_mapped in (np.zeros(64, np.uint8), rt.host_alloc(64, pinned=False)):
            with pytest.raises(ValueError, match="not mapped"):
                rt.device_view(not_mapped)
    finally:
        rt.close()


# -- the pure parts: cost model, plan record, pack layout ----------------------


def test_cost_model_chooses_by_segment_size_and_world():
    m = GatherModel()

    def pick(seg: int, world: int, rows: int = 8192) -> str:
        useful = rows * seg
        return m.choose(rows=rows, seg=seg, useful=useful, covering=world * useful, aligned=True)

    # Llama-70B at TP 8: o_proj segments of 2 KiB, down_proj 7 KiB: only the
    # owned bytes should cross PCIe.
    assert pick(2048, 8) == "zerocopy" and pick(7168, 8) == "zerocopy"
    # Tiny segments waste most of each 128-byte line a mapped read fetches.
    assert pick(16, 8) != "zerocopy"
    # The device gather's cost grows with the world; the others' do not.
    c2, c8 = (
        m.costs(rows=64, seg=512, useful=32768, covering=w * 32768, aligned=True) for w in (2, 8)
    )
    assert c8["device"] > c2["device"] and c8["zerocopy"] == c2["zerocopy"]
    assert c8["pack"] == c2["pack"]
    assert m.choose(rows=1, seg=1, useful=1, covering=8, aligned=True, allowed=("pack",)) == "pack"


def test_plan_records_the_choice_per_covering_tensor(tmp_path, rng):
    path = write_matrix(tmp_path, rng, aligned=True)
    lp = gpuload.Loader(device="cpu").plan(path, 1, 2, rules=RULES)
    items = [(t.info, t.selection) for t in lp.plan.tensors if t.name == "F32.col"]
    host = plan_reads(items, PlanOptions(chunk_bytes=4096, min_chunk_bytes=512))
    assert host.tensors[0].gather is None and host.gathers == {}
    for force in GATHERS:
        p = plan_reads(items, PlanOptions(4096, 512, gather=GatherOptions(force=force)))
        assert p.tensors[0].strategy == "covering" and p.gathers == {"F32.col": force}
    unpinned = GatherOptions(mapped=False, model=GatherModel(zerocopy_efficiency=1e6))
    p = plan_reads(items, PlanOptions(4096, 512, gather=unpinned))
    assert p.gathers["F32.col"] != "zerocopy"  # however cheap, not without pinned staging


def random_table(rng, n: int) -> np.ndarray:
    rows = []
    for _ in range(n):
        r, rb = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        rows.append((int(rng.integers(0, 64)), 0, r, rb, rb + int(rng.integers(0, 30)), rb))
    return np.array(rows, np.int64)


@pytest.mark.parametrize("seed", range(20))
def test_pack_layout_delivers_the_pieces_and_nothing_else(seed):
    rng = np.random.default_rng(seed)
    t = random_table(rng, int(rng.integers(1, 5)))
    # lay the pieces out in dst: tiled side by side (a fused row), or with gaps
    gap = int(rng.integers(0, 2)) * int(rng.integers(1, 9))
    width = int(t[:, 3].sum()) + gap * len(t)
    pos = 0
    for i in range(len(t)):
        t[i, 1], t[i, 5] = pos, width if t[i, 2] > 1 else t[i, 3]
        pos += int(t[i, 3]) + gap
    if len(t) == 1 or rng.random() < 0.3:  # contiguous rows in dst
        t[:, 5] = t[:, 3]
        t[:, 1] = np.concatenate([[0], np.cumsum(t[:, 2] * t[:, 3])[:-1]])
    src = rng.integers(0, 256, 4096, dtype=np.uint8)
    size = int((t[:, 1] + (t[:, 2] - 1) * t[:, 5] + t[:, 3]).max())
    want = rng.integers(0, 256, size, dtype=np.uint8)
    got = want.copy()
    gather_host(src, want, t)
    at = int(rng.integers(0, 16))
    packed, copies = pack_layout(t, at)
    buf = np.zeros(at + int((t[:, 2] * t[:, 3]).sum()), np.uint8)
    gather_host(src, buf, packed)
    for dst_off, pack_off, n in copies:
        got[dst_off : dst_off + n] = buf[pack_off : pack_off + n]
    np.testing.assert_array_equal(got, want)  # the gaps kept their old bytes
    assert sum(n for *_, n in copies) == int((t[:, 2] * t[:, 3]).sum())
    if gap == 0 and len(t) > 1 and (t[:, 2] == t[0, 2]).all() and (t[:, 5] == width).all():
        assert len(copies) == 1  # a tiled span moves in one copy


def test_gather_bench_prints_the_models_table_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "gather.py"
    out = subprocess.run(
        [sys.executable, str(script), "--model-only", "--strategy-mib", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 8 |")]
    assert len(rows) == 5 and all(r.split("|")[-2].strip() in GATHERS for r in rows)


def test_gather_model_constants_come_from_the_file_bench_gather_writes(tmp_path, monkeypatch):
    # bench/gather.py --write-model writes measured constants; a GPU Loader
    # plans with them (auto: the per-user cache file; or a named path), and
    # with the documented defaults when there is none or the flag says 0.
    import json

    from fake_cuda import FakeRuntime

    import gpuload
    from gpuload.errors import GpuloadError
    from gpuload.plan import gather_model

    monkeypatch.setenv("HOME", str(tmp_path))
    measured = GatherModel(launch_s=14e-6, h2d_bytes_per_s=51e9)
    gather_model.write(gather_model.default_path(), measured, {"gpu": "test"})

    def options(**kw):
        with gpuload.Loader(device="cuda:0", runtime=FakeRuntime(), **kw) as ld:
            return ld.plan_options().gather.model

    assert options() == measured
    assert options(gather_model="0") == GatherModel()
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"launch_s": 2e-5, "_command": "x"}))
    assert options(gather_model=str(own)) == GatherModel(launch_s=2e-5)
    own.write_text(json.dumps({"launch_us": 2}))
    with pytest.raises(GpuloadError, match="unknown constant 'launch_us'"):
        options(gather_model=str(own))
    with pytest.raises(GpuloadError, match="does not exist"):
        options(gather_model=str(tmp_path / "missing.json"))
    gather_model.default_path().unlink()
    assert options() == GatherModel()
    assert GatherModel().launch_s >= 10e-6  # numba-cuda's measured launch cost


def test_regular_rows_go_as_one_2d_copy_each(tmp_path):
    # Direct pieces at a fixed stride (rows of one tensor read in one range)
    # and a pack buffer whose rows land with gaps in the destination were one
    # cudaMemcpyAsync per row; each is one cudaMemcpy2DAsync now, same bytes.
    from types import SimpleNamespace

    from gpuload.format.header import FileHeader
    from gpuload.plan.ops import Piece, ReadOp

    data = np.random.default_rng(5).integers(0, 256, 1 << 16, dtype=np.uint8)
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    rows = 64
    direct = [Piece("d", 1000 + r * 300, 1, 100, 100, r * 100, 100) for r in range(rows)]
    op1 = ReadOp(str(path), 1000, (rows - 1) * 300 + 100, tuple(direct), staged=False)
    # One section of a fused tensor: rows every 128 bytes of a 256-byte-wide result.
    packed = Piece("p", 30000, rows, 64, 256, 64, 128)
    op2 = ReadOp(str(path), 30000, (rows - 1) * 256 + 64, (packed,), staged=True)
    plan = SimpleNamespace(ops=(op1, op2), gathers={"p": "pack"}, bytes_useful=2 * rows * 64)
    rt = FakeRuntime(max_delay=0.001, p_delay=0.5)
    pipe = DevicePipeline(rt, threads=2, staging_bytes=1 << 20, scratch_bytes=1 << 20, pin=True)
    out = {"d": rt.device_alloc(rows * 100), "p": rt.device_alloc(rows * 128)}
    before_p = out["p"].array.copy()
    st = path.stat()
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    header = FileHeader(str(path), 0, data.size, {}, {}, identity)
    rd = PosixReader([header], prefetch=False)
    try:
        pipe.run(plan, out, rd, LoadReport(str(path), 0, 1, "cuda:0", "posix"))
    finally:
        rd.close()
        pipe.close()
        rt.close()
    assert rt.copies_2d == 2 and rt.copies_1d == 0
    want_d = np.concatenate([data[1000 + r * 300 : 1100 + r * 300] for r in range(rows)])
    assert out["d"].array.tobytes() == want_d.tobytes()
    want_p = before_p.copy()
    for r in range(rows):
        want_p[64 + r * 128 : 128 + r * 128] = data[30000 + r * 256 : 30064 + r * 256]
    assert out["p"].array.tobytes() == want_p.tobytes()  # the gaps are untouched
