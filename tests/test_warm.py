"""The warm-cache CPU paths: mapped gathers and placed, huge-page results.

A covering read whose pages are all cached copies only the owned rows out
of them (``process_vm_readv`` from a read-only mapping: ``mapped_gather``);
a result of 2 MiB or more lives in a 2 MiB-aligned ``MADV_HUGEPAGE``
mapping placed at its source's page offset (``hugepages``). Both byte for
byte against safetensors + numpy slicing through ``gpuload.Loader``; the
mapped copy against a file truncated under it (an error, never SIGBUS), a
refused syscall (the read path instead) and cold pages (not used).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import RULES, expected_shards, write_matrix
from conftest import differing as same

import gpuload
from gpuload import config
from gpuload.errors import GpuloadError, ReadError
from gpuload.host.backend import host_result
from gpuload.memory.mapping import HUGE_PAGE, PAGE, HostBuffer, evict
from gpuload.read import posix as gio
from gpuload.read.posix import PosixReader

# Long rows (32 KiB: at world 2 they skip more than the mapped path's
# minimum gap), 8 KiB rows (past it at world 8, short of it at world 2) and
# results of 2 MiB and more, besides the whole dtype x shape matrix.
EXTRA = {
    "long.col": ("F32", (64, 8192)),
    "big.col": ("F32", (128, 8192)),
    "big.row": ("F32", (1024, 1024)),
    "mid.col": ("F32", (96, 2048)),
}
DIMS = {"long.col": 1, "big.col": 1, "big.row": 0, "mid.col": 1}
RULES_X = {**RULES, r"\.col$": 1, r"\.row$": 0}


class Counting(PosixReader):
    copies = 0

    def copy_mapped(self, file, src, dst, lengths):
        done = super().copy_mapped(file, src, dst, lengths)
        Counting.copies += done
        return done


@pytest.fixture
def model(tmp_path, rng):
    return write_matrix(tmp_path, rng, aligned=False, extra=EXTRA)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
@pytest.mark.parametrize("world", [1, 2, 8])
def test_warm_loads_match_the_oracle(model, world, mapped):
    Counting.copies = 0
    with gpuload.Loader(
        device="cpu", mapped_gather=mapped, reader_factory=Counting, threads=3
    ) as ld:
        for rank in range(world):
            got, rep = ld.load(model, rank, world, rules=RULES_X, return_report=True)
            want = expected_shards(model, rank, world, DIMS)
            assert not (bad := same(got, want)), (rank, bad[:5])
            if mapped and world > 1:  # the long rows took the mapped path
                assert rep.mapped_ops > 0
            assert rep.bytes_useful == sum(len(b) for b in want.values())
    assert (Counting.copies > 0) == (mapped and world > 1)


def test_mapped_ops_read_only_their_owned_bytes(model):
    with gpuload.Loader(device="cpu", mapped_gather=False) as ld:
        _, read = ld.load(
            model, 0, 8, rules=RULES_X, include=r"^(long|big)\.col$", return_report=True
        )
    with gpuload.Loader(device="cpu") as ld:
        _, mapped = ld.load(
            model, 0, 8, rules=RULES_X, include=r"^(long|big)\.col$", return_report=True
        )
    assert read.staged_ops == mapped.staged_ops == mapped.mapped_ops > 0
    assert read.bytes_read > 7 * read.bytes_useful  # covering reads: whole rows, but the last
    assert mapped.bytes_read == mapped.bytes_useful  # only the owned rows
    assert "mapped" in mapped.table()


@pytest.mark.parametrize(("world", "mapped"), [(8, True), (2, False)])
def test_the_bytes_a_row_skips_decide_the_mapped_copy(model, world, mapped):
    # 8 KiB rows: world 8 skips 7 KiB a row (mapped), world 2 skips 4 KiB (read).
    with gpuload.Loader(device="cpu") as ld:
        got, rep = ld.load(
            model, 0, world, rules=RULES_X, include=r"^mid\.col$", return_report=True
        )
    assert rep.staged_ops > 0 and (rep.mapped_ops > 0) == mapped
    assert not same(got, {"mid.col": expected_shards(model, 0, world, DIMS)["mid.col"]})


def test_short_rows_keep_the_covering_read(model):
    # 24 x 96 matrices: rows skip far fewer bytes than MAPPED_MIN_GAP.
    with gpuload.Loader(device="cpu") as ld:
        _, rep = ld.load(model, 0, 4, rules=RULES_X, include=r"^F32\.col$", return_report=True)
    assert rep.staged_ops > 0 and rep.mapped_ops == 0


def test_cold_pages_are_read_not_mapped(model):
    if evict(model) > 0:  # tmpfs keeps its pages: nothing is cold there
        pytest.skip("the page cache of this filesystem cannot be dropped")
    with gpuload.Loader(device="cpu", threads=1, prefetch=False) as ld:
        got, rep = ld.load(model, 1, 2, rules=RULES_X, include=r"^long\.col$", return_report=True)
    assert rep.staged_ops > 0 and rep.mapped_ops == 0
    assert not same(got, {"long.col": expected_shards(model, 1, 2, DIMS)["long.col"]})


def test_a_refused_syscall_falls_back_to_reading(model, monkeypatch):
    calls = []

    def refused(local, remote):
        calls.append(len(local))
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))  # seccomp's answer

    monkeypatch.setattr(gio, "_vm_readv_raw", refused)
    with gpuload.Loader(device="cpu", threads=1) as ld:
        got, rep = ld.load(model, 0, 2, rules=RULES_X, return_report=True)
    assert calls and rep.mapped_ops == 0 and rep.staged_ops > 0
    assert not same(got, expected_shards(model, 0, 2, DIMS))


def test_copy_mapped_after_truncation_raises_instead_of_sigbus(model):
    """Run in a child: were it a SIGBUS, this test's process would die."""
    code = textwrap.dedent(
        f"""
        import os, numpy as np
        from gpuload.format.header import parse_header
        from gpuload.errors import ReadError
        from gpuload.read.posix import PosixReader
        path = {str(model)!r}
        h = parse_header(path)
        size = os.path.getsize(path)
        out = np.zeros(8192, np.uint8)
        with PosixReader([h]) as r:
            assert r.cached(path, 0, 4096) in (True, False)  # maps the file
            os.truncate(path, size // 2)
            src = np.array([size - 8192], np.int64)
            try:
                r.copy_mapped(path, src, np.array([out.ctypes.data]), np.array([8192]))
            except ReadError as e:
                print("ReadError:", e)
            else:
                raise SystemExit("no error")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != -7, "killed by SIGBUS"
    # close() raises too (the file changed), after the copy's own error
    assert "ReadError:" in done.stdout, done.stdout + done.stderr
    assert "truncated" in done.stdout and str(model) in done.stdout


def test_a_load_whose_file_is_truncated_mid_copy_fails_cleanly(model):
    class Truncating(PosixReader):
        def copy_mapped(self, file, src, dst, lengths):
            os.truncate(file, os.path.getsize(file) // 2)
            return super().copy_mapped(file, src, dst, lengths)

    ld = gpuload.Loader(device="cpu", reader_factory=Truncating, threads=1)
    with ld, pytest.raises(GpuloadError, match="model.safetensors"):
        ld.load(model, 0, 2, rules=RULES_X, include=r"^long\.col$")


def test_copy_mapped_rejects_ranges_outside_the_file(model):
    from gpuload.format.header import parse_header

    out = np.zeros(16, np.uint8)
    with PosixReader([parse_header(model)]) as r:
        size = os.path.getsize(model)
        with pytest.raises(ReadError, match="runs past"):
            r.copy_mapped(
                str(model), np.array([size - 8]), np.array([out.ctypes.data]), np.array([16])
            )


# ---------------------------------------------------------------------------
# results


@pytest.mark.parametrize("src", [0, 8, 3000, 4095, 12345])
def test_large_results_sit_at_their_sources_page_offset(src):
    a = host_result(HUGE_PAGE + 100, "t", src)
    assert isinstance(a.base, HostBuffer) and a.base.huge in (True, False)
    assert a.ctypes.data % PAGE == src % PAGE & ~63
    assert a.ctypes.data % 64 == 0
    assert (a.ctypes.data - a.ctypes.data % PAGE - a.base.addr) % HUGE_PAGE == 0
    a[:] = 7  # writable, all of it
    assert int(a.sum()) == 7 * a.size


@pytest.mark.parametrize("hugepages", [True, False])
@pytest.mark.parametrize("nbytes", [64 << 10, HUGE_PAGE - 1, HUGE_PAGE * 2])
def test_results_of_64_kib_and_more_are_mapped_and_the_flag_off_places_numpy(nbytes, hugepages):
    # From 64 KiB on a result is gpuload's own mapping (pooled for the next
    # load); huge pages only from 2 MiB. GPULOAD_HUGEPAGES=0: np.empty.
    a = host_result(nbytes, "t", 4000, hugepages=hugepages)
    if hugepages:
        assert isinstance(a.base, HostBuffer)
        assert a.base.huge is False or nbytes >= HUGE_PAGE
        assert a.base.size % (HUGE_PAGE if nbytes >= HUGE_PAGE else 64 << 10) == 0
        a[:] = 7  # writable, all of it
        assert int(a.sum()) == 7 * a.size
    else:
        assert isinstance(a.base, np.ndarray) and a.base.base is None  # np.empty's own
        assert a.size == nbytes and a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % PAGE == 4000 & ~63


def test_tiny_results_are_plain_numpy():
    assert host_result((64 << 10) - 1, "t", 4000).base is None


def _mapped_ranges() -> set[int]:
    with open("/proc/self/maps") as f:
        return {int(line.split("-")[0], 16) for line in f}


def test_a_result_mapping_goes_when_its_last_view_dies():
    a = host_result(3 * HUGE_PAGE, "t", 64, pooled=False)
    start = a.base.addr
    view = a[10:20]
    del a
    assert start in _mapped_ranges()
    del view
    assert start not in _mapped_ranges()
    # A pooled one (the loader's) is kept for the next result of its size
    # once its last view dies, and unmapped by release_host_pool.
    gpuload.release_host_pool()
    a = host_result(3 * HUGE_PAGE, "t", 64)
    start = a.base.addr
    del a
    assert start in _mapped_ranges()
    assert host_result(3 * HUGE_PAGE, "u", 128).base.addr == start  # reused
    gpuload.release_host_pool()
    assert start not in _mapped_ranges()


def test_large_results_through_the_loader(model):
    with gpuload.Loader(device="cpu") as ld:
        got = ld.load(model, 0, 1, rules=RULES_X)
    big = got["big.row"]
    assert big.nbytes == 4 << 20 and big.flags.writeable
    assert isinstance(big.base.base, HostBuffer)  # dtype view of the owned buffer
    big[0, 0] = 1.5  # a result is the caller's own memory
    assert big[0, 0] == 1.5
    torch = pytest.importorskip("torch")
    with gpuload.Loader(device="cpu", framework="torch") as ld:
        t = ld.load(model, 0, 2, rules=RULES_X, include=r"^big\.")
    assert t["big.col"].shape == (128, 4096)
    t["big.col"].add_(1)  # writable torch memory
    assert t["big.col"].dtype == torch.float32


def test_flags_and_keywords():
    env = config.from_env({"GPULOAD_MAPPED_GATHER": "0", "GPULOAD_HUGEPAGES": "0"})
    assert env.mapped_gather is False and env.hugepages is False
    assert config.Config().mapped_gather is True and config.Config().hugepages is True
    for flag in ("GPULOAD_MAPPED_GATHER", "GPULOAD_HUGEPAGES"):
        with pytest.raises(ValueError, match=flag):
            config.from_env({flag: "maybe"})


def test_results_stop_taking_mappings_at_the_cap(monkeypatch):
    import gpuload.host.backend as gb

    assert 0 < gb.max_result_mappings() <= 16384
    before = HostBuffer.live
    a = host_result(HUGE_PAGE, "t", 0)
    assert HostBuffer.live == before + 1
    monkeypatch.setattr(gb, "max_result_mappings", lambda: HostBuffer.live)
    b = host_result(HUGE_PAGE, "t", 0)
    assert not isinstance(b.base, HostBuffer)  # np.empty past the cap
    del a
    assert HostBuffer.live == before


# ---------------------------------------------------------------------------
# cold loads: results faulted in ahead of the reads


def test_a_cold_load_prefaults_its_results_and_stays_exact(model):
    if evict(model) > 0:
        pytest.skip("the page cache of this filesystem cannot be dropped")
    with gpuload.Loader(device="cpu") as ld:
        got, cold = ld.load(model, 0, 1, rules=RULES_X, return_report=True)
        assert not same(got, expected_shards(model, 0, 1, DIMS))
        _, warm = ld.load(model, 0, 1, rules=RULES_X, return_report=True)
    assert cold.results_prefaulted and not warm.results_prefaulted
    evict(model)
    with gpuload.Loader(device="cpu", prefetch=False) as ld:  # GPULOAD_PREFETCH=0: none
        _, off = ld.load(model, 0, 1, rules=RULES_X, return_report=True)
    assert not off.results_prefaulted


def test_the_prefaulter_keeps_content_and_stops_before_the_load_returns():
    from gpuload.host.cold import ResultPrefaulter
    from gpuload.plan.ops import Piece, Plan, ReadOp

    data = np.random.default_rng(0).integers(0, 256, 3 * HUGE_PAGE, dtype=np.uint8)
    out = host_result(data.size, "t", 0, pooled=False)  # fresh memory: zeros
    out[: HUGE_PAGE + 5] = data[: HUGE_PAGE + 5]  # half written, as mid-load
    piece = Piece("t", 0, 1, data.size, data.size, 0, data.size)
    plan = Plan(ops=(ReadOp("f", 0, data.size, (piece,), staged=False),), tensors=())
    with ResultPrefaulter(plan, {"t": out}) as pre:
        pass
    assert not pre._thread.is_alive()
    assert np.array_equal(out[: HUGE_PAGE + 5], data[: HUGE_PAGE + 5])
    assert not out[HUGE_PAGE + 5 :].any()  # faulted in as zeros, nothing else
