"""gpuload.synth: the independent writer, HF-shaped model dirs, sizing, the cache.

Oracles: ``safetensors.deserialize`` (the reference reader) and the strict
parser in gpuload.format.header, which must agree with each other on every file
the writer produces.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
from safetensors import safe_open

from gpuload import synth
from gpuload.format.dtypes import DTYPES
from gpuload.format.header import parse_header
from gpuload.read.open import open_checkpoint

SHAPES = [(), (0,), (2, 0, 3), (4,), (3, 4), (2, 3, 8)]
LAYOUTS = {
    "align8": {},
    "align16": {"align": 16},
    "unpadded": {"align": None},
    "pad3": {"align": None, "header_pad": 3},
    "unaligned": {"unaligned": True},
}


def _fits(dtype: str, shape: tuple[int, ...]) -> bool:
    return math.prod(shape) * DTYPES[dtype].bits % 8 == 0


def _table(dtype: str) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    rng = np.random.default_rng(7)
    out = {}
    for i, shape in enumerate(s for s in SHAPES if _fits(dtype, s)):
        n = math.prod(shape) * DTYPES[dtype].bits // 8
        out[f"t{i}.{dtype}"] = (dtype, shape, rng.bytes(n))
    return out


def _data_start(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


# --------------------------------------------------------------------------
# write_safetensors


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_every_dtype(tmp_path, dtype, layout):
    tensors = _table(dtype)
    assert any(s == () for _, s, _ in tensors.values()) == _fits(dtype, ())
    path = tmp_path / "x.safetensors"
    synth.write_safetensors(path, tensors, {"k": "v"}, **LAYOUTS[layout])
    raw = path.read_bytes()

    ref = dict(safetensors.deserialize(raw))
    assert set(ref) == set(tensors)
    for name, (dt, shape, data) in tensors.items():
        assert ref[name]["dtype"] == dt
        assert tuple(ref[name]["shape"]) == shape
        assert bytes(ref[name]["data"]) == data

    hdr = parse_header(path)
    assert hdr.metadata == {"k": "v"}
    assert list(hdr.tensors) == list(tensors)  # stored in the given order
    for name, (dt, shape, data) in tensors.items():
        info = hdr.tensors[name]
        assert (info.dtype.name, info.shape, info.nbytes) == (dt, shape, len(data))
        assert raw[info.start : info.end] == data


def test_header_padding(tmp_path):
    tensors = {"a": ("U8", (3,), b"abc"), "b": ("F32", (1,), b"\x01\x02\x03\x04")}
    p = tmp_path / "x.safetensors"
    synth.write_safetensors(p, tensors, align=None)
    n = _data_start(p) - 8
    text = p.read_bytes()[8 : 8 + n]
    assert not text.endswith(b" ")
    assert json.loads(text)["b"]["data_offsets"] == [3, 7]
    synth.write_safetensors(p, tensors, align=None, header_pad=5)
    assert _data_start(p) - 8 == n + 5
    assert p.read_bytes()[8 + n : 8 + n + 5] == b"     "
    for align in (8, 64, 4096):
        synth.write_safetensors(p, tensors, align=align)
        assert _data_start(p) % align == 0
        parse_header(p)


def test_unaligned_offsets_are_odd(tmp_path):
    tensors = {f"w{i}": ("BF16", (i + 1, 3), os.urandom(6 * (i + 1))) for i in range(5)}
    tensors["f8"] = ("F8_E4M3", (2, 4), os.urandom(8))
    p = tmp_path / "u.safetensors"
    synth.write_safetensors(p, tensors, unaligned=True)
    assert _data_start(p) % 8 == 1
    hdr = parse_header(p)
    assert all(t.start % 2 == 1 for t in hdr.tensors.values())
    ref = dict(safetensors.deserialize(p.read_bytes()))
    assert all(bytes(ref[k]["data"]) == v[2] for k, v in tensors.items())


def test_ndarray_data(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]  # not contiguous
    b = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    c = np.array(True)
    p = tmp_path / "n.safetensors"
    synth.write_safetensors(
        p, {"a": ("F32", (4, 3), a), "b": ("BF16", (2,), b), "c": ("BOOL", (), c)}
    )
    with safe_open(p, framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("a"), a)
        np.testing.assert_array_equal(f.get_tensor("c"), c)
    ref = dict(safetensors.deserialize(p.read_bytes()))
    assert bytes(ref["b"]["data"]) == b.tobytes()
    with pytest.raises(ValueError, match="big-endian"):
        synth.write_safetensors(p, {"a": ("F32", (2,), np.zeros(2, ">f4"))})


@pytest.mark.parametrize(
    ("tensors", "kwargs", "match"),
    [
        ({"a": ("F4", (3,), b"\0\0")}, {}, "not a whole number of bytes"),
        ({"a": ("F6_E2M3", (2,), b"\0\0")}, {}, "not a whole number of bytes"),
        ({"a": ("F32", (2,), b"\0" * 7)}, {}, "needs 8 bytes, data has 7"),
        ({"a": ("F4", (4,), b"\0" * 3)}, {}, "needs 2 bytes"),
        ({"a": ("FP32", (1,), b"\0" * 4)}, {}, "unknown dtype"),
        ({"a": ("F32", (-1,), b"")}, {}, "shape"),
        ({"a": ("F32", (1.0,), b"\0" * 4)}, {}, "shape"),
        ({"__metadata__": ("U8", (1,), b"\0")}, {}, "__metadata__"),
        ({"a": ("U8", (1,), b"\0")}, {"align": 0}, "align"),
        ({"a": ("U8", (1,), b"\0")}, {"header_pad": -1}, "header_pad"),
    ],
)
def test_rejects_bad_input(tmp_path, tensors, kwargs, match):
    with pytest.raises(ValueError, match=match):
        synth.write_safetensors(tmp_path / "bad.safetensors", tensors, **kwargs)
    assert not (tmp_path / "bad.safetensors").exists()


# --------------------------------------------------------------------------
# presets: HF names and shapes


def _shapes(preset: str) -> dict[str, tuple[int, ...]]:
    return dict(synth.PRESETS[preset].tensors())


def test_llama_names_and_shapes():
    s = synth.PRESETS["llama"]
    t = _shapes("llama")
    h, q, kv, i = 4096, 32 * 128, 8 * 128, 14336
    p = "model.layers.31."
    assert t[p + "self_attn.q_proj.weight"] == (q, h)
    assert t[p + "self_attn.k_proj.weight"] == t[p + "self_attn.v_proj.weight"] == (kv, h)
    assert t[p + "self_attn.o_proj.weight"] == (h, q)
    assert t[p + "mlp.gate_proj.weight"] == t[p + "mlp.up_proj.weight"] == (i, h)
    assert t[p + "mlp.down_proj.weight"] == (h, i)
    assert t[p + "input_layernorm.weight"] == t[p + "post_attention_layernorm.weight"] == (h,)
    assert t["model.embed_tokens.weight"] == t["lm_head.weight"] == (128256, h)
    assert t["model.norm.weight"] == (h,)
    assert len(t) == 3 + 32 * 9
    names = [n for n, _ in s.tensors()]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    cfg = s.config()
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (32, 8, 128)
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is False


def test_mixtral_names_and_shapes():
    t = _shapes("mixtral")
    m = "model.layers.0.block_sparse_moe."
    assert t[m + "gate.weight"] == (8, 4096)
    for e in range(8):
        assert t[m + f"experts.{e}.w1.weight"] == t[m + f"experts.{e}.w3.weight"] == (14336, 4096)
        assert t[m + f"experts.{e}.w2.weight"] == (4096, 14336)
    assert "model.layers.0.mlp.gate_proj.weight" not in t
    cfg = synth.PRESETS["mixtral"].config()
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 8
    assert cfg["num_experts_per_tok"] == 2


def test_qwen_moe_names_and_shapes():
    t = _shapes("qwen-moe")
    p = "model.layers.23."
    assert t[p + "self_attn.q_proj.bias"] == t[p + "self_attn.k_proj.bias"] == (2048,)
    assert p + "self_attn.o_proj.bias" not in t
    assert t[p + "mlp.gate.weight"] == (60, 2048)
    assert t[p + "mlp.experts.59.gate_proj.weight"] == (1408, 2048)
    assert t[p + "mlp.experts.59.up_proj.weight"] == (1408, 2048)
    assert t[p + "mlp.experts.59.down_proj.weight"] == (2048, 1408)
    assert t[p + "mlp.shared_expert.gate_proj.weight"] == (5632, 2048)
    assert t[p + "mlp.shared_expert.down_proj.weight"] == (2048, 5632)
    assert t[p + "mlp.shared_expert_gate.weight"] == (1, 2048)
    cfg = synth.PRESETS["qwen-moe"].config()
    assert cfg["model_type"] == "qwen2_moe" and cfg["architectures"] == ["Qwen2MoeForCausalLM"]
    assert (cfg["num_experts"], cfg["moe_intermediate_size"]) == (60, 1408)
    assert cfg["shared_expert_intermediate_size"] == 5632


def test_phi3_names_and_shapes():
    t = _shapes("phi3")
    p = "model.layers.0."
    assert t[p + "self_attn.qkv_proj.weight"] == ((32 + 2 * 32) * 96, 3072)
    assert t[p + "mlp.gate_up_proj.weight"] == (2 * 8192, 3072)
    assert t[p + "mlp.down_proj.weight"] == (3072, 8192)
    assert p + "self_attn.q_proj.weight" not in t
    gqa = dict(synth.PRESETS["tiny-phi3"].tensors())  # GQA: q 8 heads, k/v 4 heads of 8
    assert gqa[p + "self_attn.qkv_proj.weight"] == ((8 + 2 * 4) * 8, 64)
    assert synth.PRESETS["phi3"].config()["model_type"] == "phi3"


@pytest.mark.parametrize(
    ("preset", "params"),
    [  # parameter counts of the published checkpoints the presets copy
        ("llama", 8_030_261_248),  # Meta-Llama-3-8B
        ("mixtral", 46_702_792_704),  # Mixtral-8x7B-v0.1
        ("qwen-moe", 14_315_784_192),  # Qwen1.5-MoE-A2.7B
        ("phi3", 3_821_079_552),  # Phi-3-mini-4k-instruct
    ],
)
def test_full_presets_match_published_sizes(preset, params):
    assert synth.PRESETS[preset].nbytes("BF16") == 2 * params
    assert synth.PRESETS[preset].nbytes("F32") == 4 * params


def test_tiny_presets_are_tiny():
    for name, spec in synth.PRESETS.items():
        if name.startswith("tiny"):
            assert 100 << 10 < spec.nbytes() < 1 << 20, name


def test_spec_validation():
    with pytest.raises(ValueError, match="kv_heads"):
        synth.ModelSpec("llama", 64, 8, 3, 8, 128, 512, 1)
    with pytest.raises(ValueError, match="experts_per_tok"):
        synth.ModelSpec("mixtral", 64, 8, 4, 8, 128, 512, 1, experts=4)
    with pytest.raises(ValueError, match="family"):
        synth.ModelSpec("gpt2", 64, 8, 4, 8, 128, 512, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown preset"):
        synth.get_spec("llama-9000")


# --------------------------------------------------------------------------
# write_model


TINY = ["tiny", "tiny-mixtral", "tiny-qwen-moe", "tiny-phi3"]


@pytest.mark.parametrize("unaligned", [False, True], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("preset", TINY)
def test_write_model_opens_and_holds_random_bytes(tmp_path, preset, unaligned):
    spec = synth.PRESETS[preset]
    root = synth.write_model(tmp_path / "m", preset, num_files=3, unaligned=unaligned, seed=5)
    ck = open_checkpoint(root)
    assert ck.config == spec.config("BF16")
    assert [os.path.basename(f.path) for f in ck.files] == [
        f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)
    ]
    index = json.loads((root / "model.safetensors.index.json").read_text())
    assert (
        index["metadata"]["total_size"]
        == spec.nbytes()
        == sum(t.nbytes for t in ck.tensors.values())
    )
    assert {n: s for n, s in spec.tensors()} == {n: t.shape for n, t in ck.tensors.items()}

    # in layer order across files: each file's tensors follow the previous file's
    order = [n for n, _ in spec.tensors()]
    stored = [n for f in ck.files for n in f.tensors]
    assert stored == order
    sizes = [sum(t.nbytes for t in f.tensors.values()) for f in ck.files]
    biggest = max(t.nbytes for t in ck.tensors.values())
    assert max(sizes) - min(sizes) <= 2 * biggest  # balanced up to tensor granularity

    for f in ck.files:
        raw = Path(f.path).read_bytes()
        assert f.metadata == {"format": "pt"}
        assert (f.data_start % 8 == 1) if unaligned else (f.data_start % 8 == 0)
        ref = dict(safetensors.deserialize(raw))
        for name, t in f.tensors.items():
            data = raw[t.start : t.end]
            assert t.start % 2 == (1 if unaligned else 0)
            assert data == synth.random_bytes(5, name, t.nbytes) == bytes(ref[name]["data"])
            assert data != bytes(len(data))  # a zero-filled load would be caught
            assert np.count_nonzero(np.frombuffer(data, np.uint8)) > 0.9 * len(data)


def test_bytes_depend_on_seed_and_name_only(tmp_path):
    a = open_checkpoint(synth.write_model(tmp_path / "a", "tiny", num_files=1))
    b = open_checkpoint(synth.write_model(tmp_path / "b", "tiny", num_files=4, unaligned=True))
    c = open_checkpoint(synth.write_model(tmp_path / "c", "tiny", num_files=1, seed=1))

    def read(ck, name):
        t = ck.tensors[name]
        with open(t.file, "rb") as f:
            f.seek(t.start)
            return f.read(t.nbytes)

    for name in a.tensors:
        assert read(a, name) == read(b, name) != read(c, name)
    # tensors differ from each other too (a loader mixing them up is caught)
    assert read(a, "model.layers.0.input_layernorm.weight") != read(
        a, "model.layers.0.post_attention_layernorm.weight"
    )


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F8_E4M3", "F4"])
def test_write_model_dtypes(tmp_path, dtype):
    root = synth.write_model(tmp_path / "m", "tiny-mixtral", dtype=dtype, num_files=2)
    ck = open_checkpoint(root)
    assert {t.dtype.name for t in ck.tensors.values()} == {dtype}
    assert sum(t.nbytes for t in ck.tensors.values()) == synth.PRESETS["tiny-mixtral"].nbytes(dtype)
    assert ck.config["torch_dtype"] == (DTYPES[dtype].torch or dtype.lower())


def test_write_model_defaults_and_errors(tmp_path):
    root = synth.write_model(tmp_path / "one", "tiny")  # far below 5 GB: one file
    assert sorted(p.name for p in root.iterdir()) == [
        "config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
    ]
    synth.write_model(root, "tiny", num_files=2)  # replaces the earlier model
    assert sorted(p.name for p in root.iterdir())[1:3] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    open_checkpoint(root)
    (root / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        synth.write_model(root, "tiny")
    assert (root / "notes.txt").exists() and len(list(root.iterdir())) == 5
    with pytest.raises(FileExistsError, match="not a directory"):
        synth.write_model(root / "config.json", "tiny")
    with pytest.raises(ValueError, match="more than"):
        synth.write_model(tmp_path / "many", "tiny", num_files=1000)
    with pytest.raises(ValueError, match="dtype"):
        synth.write_model(tmp_path / "dt", "tiny", dtype="F12")
    spec = synth.write_model(tmp_path / "scaled", "llama", target_bytes=4 << 20)
    size = open_checkpoint(spec).file_bytes()
    assert abs(size - (4 << 20)) < 0.1 * (4 << 20)


# --------------------------------------------------------------------------
# scale_spec


@pytest.mark.parametrize("target", [8 << 20, 64 << 20, 2 << 30, 12 * 10**9, 100 * 10**9])
@pytest.mark.parametrize("preset", ["llama", "mixtral", "qwen-moe", "phi3"])
def test_scale_spec_lands_near_target(preset, target):
    if preset == "qwen-moe" and target == 8 << 20:  # 60 experts at hidden 128 are 11 MB
        with pytest.raises(ValueError, match="within 10%"):
            synth.scale_spec(preset, target)
        return
    s = synth.scale_spec(preset, target)
    base = synth.PRESETS[preset]
    assert abs(s.nbytes() - target) <= 0.1 * target
    assert s.family == base.family and s.experts == base.experts
    assert s.hidden % 128 == 0 and s.heads * s.head_dim == s.hidden
    assert s.heads % 8 == 0 and s.heads % s.kv_heads == 0
    assert 8 % s.kv_heads == 0 or s.kv_heads % 8 == 0
    assert s.vocab % 512 == 0
    for d in (s.intermediate, s.moe_intermediate, s.shared_intermediate):
        assert d % 128 == 0


def test_scale_spec_shapes_are_realistic():
    s = synth.scale_spec("llama", 2 << 30)  # about Llama-3.2-1B
    assert (s.hidden, s.head_dim, s.heads // s.kv_heads) == (2048, 128, 4)
    assert 12 <= s.layers <= 20
    s = synth.scale_spec("llama", 16 * 10**9)  # the preset itself, give or take
    assert (s.hidden, s.heads, s.kv_heads) == (4096, 32, 8) and 28 <= s.layers <= 36
    f8 = synth.scale_spec("llama", 2 << 30, dtype="F8_E4M3")
    assert abs(f8.nbytes("F8_E4M3") - (2 << 30)) <= 0.1 * (2 << 30)


def test_scale_spec_errors():
    with pytest.raises(ValueError, match="within 10%"):
        synth.scale_spec("llama", 1000)
    with pytest.raises(ValueError, match="target_bytes"):
        synth.scale_spec("llama", 0)
    with pytest.raises(ValueError, match="dtype"):
        synth.scale_spec("llama", 1 << 30, dtype="bf16")


# --------------------------------------------------------------------------
# cached_model


def _mtimes(root):
    return {p.name: p.stat().st_mtime_ns for p in root.iterdir()}


def test_cached_model_reuses(tmp_path):
    a = synth.cached_model("tiny", None, cache_dir=tmp_path)
    before = _mtimes(a)
    b = synth.cached_model("tiny", None, cache_dir=tmp_path)
    assert a == b and _mtimes(b) == before
    open_checkpoint(a)
    assert [p.name for p in tmp_path.iterdir()] == [a.name]  # no temp dirs left
    # every part of the key gives its own entry
    others = {
        synth.cached_model("tiny", None, cache_dir=tmp_path, unaligned=True),
        synth.cached_model("tiny", None, cache_dir=tmp_path, seed=1),
        synth.cached_model("tiny", None, cache_dir=tmp_path, dtype="F16"),
        synth.cached_model("llama", 4 << 20, cache_dir=tmp_path),
    }
    spec = synth.ModelSpec("llama", 64, 8, 8, 8, 128, 512, 1)
    own = synth.cached_model(spec, None, cache_dir=tmp_path)
    assert synth.cached_model(spec, None, cache_dir=tmp_path) == own
    assert open_checkpoint(own).config["num_key_value_heads"] == 8
    assert len(others | {a, own}) == 6
    assert f"v{synth.FORMAT_VERSION}" in a.name


@pytest.mark.parametrize("damage", ["truncate", "delete", "no-stamp", "other-spec"])
def test_cached_model_rewrites_incomplete(tmp_path, damage):
    root = synth.cached_model("tiny", None, cache_dir=tmp_path)
    good = {p.name: p.read_bytes() for p in root.iterdir()}
    f = root / "model-00001-of-00001.safetensors"
    if damage == "truncate":
        os.truncate(f, f.stat().st_size // 2)
    elif damage == "delete":
        f.unlink()
    elif damage == "no-stamp":
        (root / "gpuload-synth.json").unlink()
    else:  # written by an older scale_spec, say: same name, other shapes
        stamp = json.loads((root / "gpuload-synth.json").read_text())
        stamp["spec"]["layers"] = 3
        (root / "gpuload-synth.json").write_text(json.dumps(stamp))
    again = synth.cached_model("tiny", None, cache_dir=tmp_path)
    assert again == root
    assert {p.name: p.read_bytes() for p in again.iterdir()} == good


def test_cached_model_interrupted_write_is_not_kept(tmp_path, monkeypatch):
    real = synth.random_chunks

    def failing(seed, name, nbytes):
        if "layers.1." in name:
            raise OSError("disk full (simulated)")
        yield from real(seed, name, nbytes)

    monkeypatch.setattr(synth.layout, "random_chunks", failing)
    with pytest.raises(OSError, match="simulated"):
        synth.cached_model("tiny", None, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a final entry nor a temp dir
    monkeypatch.setattr(synth.layout, "random_chunks", real)
    open_checkpoint(synth.cached_model("tiny", None, cache_dir=tmp_path))


def test_cached_model_clears_dead_writers_temp_dirs(tmp_path):
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    key = synth.cached_model("tiny", None, cache_dir=tmp_path).name
    stale = tmp_path / f".tmp-{key}-{socket.gethostname()}-{done.pid}-abc"
    (stale / "m").mkdir(parents=True)
    (tmp_path / key / "gpuload-synth.json").unlink()  # force a rewrite
    synth.cached_model("tiny", None, cache_dir=tmp_path)
    assert not stale.exists()
