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
here are listed by :func:`plan_writers` before any weight is written.
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


def _copy(name: str, dst: torch.Tensor, src: torch.Tensor, what: str = "") -> None:
    if src.dim() == 0 and dst.dim() == 1 and dst.numel() == 1:
        src = src.reshape(1)
    if tuple(dst.shape) != tuple(src.shape):
        raise ShardMismatch(
            f"{name}{what}: gpuload's shard has shape {tuple(src.shape)}, vLLM's parameter "
            f"part {tuple(dst.shape)}; use --load-format auto for this model"
        )
    dst.copy_(src)


class Writers:
    """The writers of one model, and the parameters they have filled."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.written: set[int] = set()
        self.writers: dict[str, tuple[torch.nn.Parameter, Writer]] = {}
        self.unsupported: list[str] = []
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
            full, lambda param, loaded_weight, *a, **k: _copy(full, param.data, loaded_weight)
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
            full, lambda param, loaded_weight, *a, **k: _copy(full, param.data, loaded_weight)
        )

    def _mark(self, full: str, write: Writer) -> Writer:
        def writer(param, loaded_weight, *args, **kwargs):  # vLLM passes both by keyword too
            result = write(param, loaded_weight, *args, **kwargs)
            self.written.add(id(param))
            return result

        writer.__qualname__ = f"gpuload writer of {full}"
        return writer

    # -- the writers --------------------------------------------------------

    @staticmethod
    def _qkv(full: str, module: Any, dim: int | None) -> Writer:
        q = module.num_heads * module.head_size
        kv = module.num_kv_heads * module.head_size
        v = module.num_kv_heads * module.v_head_size
        sections = {"q": (0, q), "k": (q, kv), "v": (q + kv, v)}

        def write(param, loaded_weight, shard_id=None, loaded_shard_id=None):
            shard_id = loaded_shard_id if shard_id is None else shard_id
            if shard_id is None or dim is None:  # fused on disk: q | k | v already cut
                return _copy(full, param.data, loaded_weight)
            start, size = sections[shard_id]
            _copy(full, param.data.narrow(dim, start, size), loaded_weight, f" [{shard_id}]")

        return write

    @staticmethod
    def _merged(full: str, module: Any, dim: int | None) -> Writer:
        tp = module.tp_size
        sizes = [s // tp for s in module.output_sizes]

        def write(param, loaded_weight, shard_id=None, loaded_shard_id=None):
            shard_id = loaded_shard_id if shard_id is None else shard_id
            if shard_id is None or dim is None:  # fused on disk (gate | up), already cut
                return _copy(full, param.data, loaded_weight)
            if not isinstance(shard_id, int):
                raise ShardMismatch(f"{full}: sections {shard_id} at once are not supported")
            start = sum(sizes[:shard_id])
            _copy(
                full,
                param.data.narrow(dim, start, sizes[shard_id]),
                loaded_weight,
                f" [{shard_id}]",
            )

        return write

    @staticmethod
    def _vocab(full: str, module: Any) -> Writer:
        idx = module.shard_indices
        rows = idx.org_vocab_end_index - idx.org_vocab_start_index

        def write(param, loaded_weight, *args):
            if getattr(param, "output_dim", None) is None:
                return _copy(full, param.data, loaded_weight)
            _copy(full, param.data[:rows], loaded_weight, " (real vocabulary rows)")
            param.data[rows:].fill_(0)  # the padding rows, as vLLM leaves them

        return write

    @staticmethod
    def _experts(full: str, module: Any) -> Writer:
        gated = module.moe_config.is_act_and_mul

        def write(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            local = module._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:
                return False if return_success else None
            dst = param.data[local]
            if shard_id in ("w1", "w3") and gated:
                half = dst.shape[0] // 2
                dst = dst.narrow(0, 0 if shard_id == "w1" else half, half)
            _copy(full, dst, loaded_weight, f" [expert {expert_id} {shard_id}]")
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
