"""Rank and world from a torch.distributed process group.

``load_sharded(path)`` inside a ``torchrun`` job needs no rank or world: they
come from ``group=`` (a tensor-parallel group) or the default group. Explicit
``rank`` and ``world`` never touch torch, and torch is never imported here
unless the caller imported it first: a process that has not imported
``torch.distributed`` cannot have a process group.
"""

from __future__ import annotations

import sys
from typing import Any


def _dist() -> Any | None:
    """``torch.distributed`` when it is imported and a group is initialized."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def ranks(rank: int | None, world: int | None, group: Any = None) -> tuple[int, int]:
    """``(rank, world)``: as given, or this process's in ``group`` (default:
    the default group) when either is omitted or a group is named.

    A value given together with a group must agree with the group.

    Raises
    ------
    ValueError
        Rank or world omitted outside an initialized process group, a
        process outside ``group``, or a given value the group contradicts.
    """
    if group is None and rank is not None and world is not None:
        return rank, world
    dist = _dist()
    if dist is None:
        what = "group= was given" if group is not None else "rank and world were omitted"
        raise ValueError(
            f"{what}, but no torch.distributed process group is initialized: "
            "call torch.distributed.init_process_group first, or pass rank= and world="
        )
    member = getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", object())
    if group is not None and (group is member or (isinstance(group, int) and group == member)):
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the group "
            "passed as group=: new_group() returns a placeholder to the ranks it leaves "
            "out; call load_sharded with group= only on the group's members"
        )
    g_rank, g_world = dist.get_rank(group), dist.get_world_size(group)
    if g_rank < 0:
        try:
            members = f" (global ranks {dist.get_process_group_ranks(group)})"
        except Exception:  # a group torch cannot list: say no more
            members = ""
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the group "
            f"passed as group={members}"
        )
    for label, given, found in (("rank", rank, g_rank), ("world", world, g_world)):
        if given is not None and given != found:
            raise ValueError(f"{label}={given} but the process group says {label}={found}")
    return g_rank, g_world


def current_device() -> str | None:
    """``"cuda:N"`` for the device a torch job selected (``torch.cuda.set_device``),
    or None when torch has not initialized CUDA in this process or gpuload's
    GPU path is not usable.

    The rank is never the device index: on several nodes, or with
    ``CUDA_VISIBLE_DEVICES`` per rank, they differ.
    """
    from gpuload.cuda import device as _device

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    # Without gpuload's GPU path (no cupy), device=None keeps meaning "cpu".
    if not _device.gpu_pipeline_available() or _device.cuda_device_count() == 0:
        return None
    return f"cuda:{torch.cuda.current_device()}"


__all__ = ["current_device", "ranks"]
