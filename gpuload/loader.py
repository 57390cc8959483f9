"""``Loader``: one load runs checkpoint -> sharding -> plan -> read -> backend.

A ``Loader`` holds what is worth reusing across loads (reader threads'
staging, the CUDA streams and device scratch); :func:`gpuload.load_sharded`
(:mod:`gpuload.load`) makes one, loads, and closes it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm import tqdm

from gpuload import config as _config
from gpuload import options as _options
from gpuload.cuda.device import resolve_device
from gpuload.errors import GpuloadError, exhausted
from gpuload.format.checkpoint import Checkpoint
from gpuload.format.gcpause import paused
from gpuload.group import ranks
from gpuload.host import resident as _resident
from gpuload.host.backend import make_backend
from gpuload.host.outputs import resident_as, resolve_framework
from gpuload.load_plan import LoadPlan, PathLike, _per_load, check_rank, plan_load
from gpuload.plan import gather_model
from gpuload.plan.ops import Plan, PlanOptions
from gpuload.plan.transfer import GatherOptions
from gpuload.read.open import open_checkpoint
from gpuload.report import LoadReport
from gpuload.sharding.selection import Selection

log = logging.getLogger("gpuload")


class Loader:
    """Loads rank shards of safetensors checkpoints; reusable across loads.

    Parameters
    ----------
    device
        ``"cpu"``, ``"cuda"``/``"cuda:N"``, or None: the current CUDA device
        when a GPU backend is usable, else ``"cpu"``.
    framework
        ``"numpy"`` (default on the CPU), ``"torch"`` (default on a GPU when a
        CUDA build is installed) or ``"cupy"`` (GPU only).
    reader_factory
        ``callable(headers, prefetch=bool) -> reader`` building the reader for
        each load (default :class:`~gpuload.read.posix.PosixReader`); tests wrap the
        reader with injected faults through it.
    **settings
        Keyword twins of the ``GPULOAD_*`` flags (``prefetch``, ``prefault``,
        ``backend``, ``pin``, ``threads``, ``staging_bytes``, ``chunk_bytes``,
        ``min_chunk_bytes``, ``device_scratch_bytes``, ``progress``,
        ``gather``); a keyword wins over the environment. Selection and
        sharding options (``include``, ``num_heads``...) go to :meth:`load`
        and :meth:`plan`; the table of which goes where is
        :mod:`gpuload.options`.
    """

    def __init__(
        self,
        *,
        device: str | None = None,
        framework: str | None = None,
        reader_factory: Callable[..., Any] | None = None,
        runtime: Any = None,
        **settings: Any,
    ) -> None:
        _options.check(settings, _options.SETTINGS, "Loader(...)")
        self.config = _config.get().replace(**settings)
        # A caller-supplied CUDA runtime (the CPU tests' fake) needs no probe.
        self.device = resolve_device(device, probe=runtime is None)
        self.framework = resolve_framework(framework, self.device, probe=runtime is None)
        self._backend = make_backend(self.device, self.config, reader_factory, runtime=runtime)
        self.backend, self.backend_reason = self._backend.name, self._backend.reason
        if hasattr(self._backend, "framework"):  # GPU results through torch's allocator
            self._backend.framework = self.framework
        try:  # a forced gather this backend cannot do fails here, not in a load
            self.plan_options()
        except (ValueError, GpuloadError):
            self._backend.close()  # its streams and staging, made above
            raise
        self.last_report: LoadReport | None = None
        self._closed = False

    # -- planning ----------------------------------------------------------

    def plan_options(self) -> PlanOptions:
        # Two staging slots must fit the budget so reads overlap packing.
        chunk = max(1, min(self.config.chunk_bytes, self.config.staging_bytes // 2))
        gather = None
        if self.config.gather == "zerocopy" and not self.config.pin:  # on the CPU too
            raise ValueError(
                "gather='zerocopy' reads mapped pinned staging, but pin=0 leaves it pageable"
            )
        if self.device != "cpu":  # covering reads reach the GPU by a cost-model choice
            model, _source = gather_model.resolve(self.config.gather_model)
            gather = GatherOptions(
                force=self.config.gather,
                mapped=self.config.pin,
                device_reads=bool(getattr(self._backend, "device_reads", False)),
                model=model,
            )
        return PlanOptions(
            chunk_bytes=chunk,
            min_chunk_bytes=min(self.config.min_chunk_bytes, chunk),
            gather=gather,
        )

    @paused()  # many small acyclic objects: see gpuload.format.gcpause
    def plan(self, path: PathLike, rank: int, world: int, **options: Any) -> LoadPlan:
        """Parse, shard and plan without reading any tensor data.

        ``options``: the per-load keywords of :func:`load_sharded` (``rules``,
        ``include``, ``cpu_resident`` and the sharding options), checked
        against :data:`gpuload.options.PER_LOAD` before any file is opened.
        """
        self._check_open()
        _options.check(options, _options.PER_LOAD, "Loader.plan")
        rank, world = check_rank(rank, world)
        return plan_load(path, rank, world, options, self.plan_options(), self.config.staging_bytes)

    # -- loading -----------------------------------------------------------

    def load(
        self,
        path: PathLike,
        rank: int | None = None,
        world: int | None = None,
        *,
        group: Any = None,
        return_report: bool = False,
        **options: Any,
    ):
        """Load this rank's shard of every tensor; see :func:`load_sharded`.

        ``options``: the per-load keywords (``rules``, ``include``,
        ``cpu_resident``, sharding options); settings go to ``Loader(...)``.
        """
        _options.check(options, _options.PER_LOAD, "Loader.load")
        return self._load(path, rank, world, group=group, return_report=return_report, **options)

    def _load(self, path: PathLike, *args: Any, **kwargs: Any):
        """:meth:`load`, and for :func:`gpuload.torch.load_into` on the CPU,
        ``into``: name -> a writable C-contiguous ``uint8`` array of exactly
        the result's bytes, which the load fills instead of a new buffer
        (checked before any I/O; the result then shares that memory).

        Memory, mappings or threads running out is an
        :class:`~gpuload.errors.OutOfMemoryError` (a ``MemoryError`` too) or
        a :class:`~gpuload.errors.ResourceError` (a ``RuntimeError`` too)."""
        try:
            return self._load_once(path, *args, **kwargs)
        except (MemoryError, RuntimeError) as e:
            err = exhausted(e, f"loading {os.fspath(path) if _is_path(path) else 'a checkpoint'}")
            if err is None:
                raise
            raise err from e

    def _load_once(
        self,
        path: PathLike,
        rank: int | None,
        world: int | None,
        *,
        group: Any = None,
        return_report: bool = False,
        into: dict[str, np.ndarray] | None = None,
        **options: Any,
    ):
        self._check_open()
        rank, world = check_rank(*ranks(rank, world, group))  # torch.distributed if omitted
        source = _per_load(options)[3]  # bad values fail here, before any file is opened
        t0 = time.perf_counter()
        ckpt = open_checkpoint(path, source) if not isinstance(path, Checkpoint) else path
        t1 = time.perf_counter()
        lp = self.plan(ckpt, rank, world, **options)
        plan = lp.plan
        t2 = time.perf_counter()
        remote = ckpt.source is not None
        report = LoadReport(
            path=str(ckpt.root or ckpt.files[0].path if ckpt.files else path),
            rank=rank,
            world=world,
            device=self.device,
            backend="remote" if remote else self.backend,
            backend_reason=_REMOTE_REASON if remote else self.backend_reason,
            tensors=len(plan.tensors) + len(lp.resident),
            file_bytes=touched_bytes(ckpt, plan, lp.resident),
            bytes_gap=plan.bytes_gap,
            header_s=t1 - t0,
            plan_s=t2 - t1,
            unknown=list(lp.unknown),
            skipped=list(lp.skipped),
            excluded=lp.excluded,
            cpu_resident=sorted(lp.resident),
        )
        for t in plan.tensors:
            report.strategies[t.strategy] = report.strategies.get(t.strategy, 0) + 1
        report.gather = plan.gathers
        backend = self._backend
        into = into or {}
        if into and self.device != "cpu":
            raise ValueError(f"into= fills host buffers; this Loader is on {self.device}")
        fresh = sum(t.out_nbytes for t in plan.tensors if t.name not in into)
        backend.check_memory(fresh)  # before any I/O
        buffers = backend.allocate(plan, into) if into else backend.allocate(plan)
        bar = self._progress(plan.bytes_read)
        try:
            if remote:  # ranged GETs into the same buffers, staging and plan
                reader = ckpt.source.reader(ckpt.files, prefetch=self.config.prefetch)
            else:
                reader = backend.reader(ckpt.files, prefetch=self.config.prefetch)
            try:
                backend.run(plan, buffers, reader, report, bar.update if bar is not None else None)
                if remote and lp.resident:
                    from gpuload.host.remote_resident import read_resident

                    resident_arrays = read_resident(lp, reader, self.config, report)
            finally:
                reader.close()  # raises if a file changed while we read it
            if remote:  # what crossed the network, retries included
                report.bytes_read = reader.bytes_received
                report.bytes_header = ckpt.source.probe_bytes
        except BaseException:
            # The traceback keeps the frames that saw ``buffers`` alive, so the
            # results would wait for the cyclic GC: on a GPU, gigabytes a retry
            # needs. Emptying the dict frees them now.
            buffers.clear()
            raise
        finally:
            if bar is not None:
                bar.close()
        result = backend.convert(buffers, list(plan.tensors), self.framework)
        if remote and lp.resident:
            result.update(resident_as(resident_arrays, self.framework))
        elif lp.resident:
            # Zero-copy host arrays over the checkpoint's mapping, prefaulted
            # and pinned (fused cuts: copies, pinned the same way): they stay
            # on the CPU whatever the device.
            # torch has no read-only tensors: it gets a private copy-on-write
            # mapping, so a write copies the touched pages, never reaching
            # the file (see gpuload.host.resident).
            gpu = int(self.device.split(":")[1]) if self.device != "cpu" else None
            arrays, report.prefault = _resident.map_resident(
                ckpt,
                lp.resident,
                self.config,
                device=gpu,
                writable=self.framework == "torch",
                copy=options.get("cpu_resident") == "copy",
            )
            result.update(resident_as(arrays, self.framework))
            report.bytes_resident = sum(a.nbytes for a in arrays.values())
            report.resident_copies = list(report.prefault.copies)
        report.seconds = time.perf_counter() - t0
        self.last_report = report
        log.info("%s", report.summary())
        # Last: every file read or mapped still is what its header described
        # (converting may have read the views: a dtype torch lacks is copied).
        files = {op.file for op in plan.ops} | {ckpt.tensors[n].file for n in lp.resident}
        _resident.check_unchanged(ckpt, files)
        return (result, report) if return_report else result

    def _progress(self, total: int):
        mode = self.config.progress
        if mode is False or total == 0:
            return None
        # auto: tqdm's delay shows the bar only for loads that run > 2 s.
        return tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="gpuload",
            delay=0 if mode is True else 2.0,
            leave=False,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Loader is closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._backend.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_path(path: Any) -> bool:
    return isinstance(path, str | os.PathLike)


_REMOTE_REASON = "remote checkpoint: ranged GETs (gpuload.read.remote) into the backend's buffers"


def touched_bytes(ckpt: Checkpoint, plan: Plan, resident: dict[str, Selection]) -> int:
    """Tensor bytes of the files this load read from or mapped."""
    files = {op.file for op in plan.ops} | {ckpt.tensors[n].file for n in resident}
    return sum(i.nbytes for i in ckpt.tensors.values() if i.file in files)
