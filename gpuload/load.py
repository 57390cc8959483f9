"""``load_sharded``: the one-call API, a :class:`~gpuload.loader.Loader` made,
used for one load and closed; its docstring is the reference for every keyword."""

from __future__ import annotations

from typing import Any

from gpuload import options as _options
from gpuload.group import current_device, ranks
from gpuload.load_plan import PathLike, _per_load, check_rank
from gpuload.loader import Loader


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
