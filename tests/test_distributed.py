"""Rank and world from torch.distributed (gpuload.group)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gpuload.synth import write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tiny"), "tiny", num_files=2)


def test_explicit_ranks_never_import_torch(model):
    # A fresh interpreter: explicit rank/world load, omitted ones raise, and
    # neither imports torch (no process group can exist without it).
    code = textwrap.dedent(
        f"""
        import sys, gpuload
        gpuload.load_sharded({str(model)!r}, 1, 2, device="cpu")
        for kwargs in ({{}}, {{"rank": 0}}, {{"group": object()}}):
            try:
                gpuload.load_sharded({str(model)!r}, device="cpu", **kwargs)
            except ValueError as e:
                assert "init_process_group" in str(e), e
            else:
                raise AssertionError(kwargs)
        assert "torch" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ranks_from_the_process_group(model):
    pytest.importorskip("torch")
    from tiny_models import ROOT, free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(ROOT / "tests" / "dist_ranks.py"),
        str(model),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "ranks ok"


def test_device_none_is_torch_current_device(monkeypatch):
    torch = pytest.importorskip("torch")
    from gpuload.cuda import device
    from gpuload.group import current_device

    assert current_device() is None  # a CPU build: CUDA never initialized
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(device, "gpu_pipeline_available", lambda: True)
    monkeypatch.setattr(device, "cuda_device_count", lambda: 0)
    assert current_device() is None  # no usable GPU path: device=None stays "cpu"
    monkeypatch.setattr(device, "cuda_device_count", lambda: 4)
    assert current_device() == "cuda:3"  # the job's device, whatever the rank
