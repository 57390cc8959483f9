"""No SIGBUS from a gpuload call: cpu_resident loads and prefault over a file
truncated, changed or failing (EIO from a real FUSE server) under them.

Each call runs in a child process: a SIGBUS kills the child, and the test
asserts that it exited normally having seen a GpuloadError (or a result).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import gpuload
from gpuload import synth

HERE = Path(__file__).parent

# Child preamble: `changed(mode)` mutates the checkpoint the moment
# gpuload.host.resident or gpuload.host.prefault maps it (after the header was
# parsed and the read path ran), the window in which issue 23's trials died of SIGBUS.
PRELUDE = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import gpuload
    from gpuload.memory import mapping

    path, mode = sys.argv[1], sys.argv[2]
    _init = mapping.Mapping.__init__
    hit = []

    def _mutate(file, size):
        if mode == "truncate":
            os.truncate(file, size // 2)
        elif mode == "extend":
            with open(file, "ab") as f:
                f.write(b"x")
        elif mode == "rename":
            tmp = file + ".new"
            with open(file, "rb") as src, open(tmp, "wb") as dst:
                dst.write(src.read())
            os.replace(tmp, file)

    def init(self, *a, **k):
        _init(self, *a, **k)
        if not hit and sys._getframe(1).f_globals["__name__"] in (
            "gpuload.host.resident",
            "gpuload.host.prefault",
        ):
            hit.append(self.path)
            _mutate(self.path, self.size)

    mapping.Mapping.__init__ = init

    def outcome(call):
        try:
            call()
        except gpuload.GpuloadError as e:
            print("ERROR", type(e).__name__, e, flush=True)
        else:
            print("RETURNED", flush=True)
    """
)


def run_child(body: str, *args: str, timeout: float = 120) -> tuple[int, str]:
    code = PRELUDE + textwrap.dedent(body)
    p = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return p.returncode, p.stdout + p.stderr


def _model(dest: Path) -> Path:
    return synth.write_model(dest, "tiny-qwen-moe", num_files=1)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("populate", ["madvise", "fallback"])
def test_truncated_under_resident_load_raises_not_sigbus(tmp_path, framework, world, populate):
    """``fallback``: a kernel without MADV_POPULATE_READ (an advice it does
    not know is EINVAL), so the pages are faulted in by process_vm_readv."""
    if framework == "torch":
        pytest.importorskip("torch")
    model = _model(tmp_path / "m")
    rc, out = run_child(
        f"""
        if "{populate}" == "fallback":
            import gpuload.host.populate; gpuload.host.populate.MADV_POPULATE_READ = 0x7FFF
        outcome(lambda: gpuload.load_sharded(
            path, 0, {world}, device="cpu", cpu_resident=True, prefault=True, pin=False,
            framework="{framework}"))
        assert hit, "the resident mapping was never made"
        """,
        model,
        "truncate",
    )
    assert rc == 0, f"child died (rc {rc}, -7 is SIGBUS):\n{out}"
    assert "ERROR ReadError" in out and ".safetensors" in out, out


@pytest.mark.parametrize("mode", ["extend", "rename"])
def test_file_changed_under_resident_load_raises(tmp_path, mode):
    model = _model(tmp_path / "m")
    rc, out = run_child(
        """
        outcome(lambda: gpuload.load_sharded(
            path, 0, 2, device="cpu", cpu_resident=True, prefault=True, pin=False))
        assert hit
        """,
        model,
        mode,
    )
    assert rc == 0, out
    assert "ERROR ReadError" in out and "changed" in out, out


def test_truncated_under_prefault_raises_not_sigbus(tmp_path):
    model = _model(tmp_path / "m")
    rc, out = run_child(
        """
        outcome(lambda: gpuload.prefault(path, pin=False, setting=True))
        """,
        model,
        "truncate",
    )
    # prefault maps from gpuload.host.prefault: the hook truncates it there
    assert rc == 0, f"child died (rc {rc}):\n{out}"
    assert "ERROR ReadError" in out, out


def test_copy_mode_survives_truncation_after_return(tmp_path):
    model = _model(tmp_path / "m")
    rc, out = run_child(
        """
        from gpuload.sharding.verify import cut, reference_tensors
        ld = gpuload.Loader(device="cpu", pin=False)
        lp = ld.plan(path, 1, 2, cpu_resident="copy")
        got, rep = ld.load(path, 1, 2, cpu_resident="copy", return_report=True)
        assert rep.cpu_resident and all(".experts." in n for n in rep.cpu_resident), rep
        files = [f.path for f in lp.checkpoint.files]
        ref = reference_tensors(files)
        for f in files:
            os.truncate(f, 0)  # after return: copies do not care
        n = 0
        for name in rep.cpu_resident:
            want = cut(ref[name], lp.resident[name])
            assert got[name].flags.c_contiguous and got[name].flags.owndata is False
            assert np.array_equal(got[name].view(np.uint8), want.view(np.uint8)), name
            n += 1
        print("CHECKED", n)
        """,
        model,
        "none",
    )
    assert rc == 0, f"child died (rc {rc}):\n{out}"
    assert "CHECKED" in out and "CHECKED 0" not in out, out


# ----------------------------------------------------------------- EIO via FUSE


def _fuse_why_not() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if os.geteuid() != 0:
        return "mounting a FUSE file system here needs root"
    if ctypes.util.find_library("fuse") is None:
        return "libfuse2 is not installed (apt-get install libfuse2; make test does)"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as e:
        return f"fusepy cannot load: {e}"
    return None


@pytest.fixture(scope="module")
def eio_model(tmp_path_factory):
    """A checkpoint served by tests/fuse_eio.py, one 4 KiB page of expert 3's
    gate_proj answering EIO; yields (mounted dir, the tensors on that page)."""
    why = _fuse_why_not()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("eio")
    back, mnt = root / "back", root / "mnt"
    mnt.mkdir()
    model = _model(back)
    ck = gpuload.open_checkpoint(model)
    name = next(n for n in ck.tensors if ".experts.3." in n and "gate_proj" in n)
    info = ck.tensors[name]
    mid = (info.start + info.end) // 2
    rel = os.path.relpath(info.file, model)
    srv = subprocess.Popen(
        [sys.executable, str(HERE / "fuse_eio.py"), str(model), str(mnt), f"{rel}:{mid}:{mid + 1}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(200):
            if os.path.ismount(mnt) or srv.poll() is not None:
                break
            time.sleep(0.05)
        if not os.path.ismount(mnt):
            srv.kill()
            pytest.skip(f"FUSE mount failed: {srv.communicate()[0].decode()[-500:]}")
        page = mid // 4096 * 4096  # the kernel reads whole pages: all of it fails
        bad = {n for n, t in ck.tensors.items() if t.start < page + 4096 and page < t.end}
        yield mnt, bad, page
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            srv.wait(timeout=10)
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        srv.stdout.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_eio_under_resident_tensor_raises_read_error(eio_model, framework):
    if framework == "torch":
        pytest.importorskip("torch")
    mnt, _, _ = eio_model
    rc, out = run_child(
        f"""
        outcome(lambda: gpuload.load_sharded(
            path, 0, 1, device="cpu", cpu_resident=True, prefault=True, pin=False,
            framework="{framework}"))
        """,
        mnt,
        "none",
    )
    assert rc == 0, f"child died (rc {rc}, -7 is SIGBUS):\n{out}"
    assert "ERROR ReadError" in out and "model" in out, out


def test_eio_under_prefault_raises_read_error(eio_model):
    mnt, _, _ = eio_model
    rc, out = run_child(
        "outcome(lambda: gpuload.prefault(path, pin=False, setting=True))", mnt, "none"
    )
    assert rc == 0, f"child died (rc {rc}, -7 is SIGBUS):\n{out}"
    assert "ERROR ReadError" in out, out


@pytest.mark.parametrize("world", [1, 8])
def test_eio_on_read_path_raises_read_error(eio_model, world):
    mnt, _, _ = eio_model
    rc, out = run_child(
        f"outcome(lambda: gpuload.load_sharded(path, 0, {world}, device='cpu'))", mnt, "none"
    )
    assert rc == 0, out
    assert "ERROR ReadError" in out, out


def test_eio_copy_mode_raises_read_error(eio_model):
    mnt, _, _ = eio_model
    rc, out = run_child(
        """outcome(lambda: gpuload.load_sharded(
            path, 0, 1, device="cpu", cpu_resident="copy", pin=False))""",
        mnt,
        "none",
    )
    assert rc == 0, out
    assert "ERROR ReadError" in out, out


def test_eio_fixture_serves_good_bytes(eio_model):
    """The FUSE server is a faithful passthrough outside the bad page, and
    answers EIO on it: what the tests above see is the disk's fault."""
    mnt, _, page = eio_model
    (name,) = [p for p in os.listdir(mnt) if p.endswith(".safetensors")]
    want = (Path(mnt).parent / "back" / name).read_bytes()
    fd = os.open(Path(mnt) / name, os.O_RDONLY)
    try:
        assert os.pread(fd, page, 0) == want[:page]
        assert os.pread(fd, len(want), page + 4096) == want[page + 4096 :]
        with pytest.raises(OSError) as e:
            os.pread(fd, 1, page + 100)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)


def test_mutate_soak_runs_and_counts(tmp_path):
    """bench/mutate_soak.py, a few trials: it runs, counts every trial, and
    (on this code) sees no crash, no wrong byte, no result over a changed
    file. The full run's counts are in bench/results/2026-12-06-cpu-soak/."""
    import json

    out = tmp_path / "soak.json"
    p = subprocess.run(
        [
            sys.executable,
            str(HERE.parent / "bench" / "mutate_soak.py"),
            "--trials",
            "24",
            "--seed",
            "5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["trials"] == 24 == doc["error"] + doc["unchanged"] + doc["over_changed"]
    assert doc["crash"] == doc["wrong_bytes_trials"] == doc["over_changed"] == 0
