"""Prefault: fault a checkpoint's mapped pages into RAM and pin them, with its report.

MoE experts too large for the GPU stay in host memory, read through the
checkpoint's mmap (:mod:`gpuload.host.resident`). Left alone, every page
faults on first use, on the request path (SharpI measured first requests ~5x
slower than warm). So, before handing arrays out, a thread pool sweeps the
ranges in 32 MiB chunks:

1. hints (best effort): ``madvise(MADV_WILLNEED)`` (the mapping's
   ``posix_fadvise(WILLNEED)``) in 128 KiB steps, which queues reads of
   exactly the chunk;
2. the guarantee, :func:`gpuload.host.populate.populate`: ``madvise(MADV_POPULATE_READ)`` (Linux
   5.14+), else ``process_vm_readv`` of a byte per page. Both fault pages in
   through the kernel, which *reports* a page it cannot read (truncated file,
   EIO) where a load instruction would die of SIGBUS: it becomes a
   ReadError. Afterwards every page is in the page cache *and* mapped in this
   process's page tables, so a first touch costs what a warm one does;
3. pin (see :mod:`gpuload.memory.pinning`): ``cudaHostRegister`` read-only, or
   ``mlock`` without CUDA; a private copy-on-write mapping (torch results)
   through ``mlock`` of a read-only twin, since locking the writable
   mapping itself would copy every page.

The owned copies :func:`~gpuload.host.resident.map_resident` makes are not
swept (their pages were just written, so they are resident) but they are
pinned with the views, by the same method.

``GPULOAD_PREFAULT`` gates all three (:func:`should_prefault`);
``GPULOAD_PIN=0`` skips step 3. Residency is measured with ``mincore``.
gpuload itself never reads a mapped page with a load instruction, and checks
each file's identity after its last page is populated (a changed file raises
ReadError).
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from gpuload import config
from gpuload.errors import exhausted
from gpuload.host.populate import check_unchanged, populate
from gpuload.memory import mapping, pinning
from gpuload.memory.mapping import mem_available, residency
from gpuload.read.open import open_checkpoint

__all__ = [
    "PrefaultReport",
    "mem_available",
    "name_filter",
    "prefault",
    "residency",
    "should_prefault",
]

_log = logging.getLogger(__name__)

PAGE = mapping.PAGE
CHUNK_BYTES = 32 << 20  # one sweep task
HINT_BYTES = 128 << 10  # one read-ahead hint
_GiB = float(1 << 30)


NameFilter = str | re.Pattern[str] | Callable[[str], bool] | Iterable[str]


def name_filter(spec: NameFilter, what: str = "tensors") -> Callable[[str], bool]:
    """A predicate on tensor names: a regex (``re.search``), a callable, or
    an iterable of exact names. ``what`` names the argument in errors."""
    if isinstance(spec, str):
        try:
            spec = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{what}: bad regex {spec!r}: {e}") from None
    if isinstance(spec, re.Pattern):
        rx = spec
        return lambda name: rx.search(name) is not None
    if callable(spec):
        return spec
    if isinstance(spec, Iterable):
        names = frozenset(spec)
        return names.__contains__
    raise TypeError(f"{what}={spec!r} is not a regex, a callable or a list of names")


def should_prefault(
    setting: bool | Literal["auto"], needed_bytes: int, available_bytes: int
) -> tuple[bool, str]:
    """The gate: prefault ``needed_bytes`` with ``available_bytes`` free?

    ``False``: never; ``True``: always; ``"auto"``: only when the set fits in
    80% of available memory (MemAvailable), since faulting in more would only
    evict the set's own first pages, or the rest of the system's.
    """
    if setting is False:
        return False, "prefault off (GPULOAD_PREFAULT=0)"
    if setting is True:
        return True, "prefault forced (GPULOAD_PREFAULT=1)"
    if setting != "auto":
        raise ValueError(f"setting={setting!r} is not True, False or 'auto'")
    need, avail = needed_bytes / _GiB, available_bytes / _GiB
    if needed_bytes * 5 <= available_bytes * 4:  # integer math: exact at 80%
        return True, f"auto: {need:.2f} GiB fits in 80% of {avail:.2f} GiB available"
    return False, (
        f"auto: {need:.2f} GiB exceeds 80% of {avail:.2f} GiB available; "
        "skipped (GPULOAD_PREFAULT=1 forces it)"
    )


@dataclasses.dataclass
class PrefaultReport:
    """What a prefault did. ``bytes`` (the mapped ranges swept) are
    page-rounded; ``seconds`` covers hints and sweep (pinning is
    ``pin_seconds``); pages are ``PAGE`` bytes. ``copy_bytes`` are the owned
    copies' buffers (whole pages; see :func:`map_resident`), not swept;
    ``pinned_bytes`` all that is pinned: the swept ranges and the copies."""

    bytes: int = 0
    seconds: float = 0.0
    pages_total: int = 0
    pages_resident_before: int = 0
    pages_resident_after: int = 0
    pinned: bool = False
    pin_reason: str = ""  # how it was pinned, or why not
    skipped_reason: str | None = None  # None: prefault ran (the gate said yes)
    pin_method: str | None = None  # "cuda" | "mlock" | None
    pin_seconds: float = 0.0
    threads: int = 0
    files: int = 0
    copies: list[str] = dataclasses.field(default_factory=list)  # returned as copies
    copy_bytes: int = 0  # their buffers, whole pages: pinned with the rest, not swept
    pinned_bytes: int = 0  # bytes pinned: swept ranges + copies (0 when not pinned)
    _keep: tuple = dataclasses.field(default=(), repr=False, compare=False)

    @property
    def gib_per_s(self) -> float:
        return self.bytes / _GiB / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """The one INFO line: bytes, seconds, GiB/s, pinned or why not."""
        size = f"{self.bytes / _GiB:.3f} GiB"
        if self.skipped_reason is not None:
            return f"prefault skipped ({size} in {self.files} file(s)): {self.skipped_reason}"
        pin = f"pinned by {self.pin_reason}" if self.pinned else f"not pinned: {self.pin_reason}"
        if self.pinned:
            pin += f" ({self.pinned_bytes:,} bytes)"
        if self.copies:
            pin += f"; {len(self.copies)} copies ({self.copy_bytes:,} bytes, not swept)"
        return (
            f"prefault: {size} in {self.seconds:.3f} s ({self.gib_per_s:.2f} GiB/s, "
            f"{self.threads} threads), resident {self.pages_resident_before}"
            f" -> {self.pages_resident_after} of {self.pages_total} pages; {pin}"
        )

    def release(self) -> None:
        """Drop the mappings (and pins) a standalone :func:`prefault` kept."""
        self._keep = ()


# --------------------------------------------------------------------------
# the sweep


def _page_ranges(ranges: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Byte ranges -> sorted, merged, page-aligned ranges within [0, size)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if e <= s:
            continue
        s, e = s - s % PAGE, min(size, -(-e // PAGE) * PAGE)
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _sweep_chunk(m: mapping.Mapping, s: int, e: int) -> None:
    # Hints: madvise(WILLNEED) on a file mapping is posix_fadvise(WILLNEED) on
    # the file (mm/madvise.c calls vfs_fadvise): it queues reads of exactly
    # the range, but the kernel caps one call at the read-ahead window, so
    # hint in 128 KiB steps (the smallest default window). While they cover
    # the chunk, fault-time read-ahead is off (MADV_RANDOM): it would run past
    # the chunk into tensors nobody asked for (a window, 8 MiB here, each).
    m.madvise(s, e, mmap.MADV_RANDOM)
    refused = 0
    for a in range(s, e, HINT_BYTES):
        refused |= m.madvise(a, min(e, a + HINT_BYTES), mmap.MADV_WILLNEED)
    if refused:  # no hints: let the faults read ahead after all
        m.madvise(s, e, mmap.MADV_NORMAL)
    try:
        populate(m, s, e)
    finally:
        m.madvise(s, e, mmap.MADV_NORMAL)  # later faults (after eviction) read ahead again


def _prefault(
    jobs: Sequence[tuple[mapping.Mapping, Iterable[tuple[int, int]]]],
    cfg: config.Config,
    keep: bool = False,
    device: int | None = None,
    owned: Sequence[mapping.HostBuffer] = (),
    cuda: bool = True,
) -> PrefaultReport:
    """Prefault (per the gate) and pin byte ranges of mapped files, and pin
    the ``owned`` copies' buffers with them (for CUDA ``device``, default the
    current one; ``cuda=False``: mlock only). The copies are not swept, nor
    counted by the gate: their pages were just written, so they are resident
    and already in use. But when the gate says no, they are not pinned
    either, as the views are not."""
    spans = [(m, _page_ranges(rs, m.size)) for m, rs in jobs]
    nbytes = sum(e - s for _, sp in spans for s, e in sp)
    pages = sum(-(-(e - s) // PAGE) for _, sp in spans for s, e in sp)
    before = sum(m.mincore(s, e) for m, sp in spans for s, e in sp)
    ok, why = should_prefault(cfg.prefault, nbytes, mem_available())
    if nbytes == 0 and not owned:
        ok, why = False, "no bytes selected"
    rep = PrefaultReport(nbytes, 0.0, pages, before, before, files=len(spans))
    rep.copy_bytes = sum(b.size for b in owned)
    if not ok:
        rep.pin_reason, rep.skipped_reason = "prefault skipped", why
        _log.info(rep.summary())
        return rep

    chunks = [
        (m, a, min(e, a + CHUNK_BYTES))
        for m, sp in spans
        for s, e in sp
        for a in range(s, e, CHUNK_BYTES)
    ]
    threads = min(cfg.threads, len(chunks))  # 0: only copies, nothing to sweep
    t0 = time.perf_counter()
    if chunks:
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="gpuload-prefault") as pool:
            list(pool.map(lambda c: _sweep_chunk(*c), chunks))
    rep.seconds, rep.threads = time.perf_counter() - t0, threads
    rep.pages_resident_after = sum(m.mincore(s, e) for m, sp in spans for s, e in sp)

    t1, rep.pin_reason = time.perf_counter(), "pinning off (GPULOAD_PIN=0 or pin=False)"
    if cfg.pin:
        # A copy-on-write mapping is pinned through a read-only twin (see
        # mapping.Mapping.pin_target): mlock of the same page-cache pages.
        # The copies go with the views, all or nothing, by the same method
        # (a torch load's copies too are locked, not registered: one method
        # per report, and the views of a private mapping cannot be).
        private = not cuda or any(m.private for m, _ in spans)
        targets = [(m.pin_target(), sp) for m, sp in spans]
        targets += [(b, [(0, b.size)]) for b in owned]
        rep.pin_method, rep.pin_reason = pinning.pin(targets, device, cuda=not private)
    rep.pinned, rep.pin_seconds = rep.pin_method is not None, time.perf_counter() - t1
    rep.pinned_bytes = nbytes + rep.copy_bytes if rep.pinned else 0
    if keep and rep.pinned:  # a standalone prefault: the report holds the pins
        rep._keep = tuple(m.pin_target() for m, _ in spans)
    _log.info(rep.summary())
    return rep


def prefault(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tensors: NameFilter | None = None,
    *,
    pin: bool | None = None,
    threads: int | None = None,
    setting: bool | Literal["auto"] | None = None,
) -> PrefaultReport:
    """Fault a checkpoint's pages (all, or those of ``tensors``) into RAM.

    ``paths`` is what :func:`~gpuload.load_sharded` takes (both resolve it
    with :func:`~gpuload.open_checkpoint`): a ``.safetensors`` file, a list of
    them, or a model directory (alone or as a list of one); ``tensors``
    a regex, a callable or a list of names (e.g. :data:`PRESET_EXPERTS`).
    ``pin``, ``threads`` and ``setting`` (the gate) override ``GPULOAD_PIN``,
    ``GPULOAD_THREADS`` and ``GPULOAD_PREFAULT``.

    The pages stay in the page cache afterwards, subject to memory pressure.
    When pinned, the returned report owns the pins: they stay locked while
    it is alive, until :meth:`PrefaultReport.release`. Keep it: a bare
    ``gpuload.prefault(p, pin=True)`` statement unpins at once.

    A file truncated, changed or failing (EIO) under the call raises
    :class:`~gpuload.errors.ReadError`; pages are populated with calls that
    report failure, never with loads that die of SIGBUS.
    """
    try:
        return _prefault_paths(paths, tensors, pin, threads, setting)
    except (MemoryError, RuntimeError) as e:
        err = exhausted(e, f"prefault of {paths}")
        if err is None:
            raise
        raise err from e


def _prefault_paths(paths, tensors, pin, threads, setting) -> PrefaultReport:
    cfg = config.get().replace(pin=pin, threads=threads, prefault=setting)
    ck = open_checkpoint(paths)
    keep = name_filter(tensors) if tensors is not None else None
    jobs = []
    for h in ck.files:
        if keep is None:
            rs = [(0, h.size)]
        else:
            rs = [(t.start, t.end) for t in h.tensors.values() if keep(t.name)]
        if rs:
            jobs.append((mapping.Mapping(h.path, h.identity), rs))
    report = _prefault(jobs, cfg, keep=True)
    check_unchanged(ck, [m.path for m, _ in jobs])
    return report
