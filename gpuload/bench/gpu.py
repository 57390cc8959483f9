"""The few GPU operations the bench needs, through torch (preferred) or cupy.

Imported lazily: on a machine with neither, :func:`probe` says why and the
bench runs its CPU scenarios. Nothing here is gpuload's own GPU path; these
are the yardsticks (pinned buffers, H2D and D2D copies, synchronisation,
device memory in use) that gpuload and its peers are measured against.
"""

from __future__ import annotations

import gc
import importlib
import subprocess
import sys
import threading
from typing import Any

import numpy as np


class Gpu:
    """One CUDA device, driven through torch or cupy (``self.lib``)."""

    def __init__(self, lib: str, index: int) -> None:
        self.lib, self.index = lib, index
        self.device = f"cuda:{index}"
        if lib == "torch":
            self.torch = importlib.import_module("torch")
            self.torch.cuda.set_device(index)
        else:
            self.cupy = importlib.import_module("cupy")
            self.cupy.cuda.Device(index).use()

    # -- buffers -----------------------------------------------------------

    def pinned(self, nbytes: int) -> tuple[Any, np.ndarray]:
        """Page-locked host memory: ``(owner, numpy view)``; keep the owner alive."""
        if self.lib == "torch":
            t = self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)
            return t, t.numpy()
        cupyx = importlib.import_module("cupyx")
        a = cupyx.empty_pinned((nbytes,), np.uint8)
        return a, a

    def empty(self, nbytes: int) -> Any:
        if self.lib == "torch":
            return self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)
        return self.cupy.empty((nbytes,), np.uint8)

    def h2d(self, dst: Any, src_owner: Any) -> None:
        """Queue a copy of pinned ``src_owner`` into device ``dst``."""
        if self.lib == "torch":
            dst.copy_(src_owner, non_blocking=True)
        else:
            dst.set(src_owner, stream=self.cupy.cuda.get_current_stream())

    def d2d(self, dst: Any, src: Any) -> None:
        if self.lib == "torch":
            dst.copy_(src, non_blocking=True)
        else:
            self.cupy.copyto(dst, src)

    def sync(self) -> None:
        if self.lib == "torch":
            self.torch.cuda.synchronize(self.index)
        else:
            self.cupy.cuda.Device(self.index).synchronize()

    # -- memory ------------------------------------------------------------

    def mem_info(self) -> tuple[int, int]:
        """``(free, total)`` bytes on the device, whoever allocated them."""
        if self.lib == "torch":
            free, total = self.torch.cuda.mem_get_info(self.index)
        else:
            free, total = self.cupy.cuda.runtime.memGetInfo()
        return int(free), int(total)

    def release(self) -> None:
        """Hand cached blocks back to the driver (torch's and cupy's pools), so
        one contender's cache does not count against the next."""
        gc.collect()
        if "torch" in sys.modules and self.lib == "torch":
            self.torch.cuda.synchronize(self.index)
            self.torch.cuda.empty_cache()
        cupy = sys.modules.get("cupy")
        if cupy is not None:
            cupy.get_default_memory_pool().free_all_blocks()
            cupy.get_default_pinned_memory_pool().free_all_blocks()

    def facts(self) -> dict[str, Any]:
        """Name, memory, driver and CUDA versions, for the JSON record."""
        out: dict[str, Any] = {"index": self.index, "lib": self.lib}
        if self.lib == "torch":
            t = self.torch
            out["name"] = t.cuda.get_device_name(self.index)
            out["capability"] = ".".join(map(str, t.cuda.get_device_capability(self.index)))
            out["cuda_torch_built"] = t.version.cuda
        else:
            props = self.cupy.cuda.runtime.getDeviceProperties(self.index)
            out["name"] = (
                props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            )
            out["capability"] = f"{props['major']}.{props['minor']}"
        out["memory_bytes"] = self.mem_info()[1]
        try:
            rt = importlib.import_module("cupy").cuda.runtime
            out["cuda_driver_api"] = rt.driverGetVersion()
            out["cuda_runtime"] = rt.runtimeGetVersion()
        except Exception:  # no cupy: torch's figure above is what there is
            pass
        try:
            out["driver"] = subprocess.run(
                ["nvidia-smi", f"--id={self.index}", "--query-gpu=driver_version,pci.bus_id",
                 "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            out["driver"] = None
        return out


def probe(device: str) -> tuple[Gpu | None, str]:
    """``(Gpu, "")`` when ``device`` ("cuda" / "cuda:N") is usable, else
    ``(None, why not)``."""
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    reasons = []
    for lib in ("torch", "cupy"):
        try:
            mod = importlib.import_module(lib)
        except ImportError:
            reasons.append(f"{lib} not installed")
            continue
        try:
            n = mod.cuda.device_count() if lib == "torch" else mod.cuda.runtime.getDeviceCount()
        except Exception as e:  # a driver error is a reason, not a crash
            reasons.append(f"{lib}: {type(e).__name__}: {e}")
            continue
        if index >= n:
            reasons.append(f"{lib} sees {n} CUDA device(s)")
            continue
        return Gpu(lib, index), ""
    return None, "; ".join(reasons)


class PeakMemory:
    """Samples device memory in use while a block runs: ``with PeakMemory(gpu) as pm:``.

    Device-wide (``cudaMemGetInfo``): it sees every allocator, the CUDA
    context included, which is what a 12 GB card has to hold.
    """

    def __init__(self, gpu: Gpu, period_s: float = 0.002) -> None:
        self.gpu, self.period = gpu, period_s
        self.peak = self.base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _used(self) -> int:
        free, total = self.gpu.mem_info()
        return total - free

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = self._used()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-peak-mem")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._used())
