"""``load_into``: a checkpoint into a module's parameters, DTensor shards included.

For each ``state_dict()`` entry, the local shard its placements give this
rank (:mod:`gpuload.integrations.torch.boxes`) is planned as a box read, all of them in
one gpuload load, and copied into the parameter's local tensor. A rank reads
only its local shards' bytes and never holds a tensor it does not own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from gpuload.errors import BackendUnavailable, ShardingError
from gpuload.group import current_device
from gpuload.integrations.torch.boxes import box_read, local_box
from gpuload.integrations.torch.fused import fused_sources, pieces, renamed
from gpuload.loader import Loader
from gpuload.read.open import open_checkpoint
from gpuload.report import LoadReport
from gpuload.sharding.selection import Selection

NameMap = Mapping[str, str] | Callable[[str], str] | None


def _mapper(name_map: NameMap) -> Callable[[str], str]:
    if name_map is None:
        return lambda key: key
    if isinstance(name_map, Mapping):
        return lambda key: name_map.get(key, key)
    if callable(name_map):
        return name_map
    raise TypeError(f"name_map has to be a dict or a callable, got {type(name_map).__name__}")


def _targets(module: Any, mapping: Callable[[str], str], names: Any):
    """``{checkpoint name: [(tensor, key), ...]}``, missing keys, unexpected
    names.

    Tied parameters (one tensor under several keys, e.g. ``lm_head.weight``
    and ``model.embed_tokens.weight``) load once, from whichever key the
    checkpoint has. Untied ones that ``mapping`` sends to one checkpoint
    name (a tied checkpoint into an untied model) are all listed: the name
    is read once and copied to each."""
    groups: dict[int, tuple[Any, list[str]]] = {}
    for key, t in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), (t, []))[1].append(key)
    wanted: dict[str, list[tuple[Any, str]]] = {}
    fused: dict[str, tuple[Any, list[list[str]], str]] = {}
    missing: list[str] = []
    asked: set[str] = set()
    for t, keys in groups.values():
        mapped = [(k, mapping(k)) for k in keys]
        if not any(n in names for _, n in mapped):  # Mixtral's block_sparse_moe.
            mapped = [(k, renamed(n, names) or n) for k, n in mapped]
        asked.update(n for _, n in mapped)
        found = [(k, n) for k, n in mapped if n in names]
        if not found:
            # transformers 5's fused experts, from per-expert tensors
            made = next(((k, f) for k, n in mapped if (f := fused_sources(n, names))), None)
            if made is None:
                missing.extend(keys)
            else:
                fused[made[0]] = (t, *made[1])
                asked.update(n for group in made[1][0] for n in group)
        for k, n in found[:1]:
            wanted.setdefault(n, []).append((t, k))
    unexpected = sorted(set(names) - asked)
    return wanted, fused, missing, unexpected


def _to_empty(module: Any, device: str) -> None:
    """``module.to_empty(device=...)``, keeping tied parameters tied: torch
    gives every parameter moved off ``meta`` a tensor of its own."""
    tied: dict[int, list[str]] = {}
    for key, p in module.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(key)
    module.to_empty(device=device)
    for keys in tied.values():
        first = module.get_parameter(keys[0])
        for key in keys[1:]:
            owner, _, attr = key.rpartition(".")
            setattr(module.get_submodule(owner), attr, first)


def _local(t: Any, name: str, shape: tuple[int, ...]):
    """The tensor's local part and its box in the global tensor, or None
    when this rank is outside the DTensor's mesh."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.data if hasattr(t, "data") else t, tuple((0, n) for n in shape)
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    box = local_box(name, shape, mesh.shape, coordinate, t.placements)
    return t.to_local().data, box


def load_into(
    module: Any,
    path: Any,
    *,
    name_map: NameMap = None,
    strict: bool = True,
    device: str | None = None,
    cast: bool = False,
    **settings: Any,
) -> LoadReport:
    """Load a safetensors checkpoint into ``module``'s parameters and buffers.

    Parameters
    ----------
    module
        A ``torch.nn.Module`` whose parameters are DTensors (after
        ``fully_shard``, ``parallelize_module`` or both on a 2-D mesh) or
        plain tensors. Each DTensor gets its local shard as its placements and
        this rank's mesh coordinate make it (``Shard(d)`` with
        ``torch.chunk`` sizes, uneven and empty included; ``Replicate``;
        nested shards; FSDP2's strided shards); plain tensors get the whole
        tensor. A module on the ``meta`` device is first given empty tensors
        on ``device`` (``module.to_empty``), then filled.
    path
        A ``.safetensors`` file, a list of them, a model directory, or an
        ``s3://``, ``http(s)://`` or ``hf://`` URL of one.
    name_map
        ``state_dict()`` key -> checkpoint name: a dict (keys it lacks map to
        themselves) or a callable. Default: the identity. Several keys may
        map to one name: it is read once and copied to each. transformers
        5's fused experts (``mlp.experts.gate_up_proj [E, 2I, H]``,
        ``down_proj [E, H, I]``) are built from per-expert tensors as
        transformers does (``experts.N.gate_proj/up_proj/down_proj`` or
        Mixtral's ``block_sparse_moe.experts.N.w1/w3/w2``), each rank
        reading only the boxes its placements cover (:mod:`gpuload.integrations.torch.fused`).
    strict
        Raise, before any read, when a key has no tensor in the checkpoint
        or a checkpoint tensor no key, as ``load_state_dict`` does; either
        way the report lists them (``missing``, ``unexpected``).
    device
        Where a meta module is materialized: default the job's current CUDA
        device when torch has initialized CUDA, else ``"cpu"``. Allocated
        modules load where their tensors are.
    cast
        False: a checkpoint dtype that differs from the parameter's is an
        error (before any read). True: convert to the parameter's dtype
        while copying.
    **settings
        :class:`~gpuload.Loader` settings (``threads``, ``chunk_bytes``...),
        and ``storage_options`` for a remote ``path`` (:mod:`gpuload.read.remote`).

    Returns
    -------
    LoadReport
        Bytes read (only the local shards', plus covering-read gaps), time,
        and the missing / unexpected keys.

    Notes
    -----
    On the CPU, a contiguous local tensor of the stored dtype is filled in
    place by the reads (``Loader._load(into=...)``): no result buffer and no
    copy. A load that fails part-way then leaves the module partly updated,
    as ``load_state_dict`` does; the error says what failed.

    Raises
    ------
    RuntimeError
        ``strict`` and the module and checkpoint disagree on names.
    ShardingError
        A shape mismatch, a placement with no checkpoint slice (``Partial``)
        or a local shard gpuload cannot read as one box; before any I/O.
    TypeError
        A dtype mismatch without ``cast=True``.
    BackendUnavailable
        ``device="cuda..."`` where torch sees no CUDA device; before the
        module is touched.
    """
    import torch

    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():  # before anything is materialized
        raise BackendUnavailable(
            f"load_into(device={device!r}): this torch ({torch.__version__}) sees no CUDA "
            "device (a CPU-only build, or no GPU); pass device='cpu'"
        )
    ckpt = open_checkpoint(path, settings.pop("storage_options", None))
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        _to_empty(module, device or current_device() or "cpu")
    mapping = _mapper(name_map)
    wanted, fused, missing, unexpected = _targets(module, mapping, ckpt.tensors)
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"Error(s) loading {ckpt.root or path} into {type(module).__name__}: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    infos, selections, locals_, devices = {}, {}, {}, set()
    copies: list[tuple[str, Any]] = []  # (name, local): a second key of one name
    for name, targets in wanted.items():
        info = ckpt.tensors[name]
        boxes: dict[tuple, str] = {}
        for t, key in targets:
            if tuple(t.shape) != info.shape:
                raise ShardingError(
                    f"{info.file}: {name!r} has shape {info.shape}, {key!r} {tuple(t.shape)}"
                )
            found = _local(t, name, info.shape)
            if found is None:
                continue  # this rank is outside the tensor's mesh
            local, box = found
            want = tuple(b - a for a, b in box)
            if tuple(local.shape) != want:  # a placement our box math gets wrong
                raise ShardingError(f"{name!r}: local shard {tuple(local.shape)}, box {box}")
            stored = getattr(torch, info.dtype.torch or "uint8")
            if stored != local.dtype and not cast:
                raise TypeError(
                    f"{info.file}: {name!r} is {info.dtype.name}, {key!r} is {local.dtype}; "
                    "pass cast=True to convert"
                )
            devices.add(str(local.device))
            if boxes and box not in boxes:  # one read per name: one box per name
                raise ShardingError(
                    f"{info.file}: {name!r} is mapped to {boxes[next(iter(boxes))]!r} and "
                    f"{key!r}, whose local shards differ ({next(iter(boxes))} vs {box}); "
                    "load them with separate load_into calls"
                )
            if boxes:
                copies.append((name, local))
                continue
            boxes[box] = key
            infos[name], selections[name] = box_read(info, box)
            locals_[name] = local
    parts = []  # (checkpoint name, local tensor, index): pieces of fused experts
    for key, (t, sources, kind) in fused.items():
        shape = _fused_shape(ckpt, key, sources, kind)
        if tuple(t.shape) != shape:
            raise ShardingError(
                f"{key!r} has shape {tuple(t.shape)}, its {len(sources)} experts "
                f"({sources[0][0]!r}...) make {shape}"
            )
        found = _local(t, key, shape)
        if found is None:
            continue
        local, box = found
        devices.add(str(local.device))
        for piece in pieces(sources, kind, box, shape):
            info = ckpt.tensors[piece.source]
            stored = getattr(torch, info.dtype.torch or "uint8")
            if stored != local.dtype and not cast:
                raise TypeError(
                    f"{info.file}: {piece.source!r} is {info.dtype.name}, {key!r} is "
                    f"{local.dtype}; pass cast=True to convert"
                )
            if piece.source in infos:
                raise ShardingError(f"{piece.source!r} is read for {key!r} and another key")
            infos[piece.source], selections[piece.source] = box_read(info, piece.box)
            parts.append((piece.source, local, piece.dest))
    if len(devices) > 1:
        raise ValueError(f"parameters on several devices {sorted(devices)}: load each part")

    def rule(name: str, shape: tuple[int, ...]) -> Selection:
        return selections[name]

    boxed = dataclasses.replace(ckpt, tensors=infos)
    device = devices.pop() if devices else "cpu"
    # On the CPU the reads land in the module's own tensors where they can
    # (contiguous, the stored dtype): no second buffer and no copy after.
    into = {
        n: _bytes_of(t) for n, t in locals_.items() if device == "cpu" and _fillable(t, infos[n])
    }
    with Loader(device=device, framework="torch", **settings) as ld:
        tensors, report = ld._load(boxed, 0, 1, rules=rule, return_report=True, into=into)
    with torch.no_grad():
        for name, local in locals_.items():
            if name not in into:
                local.copy_(tensors.pop(name).view(local.shape))
        for name, local in copies:  # read once, copied to each further key
            local.copy_(locals_[name])
        for name, local, dest in parts:  # fused experts: each piece in its place
            part = local[dest]
            part.copy_(tensors.pop(name).view(part.shape))
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        report.rank, report.world = dist.get_rank(), dist.get_world_size()
    report.file_bytes = sum(i.nbytes for i in ckpt.tensors.values())
    report.missing, report.unexpected = missing, unexpected
    return report


def _fused_shape(ckpt, key: str, sources: list[list[str]], kind: str) -> tuple[int, ...]:
    """The global shape transformers gives ``key``: ``[E, 2I, H]`` from
    gate and up ``[I, H]``, ``[E, H, I]`` from down ``[H, I]``; every
    expert's tensors of one shape."""
    shapes = {ckpt.tensors[n].shape for group in sources for n in group}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ShardingError(f"{key!r}: its expert tensors have shapes {sorted(shapes)}")
    rows, cols = next(iter(shapes))
    return (len(sources), 2 * rows, cols) if kind == "gate_up" else (len(sources), rows, cols)


def _fillable(t, info) -> bool:
    """Whether the load can write ``t``'s bytes in place: a contiguous CPU
    tensor of the stored dtype (a cast needs the stored bytes first)."""
    import torch

    stored = getattr(torch, info.dtype.torch or "", None)
    return t.device.type == "cpu" and t.is_contiguous() and t.dtype == stored and t.numel() > 0


def _bytes_of(t):
    """A writable 1-D uint8 numpy view of a contiguous CPU tensor's memory."""
    import torch

    return t.detach().reshape(-1).view(torch.uint8).numpy()


__all__ = ["load_into"]
