"""What a load will do, decided before any tensor byte is read: the
arguments checked, the tensors selected and sharded, the reads planned.

:meth:`gpuload.loader.Loader.plan` (and so every load) runs :func:`plan_load`;
nothing here reads tensor data or touches a device.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from gpuload.errors import PlanError, ShardingError
from gpuload.format.checkpoint import Checkpoint
from gpuload.format.header import TensorInfo
from gpuload.host import prefault as _prefault
from gpuload.host import resident as _resident
from gpuload.plan.ops import Plan, PlanOptions
from gpuload.plan.planner import plan_reads
from gpuload.read.open import open_checkpoint
from gpuload.sharding.selection import Selection
from gpuload.sharding.sharder import Sharder

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


def plan_load(
    path: PathLike | Checkpoint,
    rank: int,
    world: int,
    options: dict[str, Any],
    plan_options: PlanOptions,
    staging_bytes: int,
) -> LoadPlan:
    """Parse (unless ``path`` is a parsed :class:`Checkpoint`), shard and plan
    one rank's load; ``options`` are the per-load keywords, already checked
    against :data:`gpuload.options.PER_LOAD`."""
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
    plan = plan_reads(items, plan_options)
    if plan.max_staged_bytes > staging_bytes:
        raise PlanError(
            f"a staged read of {plan.max_staged_bytes} bytes does not fit "
            f"staging_bytes={staging_bytes}"
        )
    return LoadPlan(ckpt, plan, resident, tuple(unknown), tuple(skipped), excluded)
