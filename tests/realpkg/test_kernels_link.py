"""The gather kernels against the real CUDA toolchain (the cu13 extra), no GPU.

NVVM compiles every variant and nvJitLink links it for each architecture the
docs/gpu.md lists, as ``gpuload doctor --arch`` does; a PTX newer than the linker
reads is reported with the versions and the fix, not found at a first gather.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba_cuda", reason="the real-package tier needs the cu13 extra")

ARCHS = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"]


def _doctor(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPULOAD_", "NUMBA_"))}
    return subprocess.run(
        [sys.executable, "-m", "gpuload", "doctor", *args],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_doctor_links_every_variant_for_a_named_arch(arch):
    p = _doctor("--arch", arch, "--json")
    doc = json.loads(p.stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    assert p.returncode == 0 and doc["ok"], json.dumps(doc, indent=1)
    assert checks[f"kernels ({arch})"]["value"].startswith(
        "16-byte, 8-byte, 4-byte, 2-byte, 1-byte gathers compiled and linked"
    )
    assert "nvJitLink" in checks[f"toolchain ({arch})"]["value"]


def test_every_supported_arch_links_every_variant():
    from gpuload.kernels import toolchain

    for arch in ARCHS:
        tc = toolchain.check(arch=arch)
        assert tc.problem is None, tc.problem
        assert sorted(tc.variants) == [1, 2, 4, 8, 16] and min(tc.variants.values()) > 0, tc
        # the linker reads what NVVM emits: the constraint the extras keep
        assert tc.nvjitlink and tc.ptx_isa
        assert toolchain._release(tc.ptx_isa) <= toolchain.isa_for(toolchain._release(tc.nvjitlink))


def test_ptx_newer_than_the_linker_is_a_problem_naming_versions(monkeypatch):
    """NVVM one release ahead of nvJitLink (as numba-cuda[cu13] next to torch's
    pinned nvJitLink was): the PTX is made to say so, and the real nvJitLink
    must refuse it and the check name both versions and the fix."""
    from numba import cuda

    from gpuload.kernels import toolchain

    link = toolchain._release(".".join(map(str, toolchain.nvjitlink_version())))
    isa = toolchain.isa_for(link)
    newer_isa, newer_rel = f"{isa[0]}.{isa[1] + 1}", f"{link[0]}.{link[1] + 1}"
    real = cuda.compile

    def future_nvvm(*a, **k):
        ptx, resty = real(*a, **k)
        ptx = ptx.replace(f"release {toolchain.ptx_facts(ptx)[0]}", f"release {newer_rel}")
        return ptx.replace(
            f".version {toolchain.ptx_facts(ptx)[1]}", f".version {newer_isa}"
        ), resty

    monkeypatch.setattr(cuda, "compile", future_nvvm)
    tc = toolchain._run("sm_90", None)  # uncached
    assert tc.problem is not None and not tc.variants
    assert f"Unsupported .version {newer_isa}" in tc.problem, tc.problem
    assert f"NVVM {newer_rel} emits PTX ISA {newer_isa}" in tc.problem, tc.problem
    assert f"nvJitLink {link[0]}.{link[1]} reads up to {isa[0]}.{isa[1]}" in tc.problem
    assert f"=={link[0]}.{link[1]}.*'" in tc.problem  # install the linker's NVVM


def test_the_16_byte_gather_moves_one_vector_per_element_with_four_loads_in_flight():
    # Numba has no 16-byte scalar (complex128 compiles to two ld.global.f64):
    # the 16-byte variant's intrinsics must come out as v2.u64 vector loads
    # and stores, and the unrolled body issues its loads before its stores.
    from numba import cuda

    from gpuload.kernels import gather_kernel as kcuda
    from gpuload.kernels.toolchain import _sig

    kw = dict(device=False, cc=(9, 0), output="ptx", abi="numba")
    ptx, _ = cuda.compile(kcuda._body(16), _sig(16), **kw)
    lines = [ln.strip() for ln in ptx.splitlines()]
    loads = [ln for ln in lines if ln.startswith("ld.global.v2.u64")]
    stores = [ln for ln in lines if ln.startswith("st.global.v2.u64")]
    assert len(loads) == kcuda.UNROLL and len(stores) == kcuda.UNROLL, ptx[-3000:]
    first_store = next(i for i, ln in enumerate(lines) if ln.startswith("st.global"))
    assert all(lines.index(ln) < first_store for ln in loads)  # all in flight at once
    ptx8, _ = cuda.compile(kcuda._body(8), _sig(8), **kw)
    assert sum(ln.strip().startswith("ld.global.u64") for ln in ptx8.splitlines()) >= kcuda.UNROLL
