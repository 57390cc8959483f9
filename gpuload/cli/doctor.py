"""``gpuload doctor``: what this machine offers, line by line (the probes).

What a user runs when something is off, and pastes into a bug report. Each
probe reports one or more lines: ``ok``, a problem with its fix, or
information. A probe that raises becomes a problem line itself, so the doctor
never crashes on the broken installs it is meant to diagnose. Lines of the
GPU path are problems only where the user can use that path (a GPU is
visible) or asked for it (``gpu=True``, an ``arch``); elsewhere a missing
GPU package is information, with its install hint (:mod:`.doctor_verdict`).
Exit status 0 when no line is a problem.

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

from gpuload import __version__, config
from gpuload.cli.doctor_verdict import CU, Line, Report, bad, check, info, ok, self_check, settle
from gpuload.memory.mapping import mem_available
from gpuload.read.kvikio import kvikio_defaults


@dataclass
class State:
    """What earlier probes learnt that later ones need."""

    arch: str | None
    cupy: object = None
    gpus: int = 0
    numba_cuda: str | None = None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _system(st: State) -> Iterator[Line]:
    yield ok("os", platform.platform())
    yield ok("python", f"{platform.python_version()} ({sys.executable})")
    yield ok("gpuload", f"{__version__} ({os.path.dirname(__file__)})")
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    yield ok("ram", f"{mem_available() / 2**30:.1f} GiB available of {total / 2**30:.1f}")
    try:
        cfg = config.from_env()
        shown = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())
        yield ok("settings", shown)
    except ValueError as e:
        yield bad("settings", str(e), "fix or unset that GPULOAD_* variable")


def _packages(st: State) -> Iterator[Line]:
    for mod in ("numpy", "numba", "safetensors"):
        yield ok(mod, importlib.import_module(mod).__version__)
    try:
        st.cupy = importlib.import_module("cupy")
        yield ok("cupy", f"{st.cupy.__version__}", gpu=True)
    except Exception as e:  # ImportError, or a cupy built for another CUDA
        yield bad("cupy", f"not usable ({type(e).__name__}: {e})", CU, gpu=True)
    st.numba_cuda = nc = _version("numba-cuda")
    yield check("numba-cuda", nc is not None, nc or "not installed", CU, gpu=True)


def _gpus(st: State) -> Iterator[Line]:
    if st.cupy is None:
        if st.arch:  # the kernels are checked for the arch: no device needed
            yield info("gpus", "unknown: cupy is not usable", gpu=True)
        else:
            yield bad("gpus", "unknown: cupy is not usable", CU, gpu=True)
        return
    rt = st.cupy.cuda.runtime
    try:
        st.gpus = rt.getDeviceCount()
    except rt.CUDARuntimeError as e:
        st.gpus = 0
        if st.arch:
            yield info("gpus", f"none usable ({e})", gpu=True)
        else:
            yield bad(
                "gpus", f"none usable ({e})", "check nvidia-smi and CUDA_VISIBLE_DEVICES", gpu=True
            )
        return
    if st.gpus == 0:
        if st.arch:
            yield info("gpus", "none visible", gpu=True)
        else:
            yield bad("gpus", "none visible", "check CUDA_VISIBLE_DEVICES", gpu=True)
    for i in range(st.gpus):
        p = rt.getDeviceProperties(i)
        name = p["name"].decode() if isinstance(p["name"], bytes) else p["name"]
        cc = f"sm_{p['major']}{p['minor']}"
        yield ok(f"gpu {i}", f"{name}, {cc}, {p['totalGlobalMem'] / 2**30:.1f} GiB", gpu=True)
    drv, run = rt.driverGetVersion(), rt.runtimeGetVersion()
    drv_s, run_s = f"{drv // 1000}.{drv % 1000 // 10}", f"{run // 1000}.{run % 1000 // 10}"
    fix = f"update the driver to CUDA {run // 1000}, or {CU}"
    value = f"driver supports CUDA {drv_s}; cupy's runtime is {run_s}"
    yield check("cuda", drv // 1000 >= run // 1000, value, fix, gpu=True)


def _kernels(st: State) -> Iterator[Line]:
    from gpuload.kernels import toolchain

    if st.numba_cuda is None:  # numba's own, deprecated numba.cuda cannot link
        yield bad("kernels", "not checked: numba-cuda is not installed", CU, gpu=True)
        return
    if st.arch is None and st.gpus == 0:
        fix = "name one: gpuload doctor --arch sm_90"
        yield bad("kernels", "not checked: no GPU", fix, gpu=True)
        return
    targets = [(st.arch, None)] if st.arch else [(None, i) for i in range(st.gpus)]
    for arch, device in targets:
        tc = toolchain.check(arch=arch, device=device)
        where = arch or f"gpu {device}"
        yield ok(f"toolchain ({where})", toolchain.facts(tc), gpu=True)
        if tc.problem:
            value, _, fix = tc.problem.partition("; fix: ")
            yield bad(f"kernels ({where})", value, fix or "report it", gpu=True)
        else:
            words = ", ".join(f"{w}-byte" for w in sorted(tc.variants, reverse=True))
            done = "compiled, linked and loaded" if tc.loaded else "compiled and linked"
            yield ok(f"kernels ({where})", f"{words} gathers {done} for {tc.arch}", gpu=True)


def _kvikio(st: State) -> Iterator[Line]:
    fix = "pip install kvikio-cu13 (or -cu12); without it reads go through pinned staging"
    try:
        kvikio = importlib.import_module("kvikio")
        defaults = kvikio_defaults(kvikio)
    except Exception as e:
        yield bad("kvikio", f"not usable ({type(e).__name__}: {e})", fix, gpu=True)
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
    yield ok("kvikio", f"{kvikio.__version__}, {why}", gpu=True)
    drv = importlib.import_module("kvikio.cufile_driver")
    v = drv.libcufile_version()
    yield ok("cufile", f"libcufile {'.'.join(map(str, v))}" if v else "libcufile absent", gpu=True)


def _pinning(st: State) -> Iterator[Line]:
    if st.cupy is None or st.gpus == 0:
        yield info("pinning", "not probed: no GPU", gpu=True)
        return
    from cupy.cuda import Device, alloc_pinned_memory

    with Device(0):
        alloc_pinned_memory(1 << 20)  # cudaHostAlloc, as the staging slots do
    yield ok("pinned alloc", "cudaHostAlloc of 1 MiB works", gpu=True)
    from gpuload.memory.mapping import Mapping
    from gpuload.memory.pinning import pin

    with tempfile.NamedTemporaryFile(prefix="gpuload-doctor-") as f:
        f.write(b"\0" * (1 << 20))
        f.flush()
        m = Mapping(f.name)
        method, why = pin([(m, [(0, m.size)])], device=0)
        m._release.unpin()
    # mlock is the designed fallback (a VM may refuse read-only registration):
    # slower first touches, not a failure. Not pinned at all is a problem.
    fix = "raise the locked-memory limit (ulimit -l) or set GPULOAD_PIN=0"
    yield check("host register", method is not None, f"{method}: {why}", fix, gpu=True)


def _torch(st: State) -> Iterator[Line]:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        yield info("torch", "not installed (only framework='torch' needs it)")
        return
    cuda = torch.version.cuda
    avail = bool(torch.cuda.is_available()) if cuda else False
    fix = "install a CUDA build of torch (pytorch.org) for framework='torch'"
    value = f"{torch.__version__}, CUDA {cuda or 'none'}, available={avail}"
    yield check("torch", avail or st.gpus == 0, value, fix, gpu=st.gpus > 0)


def _cpu_path(st: State) -> Iterator[Line]:
    yield self_check()


PROBES: list[tuple[str, Callable[[State], Iterator[Line]]]] = [
    ("system", _system),
    ("packages", _packages),
    ("gpus", _gpus),
    ("kernels", _kernels),
    ("kvikio", _kvikio),
    ("pinning", _pinning),
    ("torch", _torch),
    ("cpu load", _cpu_path),
]


def run(arch: str | None = None, *, gpu: bool = False) -> Report:
    """Every probe's lines, settled for this machine; a probe that raises adds
    a problem line and the rest still run.

    The GPU path is checked (its failures are problems) when ``gpu``, when
    an ``arch`` is named, or when a GPU is visible here.
    """
    st, lines = State(arch), []
    for name, probe in PROBES:
        try:
            lines.extend(probe(st))
        except Exception as e:  # never crash: the crash is the finding
            lines.append(bad(name, f"probe failed: {type(e).__name__}: {e}", "report it"))
    wanted = gpu or arch is not None or st.gpus > 0 or gpu_device_nodes()
    return settle(lines, wanted, arch)


def gpu_device_nodes() -> bool:
    """An NVIDIA GPU is present even if no CUDA package can see it yet: the
    driver made its device nodes."""
    try:
        names = os.listdir("/dev")
    except OSError:
        return False
    return any(n[len("nvidia") :].isdigit() for n in names if n.startswith("nvidia"))
