"""Prefault, pinning and zero-copy host arrays (CPU tier).

Residency is measured with mincore, never assumed: files are evicted with
fsync + POSIX_FADV_DONTNEED first, which needs a disk-backed directory (on
tmpfs the page cache *is* the file and nothing can be evicted).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors

from gpuload import config
from gpuload.config import Config
from gpuload.errors import ReadError
from gpuload.host.resident import PRESET_EXPERTS, map_resident
from gpuload.memory import mapping, pinning
from gpuload.read.open import open_checkpoint
from gpuload.sharding.selection import Selection

# The module, not the function that gpuload/__init__ may re-export under its name.
pf = importlib.import_module("gpuload.host.prefault")
MiB = 1 << 20
PAGE = mapping.PAGE
REPO = Path(__file__).resolve().parents[1]
NP = {  # the oracle's own dtype table
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "I8": np.int8,
    "U8": np.uint8,
    "I64": np.int64,
    "F4": np.uint8,  # packed: its bytes
}
HAS_CUPY = importlib.util.find_spec("cupy") is not None


# --------------------------------------------------------------------------
# helpers


def write_st(path: Path, entries, pad: int = 0) -> dict[str, dict]:
    """A tiny safetensors writer: [(name, dtype, shape, raw bytes)] -> file.

    ``pad`` spaces after the JSON move the data section, e.g. to an odd
    offset. Returns the oracle: safetensors' own parse of the bytes.
    """
    header, off = {}, 0
    for name, dt, shape, data in entries:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    head = json.dumps(header).encode() + b" " * pad
    blob = len(head).to_bytes(8, "little") + head + b"".join(e[3] for e in entries)
    path.write_bytes(blob)
    return dict(safetensors.deserialize(blob))


def rand(nbytes: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def oracle(entry: dict) -> np.ndarray:
    a = np.frombuffer(entry["data"], NP[entry["dtype"]])
    shape = list(entry["shape"])
    if entry["dtype"] == "F4":
        shape[-1] //= 2
    return a.reshape(shape)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def evict(path: Path) -> float:
    """Drop the file's pages; the fraction still resident (one path, not a
    list: mapping.evict takes either)."""
    return mapping.evict(path)


def owner(a: np.ndarray):
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a


def mapped(path: Path) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path.resolve())) for line in f)


def vm_locked() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    return 0


def resident_bytes(path: Path, start: int, end: int) -> int:
    return pf.residency(path, start, end - start)[0]


@pytest.fixture(scope="session")
def disk_root(tmp_path_factory):
    """A directory whose files can be evicted from the page cache."""
    tried = []
    for parent in (tmp_path_factory.getbasetemp(), Path("/var/tmp"), REPO):
        try:
            d = Path(tempfile.mkdtemp(prefix="gpuload-prefault-", dir=parent))
        except OSError as e:
            tried.append(f"{parent}: {e.strerror}")
            continue
        probe = d / "probe"
        probe.write_bytes(rand(MiB))
        evict(probe)
        left = pf.residency(probe)[0]
        probe.unlink()
        if left == 0:
            yield d
            shutil.rmtree(d, ignore_errors=True)
            return
        tried.append(f"{parent}: {left} pages stay resident after DONTNEED (tmpfs?)")
        shutil.rmtree(d, ignore_errors=True)
    pytest.skip("no directory here can be evicted from the page cache: " + "; ".join(tried))


@pytest.fixture
def ddir(disk_root, request):
    d = disk_root / request.node.name.replace("[", "-").replace("]", "")
    d.mkdir()
    yield d
    gc.collect()
    shutil.rmtree(d, ignore_errors=True)


def three(ddir: Path, size: int = 4 * MiB, pad: int = 0):
    """a, b, c: three F32 tensors of ``size`` bytes each."""
    n = size // 4 // 256
    entries = [(x, "F32", (n, 256), rand(size, i)) for i, x in enumerate("abc")]
    path = ddir / "model.safetensors"
    return path, write_st(path, entries, pad)


# --------------------------------------------------------------------------
# the gate, the preset, filters


@pytest.mark.parametrize(
    ("setting", "need", "avail", "go", "says"),
    [
        (False, 1, 100, False, "GPULOAD_PREFAULT=0"),
        (True, 100, 1, True, "GPULOAD_PREFAULT=1"),
        ("auto", 80, 100, True, "fits"),  # exactly 80%
        ("auto", 81, 100, False, "exceeds 80%"),
        ("auto", 8 << 30, 10 << 30, True, "fits"),
        ("auto", (8 << 30) + 1, 10 << 30, False, "GPULOAD_PREFAULT=1 forces"),
        ("auto", 1, 0, False, "exceeds"),
        ("auto", 0, 0, True, "fits"),
    ],
)
def test_gate(setting, need, avail, go, says):
    ok, why = pf.should_prefault(setting, need, avail)
    assert ok is go
    assert says in why


def test_gate_rejects_unknown_setting():
    with pytest.raises(ValueError, match="setting='yes'"):
        pf.should_prefault("yes", 1, 1)


def test_mem_available_is_meminfo():
    with open("/proc/meminfo") as f:
        total = next(int(x.split()[1]) * 1024 for x in f if x.startswith("MemTotal:"))
    assert 0 < pf.mem_available() <= total


@pytest.mark.parametrize(
    ("name", "hit"),
    [
        ("model.layers.0.block_sparse_moe.experts.7.w1.weight", True),  # Mixtral
        ("model.layers.3.mlp.experts.12.down_proj.weight", True),  # Qwen-MoE, DeepSeek
        ("model.layers.3.mlp.experts.gate_up_proj", True),  # fused experts
        ("blk.4.ffn_gate_exps.weight", True),  # GGUF names
        ("blk.4.ffn_down_exps.weight", True),
        ("model.layers.3.mlp.shared_experts.gate_proj.weight", False),  # DeepSeek shared
        ("model.layers.3.mlp.shared_expert.up_proj.weight", False),  # Qwen shared
        ("model.layers.3.mlp.shared_expert_gate.weight", False),
        ("blk.4.ffn_gate_shexp.weight", False),
        ("model.layers.3.mlp.gate.weight", False),  # the router
        ("model.layers.3.self_attn.q_proj.weight", False),
    ],
)
def test_preset_experts(name, hit):
    assert pf.name_filter(PRESET_EXPERTS)(name) is hit


def test_name_filter_kinds():
    assert pf.name_filter(r"\.w1\.")("x.w1.weight")
    assert not pf.name_filter(["a", "b"])("c")
    assert pf.name_filter(["a", "b"])("b")
    assert pf.name_filter(lambda n: n.startswith("x"))("xy")
    with pytest.raises(TypeError, match="tensors=3"):
        pf.name_filter(3)


# --------------------------------------------------------------------------
# residency: measured before and after


def test_prefault_makes_every_page_resident(ddir, caplog):
    path, _ = three(ddir)
    evict(path)
    resident, total = pf.residency(path)
    assert resident <= total // 100, "eviction did not work"
    caplog.set_level(logging.INFO, logger="gpuload.host.prefault")
    rep = pf.prefault(path, pin=False, setting=True)
    assert pf.residency(path) == (total, total)
    assert rep.skipped_reason is None
    assert rep.pages_total == total and rep.pages_resident_after == total
    assert rep.pages_resident_before <= total // 100
    assert rep.bytes == path.stat().st_size and rep.seconds > 0 and rep.gib_per_s > 0
    assert not rep.pinned and "pin" in rep.pin_reason
    lines = [r.getMessage() for r in caplog.records if r.name == "gpuload.host.prefault"]
    assert len(lines) == 1 and "GiB/s" in lines[0] and "not pinned" in lines[0]


def test_only_selected_pages_become_resident(ddir):
    path, _ = three(ddir, pad=3)  # tensors start off page boundaries
    ck = open_checkpoint(path)
    a, b, c = (ck.tensors[x] for x in "abc")
    evict(path)
    arrays, rep = map_resident(ck, {"b": Selection.whole(b.shape)}, Config(prefault=True))
    b_pages = pf.residency(path, b.start, b.nbytes)
    assert b_pages[0] == b_pages[1] == rep.pages_total
    # page rounding: at most the one page each neighbour shares with b
    assert resident_bytes(path, a.start, a.end) <= 1
    assert resident_bytes(path, c.start, c.end) <= 1


def test_row_shard_prefaults_only_its_rows(ddir):
    path, _ = three(ddir, size=8 * MiB)
    ck = open_checkpoint(path)
    b = ck.tensors["b"]
    rows = b.shape[0]
    sel = Selection(0, ((rows // 2, rows // 4),), (rows // 4, 256), "row")
    evict(path)
    map_resident(ck, {"b": sel}, Config(prefault=True, pin=False))
    row = b.nbytes // rows
    lo, hi = b.start + rows // 2 * row, b.start + 3 * rows // 4 * row
    got, total = pf.residency(path, lo, hi - lo)
    assert got == total >= (hi - lo) // PAGE
    assert resident_bytes(path, b.start, lo) <= 1
    assert resident_bytes(path, hi, b.end) <= 1


def test_standalone_prefault_of_a_regex(ddir):
    path, _ = three(ddir)
    ck = open_checkpoint(path)
    evict(path)
    rep = pf.prefault(path, "^[ab]$", pin=False, setting=True)
    for x in "ab":
        t = ck.tensors[x]
        got, total = pf.residency(path, t.start, t.nbytes)
        assert got == total
    c = ck.tensors["c"]
    assert resident_bytes(path, c.start, c.end) <= 1
    assert rep.pages_resident_after == rep.pages_total


def test_auto_skips_a_set_too_big_for_ram(ddir, monkeypatch):
    path, _ = three(ddir)
    monkeypatch.setattr(pf, "mem_available", lambda: 4 * MiB)
    evict(path)
    rep = pf.prefault(path, setting="auto")
    assert rep.skipped_reason is not None and "80%" in rep.skipped_reason
    assert not rep.pinned and rep.pages_resident_after == rep.pages_resident_before
    assert pf.residency(path)[0] <= pf.residency(path)[1] // 100


def test_prefault_off_from_config(ddir):
    path, _ = three(ddir)
    with config.override(prefault=False):
        rep = pf.prefault(path)
    assert "GPULOAD_PREFAULT=0" in rep.skipped_reason
    assert not rep.pinned


def test_nothing_selected(ddir):
    path, _ = three(ddir)
    rep = pf.prefault(path, ["nope"], setting=True)
    assert rep.bytes == 0 and rep.skipped_reason == "no bytes selected"


def test_residency_of_a_part(ddir):
    path, _ = three(ddir)
    evict(path)
    assert pf.residency(path, 5, 0) == (0, 0)
    assert pf.residency(path, PAGE + 1, PAGE) == (0, 2)


# --------------------------------------------------------------------------
# arrays: exact, zero-copy, alive as long as needed


@pytest.fixture
def mixed(ddir):
    """Every kind of tensor, at unaligned offsets, in two files."""
    e1 = [
        ("odd", "I8", (3,), rand(3, 1)),  # pushes the rest off alignment
        ("w", "F32", (64, 48), rand(64 * 48 * 4, 2)),
        ("bf", "BF16", (32, 80), rand(32 * 80 * 2, 3)),
        ("f8", "F8_E4M3", (16, 64), rand(16 * 64, 4)),
        ("f4", "F4", (8, 12), rand(8 * 6, 5)),
        ("scalar", "I64", (), rand(8, 6)),
        ("empty", "F16", (0, 5), b""),
    ]
    e2 = [("gate_up", "F16", (96, 40), rand(96 * 40 * 2, 7)), ("u", "U8", (9, 9), rand(81, 8))]
    o = write_st(ddir / "a.safetensors", e1, pad=1)
    o |= write_st(ddir / "b.safetensors", e2)
    return [ddir / "a.safetensors", ddir / "b.safetensors"], o


def test_arrays_match_the_oracle(mixed):
    paths, o = mixed
    ck = open_checkpoint(paths)
    sels = {
        "odd": (Selection.whole((3,)), lambda x: x),
        "w": (Selection(1, ((12, 12),), (64, 12), "column"), lambda x: x[:, 12:24]),
        "bf": (Selection(0, ((8, 8),), (8, 80), "row"), lambda x: x[8:16]),
        "f8": (Selection.whole((16, 64), "expert"), lambda x: x),
        "f4": (Selection(1, ((4, 4),), (8, 4), "column"), lambda x: x[:, 2:4]),
        "scalar": (Selection.whole(()), lambda x: x),
        "empty": (Selection.whole((0, 5)), lambda x: x),
        "gate_up": (
            Selection(0, ((12, 12), (60, 12)), (24, 40), "fused"),
            lambda x: np.concatenate([x[12:24], x[60:72]]),
        ),
        "u": (Selection(1, ((3, 3),), (9, 3), "column"), lambda x: x[:, 3:6]),
    }
    arrays, _ = map_resident(ck, {k: s for k, (s, _) in sels.items()}, Config(pin=False))
    for name, (_, cut) in sels.items():
        assert same(arrays[name], cut(oracle(o[name]))), name


def test_views_and_copies(mixed):
    paths, _ = mixed
    ck = open_checkpoint(paths)
    sels = {
        "w": Selection(1, ((12, 12),), (64, 12), "column"),
        "bf": Selection.whole((32, 80)),
        "gate_up": Selection(0, ((12, 12), (60, 12)), (24, 40), "fused"),
        "u": Selection.whole((9, 9)),
    }
    arrays, _ = map_resident(ck, sels, Config(pin=False))
    col = arrays["w"]
    assert col.strides == (48 * 4, 4) and not col.flags.c_contiguous  # a strided view
    for name in ("w", "bf", "u"):
        a = arrays[name]
        assert isinstance(owner(a), mapping.Mapping) and not a.flags.owndata
        with pytest.raises(ValueError, match="read-only"):
            a[(0,) * a.ndim] = 0
    # a copy, in memory of its own (pinned with the views: see test_contract)
    assert isinstance(owner(arrays["gate_up"]), mapping.HostBuffer)
    assert arrays["gate_up"].flags.writeable
    # one mapping per file
    assert owner(arrays["w"]) is owner(arrays["bf"]) is not owner(arrays["u"])


def test_arrays_outlive_checkpoint_and_report(mixed):
    paths, o = mixed
    ck = open_checkpoint(paths)
    arrays, rep = map_resident(ck, {"w": Selection.whole((64, 48))}, Config())
    m = owner(arrays["w"])
    fin, ref = m._finalizer, weakref.ref(m)
    del m, ck, rep
    gc.collect()
    assert mapped(paths[0]) and fin.alive
    assert same(arrays["w"], oracle(o["w"]))
    col = arrays.pop("w")[:, 3]  # a view of a view still holds the mapping
    gc.collect()
    assert same(col, oracle(o["w"])[:, 3])
    del col
    gc.collect()
    assert ref() is None and not fin.alive and not mapped(paths[0])


def test_changed_file_is_refused(mixed):
    paths, _ = mixed
    ck = open_checkpoint(paths)
    os.utime(paths[0], ns=(1, 1))
    with pytest.raises(ReadError, match="changed"):
        map_resident(ck, {"w": Selection.whole((64, 48))})


def test_unknown_tensor_and_bad_cuts(mixed):
    paths, _ = mixed
    ck = open_checkpoint(paths)
    with pytest.raises(ValueError, match="'nope'"):
        map_resident(ck, {"nope": Selection.whole(())})
    with pytest.raises(ValueError, match="splits a byte"):
        map_resident(ck, {"f4": Selection(1, ((1, 3),), (8, 3), "column")})
    with pytest.raises(ValueError, match="exceed"):
        map_resident(ck, {"w": Selection(0, ((60, 8),), (8, 48), "row")})


# --------------------------------------------------------------------------
# pinning


def test_pin_off(ddir):
    path, _ = three(ddir)
    rep = pf.prefault(path, pin=False, setting=True)
    assert not rep.pinned and rep.pin_method is None and "pin=False" in rep.pin_reason


@pytest.mark.skipif(HAS_CUPY, reason="cupy is installed: CUDA pinning is tried first")
def test_pin_without_cuda_mlocks_or_says_why(ddir):
    path, _ = three(ddir, size=MiB)
    base = vm_locked()
    rep = pf.prefault(path, pin=True, setting=True)
    assert "cupy is not installed" in rep.pin_reason
    if not rep.pinned:
        assert "mlock" in rep.pin_reason or "RLIMIT_MEMLOCK" in rep.pin_reason
        return
    assert rep.pin_method == "mlock"
    assert vm_locked() - base >= rep.bytes - PAGE  # measured, not assumed
    rep.release()
    gc.collect()
    assert vm_locked() == base


def test_pin_refused_by_rlimit(ddir, monkeypatch):
    path, _ = three(ddir, size=MiB)
    monkeypatch.setattr(pinning, "_cuda_runtime", lambda device=None: (None, "no CUDA (test)"))
    monkeypatch.setattr(pinning, "mlock_allowance", lambda: 4096)
    rep = pf.prefault(path, pin=True, setting=True)
    assert not rep.pinned and "RLIMIT_MEMLOCK allows 4096" in rep.pin_reason
    assert rep.pages_resident_after == rep.pages_total  # prefault itself still ran


class FakeRuntime:
    """cupy.cuda.runtime's host-registration calls, recorded."""

    class CUDARuntimeError(RuntimeError):
        # cupy's is made from the status number, and says its name and text.
        NAMES = {709: "cudaErrorContextIsDestroyed: context is destroyed"}
        NAMES[801] = "cudaErrorNotSupported: operation not supported"

        def __init__(self, status: int) -> None:
            self.status = status
            super().__init__(self.NAMES[status])

    def __init__(self, path: Path, refuse_at: int | None = None) -> None:
        self.path, self.refuse_at = path, refuse_at
        self.registered: dict[int, tuple[int, int]] = {}
        self.unregistered_while_mapped: list[bool] = []

    def hostRegister(self, ptr: int, size: int, flags: int) -> None:  # noqa: N802
        if len(self.registered) == self.refuse_at:
            raise self.CUDARuntimeError(801)
        self.registered[ptr] = (size, flags)

    def hostUnregister(self, ptr: int) -> None:  # noqa: N802
        del self.registered[ptr]
        self.unregistered_while_mapped.append(mapped(self.path))


def test_cuda_registration_contract(ddir, monkeypatch):
    path, _ = three(ddir)
    fake = FakeRuntime(path)
    monkeypatch.setattr(pinning, "_cuda_runtime", lambda device=None: (fake, ""))
    monkeypatch.setattr(pinning, "PIN_PIECE_BYTES", MiB)
    ck = open_checkpoint(path)
    arrays, rep = map_resident(ck, {"b": Selection.whole(ck.tensors["b"].shape)})
    assert rep.pinned and rep.pin_method == "cuda"
    pieces = sorted(fake.registered.items())
    assert all(size <= MiB and flags & 8 for _, (size, flags) in pieces)  # ReadOnly
    assert all(p % PAGE == 0 for p, _ in pieces)
    assert all(p + s == q for (p, (s, _)), (q, _) in zip(pieces, pieces[1:], strict=False))
    assert sum(s for _, (s, _) in pieces) == rep.bytes
    del arrays, ck
    gc.collect()
    assert not fake.registered and all(fake.unregistered_while_mapped)


def test_cuda_refusal_falls_back(ddir, monkeypatch):
    path, _ = three(ddir, size=MiB)
    fake = FakeRuntime(path, refuse_at=2)
    monkeypatch.setattr(pinning, "_cuda_runtime", lambda device=None: (fake, ""))
    monkeypatch.setattr(pinning, "PIN_PIECE_BYTES", 256 << 10)
    rep = pf.prefault(path, pin=True, setting=True)
    assert not fake.registered  # what was registered was undone
    assert "cudaHostRegister refused" in rep.pin_reason
    assert "cudaErrorNotSupported: operation not supported" in rep.pin_reason
    assert str(path) in rep.pin_reason
    assert rep.pin_method in ("mlock", None)
    if rep.pin_method == "mlock":
        assert rep.pin_reason.startswith("mlock, the fallback: cudaHostRegister refused")
    rep.release()


def test_pins_are_made_in_the_loads_device_context(ddir, monkeypatch):
    # A process loading for cuda:3 must not create a context on cuda:0.
    path, _ = three(ddir)
    fake, seen = FakeRuntime(path), []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            seen.append(("enter", self.index, len(fake.registered)))

        def __exit__(self, *exc):
            seen.append(("exit", self.index, len(fake.registered)))

    def runtime(device=None):
        seen.append(("check", device))
        return fake, ""

    monkeypatch.setattr(pinning, "_cuda_runtime", runtime)
    monkeypatch.setattr(pinning, "_on_device", lambda d: Device(d) if d is not None else Device(-1))
    ck = open_checkpoint(path)
    sel = {"b": Selection.whole(ck.tensors["b"].shape)}
    arrays, rep = map_resident(ck, sel, Config(), device=3)
    assert rep.pin_method == "cuda"
    n = len(fake.registered)
    assert seen == [("check", 3), ("enter", 3, 0), ("exit", 3, n)]  # every piece inside
    del arrays
    gc.collect()


def test_unpin_goes_on_past_a_piece_that_refuses(ddir, monkeypatch):
    path, _ = three(ddir)
    fake = FakeRuntime(path)
    monkeypatch.setattr(pinning, "_cuda_runtime", lambda device=None: (fake, ""))
    monkeypatch.setattr(pinning, "PIN_PIECE_BYTES", 64 << 10)
    ck = open_checkpoint(path)
    arrays, rep = map_resident(ck, {"b": Selection.whole(ck.tensors["b"].shape)}, Config())
    assert len(fake.registered) > 2
    first = min(fake.registered)
    real = fake.hostUnregister

    def unregister(ptr):
        if ptr == first:
            raise fake.CUDARuntimeError(709)
        real(ptr)

    fake.hostUnregister = unregister
    del arrays, ck
    gc.collect()
    assert list(fake.registered) == [first]  # only the piece that refused


@pytest.mark.gpu
def test_cuda_pin_on_a_device(ddir):
    if not HAS_CUPY:
        pytest.skip("cupy is not installed")
    import cupy

    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:  # no driver: cupy raises, not 0
        pytest.skip(f"no CUDA device ({e})")
    if n < 1:
        pytest.skip("no CUDA device")
    path, o = three(ddir)
    ck = open_checkpoint(path)
    arrays, rep = map_resident(ck, {"b": Selection.whole(ck.tensors["b"].shape)}, Config())
    # cudaHostRegister(ReadOnly) of a shared file mapping may be refused (in
    # some VMs): the documented fallback is mlock, with the CUDA error named.
    print(f"pin_method={rep.pin_method}: {rep.pin_reason}")  # in the log either way
    if rep.pin_method != "cuda":
        assert rep.pin_method in ("mlock", None), rep.pin_reason  # None: mlock refused too
        refused = "cudaHostRegister refused" in rep.pin_reason and "cudaError" in rep.pin_reason
        unsupported = "cannot register read-only host memory" in rep.pin_reason
        assert refused or unsupported, rep.pin_reason
    assert same(cupy.asnumpy(cupy.asarray(arrays["b"])), oracle(o["b"]))


# --------------------------------------------------------------------------
# prefault takes what load_sharded takes (issue 20)


def test_prefault_takes_what_load_sharded_takes(ddir):
    import gpuload
    from gpuload import synth

    model = synth.write_model(ddir / "m", "tiny", num_files=2)
    files = sorted(model.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    for form in (model, str(model), [model], [str(model)], files, [str(f) for f in files]):
        for f in files:
            evict(f)
        rep = gpuload.prefault(form, pin=False, setting=True)
        assert rep.skipped_reason is None and rep.files == 2 and rep.bytes == size, form
        assert all(pf.residency(f)[0] == pf.residency(f)[1] for f in files), form
        rep.release()
    one = gpuload.prefault(files[0], pin=False, setting=True)
    assert one.files == 1 and one.bytes == files[0].stat().st_size
    # load_sharded resolves the same way: [model_dir] is the directory.
    whole = gpuload.load_sharded(model, 1, 2, device="cpu")
    listed = gpuload.load_sharded([model], 1, 2, device="cpu")
    assert whole.keys() == listed.keys()
    assert all(np.asarray(whole[k]).tobytes() == np.asarray(listed[k]).tobytes() for k in whole)
    # A directory among files is refused by name, with what a list wants.
    with pytest.raises(ValueError, match=f"{model}: is a directory; a list names .safetensors"):
        gpuload.prefault([model, files[0]])
