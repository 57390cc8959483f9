"""CPU covering reads scattered straight into results (``GPULOAD_SCATTER=1``).

One ``preadv`` per 1024 rows puts each owned row into its result and each
gap into a small discard buffer: no staging, no gather pass. Byte for byte
against safetensors + numpy slicing, through ``gpuload.Loader``; the raw
``preadv`` loop against short reads, EINTR, EIO and end of file.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from conftest import RULES, expected_shards, write_matrix, write_raw
from conftest import differing as same

import gpuload
from gpuload import config
from gpuload.errors import ReadError
from gpuload.format.header import parse_header
from gpuload.host.pipeline import piece_tables, scatter_iov
from gpuload.plan.ops import Piece, ReadOp
from gpuload.read import posix as gio
from gpuload.read.faults import FaultyReaderFactory
from gpuload.read.posix import PosixReader

SMALL = dict(chunk_bytes=4096, min_chunk_bytes=512, threads=3)


class CountingReader(PosixReader):
    scattered = 0

    def readinto_iov(self, file, offset, iov):
        CountingReader.scattered += 1
        super().readinto_iov(file, offset, iov)


@pytest.mark.parametrize("scatter", [True, False], ids=["scattered", "staged"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_scattered_and_staged_loads_match_the_oracle(tmp_path, rng, aligned, world, scatter):
    # GPULOAD_SCATTER=1 (the default): covering rows land straight in their
    # results; 0: covering reads go through staging and gather_host.
    path = write_matrix(tmp_path, rng, aligned=aligned)
    CountingReader.scattered = 0
    with gpuload.Loader(
        device="cpu", scatter=scatter, reader_factory=CountingReader, **SMALL
    ) as ld:
        for rank in range(world):
            got, report = ld.load(path, rank, world, rules=RULES, return_report=True)
            assert not (bad := same(got, expected_shards(path, rank, world))), (rank, bad[:5])
        staging = ld._backend._pipeline._slot_size
    if scatter:
        assert staging == 0  # no staging was made
        assert (CountingReader.scattered > 0) == (world > 1) == (report.staged_ops > 0)
    else:
        assert (staging > 0) == (world > 1)  # staging was made
        assert CountingReader.scattered == 0 and (report.gather_s > 0) == (world > 1)


def test_a_reader_without_raw_scatter_stages_and_gathers(tmp_path, rng):
    path = write_matrix(tmp_path, rng, aligned=False)
    factory = FaultyReaderFactory(short_reads=0.3, eintr=0.1, seed=3)
    with gpuload.Loader(device="cpu", scatter=True, reader_factory=factory, **SMALL) as ld:
        got = ld.load(path, 1, 4, rules=RULES)
    assert not same(got, expected_shards(path, 1, 4))


def test_flag_and_keyword(monkeypatch):
    assert config.from_env({"GPULOAD_SCATTER": "0"}).scatter is False
    assert config.Config().scatter is True  # the default since bench/warm_ab.py measured it
    with pytest.raises(ValueError, match="GPULOAD_SCATTER"):
        config.from_env({"GPULOAD_SCATTER": "maybe"})


def _file(tmp_path, n=1 << 16):
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    f = write_raw(
        tmp_path / "x.safetensors",
        {"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}},
        data,
    )
    return f, data


@pytest.mark.parametrize("discard", [1, 7, 64, 1 << 18])
def test_scatter_iov_delivers_every_piece_and_nothing_else(tmp_path, discard):
    # Rows of two tensors interleaved in one covering read, gaps longer and
    # shorter than the discard buffer: the result must equal staging + gather.
    f, data = _file(tmp_path)
    h = parse_header(f)
    base = h.data_start + 5
    a = Piece("a", base + 3, 20, 24, 100, 0, 24)  # a column shard
    b = Piece("b", base + 40, 20, 16, 100, 8, 40)  # a section, beside others in b
    c = Piece("c", base + 2100, 1, 900, 900, 0, 900)  # after a long gap
    op = ReadOp(str(f), base, 3200, (a, b, c), staged=True)
    rng = np.random.default_rng(1)
    sizes = {"a": 480, "b": 800, "c": 900}
    got = {t: rng.integers(0, 256, n, dtype=np.uint8) for t, n in sizes.items()}
    want = {t: x.copy() for t, x in got.items()}
    block = np.frombuffer(data, np.uint8)[op.offset - h.data_start :][: op.length]
    from gpuload.kernels.host import gather_host

    for t, table in piece_tables(op).items():
        gather_host(block, want[t], table)
    gaps = np.zeros(discard, np.uint8)
    iov = scatter_iov(op, got, gaps)
    assert int(iov[:, 1].sum()) == op.length
    with PosixReader([h]) as r:
        r.readinto_iov(str(f), op.offset, iov)
    for t in sizes:
        np.testing.assert_array_equal(got[t], want[t])  # bytes between b's sections kept


@pytest.mark.parametrize("seed", range(6))
def test_one_piece_iov_equals_the_general_build(monkeypatch, seed):
    # A one-piece op (the common covering read) takes a short path; it must
    # give exactly the general build's table, with gaps of every size: none,
    # shorter than the discard buffer, and longer (where it hands over).
    from gpuload.host import pipeline

    rng = np.random.default_rng(seed)
    discard = np.zeros(int(rng.integers(1, 64)), np.uint8)
    for _ in range(50):
        rows, row_bytes = int(rng.integers(1, 40)), int(rng.integers(1, 50))
        stride = row_bytes + int(rng.integers(0, 70))
        lead, trail = int(rng.integers(0, 70)), int(rng.integers(0, 70))
        dst, dst_stride = int(rng.integers(0, 30)), row_bytes + int(rng.integers(0, 5))
        piece = Piece("a", 1000 + lead, rows, row_bytes, stride, dst, dst_stride)
        op = ReadOp("f", 1000, lead + (rows - 1) * stride + row_bytes + trail, (piece,), True)
        out = {"a": np.zeros(piece.dst_end + int(rng.integers(0, 9)), np.uint8)}
        fast = scatter_iov(op, out, discard)
        monkeypatch.setattr(pipeline, "SCATTER_ONE_PIECE", False)
        general = scatter_iov(op, out, discard)
        monkeypatch.setattr(pipeline, "SCATTER_ONE_PIECE", True)
        np.testing.assert_array_equal(fast, general)
        assert int(fast[:, 1].sum()) == op.length
    small = {"a": np.zeros(piece.dst_end - 1, np.uint8)}
    with pytest.raises(gpuload.PlanError, match="does not fit"):
        scatter_iov(op, small, discard)


def test_scatter_iov_refuses_a_piece_past_its_result(tmp_path):
    op = ReadOp("f", 0, 100, (Piece("a", 0, 2, 10, 50, 0, 10),), staged=True)
    with pytest.raises(gpuload.PlanError, match="does not fit"):
        scatter_iov(op, {"a": np.zeros(19, np.uint8)}, np.zeros(8, np.uint8))


def _iov(*bufs: np.ndarray) -> np.ndarray:
    return np.array([[b.ctypes.data, b.size] for b in bufs], np.uint64)


def test_raw_preadv_survives_short_reads_and_eintr(tmp_path, monkeypatch):
    f, data = _file(tmp_path)
    h = parse_header(f)
    real = gio._preadv_raw
    calls = []

    def flaky(fd, iov, off):  # EINTR once, then never more than 1000 bytes per call
        calls.append(off)
        if len(calls) == 2:
            raise OSError(errno.EINTR, "Interrupted system call")
        first = iov[:1].copy()
        first[0, 1] = min(1000, int(first[0, 1]))
        return real(fd, first, off)

    monkeypatch.setattr(gio, "_preadv_raw", flaky)
    a, b, c = np.zeros(3000, np.uint8), np.zeros(0, np.uint8), np.zeros(5, np.uint8)
    with PosixReader([h]) as r:
        r.readinto_iov(str(f), h.data_start + 7, _iov(a, b, c))
    assert a.tobytes() + c.tobytes() == data[7 : 7 + 3005] and len(calls) >= 5


def test_raw_preadv_errors_name_the_file(tmp_path, monkeypatch):
    f, _ = _file(tmp_path)
    h = parse_header(f)
    buf = np.zeros(20, np.uint8)
    with PosixReader([h]) as r, pytest.raises(ReadError, match="end of file"):
        r.readinto_iov(str(f), h.size - 10, _iov(buf))  # a truncated file: never a crash

    def eio(fd, iov, off):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(gio, "_preadv_raw", eio)
    with PosixReader([h]) as r, pytest.raises(ReadError, match="Input/output error") as e:
        r.readinto_iov(str(f), h.data_start, _iov(buf))
    assert str(f) in str(e.value)
