"""End to end on the host backend: every loaded byte against the oracle.

Expected shards come from ``safetensors.deserialize`` and ``np.split`` along
the split dimension, computed here independently of gpuload's sharding code.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from conftest import carrier, oracle, write_raw

import gpuload
from gpuload.dtypes import DTYPES
from gpuload.errors import ReadError, ShardingError

WORLDS = [1, 2, 3, 4, 8]
# Splittable sizes: 24 divides by every world; 96 keeps F4/F6 shards on whole
# bytes at every world (96/8 = 12 elements x 6 bits = 9 bytes).
SHAPES = {
    "scalar": ((), None),
    "empty": ((0, 96), None),
    "vec": ((96,), 0),
    "row": ((24, 96), 0),
    "col": ((24, 96), 1),
    "exp0": ((24, 2, 96), 0),  # 3-D experts: expert-parallel style
    "exp1": ((2, 24, 96), 1),
    "exp2": ((2, 24, 96), 2),
}
RULES = {r"\.(vec|row|exp0)$": 0, r"\.(col|exp1)$": 1, r"\.exp2$": 2}


def build(tmp_path, rng, *, aligned: bool, index: bool) -> tuple[str, dict]:
    """Every dtype x every shape, in one file or two files plus index.json."""
    tensors = {}
    for dname, d in DTYPES.items():
        for kind, (shape, _) in SHAPES.items():
            if d.packed and not shape:
                continue  # a lone 4- or 6-bit scalar does not fill a byte: invalid
            nbytes = math.prod(shape) * d.bits // 8
            tensors[f"{dname}.{kind}"] = (dname, shape, rng.bytes(nbytes))
    names = list(tensors)
    groups = [names[::2], names[1::2]] if index else [names]
    files = []
    for i, group in enumerate(groups):
        header, data, pos = {"__metadata__": {"format": "pt"}}, [], 0
        for n in group:
            dname, shape, raw = tensors[n]
            header[n] = {
                "dtype": dname,
                "shape": list(shape),
                "data_offsets": [pos, pos + len(raw)],
            }
            data.append(raw)
            pos += len(raw)
        text = json.dumps(header).encode()
        pad = (-len(text) % 8) if aligned else (-len(text) % 8) + 3  # +3: every offset odd-ish
        f = write_raw(tmp_path / f"model-{i}.safetensors", text, b"".join(data), pad=pad)
        files.append(f)
    if index:
        wm = {n: files[i].name for i, g in enumerate(groups) for n in g}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        return str(tmp_path), wm
    return str(files[0]), {}


def expected_shard(dname, shape, raw, kind, rank, world) -> bytes:
    full = carrier(dname, shape, raw)
    dim = SHAPES[kind][1]
    if dim is None:
        return full.tobytes()
    # Packed dtypes: the carrier's last dim is in bytes, so an even split of
    # it is the same cut as an even split of the elements.
    return np.split(full, world, axis=dim)[rank].tobytes()


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("index", [False, True], ids=["file", "index"])
@pytest.mark.parametrize("world", WORLDS)
def test_every_dtype_shape_world_rank_matches_oracle(tmp_path, rng, aligned, index, world):
    path, _ = build(tmp_path, rng, aligned=aligned, index=index)
    truth = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        truth.update(oracle(f))
    # Small caps force splitting, coalescing and both column strategies.
    with gpuload.Loader(device="cpu", chunk_bytes=4096, min_chunk_bytes=512, threads=3) as ld:
        for rank in range(world):
            got, report = ld.load(path, rank, world, rules=RULES, return_report=True)
            assert set(got) == set(truth)
            for name, (dname, shape, raw) in truth.items():
                want = expected_shard(dname, shape, raw, name.split(".")[-1], rank, world)
                assert got[name].tobytes() == want, (name, rank, world)
                if not DTYPES[dname].packed:
                    assert got[name].dtype == DTYPES[dname].numpy
            assert report.bytes_useful == sum(a.nbytes for a in got.values())


def test_results_own_their_memory_across_loads(tmp_path, rng):
    path, _ = build(tmp_path, rng, aligned=True, index=False)
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
    path, _ = build(tmp_path, rng, aligned=True, index=True)
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
    path, _ = build(tmp_path, rng, aligned=False, index=False)
    truth = oracle(tmp_path / "model-0.safetensors")
    got = gpuload.load_sharded(path, 1, 2, device="cpu", rules=RULES, framework="torch")
    for name, (dname, shape, raw) in truth.items():
        t = got[name]
        assert isinstance(t, torch.Tensor) and t.device.type == "cpu"
        tname = DTYPES[dname].torch
        want_dtype = getattr(torch, tname) if tname else torch.uint8
        assert t.dtype == want_dtype, name
        want = expected_shard(dname, shape, raw, name.split(".")[-1], 1, 2)
        assert t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == want, name


def test_file_changed_during_load_raises_and_returns_nothing(tmp_path, rng):
    path, _ = build(tmp_path, rng, aligned=True, index=False)
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
    path, _ = build(tmp_path, rng, aligned=True, index=False)
    with pytest.raises(ValueError, match="rank"):
        gpuload.load_sharded(path, 2, 2, device="cpu")
    with pytest.raises(TypeError):
        gpuload.load_sharded(path, "0", 2, device="cpu")
    with pytest.raises(ShardingError) as e:
        gpuload.load_sharded(path, 0, 5, device="cpu", rules=RULES)
    msg = str(e.value)
    assert "5" in msg and ("24" in msg or "96" in msg or "8" in msg)


def test_unknown_tensors_are_replicated_and_reported(tmp_path, rng):
    path, _ = build(tmp_path, rng, aligned=True, index=False)
    got, report = gpuload.load_sharded(path, 0, 2, device="cpu", return_report=True)
    # No rule names these synthetic tensors: the 2-D+ ones are unknown.
    assert "F32.row" in report.unknown and got["F32.row"].shape == (24, 96)
    assert "F32.scalar" not in report.unknown


def test_settings_keyword_twins_and_cpu_only_backends(tmp_path, rng, monkeypatch):
    path, _ = build(tmp_path, rng, aligned=True, index=False)
    ld = gpuload.Loader(device="cpu", prefetch=False, threads=1, chunk_bytes="1MiB")
    assert ld.config.prefetch is False and ld.config.chunk_bytes == 1 << 20
    assert ld.load(path, 0, 1)["F32.row"].shape == (24, 96)
    with pytest.raises(gpuload.BackendUnavailable):
        gpuload.Loader(device="cpu", backend="kvikio")
    with pytest.raises(ValueError, match="threads"):
        gpuload.Loader(device="cpu", threads=0)


def test_report_is_logged_and_progress_bar_obeys_setting(tmp_path, rng, caplog, capsys):
    path, _ = build(tmp_path, rng, aligned=True, index=False)
    with caplog.at_level("INFO", logger="gpuload"):
        gpuload.load_sharded(path, 0, 2, device="cpu", rules=RULES, progress=True)
    assert any("GiB/s" in r.getMessage() and "rank 0/2" in r.getMessage() for r in caplog.records)
    assert "gpuload" in capsys.readouterr().err  # the tqdm bar, forced on
    gpuload.load_sharded(path, 0, 2, device="cpu", rules=RULES, progress=False)
    assert capsys.readouterr().err == ""
