"""Can this machine compile, link and load every gather-kernel variant?

The gather kernels are compiled on first use by Numba: NVVM turns them into
PTX, nvJitLink (or, without it, the driver) links the PTX into a cubin for
the device's architecture, and the driver loads it. Each step has a version,
and a newer step upstream breaks an older one downstream: NVVM 13.5 emits PTX
ISA 9.5, which nvJitLink 13.0 and the CUDA 13.0 driver's PTX JIT reject
(``ptxas fatal: Unsupported .version 9.5``). Found at the first gather, that
fails a load half way through its reads; ``check`` finds it when a GPU Loader
is made, before any I/O, or on any machine for a named architecture
(``gpuload doctor --arch sm_90``), since compiling and linking need no GPU.

``check`` compiles and links every word width (16, 8, 4, 2, 1 bytes; see
``gpuload.kernels.cuda``). With a device it compiles through the very
dispatchers the gathers launch and loads each module into the device's
primary context, so the work is not repeated at the first gather. The result
is cached per (architecture, device) for the process.
"""

from __future__ import annotations

import re
import threading
import warnings
from dataclasses import dataclass, field

WORDS = (16, 8, 4, 2, 1)

_cache: dict[tuple[str | None, int | None], Toolchain] = {}
_lock = threading.Lock()


@dataclass
class Toolchain:
    """What ``check`` found; ``problem`` is None when every variant linked (and loaded)."""

    arch: str = "?"  # e.g. "sm_90"
    nvvm: str | None = None  # CUDA release of libNVVM, from the PTX header: "13.5"
    ptx_isa: str | None = None  # the PTX ISA NVVM emitted: "9.5"
    nvjitlink: str | None = None  # CUDA release of nvJitLink: "13.0"; None: absent
    nvjitlink_isa: str | None = None  # newest PTX ISA that nvJitLink release reads
    driver: str | None = None  # CUDA version the driver supports: "13.0"; None: no GPU
    driver_isa: str | None = None  # newest PTX ISA the driver's JIT reads
    linker: str = "nvJitLink"  # or "driver" (cuLink), when nvJitLink is absent
    variants: dict[int, int] = field(default_factory=dict)  # word -> cubin bytes
    loaded: bool = False  # modules loaded into a device context
    problem: str | None = None


def isa_for(release: tuple[int, int]) -> tuple[int, int]:
    """Newest PTX ISA a CUDA release's tools (NVVM, ptxas, nvJitLink, driver JIT) handle.

    From NVIDIA's PTX ISA release notes: 12.0-12.5 read 8.0-8.5, 12.6 still
    8.5, 12.8 8.7, 12.9 8.8; CUDA 13.x reads 9.x. Used to explain a failure
    and to flag a driver that could not JIT the PTX; the link itself is the test.
    """
    major, minor = release
    if major >= 13:
        return (9 + (major - 13), minor)
    if major == 12:
        return (8, {6: 5, 7: 5, 8: 7, 9: 8}.get(minor, minor))
    return (7, min(minor, 8)) if major == 11 else (6, 0)


def _release(text: str | None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _fmt(v: tuple[int, int] | None) -> str | None:
    return None if v is None else f"{v[0]}.{v[1]}"


def ptx_facts(ptx: str) -> tuple[str | None, str | None]:
    """(NVVM's CUDA release, PTX ISA version) read from a PTX module's header."""
    rel = re.search(r"release (\d+\.\d+)", ptx)
    ver = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, re.M)
    return (rel.group(1) if rel else None, ver.group(1) if ver else None)


def nvjitlink_version() -> tuple[int, int] | None:
    """nvJitLink's CUDA release, or None when no usable nvJitLink loads."""
    from numba.cuda.cudadrv import driver

    if not driver._have_nvjitlink():  # the test Numba itself makes before linking
        return None
    from cuda.bindings import nvjitlink

    return tuple(nvjitlink.version())[:2]  # type: ignore[return-value]


def _packages(major: int) -> tuple[str, str]:
    """(NVVM wheel, nvJitLink wheel) for a CUDA major release."""
    if major == 12:
        return "nvidia-cuda-nvcc-cu12", "nvidia-nvjitlink-cu12"
    return "nvidia-nvvm", "nvidia-nvjitlink"


def facts(tc: Toolchain) -> str:
    """The versions found, in one line (``explain``, ``gpuload doctor``)."""
    return (
        f"NVVM {tc.nvvm or '?'} emits PTX ISA {tc.ptx_isa or '?'}; "
        + (
            f"nvJitLink {tc.nvjitlink} reads up to {tc.nvjitlink_isa}"
            if tc.nvjitlink
            else "no nvJitLink (the driver links)"
        )
        + (f"; the driver supports CUDA {tc.driver} (PTX ISA {tc.driver_isa})" if tc.driver else "")
    )


def explain(tc: Toolchain, error: str, stage: str) -> str:
    """The problem line: what failed, the versions found, and what to install."""
    nvvm, ptx, link = _release(tc.nvvm), _release(tc.ptx_isa), _release(tc.nvjitlink)
    fix = "pip install 'gpuload[cu13]' (CUDA 13 drivers) or 'gpuload[cu12]' (CUDA 12)"
    if nvvm and ptx and link and ptx > isa_for(link):
        nvvm_pkg, link_pkg = _packages(nvvm[0])
        fix = (
            f"install the NVVM of nvJitLink's release, pip install '{nvvm_pkg}=={tc.nvjitlink}.*', "
            f"or a newer nvJitLink, pip install -U '{link_pkg}>={tc.nvvm}'"
        )
    elif nvvm and not link and tc.driver and ptx and ptx > _release(tc.driver_isa or "0.0"):
        nvvm_pkg, link_pkg = _packages(nvvm[0])
        fix = f"pip install '{link_pkg}=={tc.nvvm}.*', or update the NVIDIA driver"
    elif nvvm and tc.driver and nvvm[0] > (_release(tc.driver) or (0, 0))[0]:
        older = "cu12" if nvvm[0] == 13 else f"cu{nvvm[0] - 1}"
        fix = f"update the NVIDIA driver to CUDA {nvvm[0]}, or pip install 'gpuload[{older}]'"
    elif not link and not tc.driver:
        _, link_pkg = _packages(nvvm[0] if nvvm else 13)
        fix = f"linking without a GPU needs nvJitLink: pip install '{link_pkg}'"
    return f"the gather kernels do not {stage} for {tc.arch}: {error} ({facts(tc)}); fix: {fix}"


def _linker_api():
    try:
        from cuda.core import Linker, LinkerOptions, ObjectCode
    except ImportError:  # cuda-core < 1.0
        from cuda.core.experimental import Linker, LinkerOptions, ObjectCode
    return Linker, LinkerOptions, ObjectCode


def link(ptx: str, arch: str) -> bytes:
    """Link one PTX module into a cubin for ``arch`` with nvJitLink (no GPU needed)."""
    Linker, LinkerOptions, ObjectCode = _linker_api()
    linker = Linker(
        ObjectCode.from_ptx(ptx.encode(), name="gather"), options=LinkerOptions(arch=arch)
    )
    try:
        return bytes(linker.link("cubin").code)
    finally:
        linker.close()


def _error(e: BaseException) -> str:
    text = " ".join(str(e).replace("\x00", " ").split())  # ptxas logs span lines
    return f"{type(e).__name__}: {text[:400]}"


def _sig(word: int) -> str:
    from .gather_kernel import _DTYPES

    ty = _DTYPES[word]().dtype.name
    return f"void({ty}[::1], {ty}[::1], int64[::1], int64, int64)"


def _run(arch: str | None, device: int | None) -> Toolchain:
    from numba import cuda
    from numba.cuda.cudadrv import driver

    from . import gather_kernel as kcuda

    tc = Toolchain()
    if device is not None:
        dev = cuda.gpus[device]
        cc = tuple(dev.compute_capability)
        drv = driver.get_version()
        tc.driver, tc.driver_isa = _fmt(drv[:2]), _fmt(isa_for(drv[:2]))
    else:
        m = re.fullmatch(r"sm_(\d+)(\d)[a-z]?", arch or "")
        if not m:
            raise ValueError(f"arch must look like sm_90, got {arch!r}")
        cc = (int(m.group(1)), int(m.group(2)))
    tc.arch = arch or f"sm_{cc[0]}{cc[1]}"
    link_v = nvjitlink_version()
    tc.nvjitlink, tc.nvjitlink_isa = _fmt(link_v), _fmt(isa_for(link_v) if link_v else None)
    tc.linker = "nvJitLink" if link_v else "driver"
    for word in WORDS:
        stage = "compile"
        try:
            if device is None:
                ptx, _ = cuda.compile(
                    kcuda._body(word), _sig(word), device=False, cc=cc, output="ptx", abi="numba"
                )
                tc.nvvm, tc.ptx_isa = ptx_facts(ptx)
                stage = "link"
                if link_v is None:
                    raise RuntimeError("no nvJitLink, and without a GPU no driver to link with")
                tc.variants[word] = len(link(ptx, tc.arch))
            else:
                with cuda.gpus[device]:
                    kernel = kcuda._kernel(word)  # the dispatcher gathers will launch
                    (overload,) = kernel.overloads.values()
                    tc.nvvm, tc.ptx_isa = ptx_facts(overload.inspect_asm(cc))
                    stage = "link and load"
                    overload.bind()  # links and loads the module into this context
                    cubin = getattr(overload._codelibrary, "_cubin_cache", {}).get(cc, b"")
                    tc.variants[word] = len(cubin)  # 0: this numba keeps it elsewhere
        except Exception as e:  # NvvmError, LinkerError, CudaAPIError, nvJitLinkError...
            tc.problem = explain(tc, _error(e), stage)
            return tc
    tc.loaded = device is not None
    return tc


def check(arch: str | None = None, device: int | None = None) -> Toolchain:
    """Compile and link every variant for ``arch`` (no GPU needed), or compile,
    link and load them on CUDA ``device`` (its architecture); cached per process.

    Never raises for a toolchain failure: the returned ``problem`` says what
    failed, the versions found and what to install. Warnings from the first
    compile (an NvvmWarning, cuda.core's linker fallback) are kept out of the
    caller, since under ``-W error`` they would become the failure.
    """
    if (arch is None) == (device is None):
        raise ValueError("give exactly one of arch= (e.g. 'sm_90') or device= (an index)")
    from .gather_kernel import _SIM

    if _SIM:  # the simulator runs the Python body: nothing to compile or link
        return Toolchain(arch="simulator")
    key = (arch, device)
    with _lock:
        tc = _cache.get(key)
        if tc is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tc = _cache[key] = _run(arch, device)
    return tc
