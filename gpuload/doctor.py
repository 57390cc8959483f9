"""``gpuload doctor``: what this machine offers the GPU path, line by line.

What a user runs when something is off, and pastes into a bug report. Each
probe reports one or more lines: ``ok`` or a problem with its fix. A probe
that raises becomes a problem line itself, so the doctor never crashes on
the broken installs it is meant to diagnose. Exit status 0 when no line is a
problem.

``arch="sm_90"`` compiles and links the gather kernels for that architecture
without a GPU (then a missing GPU is not a problem); with GPUs and no arch,
the kernels are compiled, linked and loaded on each device.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import __version__, config
from .io_kvikio import kvikio_defaults
from .resident import mem_available

CU = "pip install 'gpuload[cu13]' (NVIDIA driver >= 580, CUDA 13) or 'gpuload[cu12]' (>= 525)"


@dataclass
class Line:
    name: str
    ok: bool
    value: str
    fix: str | None = None


@dataclass
class State:
    """What earlier probes learnt that later ones need."""

    arch: str | None
    cupy: object = None
    gpus: int = 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _system(st: State) -> Iterator[Line]:
    yield Line("os", True, platform.platform())
    yield Line("python", True, f"{platform.python_version()} ({sys.executable})")
    yield Line("gpuload", True, f"{__version__} ({os.path.dirname(__file__)})")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    yield Line("ram", True, f"{mem_available() / 2**30:.1f} GiB available of {total / 2**30:.1f}")
    try:
        cfg = config.from_env()
        shown = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
        yield Line("settings", True, shown)
    except ValueError as e:
        yield Line("settings", False, str(e), "fix or unset that GPULOAD_* variable")


def _packages(st: State) -> Iterator[Line]:
    for mod in ("numpy", "numba"):
        yield Line(mod, True, importlib.import_module(mod).__version__)
    try:
        st.cupy = importlib.import_module("cupy")
        yield Line("cupy", True, f"{st.cupy.__version__}")
    except Exception as e:  # ImportError, or a cupy built for another CUDA
        yield Line("cupy", False, f"not usable ({type(e).__name__}: {e})", CU)
    nc = _version("numba-cuda")
    yield Line("numba-cuda", nc is not None, nc or "not installed", None if nc else CU)


def _gpus(st: State) -> Iterator[Line]:
    if st.cupy is None:
        yield Line("gpus", st.arch is not None, "unknown: cupy is not usable", CU)
        return
    rt = st.cupy.cuda.runtime
    try:
        st.gpus = rt.getDeviceCount()
    except rt.CUDARuntimeError as e:
        st.gpus = 0
        fix = None if st.arch else "check nvidia-smi and CUDA_VISIBLE_DEVICES"
        yield Line("gpus", st.arch is not None, f"none usable ({e})", fix)
        return
    if st.gpus == 0:
        yield Line("gpus", st.arch is not None, "none visible", "check CUDA_VISIBLE_DEVICES")
    for i in range(st.gpus):
        p = rt.getDeviceProperties(i)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        cc = f"sm_{p['major']}{p['minor']}"
        yield Line(f"gpu {i}", True, f"{name}, {cc}, {p['totalGlobalMem'] / 2**30:.1f} GiB")
    drv, run = rt.driverGetVersion(), rt.runtimeGetVersion()
    drv_s, run_s = f"{drv // 1000}.{drv % 1000 // 10}", f"{run // 1000}.{run % 1000 // 10}"
    ok = drv // 1000 >= run // 1000
    fix = None if ok else f"update the driver to CUDA {run // 1000}, or {CU}"
    yield Line("cuda", ok, f"driver supports CUDA {drv_s}; cupy's runtime is {run_s}", fix)


def _kernels(st: State) -> Iterator[Line]:
    from .kernels import toolchain

    if _version("numba-cuda") is None:  # numba's own, deprecated numba.cuda cannot link
        yield Line("kernels", False, "not checked: numba-cuda is not installed", CU)
        return
    if st.arch is None and st.gpus == 0:
        yield Line("kernels", False, "not checked: no GPU", "name one: gpuload doctor --arch sm_90")
        return
    targets = [(st.arch, None)] if st.arch else [(None, i) for i in range(st.gpus)]
    for arch, device in targets:
        tc = toolchain.check(arch=arch, device=device)
        where = arch or f"gpu {device}"
        yield Line(f"toolchain ({where})", True, toolchain.facts(tc))
        if tc.problem:
            yield Line(
                f"kernels ({where})",
                False,
                tc.problem.split("; fix: ")[0],
                tc.problem.partition("; fix: ")[2] or None,
            )
        else:
            words = ", ".join(f"{w}-byte" for w in sorted(tc.variants, reverse=True))
            done = "compiled, linked and loaded" if tc.loaded else "compiled and linked"
            yield Line(f"kernels ({where})", True, f"{words} gathers {done} for {tc.arch}")


def _kvikio(st: State) -> Iterator[Line]:
    fix = "pip install kvikio-cu13 (or -cu12); without it reads go through pinned staging"
    try:
        kvikio = importlib.import_module("kvikio")
        defaults = kvikio_defaults(kvikio)
    except Exception as e:
        yield Line("kvikio", False, f"not usable ({type(e).__name__}: {e})", fix)
        return
    mode = defaults.get("compat_mode") if hasattr(defaults, "get") else "?"
    mode = {0: "OFF", 1: "ON", 2: "AUTO"}.get(int(mode), mode) if str(mode).isdigit() else mode
    compat = bool(defaults.is_compat_mode_preferred())
    why = (
        f"compatibility mode (POSIX reads via bounce buffers; configured {mode}: "
        "cuFile or GPUDirect Storage is not usable here, or KVIKIO_COMPAT_MODE=ON)"
        if compat
        else f"GPUDirect Storage (configured {mode})"
    )
    yield Line("kvikio", True, f"{kvikio.__version__}, {why}")
    drv = importlib.import_module("kvikio.cufile_driver")
    v = drv.libcufile_version()
    yield Line("cufile", True, f"libcufile {'.'.join(map(str, v))}" if v else "libcufile absent")


def _pinning(st: State) -> Iterator[Line]:
    if st.cupy is None or st.gpus == 0:
        yield Line("pinning", True, "not probed: no GPU")
        return
    from cupy.cuda import Device, alloc_pinned_memory

    with Device(0):
        alloc_pinned_memory(1 << 20)  # cudaHostAlloc, as the staging slots do
    yield Line("pinned alloc", True, "cudaHostAlloc of 1 MiB works")
    from .pinning import Mapping, pin

    with tempfile.NamedTemporaryFile(prefix="gpuload-doctor-") as f:
        f.write(b"\0" * (1 << 20))
        f.flush()
        m = Mapping(f.name)
        method, why = pin([(m, [(0, m.size)])], device=0)
        m._release.unpin()
    # mlock is the designed fallback (a VM may refuse read-only registration):
    # slower first touches, not a failure. Not pinned at all is a problem.
    ok = method is not None
    fix = None if ok else "raise the locked-memory limit (ulimit -l) or set GPULOAD_PIN=0"
    yield Line("host register", ok, f"{method}: {why}", fix)


def _torch(st: State) -> Iterator[Line]:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        yield Line("torch", True, "not installed (only framework='torch' needs it)")
        return
    cuda = torch.version.cuda
    avail = bool(torch.cuda.is_available()) if cuda else False
    ok = avail or st.gpus == 0
    fix = None if ok else "install a CUDA build of torch (pytorch.org) for framework='torch'"
    yield Line("torch", ok, f"{torch.__version__}, CUDA {cuda or 'none'}, available={avail}", fix)


PROBES: list[tuple[str, Callable[[State], Iterator[Line]]]] = [
    ("system", _system),
    ("packages", _packages),
    ("gpus", _gpus),
    ("kernels", _kernels),
    ("kvikio", _kvikio),
    ("pinning", _pinning),
    ("torch", _torch),
]


def run(arch: str | None = None) -> list[Line]:
    """Every probe's lines; a probe that raises adds a problem line and the rest still run."""
    st, lines = State(arch), []
    for name, probe in PROBES:
        try:
            lines.extend(probe(st))
        except Exception as e:  # never crash: the crash is the finding
            lines.append(Line(name, False, f"probe failed: {type(e).__name__}: {e}", "report it"))
    return lines


def report(lines: list[Line]) -> str:
    width = max(len(ln.name) for ln in lines)
    out = []
    for ln in lines:
        out.append(f"{'ok ' if ln.ok else 'BAD'}  {ln.name.ljust(width)}  {ln.value}")
        if ln.fix:
            out.append(f"     {''.ljust(width)}  fix: {ln.fix}")
    bad = sum(not ln.ok for ln in lines)
    out.append("no problem found" if not bad else f"{bad} problem(s) found")
    return "\n".join(out)


def as_json(lines: list[Line], arch: str | None) -> dict:
    return {
        "ok": all(ln.ok for ln in lines),
        "arch": arch,
        "problems": sum(not ln.ok for ln in lines),
        "checks": [dataclasses.asdict(ln) for ln in lines],
    }
