"""HTTP multi-range GETs for column shards (issue 22): every rank of worlds
1, 2, 4, 8 byte-exact against local loads, over nginx (a real server that
answers ``multipart/byteranges``) and over the fault-injecting server; a
server that refuses them (one coalesced range, the whole object, a wrong or
short part) makes the load read covering ranges instead, and the faults
(500, 503, a drop, a short body, a hang, an object replaced) end in correct
bytes or a GpuloadError. Bytes counted at the server stay the load's own
count, and close to the rows the plan needs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from remote_server import Faults, RangeServer, replace_file
from test_remote_nginx import CONF, _port, require_nginx, start_nginx

import gpuload
from gpuload import synth
from gpuload.errors import ReadError
from gpuload.plan.ops import Piece, ReadOp
from gpuload.read.remote import multirange
from gpuload.read.remote.reader import RemoteReader
from gpuload.read.remote.source import PROBE_BYTES, make_source

pytestmark = pytest.mark.timeout(240)
MiB = 1 << 20


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("www")
    synth.write_model(root / "llama", "llama", target_bytes=8 * MiB, num_files=2)
    synth.write_model(root / "small", "llama", target_bytes=4 * MiB, num_files=2)
    synth.write_model(root / "moe", "tiny-qwen-moe", num_files=3)
    return root


def _expected_fetch(path, rank: int, world: int) -> tuple[int, int]:
    """(data bytes, parts) the load fetches beyond the header probes: the
    wanted ranges of each sparse op, the whole range of any other op."""
    plan = gpuload.Loader(device="cpu").plan(path, rank, world).plan
    data = parts = 0
    for op in plan.ops:
        ranges = multirange.sparse_ranges(op)
        if ranges:  # those inside the probe's first MiB are not fetched again
            ranges = [(max(s, PROBE_BYTES), e) for s, e in ranges if e > PROBE_BYTES]
        data += sum(e - s for s, e in ranges) if ranges else op.length
        parts += len(ranges) if ranges else 0
    return data, parts


def _same_as_local(got: dict, path, rank: int, world: int) -> bool:
    want = gpuload.load_sharded(path, rank, world, device="cpu")
    return set(got) == set(want) and all(got[n].tobytes() == want[n].tobytes() for n in want)


def _no_leaks(server: RangeServer) -> None:
    assert server.wait_idle() == 0, "a connection was left open"


# -- the pure parts ------------------------------------------------------------


def _op(rows: int, stride: int, slice_bytes: int, at: int = 0) -> ReadOp:
    p = Piece("w", 4096 + at, rows, slice_bytes, stride, 0, slice_bytes)
    return ReadOp("f", 4096, (rows - 1) * stride + at + slice_bytes, (p,), staged=True)


def test_wanted_merges_gaps_under_a_part_and_decides_by_waste():
    # 1/8 of each 2 KiB row: one part per row
    op = _op(100, 2048, 256)
    assert multirange.wanted(op) == [(4096 + r * 2048, 4096 + r * 2048 + 256) for r in range(100)]
    assert multirange.sparse_ranges(op) is not None
    # half of a 256-byte row: the 128-byte gaps are cheaper than parts: one range
    assert multirange.wanted(_op(100, 256, 128)) == [(4096, 4096 + 99 * 256 + 128)]
    assert multirange.sparse_ranges(_op(100, 256, 128)) is None
    # 3/4 of each row: the covering range wastes too little to bother
    assert multirange.sparse_ranges(_op(100, 2048, 1536)) is None
    # a direct op is never sparse
    direct = ReadOp("f", 0, 10, (Piece("w", 0, 1, 10, 10, 0, 10),), staged=False)
    assert multirange.sparse_ranges(direct) is None


def test_batches_respect_the_range_header_and_body_caps():
    ranges = [(i * 10_000_000_000, i * 10_000_000_000 + 100) for i in range(1, 1001)]
    out = multirange.batches(ranges)
    assert [r for b in out for r in b] == ranges
    assert all(len(b) <= multirange.MAX_RANGES for b in out)
    assert all(len(multirange.range_header(b)) <= multirange.MAX_HEADER + 6 for b in out)
    big = [(i * 4 * MiB, (i + 1) * 4 * MiB - 1) for i in range(10)]
    assert all(sum(e - s for s, e in b) <= multirange.MAX_BODY for b in multirange.batches(big))


def test_s3_sources_never_get_multirange():
    src, _ = make_source("s3://bucket/m/", {"endpoint": "http://127.0.0.1:9", "allow_http": True})
    assert RemoteReader(src, []).multirange is False
    src, _ = make_source("http://127.0.0.1:9/m/")
    assert RemoteReader(src, []).multirange is True


# -- nginx ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx(models, tmp_path_factory):
    require_nginx()
    tmp = tmp_path_factory.mktemp("nginx-mr")
    port = _port()
    conf = CONF.format(tmp=tmp, port=port, root=models)
    proc, url = start_nginx(
        tmp, conf.replace("$body_bytes_sent", "$body_bytes_sent $http_range"), port
    )
    yield url, tmp / "access.log"
    proc.terminate()
    proc.wait(10)


def _logged(log: Path, since: int, expect: int) -> tuple[int, int]:
    """(bytes nginx sent, multi-range GETs) logged after byte ``since``."""
    deadline = time.monotonic() + 5  # nginx logs a request after sending it
    while True:
        lines = log.read_bytes()[since:].decode().splitlines()
        sent = sum(int(line.split()[2]) for line in lines)
        if sent >= expect or time.monotonic() > deadline:
            return sent, sum("," in line for line in lines)
        time.sleep(0.02)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("model", ["llama", "moe"])
def test_nginx_every_rank_byte_exact_and_bytes_close_to_the_rows(nginx, models, model, world):
    url, log = nginx
    for rank in range(world):
        since = log.stat().st_size if log.exists() else 0
        got, rep = gpuload.load_sharded(
            f"{url}/{model}/", rank, world, device="cpu", return_report=True
        )
        assert _same_as_local(got, models / model, rank, world)
        sent, multi = _logged(log, since, rep.bytes_read + rep.bytes_header)
        assert 0 <= sent - rep.bytes_read - rep.bytes_header < 1024  # config's 404 page at most
        data, parts = _expected_fetch(models / model, rank, world)
        # less what the header probes held; plus each part's multipart headers
        assert data - 3 * MiB <= rep.bytes_read <= data + 160 * parts
        assert (multi > 0) == (parts > 0)
        if model == "llama" and world >= 4:
            plan = gpuload.Loader(device="cpu").plan(models / model, rank, world).plan
            assert rep.bytes_read < 0.75 * plan.bytes_read  # the column shards' waste is gone


# -- the fault-injecting server --------------------------------------------------


@pytest.mark.parametrize("world", [2, 8])
def test_server_multipart_every_rank_and_bytes(models, world):
    path = models / "small"
    with RangeServer(path) as s:
        for rank in range(world):
            before = s.quiet()
            got, rep = gpuload.load_sharded(
                s.url + "/", rank, world, device="cpu", return_report=True
            )
            assert _same_as_local(got, path, rank, world)
            assert s.quiet() - before == rep.bytes_read + rep.bytes_header
            data, parts = _expected_fetch(path, rank, world)
            assert data - 2 * MiB <= rep.bytes_read <= data + 160 * parts
        assert s.faults.multi_seen > 0
        _no_leaks(s)


@pytest.mark.parametrize("mode", ["single", "whole", "wrong_part", "short_part"])
def test_refused_multirange_falls_back_to_covering_reads(models, mode):
    """A server that does not answer as asked: right bytes from covering
    reads, and the refusal is remembered: one multi-range GET is sent while
    the server's answer is unknown, none after a refusal."""
    path = models / "small"
    with RangeServer(path, Faults(multirange=mode)) as s:
        for rank in range(4):
            before = s.quiet()
            got, rep = gpuload.load_sharded(s.url + "/", rank, 4, device="cpu", return_report=True)
            assert _same_as_local(got, path, rank, 4)
            plan = gpuload.Loader(device="cpu").plan(path, rank, 4).plan
            # at most the covering reads, the refused answers' first bytes
            # and the probes (a refused answer is dropped, never read whole)
            assert s.quiet() - before <= plan.bytes_read + rep.bytes_header + 3 * MiB
        assert s.faults.multi_seen == 1  # one asked; the refusal holds for the process
        _no_leaks(s)


@pytest.mark.parametrize("kind", ["500", "503", "drop", "short", "hang"])
def test_faults_in_multipart_answers_end_in_correct_bytes(models, kind):
    path = models / "small"
    with RangeServer(path, Faults(every=3, kind=kind)) as s:
        for rank in (0, 3):
            got = gpuload.load_sharded(
                s.url + "/",
                rank,
                4,
                device="cpu",
                storage_options={"timeout": 0.5, "retries": 4},
            )
            assert _same_as_local(got, path, rank, 4)
        assert any("," in rng for _, rng in s.faulted), "no multipart answer was faulted"
        _no_leaks(s)


def test_object_replaced_during_multirange_reads_raises(models, tmp_path):
    path = tmp_path / "m"
    synth.write_model(path, "llama", target_bytes=4 * MiB, num_files=1)
    (target,) = path.glob("*.safetensors")

    def replace(n: int) -> None:
        if n == 3:  # after the header probe and a first range
            replace_file(target)

    with RangeServer(path, Faults(on_request=replace)) as s:
        with pytest.raises(ReadError, match="changed since|replaced"):
            gpuload.load_sharded(s.url + "/", 1, 8, device="cpu", threads=1)
        _no_leaks(s)


def test_prefetch_off_still_multirange(models):
    path = models / "small"
    with RangeServer(path) as s:
        got = gpuload.load_sharded(s.url + "/", 5, 8, device="cpu", prefetch=False)
        assert _same_as_local(got, path, 5, 8)
        assert s.faults.multi_seen > 0
        _no_leaks(s)
