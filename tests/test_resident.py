"""cpu_resident= through load_sharded: experts stay mapped on the host."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import gpuload
from gpuload import synth
from gpuload.sharding.verify import cut, reference_tensors


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return synth.write_model(tmp_path_factory.mktemp("moe") / "m", "tiny-qwen-moe", num_files=2)


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1), (4, 3)])
def test_experts_mapped_rest_loaded_all_bytes_exact(moe, world, rank):
    ld = gpuload.Loader(device="cpu", prefault=True, pin=False)
    lp = ld.plan(moe, rank, world, cpu_resident=True)
    got, report = ld.load(moe, rank, world, cpu_resident=True, return_report=True)
    ref = reference_tensors(f.path for f in lp.checkpoint.files)
    experts = [n for n in got if ".experts." in n]
    shared = [n for n in got if "shared_expert" in n]
    assert experts and shared and set(report.cpu_resident) == set(experts)
    sels = {**lp.resident, **{t.name: t.selection for t in lp.plan.tensors}}
    for name, arr in got.items():
        want = cut(ref[name], sels[name])
        assert np.ascontiguousarray(arr).tobytes() == want.tobytes(), name
    for name in experts:  # zero-copy and read-only: a view of the mapping
        assert not got[name].flags.owndata and not got[name].flags.writeable
    for name in shared:  # shared experts go to the device path: owned copies
        assert got[name].flags.writeable
    assert report.prefault is not None and report.prefault.pages_total > 0
    # Resident tensors are mapped, not read: only the rest is delivered.
    assert report.bytes_useful == sum(got[t.name].nbytes for t in lp.plan.tensors)
    assert not set(report.cpu_resident) & {t.name for t in lp.plan.tensors}


def test_resident_arrays_outlive_loader_and_checkpoint(moe):
    got = gpuload.load_sharded(moe, 0, 2, device="cpu", cpu_resident=r"\.experts\.", pin=False)
    name = next(n for n in got if ".experts." in n)
    before = got[name].tobytes()
    del got  # the rest of the results, the loader and the checkpoint go away
    gc.collect()
    got = gpuload.load_sharded(moe, 0, 2, device="cpu", cpu_resident=r"\.experts\.", pin=False)
    keep = got[name]
    del got
    gc.collect()
    assert keep.tobytes() == before


def test_resident_as_torch(moe):
    torch = pytest.importorskip("torch")
    got = gpuload.load_sharded(
        moe, 0, 1, device="cpu", cpu_resident=True, framework="torch", pin=False
    )
    name = next(n for n in got if ".experts." in n)
    assert isinstance(got[name], torch.Tensor) and got[name].dtype == torch.bfloat16
