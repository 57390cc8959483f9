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
        "8-byte, 4-byte, 2-byte, 1-byte gathers compiled and linked"
    )
    assert "nvJitLink" in checks[f"toolchain ({arch})"]["value"]


def test_every_supported_arch_links_every_variant():
    from gpuload.kernels import toolchain

    for arch in ARCHS:
        tc = toolchain.check(arch=arch)
        assert tc.problem is None, tc.problem
        assert sorted(tc.variants) == [1, 2, 4, 8] and min(tc.variants.values()) > 0, tc
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
