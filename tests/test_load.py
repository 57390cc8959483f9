"""End to end on the host backend: every loaded byte against the oracle.

Expected shards come from ``safetensors.deserialize`` and ``np.split`` along
the split dimension, computed here independently of gpuload's sharding code.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import RULES, SHAPES, expected_shards, write_matrix

import gpuload
from gpuload.errors import ReadError, ShardingError
from gpuload.format.dtypes import DTYPES

WORLDS = [1, 2, 3, 4, 8]


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("index", [False, True], ids=["file", "index"])
@pytest.mark.parametrize("world", WORLDS)
def test_every_dtype_shape_world_rank_matches_oracle(tmp_path, rng, aligned, index, world):
    path = write_matrix(tmp_path, rng, aligned=aligned, index=index)
    # Small caps force splitting, coalescing and both column strategies.
    with gpuload.Loader(device="cpu", chunk_bytes=4096, min_chunk_bytes=512, threads=3) as ld:
        for rank in range(world):
            got, report = ld.load(path, rank, world, rules=RULES, return_report=True)
            want = expected_shards(path, rank, world)
            assert set(got) == set(want)
            for name, data in want.items():
                assert got[name].tobytes() == data, (name, rank, world)
                dtype = DTYPES[name.split(".")[0]]
                if not dtype.packed:
                    assert got[name].dtype == dtype.numpy
            assert report.bytes_useful == sum(a.nbytes for a in got.values())


def test_results_own_their_memory_across_loads(tmp_path, rng):
    path = write_matrix(tmp_path, rng)
    with gpuload.Loader(device="cpu", chunk_bytes=4096, min_chunk_bytes=512) as ld:
        first = ld.load(path, 0, 2, rules=RULES)
        snapshot = {k: v.tobytes() for k, v in first.items()}
        second = ld.load(path, 1, 2, rules=RULES)  # reuses the staging slots
    assert {k: v.tobytes() for k, v in first.items()} == snapshot
    arrays = [a for a in [*first.values(), *second.values()] if a.nbytes]
    for a in arrays:
        assert a.flags.owndata or a.base is not None and a.base.flags.owndata
    seen = set()
    for a in arrays:  # no two results share a buffer
        base = a.base if a.base is not None else a
        assert id(base) not in seen
        seen.add(id(base))


def test_include_reads_only_what_is_kept(tmp_path, rng):
    path = write_matrix(tmp_path, rng, aligned=True, index=True)
    got, report = gpuload.load_sharded(
        path, 1, 4, device="cpu", rules=RULES, include=r"^BF16\.", return_report=True
    )
    assert set(got) == {f"BF16.{k}" for k in SHAPES}
    assert report.bytes_read == report.bytes_useful + report.bytes_wasted
    assert report.bytes_useful == sum(a.nbytes for a in got.values())
    assert report.excluded == len(report_names(path)) - len(SHAPES)
    only = gpuload.load_sharded(path, 0, 1, device="cpu", include=["F32.row", "U8.vec"])
    assert set(only) == {"F32.row", "U8.vec"}


def report_names(path):
    return gpuload.open_checkpoint(path).tensors


def test_torch_framework_dtypes_and_bytes(tmp_path, rng):
    torch = pytest.importorskip("torch")
    path = write_matrix(tmp_path, rng, aligned=False)
    got = gpuload.load_sharded(path, 1, 2, device="cpu", rules=RULES, framework="torch")
    for name, want in expected_shards(path, 1, 2).items():
        t = got[name]
        assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
        tname = DTYPES[name.split(".")[0]].torch
        want_dtype = getattr(torch, tname) if tname else torch.uint8
        assert t.dtype == want_dtype, name
        assert t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == want, name


def test_file_changed_during_load_raises_and_returns_nothing(tmp_path, rng):
    path = write_matrix(tmp_path, rng)
    ckpt = gpuload.open_checkpoint(path)
    with open(path, "r+b") as f:  # rewrite one byte in place: same size, new mtime
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ReadError, match="changed"):
        gpuload.load_sharded(ckpt, 0, 1, device="cpu", rules=RULES)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(gpuload.GpuloadError):
        gpuload.load_sharded(ckpt, 0, 1, device="cpu", rules=RULES)


def test_bad_rank_world_and_uneven_split(tmp_path, rng):
    path = write_matrix(tmp_path, rng)
    with pytest.raises(ValueError, match="rank"):
        gpuload.load_sharded(path, 2, 2, device="cpu")
    with pytest.raises(TypeError):
        gpuload.load_sharded(path, "0", 2, device="cpu")
    with pytest.raises(ShardingError) as e:
        gpuload.load_sharded(path, 0, 5, device="cpu", rules=RULES)
    msg = str(e.value)
    assert "5" in msg and ("24" in msg or "96" in msg or "8" in msg)
    assert msg.startswith(f"{path}: '")  # the file, then the tensor


@pytest.mark.parametrize(
    "config,match",
    [
        ({"num_attention_heads": "eight"}, "num_attention_heads='eight'"),
        ({"quantization_config": {"weight_block_size": [128]}}, "weight_block_size"),
    ],
)
def test_bad_config_values_are_errors_naming_config_json(tmp_path, rng, config, match):
    path = write_matrix(tmp_path, rng)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShardingError, match=match) as e:
        gpuload.load_sharded(path, 0, 2, device="cpu")
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: ")


def test_unknown_tensors_are_replicated_and_reported(tmp_path, rng):
    path = write_matrix(tmp_path, rng)
    got, report = gpuload.load_sharded(path, 0, 2, device="cpu", return_report=True)
    # No rule names these synthetic tensors: the 2-D+ ones are unknown.
    assert "F32.row" in report.unknown and got["F32.row"].shape == (24, 96)
    assert "F32.scalar" not in report.unknown


def test_settings_keyword_twins_and_cpu_only_backends(tmp_path, rng, monkeypatch):
    path = write_matrix(tmp_path, rng)
    ld = gpuload.Loader(device="cpu", prefetch=False, threads=1, chunk_bytes="1MiB")
    assert ld.config.prefetch is False and ld.config.chunk_bytes == 1 << 20
    assert ld.load(path, 0, 1)["F32.row"].shape == (24, 96)
    with pytest.raises(gpuload.BackendUnavailable):
        gpuload.Loader(device="cpu", backend="kvikio")
    with pytest.raises(ValueError, match="threads"):
        gpuload.Loader(device="cpu", threads=0)


def test_report_is_logged_and_progress_bar_obeys_setting(tmp_path, rng, caplog, capsys):
    path = write_matrix(tmp_path, rng)
    with caplog.at_level("INFO", logger="gpuload"):
        gpuload.load_sharded(path, 0, 2, device="cpu", rules=RULES, progress=True)
    assert any("GiB/s" in r.getMessage() and "rank 0/2" in r.getMessage() for r in caplog.records)
    assert "gpuload" in capsys.readouterr().err  # the tqdm bar, forced on
    gpuload.load_sharded(path, 0, 2, device="cpu", rules=RULES, progress=False)
    assert capsys.readouterr().err == ""
