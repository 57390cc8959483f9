"""The strict header parser: every rule of the format, every dtype, index.json."""

from __future__ import annotations

import json
import os
import struct

import pytest
from conftest import oracle, write_raw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuload.errors import GpuloadError, HeaderError, IndexFileError
from gpuload.format.dtypes import DTYPES
from gpuload.format.header import MAX_HEADER_BYTES, parse_header, parse_header_bytes
from gpuload.read.open import open_checkpoint


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def test_every_dtype_parses_and_matches_safetensors(tmp_path, rng):
    header, data, pos = {"__metadata__": {"format": "pt"}}, b"", 0
    for i, (name, d) in enumerate(DTYPES.items()):
        shape = (2, 8) if i % 2 else (3, 4, 8)
        n = 1
        for s in shape:
            n *= s
        nbytes = n * d.bits // 8
        header[f"t.{name}"] = entry(name, shape, pos, pos + nbytes)
        data += rng.bytes(nbytes)
        pos += nbytes
    header["scalar"] = entry("F32", (), pos, pos + 4)
    header["empty"] = entry("BF16", (0, 7), pos + 4, pos + 4)
    data += rng.bytes(4)
    f = write_raw(tmp_path / "all.safetensors", header, data, pad=3)  # unaligned offsets
    h = parse_header(f)
    assert h.metadata == {"format": "pt"}
    assert h.data_start % 8 != 0
    raw = f.read_bytes()
    for name, (dtype, shape, want) in oracle(f).items():
        t = h.tensors[name]
        assert (t.dtype.name, t.shape) == (dtype, shape)
        assert raw[t.start : t.end] == want


CASES = {
    "past_eof": (lambda: struct.pack("<Q", 1000) + b"{}", "past the end"),
    "zero_len": (lambda: struct.pack("<Q", 0), "length is 0"),
    "huge_len": (lambda: struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"x" * 16, "cap"),
    "short": (lambda: b"\x01\x00", "too short"),
    "not_utf8": (lambda: struct.pack("<Q", 4) + b"\xff\xfe{}", "not UTF-8"),
    "not_json": (lambda: struct.pack("<Q", 5) + b"{abc}", "not valid JSON"),
    "not_object": (lambda: struct.pack("<Q", 2) + b"[]", "not an object"),
    "deep": (lambda: _h("[" * 100000 + "]" * 100000), "nested too deeply"),
    "nan": (lambda: _h('{"__metadata__": {"a": NaN}}'), "not valid JSON"),
}


def _h(text: str, data: bytes = b"") -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b + data


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_prefix_and_json(tmp_path, case):
    make, msg = CASES[case]
    f = tmp_path / f"{case}.safetensors"
    f.write_bytes(make())
    with pytest.raises(HeaderError, match=msg) as e:
        parse_header(f)
    assert str(f) in str(e.value)


ENTRY_CASES = {
    "duplicate": (
        '{"a": E, "a": E}'.replace("E", json.dumps(entry("U8", [2], 0, 2))),
        "duplicate",
        b"xx",
    ),
    "unknown_dtype": (entry("F12", [2], 0, 2), "unknown dtype", b"xx"),
    "negative_dim": (entry("U8", [-2], 0, 2), "negative", b"xx"),
    "float_dim": (entry("U8", [2.0], 0, 2), "non-integer", b"xx"),
    "bool_dim": (entry("U8", [True], 0, 1), "non-integer", b"x"),
    "overflow": (entry("F64", [1 << 32, 1 << 32], 0, 8), "overflows", b"x" * 8),
    "reversed": (entry("U8", [2], 2, 0), "reversed", b"xx"),
    "size_mismatch": (entry("U8", [3], 0, 2), "needs 3", b"xx"),
    "past_eof": (entry("U8", [4], 0, 4), "file ends before", b"xx"),
    "trailing": (entry("U8", [2], 0, 2), "trailing", b"xxxx"),
    "hole": (entry("U8", [2], 1, 3), "hole", b"xxx"),
    "missing_key": ({"dtype": "U8", "shape": [2]}, "missing", b"xx"),
    "extra_key": ({**entry("U8", [2], 0, 2), "x": 1}, "unexpected", b"xx"),
    "shape_not_list": ({**entry("U8", [2], 0, 2), "shape": 2}, "not a list", b"xx"),
    "f4_odd": (entry("F4", [3], 0, 2), "whole bytes", b"xx"),
    "offsets_str": ({**entry("U8", [2], 0, 2), "data_offsets": ["0", "2"]}, "two integers", b"xx"),
}


@pytest.mark.parametrize("case", sorted(ENTRY_CASES))
def test_bad_tensor_entries_name_file_and_tensor(tmp_path, case):
    ent, msg, data = ENTRY_CASES[case]
    text = ent if isinstance(ent, str) else json.dumps({"a": ent})
    f = tmp_path / "bad.safetensors"
    f.write_bytes(_h(text, data))
    with pytest.raises(HeaderError, match=msg) as e:
        parse_header(f)
    assert str(f) in str(e.value)
    if case not in ("past_eof", "trailing"):
        assert e.value.tensor == "a"


def test_overlap_and_metadata_rules(tmp_path):
    f = write_raw(
        tmp_path / "o.safetensors",
        {"a": entry("U8", [4], 0, 4), "b": entry("U8", [2], 2, 4)},
        b"xxxx",
    )
    with pytest.raises(HeaderError, match="overlap"):
        parse_header(f)
    f = write_raw(tmp_path / "m.safetensors", {"__metadata__": {"k": 1}}, b"")
    with pytest.raises(HeaderError, match="strings") as e:
        parse_header(f)
    assert e.value.tensor == "__metadata__"
    # An empty or null __metadata__ is fine (a KeyError here bit other loaders).
    for md in ({}, None):
        f = write_raw(
            tmp_path / "e.safetensors", {"__metadata__": md, "a": entry("U8", [1], 0, 1)}, b"x"
        )
        assert parse_header(f).metadata == {}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_headers_only_raise_gpuload_errors(data):
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "w": entry("BF16", [4, 8], 0, 64),
            "b": entry("F32", [8], 64, 96),
            "s": entry("F8_E4M3", [], 96, 97),
        }
    ).encode()
    blob = bytearray(struct.pack("<Q", len(header)) + header + bytes(97))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "length"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)) :]
    elif kind == "insert":
        i = data.draw(st.integers(8, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        blob[:8] = struct.pack("<Q", data.draw(st.integers(0, (1 << 64) - 1)))
    try:
        h = parse_header_bytes("mut.safetensors", bytes(blob), len(blob))
    except GpuloadError as e:
        assert "mut.safetensors" in str(e)
        return
    # Whatever parsed must be self-consistent and inside the file.
    for t in h.tensors.values():
        assert h.data_start <= t.start <= t.end <= len(blob)


# -------------------------------------------------------------------- index


def _model(tmp_path, files: dict[str, dict[str, tuple]], weight_map=None):
    for fname, tensors in files.items():
        header, pos = {}, 0
        for name, (dtype, shape) in tensors.items():
            n = DTYPES[dtype].bits // 8
            for s in shape:
                n *= s
            header[name] = entry(dtype, shape, pos, pos + n)
            pos += n
        write_raw(tmp_path / fname, header, b"\x01" * pos)
    if weight_map is None:
        weight_map = {t: f for f, ts in files.items() for t in ts}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return tmp_path


def test_index_directory_opens_with_config(tmp_path):
    d = _model(
        tmp_path, {"a.safetensors": {"x": ("F32", (2,))}, "b.safetensors": {"y": ("U8", (3,))}}
    )
    (d / "config.json").write_text(json.dumps({"num_attention_heads": 4}))
    ck = open_checkpoint(d)
    assert set(ck.tensors) == {"x", "y"} and ck.config == {"num_attention_heads": 4}
    assert open_checkpoint([d / "a.safetensors", d / "b.safetensors"]).tensors.keys() == {"x", "y"}


@pytest.mark.parametrize(
    "bad,msg",
    [
        ({"x": "missing.safetensors"}, "missing file"),
        ({"x": "../a.safetensors"}, "plain file name"),
        ({"x": "/etc/passwd"}, "plain file name"),
        ({"x": "sub/a.safetensors"}, "plain file name"),
        ({"x": "a.safetensors", "ghost": "a.safetensors"}, "found in no file"),
        ({"x": "b.safetensors", "y": "a.safetensors"}, "but stored in"),
        ({"x": 3}, "not a string"),
    ],
)
def test_index_errors_name_index_and_tensor(tmp_path, bad, msg):
    d = _model(
        tmp_path,
        {"a.safetensors": {"x": ("F32", (2,))}, "b.safetensors": {"y": ("U8", (3,))}},
        weight_map=bad,
    )
    with pytest.raises(IndexFileError, match=msg) as e:
        open_checkpoint(d)
    assert "model.safetensors.index.json" in str(e.value)


def test_tensor_in_two_files_and_missing_from_map(tmp_path):
    files = {
        "a.safetensors": {"x": ("F32", (2,))},
        "b.safetensors": {"x": ("F32", (2,)), "y": ("U8", (3,))},
    }
    d = _model(tmp_path, files, weight_map={"x": "a.safetensors", "y": "b.safetensors"})
    with pytest.raises(HeaderError, match="also stored in"):
        open_checkpoint(d)
    with pytest.raises(HeaderError, match="also stored in"):
        open_checkpoint([d / "a.safetensors", d / "b.safetensors"])
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"y": "b.safetensors"}})
    )
    with pytest.raises(IndexFileError, match="not in weight_map"):
        open_checkpoint(d)


def test_symlinked_files_inside_model_dir_are_allowed(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    _model(blobs, {"a.safetensors": {"x": ("F32", (2,))}})
    snap = tmp_path / "snapshot"
    snap.mkdir()
    os.symlink(blobs / "a.safetensors", snap / "a.safetensors")
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors"}})
    )
    assert set(open_checkpoint(snap).tensors) == {"x"}


def test_missing_paths_are_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path)  # empty directory


# -- a file that is not safetensors says what it is (issue 20) ---------------------


@pytest.mark.parametrize(
    "name,body,says",
    [
        (
            "config.json",
            b'{\n  "architectures": ["LlamaForCausalLM"]\n}\n',
            "JSON (it starts with '{'",
        ),
        ("list.json", b"  [1, 2, 3, 4, 5, 6]", "JSON (it starts with '['"),
        ("w.safetensors", b"version https://git-lfs.github.com/spec/v1\n", "text (it starts"),
        ("tiny.json", b"{}", "JSON (it starts with '{'"),
        ("pyproject.toml", b"[build-system]\nrequires = []\n", "text (it starts with '[build-s')"),
    ],
)
def test_json_and_text_files_are_named_not_parsed_as_a_length(tmp_path, name, body, says):
    import subprocess
    import sys

    import gpuload

    path = tmp_path / name
    path.write_bytes(body)
    with pytest.raises(HeaderError, match="not a safetensors") as e:
        gpuload.load_sharded(path, 0, 2, device="cpu")
    assert e.value.file == str(path) and says in str(e.value), e.value
    assert "header length" not in str(e.value)  # not the first 8 bytes read as a number
    r = subprocess.run(
        [sys.executable, "-m", "gpuload", "inspect", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith(f"gpuload: error: {path}: ")
    assert says in r.stderr, r.stderr
