"""``Loader`` and ``load_sharded``: checkpoint -> sharding -> plan -> pipeline.

A ``Loader`` holds what is worth reusing across loads (reader threads'
staging, later the CUDA streams and device scratch); ``load_sharded`` is a
thin wrapper that makes one, loads, and closes it.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from gpuload import config as _config
from gpuload import options as _options
from gpuload.cuda.device import resolve_device
from gpuload.errors import GpuloadError, PlanError, ShardingError, exhausted
from gpuload.format.checkpoint import Checkpoint, TensorInfo
from gpuload.format.gcpause import paused
from gpuload.group import current_device, ranks
from gpuload.host import prefault as _prefault
from gpuload.host import resident as _resident
from gpuload.host.backend import make_backend
from gpuload.host.outputs import resident_as, resolve_framework
from gpuload.plan import gather_model
from gpuload.plan.planner import Plan, PlanOptions, plan_reads
from gpuload.plan.transfer import GatherOptions
from gpuload.read.open import open_checkpoint
from gpuload.report import LoadReport
from gpuload.sharding.selection import Selection
from gpuload.sharding.sharder import Sharder

log = logging.getLogger("gpuload")

PathLike = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
Filter = str | re.Pattern[str] | Callable[[str], bool] | Iterable[str] | None


def name_filter(spec: Filter, what: str = "include") -> Callable[[str], bool] | None:
    """A tensor-name predicate (regex, callable or names), or None for "all"."""
    return None if spec is None else _prefault.name_filter(spec, what)


def check_rank(rank: Any, world: Any) -> tuple[int, int]:
    """``(rank, world)`` as Python ints: any integral type (numpy, torch
    scalars) is accepted through ``operator.index``; bools and floats are not."""
    out = []
    for name, v in (("rank", rank), ("world", world)):
        try:
            if isinstance(v, bool | np.bool_):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{name} must be an int, got {v!r}") from None
    rank, world = out
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return rank, world


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """Everything decided before the first byte is read."""

    checkpoint: Checkpoint
    plan: Plan
    resident: dict[str, Selection]  # cpu_resident tensors: mapped, not read
    unknown: tuple[str, ...]  # replicated because no rule matched
    skipped: tuple[str, ...]  # not owned by this rank (expert parallel)
    excluded: int  # dropped by include=


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
        keep, resident_of, rules, source, options = _per_load(options)
        ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path, source)
        shapes = {name: info.shape for name, info in ckpt.tensors.items()}
        try:
            sharder = Sharder(
                ckpt.config, rules, shapes=shapes, config_path=ckpt.config_path, **options
            )
        except ShardingError as e:  # a bad value in config.json
            raise ShardingError(f"{ckpt.config_path}: {e}", keywords=e.keywords) from None
        items: list[tuple[TensorInfo, Selection]] = []
        resident: dict[str, Selection] = {}
        unknown, skipped, excluded = [], [], 0
        for name, info in ckpt.tensors.items():
            if keep is not None and not keep(name):
                excluded += 1
                continue
            try:
                sel = sharder.select(name, info.shape, rank, world)
            except ShardingError as e:  # the sharder knows names, not files
                raise ShardingError(f"{info.file}: {e}", keywords=e.keywords) from None
            if sel is None:
                skipped.append(name)
                continue
            if sel.rule is None:
                unknown.append(name)
            if resident_of is not None and resident_of(name):
                resident[name] = sel
            else:
                items.append((info, sel))
        plan = plan_reads(items, self.plan_options())
        if plan.max_staged_bytes > self.config.staging_bytes:
            raise PlanError(
                f"a staged read of {plan.max_staged_bytes} bytes does not fit "
                f"staging_bytes={self.config.staging_bytes}"
            )
        return LoadPlan(ckpt, plan, resident, tuple(unknown), tuple(skipped), excluded)

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


def _per_load(options: dict[str, Any]):
    """Per-load keywords -> (include filter, cpu_resident filter, rules,
    sharding options), every value checked: a bad regex or count raises
    ValueError/TypeError here, before any file is opened."""
    options = dict(options)
    keep = name_filter(options.pop("include", None))
    resident_spec = options.pop("cpu_resident", None)
    if resident_spec is True or resident_spec == "copy":
        resident_spec = _resident.PRESET_EXPERTS
    resident_of = name_filter(resident_spec or None, "cpu_resident")
    rules = options.pop("rules", None)
    source = options.pop("storage_options", None)
    if source is not None and not isinstance(source, dict):
        raise TypeError(f"storage_options must be a dict, got {type(source).__name__}")
    Sharder(None, rules, **options)  # validates rules and every sharding option
    return keep, resident_of, rules, source, options


_REMOTE_REASON = "remote checkpoint: ranged GETs (gpuload.read.remote) into the backend's buffers"


def touched_bytes(ckpt: Checkpoint, plan: Plan, resident: dict[str, Selection]) -> int:
    """Tensor bytes of the files this load read from or mapped."""
    files = {op.file for op in plan.ops} | {ckpt.tensors[n].file for n in resident}
    return sum(i.nbytes for i in ckpt.tensors.values() if i.file in files)


def load_sharded(
    path: PathLike,
    rank: int | None = None,
    world: int | None = None,
    *,
    group: Any = None,
    device: str | None = None,
    framework: str | None = None,
    return_report: bool = False,
    **options: Any,
):
    """Load one tensor-parallel rank's shard of a safetensors checkpoint.

    Parameters
    ----------
    path
        A ``.safetensors`` file, a list of them, or a model directory (with
        ``model.safetensors.index.json``; ``config.json`` supplies head and
        expert counts).
    rank, world
        This rank and the tensor-parallel world size, ``0 <= rank < world``.
        Omitted inside an initialized ``torch.distributed`` job: this
        process's rank and size in ``group``.
    group
        A ``torch.distributed`` process group (the tensor-parallel group)
        to take ``rank`` and ``world`` from; None: the default group, when
        ``rank`` and ``world`` are omitted. Explicit ``rank`` and ``world``
        never import torch.
    device
        ``"cpu"``, ``"cuda"`` (the current device) or ``"cuda:N"``; None picks
        the current CUDA device (torch's, when the job has initialized CUDA;
        else cupy's) when one is usable, else ``"cpu"``. The rank is never
        used as a device index.
    framework
        ``"numpy"`` (default on the CPU), ``"torch"`` (default on a GPU when
        installed) or ``"cupy"`` (GPU only; bf16/fp8 as raw integer views).
    return_report
        Also return the :class:`~gpuload.report.LoadReport` (stage breakdown).
    **options
        Every other keyword, checked against :mod:`gpuload.options` before
        any file is opened (a misspelled one raises TypeError naming it and
        the close match):

        * selection: ``rules`` (caller sharding rules, ``{regex: spec}`` or
          ``callable(name, shape)``, consulted before the built-in tables),
          ``include`` (keep only matching tensors; the others are never
          read), ``cpu_resident`` (tensors kept in host memory: a regex,
          callable or names, or True for the routed-expert preset
          ``gpuload.host.resident.PRESET_EXPERTS``, or ``"copy"``: that preset
          read into pinned anonymous memory instead of mapped; see
          :func:`gpuload.host.resident.map_resident` for views and copies);
        * sharding: ``num_heads``, ``num_kv_heads``, ``num_experts``,
          ``qkv_sections``, ``expert_parallel``, ``allow_uneven``,
          ``weight_block_size``, ``vision_tp``;
        * settings, the keyword twins of the ``GPULOAD_*`` flags:
          ``threads``, ``chunk_bytes``, ``prefetch``, ...

        With a :class:`Loader`, settings go to ``Loader(...)`` and the
        selection and sharding options to ``Loader.load``/``Loader.plan``.

    Returns
    -------
    dict
        Tensor name -> array (numpy or torch) holding this rank's shard.
        Read tensors are private buffers of exactly their size (a dtype view
        of a ``uint8`` buffer of their own: ``.base`` is that buffer, never
        shared with another tensor or load); cpu_resident ones are views of
        the checkpoint's mapping (or copies, see
        :func:`gpuload.host.resident.map_resident`). Tensors owned by other ranks
        (expert parallel) are absent.

    Notes
    -----
    Only the bytes this rank owns are read, plus the other ranks' columns
    inside covering reads and small gaps merged into one read (at most a
    quarter of the bytes around them), all reported as wasted bytes. bf16
    and fp8 numpy arrays use ``ml_dtypes``; packed sub-byte dtypes (F4, F6)
    come back as ``uint8`` bytes.
    """
    settings, per_load = _options.split(options, "load_sharded")
    rank, world = check_rank(*ranks(rank, world, group))  # before the Loader probes the device
    _per_load(per_load)
    with Loader(device=device or current_device(), framework=framework, **settings) as loader:
        return loader.load(path, rank, world, return_report=return_report, **per_load)
