"""Writers that put one rank's pre-cut shards into vLLM's parameters.

vLLM's own weight loaders take full checkpoint tensors and narrow them to the
rank's part. gpuload has already read only that part, so each parameter's
``weight_loader`` is swapped, for the duration of one load, for a writer
that copies the shard where vLLM would have put its narrow: the whole
parameter, a stacked section of ``qkv_proj``/``gate_up_proj``, the real rows
of a padded vocabulary shard, or one expert's slice of ``w13``/``w2``. The
model's own ``load_weights`` still maps checkpoint names to parameters
(stacked names, tied embeddings, expert ids), so that logic is vLLM's.

Every writer checks the shard's shape against its destination: a shard cut
differently from what vLLM expects raises, naming the parameter, instead of
loading silently wrong weights. Parameters of any layer type not handled
here are listed in :attr:`Writers.unsupported` before any weight is written.

:meth:`Writers.destinations` runs the model's ``load_weights`` once on
shape-only (meta) stand-ins of the shards, with writers that record where
each would go instead of writing: every shape is checked before any read,
and the loader can then read a shard straight into its destination (the
parameter, or a contiguous section of it) instead of into a buffer of its
own. A writer handed a shard that already lies in its destination has
nothing left to copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from gpuload.errors import GpuloadError

Writer = Callable[..., Any]


class ShardMismatch(GpuloadError):
    """A shard's shape is not the part of the parameter vLLM would fill."""


def _check(name: str, dst: torch.Tensor, src: torch.Tensor, what: str = "") -> torch.Tensor:
    if src.dim() == 0 and dst.dim() == 1 and dst.numel() == 1:
        src = src.reshape(1)
    if tuple(dst.shape) != tuple(src.shape):
        raise ShardMismatch(
            f"{name}{what}: gpuload's shard has shape {tuple(src.shape)}, vLLM's parameter "
            f"part {tuple(dst.shape)}; use --load-format auto for this model"
        )
    return src


def _in_place(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether ``src`` is ``dst`` already: the same memory, read there."""
    return (
        src.device == dst.device
        and src.dtype == dst.dtype
        and src.data_ptr() == dst.data_ptr()
        and src.stride() == dst.stride()
    )


def _whole_view(view: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``view`` holds all of ``base``'s elements, in the same order."""
    return (
        view.numel() == base.numel()
        and view.storage_offset() == base.storage_offset()
        and view.is_contiguous()
        and base.is_contiguous()
    )


class Writers:
    """The writers of one model, and the parameters they have filled."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.written: set[int] = set()
        self.writers: dict[str, tuple[torch.nn.Parameter, Writer]] = {}
        self.unsupported: list[str] = []
        # While :meth:`destinations` runs: (shard, destination) pairs, no writes.
        self._found: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.copied = 0  # bytes the writers copied (not read in place)
        seen: set[int] = set()
        for mname, module in model.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                if id(param) in seen:  # tied: one parameter, one writer
                    continue
                seen.add(id(param))
                full = f"{mname}.{pname}" if mname else pname
                writer = self._writer(full, module, pname, param)
                if writer is None:
                    self.unsupported.append(f"{full} ({type(module).__name__})")
                else:
                    self.writers[full] = (param, writer)

    # -- choosing a writer ------------------------------------------------

    def _writer(self, full: str, module: Any, pname: str, param: Any) -> Writer | None:
        if isinstance(module, LinearBase):
            return self._linear(full, module, param)
        if isinstance(module, VocabParallelEmbedding):
            if module.num_added_embeddings or module.quant_method.__class__.__name__ != (
                "UnquantizedEmbeddingMethod"
            ):
                return None
            return self._mark(full, self._vocab(full, module))
        if isinstance(module, RoutedExperts):
            if pname not in ("w13_weight", "w2_weight", "w13_bias", "w2_bias"):
                return None
            if getattr(param, "is_transposed", False):
                return None
            return self._mark(full, self._experts(full, module))
        loader = getattr(param, "weight_loader", default_weight_loader)
        if loader is not default_weight_loader:
            return None  # a layer with its own loading rule we do not know
        return self._mark(
            full, lambda param, loaded_weight, *a, **k: self._put(full, param.data, loaded_weight)
        )

    def _linear(self, full: str, module: Any, param: Any) -> Writer | None:
        if module.quant_method.__class__.__name__ != "UnquantizedLinearMethod":
            return None
        dim = getattr(param, "output_dim", None)
        base = next((b for b in _LINEAR if isinstance(module, b)), None)
        if base is None or any(
            getattr(type(module), f, None) is not getattr(base, f, None) for f in _LOADERS
        ):
            return None  # a subclass with a loading rule of its own
        if base is QKVParallelLinear:
            return self._mark(full, self._qkv(full, module, dim))
        if base is MergedColumnParallelLinear:
            return self._mark(full, self._merged(full, module, dim))
        # Column, row, replicated (and subclasses such as MoE's GateLinear
        # that keep their loaders): the shard is the whole parameter.
        return self._mark(
            full, lambda param, loaded_weight, *a, **k: self._put(full, param.data, loaded_weight)
        )

    def _mark(self, full: str, write: Writer) -> Writer:
        def writer(param, loaded_weight, *args, **kwargs):  # vLLM passes both by keyword too
            result = write(param, loaded_weight, *args, **kwargs)
            if self._found is None:
                self.written.add(id(param))
            return result

        writer.__qualname__ = f"gpuload writer of {full}"
        return writer

    # -- the writers --------------------------------------------------------

    def _put(self, name: str, dst: torch.Tensor, src: torch.Tensor, what: str = "") -> None:
        """Check ``src`` against ``dst``, then record the pair (while
        :meth:`destinations` runs) or copy, unless it was read in place."""
        src = _check(name, dst, src, what)
        if self._found is not None:
            self._found.append((src, dst))
        elif not _in_place(dst, src):
            dst.copy_(src)
            self.copied += dst.numel() * dst.element_size()

    def _qkv(self, full: str, module: Any, dim: int | None) -> Writer:
        q = module.num_heads * module.head_size
        kv = module.num_kv_heads * module.head_size
        v = module.num_kv_heads * module.v_head_size
        sections = {"q": (0, q), "k": (q, kv), "v": (q + kv, v)}

        def write(param, loaded_weight, shard_id=None, loaded_shard_id=None):
            shard_id = loaded_shard_id if shard_id is None else shard_id
            if shard_id is None or dim is None:  # fused on disk: q | k | v already cut
                return self._put(full, param.data, loaded_weight)
            start, size = sections[shard_id]
            self._put(full, param.data.narrow(dim, start, size), loaded_weight, f" [{shard_id}]")

        return write

    def _merged(self, full: str, module: Any, dim: int | None) -> Writer:
        tp = module.tp_size
        sizes = [s // tp for s in module.output_sizes]

        def write(param, loaded_weight, shard_id=None, loaded_shard_id=None):
            shard_id = loaded_shard_id if shard_id is None else shard_id
            if shard_id is None or dim is None:  # fused on disk (gate | up), already cut
                return self._put(full, param.data, loaded_weight)
            if not isinstance(shard_id, int):
                raise ShardMismatch(f"{full}: sections {shard_id} at once are not supported")
            start = sum(sizes[:shard_id])
            self._put(
                full,
                param.data.narrow(dim, start, sizes[shard_id]),
                loaded_weight,
                f" [{shard_id}]",
            )

        return write

    def _vocab(self, full: str, module: Any) -> Writer:
        idx = module.shard_indices
        rows = idx.org_vocab_end_index - idx.org_vocab_start_index

        def write(param, loaded_weight, *args):
            if getattr(param, "output_dim", None) is None:
                return self._put(full, param.data, loaded_weight)
            self._put(full, param.data[:rows], loaded_weight, " (real vocabulary rows)")
            if self._found is None:
                param.data[rows:].fill_(0)  # the padding rows, as vLLM leaves them

        return write

    def _experts(self, full: str, module: Any) -> Writer:
        gated = module.moe_config.is_act_and_mul

        def write(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            local = module._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:
                return False if return_success else None
            dst = param.data[local]
            if shard_id in ("w1", "w3") and gated:
                half = dst.shape[0] // 2
                dst = dst.narrow(0, 0 if shard_id == "w1" else half, half)
            self._put(full, dst, loaded_weight, f" [expert {expert_id} {shard_id}]")
            return True if return_success else None

        return write

    # -- installing ---------------------------------------------------------

    def __enter__(self) -> Writers:
        self._saved = {}
        for full, (param, writer) in self.writers.items():
            self._saved[full] = param.__dict__.get("weight_loader", _ABSENT)
            if hasattr(type(param), "weight_loader"):  # BasevLLMParameter: a property
                self._saved[full] = param._weight_loader
            param.weight_loader = writer
        return self

    def __exit__(self, *exc: object) -> None:
        for full, (param, _) in self.writers.items():
            old = self._saved[full]
            if hasattr(type(param), "weight_loader"):
                param._weight_loader = old
            elif old is _ABSENT:
                del param.weight_loader
            else:
                param.weight_loader = old

    def destinations(self, shards: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Where the model's ``load_weights`` puts each shard, without writing.

        ``shards``: checkpoint name -> a stand-in of the shard's shape and
        dtype (a meta tensor). Returns name -> the destinations its writers
        chose (parameters or views of them); a name whose stand-in the model
        transformed before a writer saw it has none. A shard that does not
        fit its destination raises :class:`ShardMismatch` here, before any
        read. Must run inside ``with self``."""
        by_id = {id(t): n for n, t in shards.items()}
        self._found = []
        try:
            self.model.load_weights(iter(list(shards.items())))
            found = self._found
        finally:
            self._found = None
        out: dict[str, list[torch.Tensor]] = {}
        for src, dst in found:
            name = by_id.get(id(src))
            if name is None and src._base is not None and _whole_view(src, src._base):
                name = by_id.get(id(src._base))  # e.g. FusedMoE's unsqueeze(0).unbind()
            if name is not None:
                out.setdefault(name, []).append(dst)
        return out

    def missing(self) -> list[str]:
        """Parameters no writer has filled."""
        return [n for n, (p, _) in self.writers.items() if id(p) not in self.written]


_ABSENT = object()
# Most derived first: a layer is written by the rule of the first it is.
_LINEAR = (
    QKVParallelLinear,
    MergedColumnParallelLinear,
    ColumnParallelLinear,
    RowParallelLinear,
    ReplicatedLinear,
)
_LOADERS = ("weight_loader", "weight_loader_v2")
