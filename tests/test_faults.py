"""Fault injection (gpuload.read.faults) under real loads: short reads, EINTR and
delays give byte-exact results; EIO raises ReadError and leaves nothing
behind; a file changed before or during a load raises ReadError.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import gpuload
from gpuload.format.header import parse_header
from gpuload.read.faults import FaultStats, FaultyReader, FaultyReaderFactory
from gpuload.read.posix import PosixReader
from gpuload.sharding.verify import reference_tensors
from gpuload.synth import write_safetensors

ROOT = Path(__file__).resolve().parent.parent

# name -> (dtype, shape, split dim or None); every split dim divides by 2 and 4
TENSORS = {
    "row": ("BF16", (64, 96), 0),
    "col": ("F32", (40, 80), 1),
    "col8": ("F8_E4M3", (128, 64), 1),
    "f4": ("F4", (16, 256), 1),
    "rep": ("F16", (33,), None),
    "scalar": ("I64", (), None),
    "big": ("U8", (256, 512), 0),
}
RULES = {rf"^{n}$": (d if d is not None else "replicate") for n, (_, _, d) in TENSORS.items()}
SMALL = dict(chunk_bytes=4096, min_chunk_bytes=1024, staging_bytes=16384, threads=3)


# ---------------------------------------------------------------- helpers


def make_model(root: Path, *, seed: int = 0, files: int = 2) -> Path:
    """TENSORS over ``files`` unaligned files plus index.json."""
    rng = np.random.default_rng(seed)
    names = list(TENSORS)
    groups = [names[i::files] for i in range(files)]
    root.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i}.safetensors"
        tensors = {}
        for n in group:
            dtype, shape, _ = TENSORS[n]
            bits = gpuload.format.header.DTYPES[dtype].bits * int(np.prod(shape))
            raw = rng.integers(1, 256, bits // 8, dtype=np.uint8)
            tensors[n] = (dtype, shape, raw)
            weight_map[n] = fname
        write_safetensors(root / fname, tensors, {"format": "pt"}, unaligned=True)
    (root / "model.safetensors.index.json").write_text(
        __import__("json").dumps({"weight_map": weight_map})
    )
    return root


def expected(root: Path, rank: int, world: int) -> dict[str, bytes]:
    """safetensors' bytes cut with np.split: independent of gpuload's planner."""
    full = reference_tensors(sorted(root.glob("*.safetensors")))
    out = {}
    for name, a in full.items():
        dim = TENSORS[name][2]
        out[name] = a.tobytes() if dim is None else np.split(a, world, axis=dim)[rank].tobytes()
    return out


def as_bytes(result: dict) -> dict[str, bytes]:
    return {k: np.ascontiguousarray(v).tobytes() for k, v in result.items()}


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def gpuload_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("gpuload")]


def maps_of(root: Path) -> list[str]:
    """Lines of /proc/self/maps that map a file under ``root``."""
    with open("/proc/self/maps") as f:
        return [line for line in f if str(root) in line]


@pytest.fixture
def model(tmp_path) -> Path:
    return make_model(tmp_path / "m")


# ---------------------------------------------------------------- the wrapper


def test_short_reads_and_eintr_go_through_posix_readers_own_loop(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    f = tmp_path / "x.safetensors"
    write_safetensors(f, {"w": ("U8", (len(data),), data)})
    h = parse_header(f)
    stats = FaultStats()
    r = FaultyReader(PosixReader([h]), short_reads=0.9, eintr=0.3, stats=stats, seed=3)
    a, b, c = bytearray(60_000), bytearray(7), bytearray(39_000)
    with r:
        r.readinto(str(f), h.data_start + 11, [memoryview(a), memoryview(b), memoryview(c)])
    assert bytes(a + b + c) == data[11 : 11 + 99_007]
    assert stats.short_reads >= 5 and stats.eintr >= 1 and stats.syscalls > stats.short_reads
    # EIO at the syscall becomes io.py's ReadError, naming the file and the range.
    r = FaultyReader(PosixReader([h]), eio=1.0, stats=stats)
    with r, pytest.raises(gpuload.ReadError, match="Input/output error") as e:
        r.readinto(str(f), h.data_start, [memoryview(bytearray(10))])
    assert str(f) in str(e.value) and isinstance(e.value.__cause__, OSError)
    assert e.value.__cause__.errno == errno.EIO and stats.eio == 1


def test_bad_fault_settings_are_refused():
    with pytest.raises(ValueError, match="eintr"):
        FaultyReaderFactory(eintr=1.0)
    with pytest.raises(ValueError, match="short_reads"):
        FaultyReaderFactory(short_reads=1.5)
    with pytest.raises(ValueError, match="delay"):
        FaultyReaderFactory(delay=(0.2, 0.1))
    with pytest.raises(TypeError, match="PosixReader"):
        FaultyReader(object())


# ---------------------------------------------------------------- byte-exact under faults


@pytest.mark.parametrize("world", [1, 2, 4])
def test_short_reads_eintr_and_delays_are_byte_exact(model, world):
    factory = FaultyReaderFactory(short_reads=0.4, eintr=0.15, delay=(0, 0.002), seed=world)
    with gpuload.Loader(device="cpu", reader_factory=factory, **SMALL) as loader:
        for rank in range(world):
            got = loader.load(model, rank, world, rules=RULES)
            assert as_bytes(got) == expected(model, rank, world), (rank, world)
            assert loader.last_report.staged_ops > 0 or world == 1  # covering reads ran
    s = factory.stats
    assert s.short_reads > 10 and s.eintr > 3 and s.delays == s.ops > 10
    assert gpuload_threads() == []


# ---------------------------------------------------------------- EIO


@pytest.mark.parametrize(
    "faults",
    [dict(eio_after=0), dict(eio_after=7, delay=(0, 0.001)), dict(eio=0.2, short_reads=0.3)],
    ids=["first", "mid", "random"],
)
def test_eio_raises_read_error_and_leaves_nothing_behind(model, faults):
    fds0, maps0 = fds(), maps_of(model)
    factory = FaultyReaderFactory(seed=5, **faults)
    loader = gpuload.Loader(device="cpu", reader_factory=factory, **SMALL)
    result = None
    with pytest.raises(gpuload.ReadError, match="Input/output error") as e:
        result = loader.load(model, 1, 2, rules=RULES, cpu_resident=r"^rep$")
    assert result is None and loader.last_report is None
    assert str(model) in str(e.value)
    assert factory.stats.eio >= 1
    assert gpuload_threads() == []
    assert fds() == fds0
    assert maps_of(model) == maps0 == []
    # The same Loader loads correctly once the disk behaves.
    factory.faults.update(eio=0.0, eio_after=None)
    got = loader.load(model, 1, 2, rules=RULES)
    assert as_bytes(got) == expected(model, 1, 2)
    loader.close()
    assert fds() == fds0


# ---------------------------------------------------------------- files that change


def _flip_last_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def _replace_same_bytes(path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(path.read_bytes())
    os.replace(tmp, path)  # same content, new inode


def _truncate(path: Path) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _append(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0" * 16)


def _fifo(path: Path) -> None:
    os.unlink(path)
    os.mkfifo(path)  # opening it for reading would block forever


def _touch(path: Path) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


CHANGES = {
    "modified": _flip_last_byte,
    "replaced": _replace_same_bytes,
    "truncated": _truncate,
    "appended": _append,
    "fifo": _fifo,
    "touched": _touch,
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_file_changed_between_header_and_read(model, change):
    ckpt = gpuload.open_checkpoint(model)
    target = model / "model-1.safetensors"
    CHANGES[change](target)
    fds0 = fds()
    result = None
    loader = gpuload.Loader(device="cpu", **SMALL)
    done = threading.Event()

    def go():
        nonlocal result
        try:
            result = loader.load(ckpt, 0, 2, rules=RULES)
        except BaseException as e:  # noqa: BLE001
            result = e
        done.set()

    threading.Thread(target=go, daemon=True).start()
    assert done.wait(30), "load hung"
    assert isinstance(result, gpuload.ReadError), result
    assert str(target) in str(result)
    assert loader.last_report is None
    assert gpuload_threads() == [] and fds() == fds0


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_file_changed_during_load(model, change):
    """A thread changes a file while reads are in flight (the delays keep the
    load going): the load raises ReadError and returns nothing."""
    target = model / "model-0.safetensors"  # read first: reads go in file order
    changed = threading.Event()
    calls, lock = [], threading.Lock()

    def fourth_read(file, offset, nbytes):
        with lock:
            calls.append(file)
            n = len(calls)
        if n == 4:  # model-0 is open and being read by now
            t = threading.Thread(target=CHANGES[change], args=(target,), name="changer")
            t.start()
            t.join()
            changed.set()

    factory = FaultyReaderFactory(delay=(0.001, 0.003), before_read=fourth_read, seed=2)
    fds0 = fds()
    result = None
    with gpuload.Loader(device="cpu", reader_factory=factory, **SMALL) as loader:
        with pytest.raises(gpuload.ReadError) as e:
            result = loader.load(model, 1, 2, rules=RULES)
        assert result is None and loader.last_report is None
    assert changed.is_set() and calls[0] == str(target)
    assert str(model) in str(e.value)
    assert gpuload_threads() == [] and fds() == fds0


# ---------------------------------------------------------------- soak (CI size)


def test_soak_250_random_plans_byte_exact(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    summary = soak.run(plans=250, seed=20260101, workdir=tmp_path, max_tensor_bytes=96 << 10)
    assert summary["plans"] == 250
    assert summary["wrong_bytes"] == 0 and summary["wrong_tensors"] == []
    assert summary["unexpected_errors"] == []
    assert summary["bytes_checked"] > 4 << 20
    assert summary["faults"]["short_reads"] > 100 and summary["faults"]["eintr"] > 10
    assert summary["eio_plans"] > 0 and summary["eio_raised"] > 0
    assert gpuload_threads() == []
