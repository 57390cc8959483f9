"""The kvikio reader: file ranges straight into device memory.

``CuFile.pread`` reads with GPUDirect Storage when the platform has it, and
in kvikio's compatibility mode (POSIX reads through its own pinned bounce
buffers) when it does not. GDS DMAs whole 4 KiB pages, so every read is
widened to page boundaries (clamped to the end of the file) and lands at
the start of the caller's scratch buffer; :meth:`KvikioReader.read_device`
says where the requested first byte ended up, and the extra bytes are
never copied anywhere. (Shifting the destination instead of the read is
how one loader corrupted weights: the pad belongs to the scratch, not to
the result.)

kvikio does not order itself on CUDA streams: ``read_device`` returns once
the bytes are in device memory (it waits on kvikio's future), and the
pipeline orders everything after it with events. Advice
(``posix_fadvise``) and the file-identity checks of the posix reader apply
here too: a file replaced during a load raises ``ReadError`` at close.

kvikio is imported by the caller (the CUDA runtime) and passed in, so this
module imports without it. Its settings live in the submodule
``kvikio.defaults``, which ``import kvikio`` does not import (kvikio 26.x):
:func:`kvikio_defaults` imports it by name instead of reading an attribute
that may not be there.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from typing import Any

from gpuload.errors import ReadError
from gpuload.format.header import FileHeader
from gpuload.plan.ops import PAGE
from gpuload.read.posix import PosixReader

_threads_lock = threading.Lock()


def kvikio_defaults(kvikio: Any) -> Any:
    """The ``kvikio.defaults`` submodule of the kvikio module ``kvikio``.

    Imported, not read as an attribute: kvikio 26's ``__init__`` never
    imports it, so ``kvikio.defaults`` is an AttributeError until some code
    somewhere happened to import the submodule."""
    return importlib.import_module(f"{kvikio.__name__}.defaults")


def gds_active(kvikio: Any) -> bool | None:
    """Whether kvikio will read with GPUDirect Storage here: True, False
    (its POSIX compatibility mode), or None when it cannot say (kvikio
    24.12 - 25.02 with compatibility mode ``AUTO``, or a half-installed cuFile).

    ``backend="auto"`` picks kvikio only on True: in compatibility mode kvikio
    reads through its own bounce buffers, which forces the ``device`` gather
    (column shards cross PCIe ``world`` times their size) and an extra
    device-to-device copy per row shard, for nothing the posix path lacks."""
    d = kvikio_defaults(kvikio)
    try:
        if hasattr(d, "is_compat_mode_preferred"):  # kvikio >= 25.04
            return not bool(d.is_compat_mode_preferred())
        mode = int(d.compat_mode())  # 24.12 - 25.02: kvikio.CompatMode (OFF 0, ON 1, AUTO 2)
    except Exception:  # a half-installed cuFile: kvikio falls back itself
        return None
    return None if mode == 2 else mode == 0


def describe_kvikio(kvikio: Any) -> str:
    """How kvikio will read here: GDS, or its POSIX compatibility mode."""
    version = getattr(kvikio, "__version__", "?")
    try:
        active = gds_active(kvikio)
    except Exception as e:
        return f"kvikio {version}, GDS state unknown ({e})"
    if active is None:
        return f"kvikio {version}, compatibility mode auto or unknown (GDS where cuFile works)"
    if not active:
        return f"kvikio {version} in compatibility mode (no GDS: POSIX reads via bounce buffers)"
    return f"kvikio {version} with GPUDirect Storage"


def set_threads(kvikio: Any, n: int) -> None:
    """kvikio's thread pool size (``GPULOAD_THREADS``); it defaults to 1,
    far from what a hot page cache needs. Reset only when it differs: a
    reset rebuilds kvikio's pool."""
    d = kvikio_defaults(kvikio)
    with _threads_lock:
        if hasattr(d, "set") and hasattr(d, "get"):  # kvikio >= 25.04
            if d.get("num_threads") != n:
                d.set("num_threads", n)
        elif d.get_num_threads() != n:
            d.num_threads_reset(n)


class KvikioReader:
    """Reads file ranges into device buffers with ``kvikio.CuFile.pread``.

    Parameters
    ----------
    headers
        The parsed files; identities are checked as by the posix reader.
    prefetch
        ``posix_fadvise(WILLNEED)`` on announced ranges.
    kvikio
        The kvikio module (or a stand-in module with ``CuFile`` and a
        ``defaults`` submodule).
    threads
        kvikio's thread pool size.
    """

    name = "kvikio"
    into = "device"  # the pipeline hands it device scratch, not pinned memory

    def __init__(
        self, headers: Sequence[FileHeader], *, prefetch: bool, kvikio: Any, threads: int
    ) -> None:
        self._kvikio = kvikio
        self._sizes = {h.path: h.size for h in headers}
        self._posix = PosixReader(headers, prefetch=prefetch)  # identity checks, advice
        self._files: dict[str, Any] = {}
        self._lock = threading.Lock()
        set_threads(kvikio, threads)

    def _cufile(self, file: str) -> Any:
        f = self._files.get(file)
        if f is not None:
            return f
        with self._lock:
            f = self._files.get(file)
            if f is None:
                self._posix.fd(file)  # opens and checks the identity first
                try:
                    f = self._files[file] = self._kvikio.CuFile(file, "r")
                except Exception as e:
                    raise ReadError(f"{file}: kvikio cannot open it: {e}") from e
            return f

    def advise(self, file: str, offset: int, length: int) -> None:
        self._posix.advise(file, offset, length)

    def read_device(self, file: str, offset: int, length: int, dst: Any) -> tuple[int, int]:
        """Read ``[offset, offset+length)`` of ``file`` into device buffer ``dst``.

        Returns
        -------
        (pad, nbytes)
            The requested first byte is at ``dst[pad]``; ``nbytes`` were read.

        Notes
        -----
        The read covers whole 4 KiB pages (``offset`` rounded down, the end
        rounded up and clamped to the file's size), so ``dst`` must hold
        ``length`` plus up to two pages. Blocks until the bytes are in
        device memory.
        """
        lo = offset - offset % PAGE
        hi = min(-(-(offset + length) // PAGE) * PAGE, self._sizes[file])
        n = hi - lo
        if n > dst.size:
            raise ValueError(f"read of {n} bytes does not fit a {dst.size}-byte device buffer")
        f = self._cufile(file)
        try:
            got = f.pread(dst[:n], size=n, file_offset=lo).get()
        except Exception as e:
            raise ReadError(f"{file}: kvikio read of {n} bytes at {lo} failed: {e}") from e
        if got != n:
            raise ReadError(
                f"{file}: kvikio read {got} of {n} bytes at offset {lo}; was the file truncated?"
            )
        return offset - lo, n

    def close(self) -> None:
        """Close every file; raise if one changed while it was being read."""
        with self._lock:
            files, self._files = self._files, {}
        for f in files.values():
            f.close()
        self._posix.close()
