"""Write the hostile checkpoint corpus: crafted files and model directories.

    python tests/hostile/make_corpus.py            # rewrite tests/hostile/{files,dirs}
    python tests/hostile/make_corpus.py --out DIR  # write elsewhere (the test compares)

Deterministic: the same bytes every run, so the generated files are committed
and ``tests/test_hostile.py`` checks they are up to date. Every case is built
from raw bytes here (struct + json), independently of gpuload's own writer,
and ``manifest.json`` records what loading it must raise: the
:class:`gpuload.GpuloadError` subclass, a regex its message matches, the file
the message names and the tensor (``null`` where none is to blame).

A huge-header case costs a few bytes: only its length prefix claims the size.
Cases that git cannot store (a FIFO, a directory named ``*.safetensors``)
are made at test time in ``tests/test_hostile.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
U64 = (1 << 64) - 1
INDEX = "model.safetensors.index.json"

CASES: dict[str, dict] = {}


def prefixed(header: bytes | str, data: bytes = b"") -> bytes:
    """``u64 little-endian len`` | header | data."""
    h = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(h)) + h + data


def entry(dtype, shape, begin, end) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def pattern(n: int, salt: int = 0) -> bytes:
    """Non-zero, position-dependent bytes: a zero-filled result shows."""
    return bytes((i * 7 + salt * 31 + 1) % 251 + 1 for i in range(n))


def st_file(tensors: dict[str, tuple[str, list[int], bytes]], metadata=None) -> bytes:
    """A valid safetensors file, tensors in the given order, header padded to 8."""
    header, data, pos = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = entry(dtype, shape, pos, pos + len(raw))
        data += raw
        pos += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return prefixed(text, data)


# ---------------------------------------------------------------- one file


def bad_file(name: str, blob: bytes, error: str, match: str, tensor: str | None = None) -> None:
    CASES[name] = {
        "kind": "file",
        "write": {f"files/{name}.safetensors": blob},
        "path": f"files/{name}.safetensors",
        "error": error,
        "match": match,
        "names": f"files/{name}.safetensors",
        "tensor": tensor,
    }


def bad_header(name: str, header, data: bytes, match: str, tensor: str | None = "a") -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    bad_file(name, prefixed(text, data), "HeaderError", match, tensor)


def file_cases() -> None:
    H = "HeaderError"
    # the length prefix
    bad_file("empty", b"", H, "too short")
    bad_file("short_prefix", b"\x05\x00\x00", H, "too short")
    bad_file("len_past_eof", struct.pack("<Q", 1000) + b'{"a":1}', H, "past the end")
    bad_file("len_zero", struct.pack("<Q", 0) + b"{}", H, "length is 0")
    bad_file("len_huge_200mb", struct.pack("<Q", 200_000_000) + b"{}", H, "exceeds .* cap")
    bad_file("len_cap_plus_one", struct.pack("<Q", 100_000_001) + b"{}", H, "exceeds .* cap")
    bad_file("len_u64_max", struct.pack("<Q", U64) + b"{}", H, "exceeds .* cap")
    # the JSON text
    bad_file("not_utf8", prefixed(b'{"a\xff\xfe": 1}'), H, "not UTF-8")
    bad_file("utf8_surrogate", prefixed(b'{"\xed\xa0\x80": 1}'), H, "not UTF-8")
    bad_file("utf8_bom", prefixed("\ufeff{}".encode()), H, "not valid JSON")
    bad_file("not_json", prefixed("{abc}"), H, "not valid JSON")
    bad_file("json_truncated", prefixed('{"a": {"dtype": "U8"'), H, "not valid JSON")
    bad_file("json_array", prefixed("[]"), H, "list, not an object")
    bad_file("json_string", prefixed('"x"'), H, "str, not an object")
    bad_file("json_number", prefixed("42"), H, "int, not an object")
    bad_file("json_null", prefixed("null"), H, "NoneType, not an object")
    bad_file("deep_array", prefixed("[" * 3000 + "]" * 3000), H, "nested too deeply")
    deep = '{"__metadata__": ' + '{"k": ' * 2000 + '"v"' + "}" * 2000 + "}"
    bad_file("deep_metadata", prefixed(deep), H, "nested too deeply")
    bad_header(
        "nan",
        '{"a": {"dtype": "U8", "shape": [NaN], "data_offsets": [0, 1]}}',
        b"x",
        "not valid JSON",
        None,
    )
    bad_header(
        "infinity",
        '{"a": {"dtype": "U8", "shape": [Infinity], "data_offsets": [0, 1]}}',
        b"x",
        "not valid JSON",
        None,
    )
    digits = "1" * 5000  # past Python's 4300-digit int parsing limit
    bad_header(
        "int_5000_digits",
        f'{{"a": {{"dtype": "U8", "shape": [{digits}], "data_offsets": [0, 1]}}}}',
        b"x",
        "not valid JSON",
        None,
    )
    # duplicate keys: the message names the tensor (or __metadata__)
    e = json.dumps(entry("U8", [2], 0, 2))
    bad_header("dup_tensor", f'{{"a": {e}, "a": {e}}}', b"xx", "duplicate")
    bad_header(
        "dup_metadata_key",
        f'{{"__metadata__": {{"k": "v", "k": "w"}}, "a": {e}}}',
        b"xx",
        "duplicate key 'k'",
        "__metadata__",
    )
    bad_header(
        "dup_metadata",
        f'{{"__metadata__": {{}}, "__metadata__": {{}}, "a": {e}}}',
        b"xx",
        "duplicate",
        "__metadata__",
    )
    bad_header(
        "dup_entry_field",
        '{"a": {"dtype": "U8", "dtype": "I8", "shape": [2], "data_offsets": [0, 2]}}',
        b"xx",
        "duplicate key 'dtype'",
    )
    # dtype
    bad_header("unknown_dtype", {"a": entry("F12", [2], 0, 2)}, b"xx", "unknown dtype")
    bad_header("dtype_lowercase", {"a": entry("f32", [1], 0, 4)}, b"xxxx", "unknown dtype")
    bad_header("dtype_not_string", {"a": entry(7, [2], 0, 2)}, b"xx", "unknown dtype")
    bad_header("dtype_null", {"a": entry(None, [2], 0, 2)}, b"xx", "unknown dtype")
    # shape
    bad_header("shape_negative", {"a": entry("U8", [-2], 0, 2)}, b"xx", "negative")
    bad_header("shape_negative_pair", {"a": entry("U8", [-2, -1], 0, 2)}, b"xx", "negative")
    bad_header("shape_float", {"a": entry("U8", [2.0], 0, 2)}, b"xx", "non-integer")
    bad_header(
        "shape_float_exp",
        '{"a": {"dtype": "U8", "shape": [1e400], "data_offsets": [0, 2]}}',
        b"xx",
        "non-integer",
    )
    bad_header("shape_bool", {"a": entry("U8", [True], 0, 1)}, b"x", "non-integer")
    bad_header("shape_string", {"a": entry("U8", "2", 0, 2)}, b"xx", "not a list")
    bad_header("shape_nested", {"a": entry("U8", [[2]], 0, 2)}, b"xx", "non-integer")
    bad_header("shape_null", {"a": entry("U8", None, 0, 2)}, b"xx", "not a list")
    bad_header(
        "shape_overflow", {"a": entry("F64", [1 << 32, 1 << 32], 0, 8)}, b"x" * 8, "overflows"
    )
    bad_header("shape_overflow_u64", {"a": entry("U8", [1 << 64], 0, 8)}, b"x" * 8, "overflows")
    bad_header("shape_zero_times_huge", {"a": entry("U8", [0, 1 << 70], 0, 0)}, b"", "overflows")
    bad_header("shape_40_dims", {"a": entry("U8", [1] * 40, 0, 1)}, b"x", "40 dims")
    bad_header("shape_size_mismatch", {"a": entry("U8", [3], 0, 2)}, b"xx", "needs 3")
    bad_header("f4_half_byte", {"a": entry("F4", [3], 0, 2)}, b"xx", "whole bytes")
    # data_offsets
    bad_header("offsets_reversed", {"a": entry("U8", [2], 2, 0)}, b"xx", "reversed")
    bad_header("offsets_negative", {"a": entry("U8", [2], -1, 1)}, b"xx", "out of range")
    bad_header(
        "offsets_past_u64", {"a": entry("U8", [2], 1 << 64, (1 << 64) + 2)}, b"xx", "out of range"
    )
    bad_header(
        "offsets_three",
        {"a": {**entry("U8", [2], 0, 2), "data_offsets": [0, 2, 4]}},
        b"xx",
        "two integers",
    )
    bad_header(
        "offsets_strings",
        {"a": {**entry("U8", [2], 0, 2), "data_offsets": ["0", "2"]}},
        b"xx",
        "two integers",
    )
    bad_header(
        "offsets_float",
        {"a": {**entry("U8", [2], 0, 2), "data_offsets": [0, 2.0]}},
        b"xx",
        "two integers",
    )
    bad_header("offsets_past_eof", {"a": entry("U8", [4], 0, 4)}, b"xx", "file ends before")
    bad_header(
        "offsets_far_past_eof", {"a": entry("U8", [1 << 40], 0, 1 << 40)}, b"xx", "file ends before"
    )
    bad_header(
        "offsets_second_past_eof",
        {"a": entry("U8", [2], 0, 2), "b": entry("U8", [4], 2, 6)},
        b"xxxx",
        "file ends before",
        "b",
    )
    bad_header(
        "overlap",
        {"a": entry("U8", [4], 0, 4), "b": entry("U8", [2], 2, 4)},
        b"xxxx",
        "overlap",
        "b",
    )
    bad_header(
        "overlap_identical",
        {"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 0, 4)},
        b"xxxx",
        "overlap",
        "b",
    )
    bad_header(
        "overlap_inside",
        {"a": entry("U8", [4], 0, 4), "b": entry("U8", [2], 1, 3)},
        b"xxxx",
        "overlap",
        "b",
    )
    bad_header(
        "hole", {"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 3, 5)}, b"xxxxx", "hole", "b"
    )
    bad_header("hole_at_start", {"a": entry("U8", [2], 1, 3)}, b"xxx", "hole")
    bad_header(
        "trailing_garbage",
        {"a": entry("U8", [2], 0, 2)},
        b"xx" + b"garbage",
        "trailing bytes",
        None,
    )
    bad_header("trailing_garbage_no_tensors", {}, b"\x00", "trailing bytes", None)
    # __metadata__
    md = "__metadata__"
    ok = {"a": entry("U8", [2], 0, 2)}
    bad_header("metadata_int_value", {md: {"k": 1}, **ok}, b"xx", "strings to strings", md)
    bad_header("metadata_null_value", {md: {"k": None}, **ok}, b"xx", "strings to strings", md)
    bad_header("metadata_list", {md: ["k", "v"], **ok}, b"xx", "strings to strings", md)
    bad_header("metadata_string", {md: "format=pt", **ok}, b"xx", "strings to strings", md)
    bad_header("metadata_nested", {md: {"k": {"x": "y"}}, **ok}, b"xx", "strings to strings", md)
    # the entry itself
    bad_header("entry_list", {"a": [0, 2]}, b"xx", "not an object")
    bad_header("entry_null", {"a": None}, b"xx", "not an object")
    bad_header("entry_missing_key", {"a": {"dtype": "U8", "shape": [2]}}, b"xx", "missing")
    bad_header("entry_extra_key", {"a": {**entry("U8", [2], 0, 2), "x": 1}}, b"xx", "unexpected")


def ok_file(name: str, blob: bytes) -> None:
    """A valid file that must load, byte for byte as safetensors reads it."""
    CASES[name] = {
        "kind": "ok",
        "write": {f"files/{name}.safetensors": blob},
        "path": f"files/{name}.safetensors",
    }


def ok_cases() -> None:
    ok_file("ok_empty_metadata", st_file({"a": ("U8", [3], pattern(3))}, metadata={}))
    ok_file("ok_no_tensors", prefixed("{}"))
    ok_file("ok_no_tensors_metadata", prefixed('{"__metadata__": {"format": "pt"}}'))
    ok_file(
        "ok_scalar_and_empty",
        st_file(
            {
                "s": ("F32", [], pattern(4)),
                "e": ("BF16", [0, 7], b""),
                "z": ("U8", [5, 0], b""),
                "f4": ("F4", [2, 4], pattern(4, 1)),
            }
        ),
    )
    ok_file(
        "ok_padded_header",
        prefixed(json.dumps({"a": entry("U8", [2], 0, 2)}) + " " * 61, pattern(2)),
    )


# ------------------------------------------------------------ model dirs


def bad_dir(
    name: str,
    files: dict[str, bytes],
    error: str,
    match: str,
    names: str,
    tensor: str | None,
    links: dict[str, str] | None = None,
    path: str | list[str] | None = None,
) -> None:
    CASES[name] = {
        "kind": "dir",
        "write": {f"dirs/{name}/{f}": b for f, b in files.items()},
        "links": {f"dirs/{name}/{f}": t for f, t in (links or {}).items()},
        "path": path if path is not None else f"dirs/{name}",
        "error": error,
        "match": match,
        "names": f"dirs/{name}/{names}",
        "tensor": tensor,
    }


def index(weight_map) -> bytes:
    return json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1).encode()


def dir_cases() -> None:
    A = st_file({"x": ("F32", [2], pattern(8))})
    B = st_file({"y": ("U8", [3], pattern(3, 2))})
    BX = st_file({"x": ("F32", [2], pattern(8, 3)), "y": ("U8", [3], pattern(3, 2))})
    BZ = st_file({"y": ("U8", [3], pattern(3, 2)), "z": ("U8", [1], pattern(1, 7))})
    ab = {"a.safetensors": A, "b.safetensors": B}
    IX, E, CF = "IndexFileError", "HeaderError", "ConfigFileError"
    wm = {"x": "a.safetensors", "y": "b.safetensors"}

    def with_index(weight_map, extra=None):
        return {**ab, INDEX: index(weight_map), **(extra or {})}

    bad_dir(
        "idx_missing_file",
        with_index({**wm, "y": "missing.safetensors"}),
        IX,
        "missing file 'missing.safetensors'",
        INDEX,
        "y",
    )
    bad_dir(
        "idx_tensor_in_two_files",
        {"a.safetensors": A, "b.safetensors": BX, INDEX: index(wm)},
        E,
        "also stored in .*a.safetensors",
        "b.safetensors",
        "x",
    )
    bad_dir(
        "idx_tensor_missing",
        with_index({**wm, "ghost": "a.safetensors"}),
        IX,
        "found in no file",
        INDEX,
        "ghost",
    )
    bad_dir(
        "idx_tensor_unlisted",
        {"a.safetensors": A, "b.safetensors": BZ, INDEX: index(wm)},
        IX,
        "not in weight_map",
        INDEX,
        "z",
    )
    bad_dir(
        "idx_wrong_file",
        with_index({"x": "b.safetensors", "y": "a.safetensors"}),
        IX,
        "listed in 'b.safetensors' but stored in",
        INDEX,
        "x",
    )
    # path traversal: the target exists, so only the name itself is to blame
    traversal = {
        "idx_dotdot": "../outside.safetensors",
        "idx_dotdot_inner": "sub/../a.safetensors",
        "idx_absolute": "/etc/passwd",
        "idx_absolute_dir": "/",
        "idx_separator": "sub/a.safetensors",
        "idx_dot_slash": "./a.safetensors",
        "idx_backslash": "sub\\a.safetensors",
        "idx_dotdot_backslash": "..\\outside.safetensors",
        "idx_dot": ".",
        "idx_dotdot_bare": "..",
        "idx_empty_name": "",
        "idx_nul": "a.safetensors\x00.json",
    }
    for case, target in traversal.items():
        bad_dir(
            case,
            with_index({**wm, "x": target}, {"sub/a.safetensors": A}),
            IX,
            "not a plain file name",
            INDEX,
            "x",
        )
    bad_dir("idx_value_not_string", with_index({**wm, "x": 3}), IX, "not a string", INDEX, "x")
    bad_dir(
        "idx_value_list", with_index({**wm, "x": ["a.safetensors"]}), IX, "not a string", INDEX, "x"
    )
    bad_dir("idx_not_json", {**ab, INDEX: b'{"weight_map": {'}, IX, "not valid JSON", INDEX, None)
    bad_dir(
        "idx_not_utf8",
        {**ab, INDEX: b'{"weight_map": {"\xff": "a"}}'},
        IX,
        "not UTF-8",
        INDEX,
        None,
    )
    bad_dir(
        "idx_no_weight_map", {**ab, INDEX: b'{"metadata": {}}'}, IX, "no weight_map", INDEX, None
    )
    bad_dir(
        "idx_weight_map_list",
        {**ab, INDEX: b'{"weight_map": [["x", "a.safetensors"]]}'},
        IX,
        "no weight_map",
        INDEX,
        None,
    )
    bad_dir("idx_not_object", {**ab, INDEX: b"[]"}, IX, "no weight_map", INDEX, None)
    bad_dir(
        "idx_duplicate_tensor",
        {
            **ab,
            INDEX: b'{"weight_map": {"x": "a.safetensors", '
            b'"x": "a.safetensors", "y": "b.safetensors"}}',
        },
        IX,
        "duplicate",
        INDEX,
        "x",
    )
    deep = b'{"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}, "m": ' + b"[" * 3000
    bad_dir(
        "idx_deep", {**ab, INDEX: deep + b"]" * 3000 + b"}"}, IX, "nested too deeply", INDEX, None
    )
    bad_b = prefixed(json.dumps({"y": entry("U7", [3], 0, 3)}), b"xyz")
    bad_dir(
        "idx_shard_bad_header",
        {"a.safetensors": A, "b.safetensors": bad_b, INDEX: index(wm)},
        E,
        "unknown dtype 'U7'",
        "b.safetensors",
        "y",
    )
    bad_dir(
        "config_not_object",
        {**ab, INDEX: index(wm), "config.json": b"[1]"},
        CF,
        "not a JSON object",
        "config.json",
        None,
    )
    bad_dir(
        "config_not_json",
        {**ab, INDEX: index(wm), "config.json": b"{model_type}"},
        CF,
        "not valid JSON",
        "config.json",
        None,
    )
    bad_dir(
        "noindex_tensor_in_two_files",
        {"a.safetensors": A, "b.safetensors": BX},
        E,
        "also stored in .*a.safetensors",
        "b.safetensors",
        "x",
    )
    bad_dir(
        "list_tensor_in_two_files",
        {"a.safetensors": A, "b.safetensors": BX},
        E,
        "also stored in .*a.safetensors",
        "b.safetensors",
        "x",
        path=[
            "dirs/list_tensor_in_two_files/a.safetensors",
            "dirs/list_tensor_in_two_files/b.safetensors",
        ],
    )
    # A symlink that escapes the model dir is a plain name in the index: it is
    # how the Hugging Face cache lays out snapshots, so it stays allowed. The
    # one below points at a bad file: the error names the link.
    bad_dir(
        "symlink_to_bad_file",
        {INDEX: index({"a": "model.safetensors"})},
        E,
        "unknown dtype",
        "model.safetensors",
        "a",
        links={"model.safetensors": "../../files/unknown_dtype.safetensors"},
    )
    # The valid control: an HF cache snapshot, every file a relative symlink
    # into blobs/ (index.json and config.json too), as huggingface_hub makes.
    s1 = st_file(
        {
            "model.embed_tokens.weight": ("BF16", [8, 4], pattern(64, 4)),
            "model.norm.weight": ("BF16", [4], pattern(8, 5)),
        },
        metadata={"format": "pt"},
    )
    s2 = st_file({"lm_head.weight": ("F8_E4M3", [8, 4], pattern(32, 6))}, metadata={})
    snap_index = index(
        {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    )
    blobs = {
        "blobs/1a2b": s1,
        "blobs/3c4d": s2,
        "blobs/5e6f": snap_index,
        "blobs/7a8b": b'{"model_type": "llama", "num_attention_heads": 2}',
    }
    snap = "snapshots/0123abcd"
    CASES["ok_hf_cache_snapshot"] = {
        "kind": "ok",
        "write": {f"dirs/ok_hf_cache/{k}": v for k, v in blobs.items()},
        "links": {
            f"dirs/ok_hf_cache/{snap}/model-00001-of-00002.safetensors": "../../blobs/1a2b",
            f"dirs/ok_hf_cache/{snap}/model-00002-of-00002.safetensors": "../../blobs/3c4d",
            f"dirs/ok_hf_cache/{snap}/{INDEX}": "../../blobs/5e6f",
            f"dirs/ok_hf_cache/{snap}/config.json": "../../blobs/7a8b",
        },
        "path": f"dirs/ok_hf_cache/{snap}",
    }
    CASES["_outside"] = {"kind": "support", "write": {"dirs/outside.safetensors": A}}


# ------------------------------------------------------------------ write


def build() -> dict[str, dict]:
    CASES.clear()
    file_cases()
    ok_cases()
    dir_cases()
    return CASES


def write(out: Path) -> dict[str, dict]:
    cases = build()
    for sub in ("files", "dirs"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    for case in cases.values():
        for rel, blob in case.get("write", {}).items():
            p = out / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(blob)
        for rel, target in case.get("links", {}).items():
            p = out / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, p)
    manifest = {
        name: {k: v for k, v in case.items() if k not in ("write", "links")}
        for name, case in sorted(cases.items())
        if case["kind"] != "support"
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return cases


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="where to write (default: here)")
    args = ap.parse_args(argv)
    cases = write(args.out)
    print(f"{len(cases)} cases written to {args.out}")


if __name__ == "__main__":
    main()
