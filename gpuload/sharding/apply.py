"""Turning a matched spec into the part of a tensor one rank owns.

:class:`SpecSplits` holds the per-spec splits a
:class:`~gpuload.sharding.sharder.Sharder` dispatches to once a rule matched:
plain and fused splits, attention heads (checked for one head_dim per
attention block), fused qkv, padded vocab, config-sized sections and experts
(expert parallelism included). The Sharder supplies the counts and options
it read from the config; the cutting arithmetic is :mod:`~gpuload.sharding.cuts`.
"""

from __future__ import annotations

import math
import re
from typing import Any

from gpuload.errors import ShardingError
from gpuload.sharding.cuts import _chunk, _heads, _intermediate, _selection, expert_block
from gpuload.sharding.rules import (
    ConfigSections,
    Expert,
    FirstRank,
    FusedQKV,
    Heads,
    Intermediate,
    Replicate,
    Split,
    Vocab,
)
from gpuload.sharding.selection import Selection

_EXPERT_INDEX = re.compile(r"(^|\.)experts\.(\d+)\.")
_QKV = frozenset({"q_proj", "k_proj", "v_proj"})
_GATED_Q = frozenset({"qwen3_next"})  # q_proj: each head's query, then its output gate


class SpecSplits:
    """The per-spec splits of :class:`~gpuload.sharding.sharder.Sharder`.

    A mixin: the Sharder sets the attributes annotated here in its
    ``__init__``.
    """

    family: str
    config: dict[str, Any]
    num_heads: int | None
    num_kv_heads: int | None
    vision_heads: int | None
    num_experts: int | None
    hidden: int | None
    qkv_sections: tuple[int, ...] | None
    expert_parallel: bool
    allow_uneven: bool
    _from: dict[str, str]
    _head_dims: dict[tuple[str, bool], tuple[int, str, str]]
    _applied: dict[tuple[Any, ...], Selection | None]

    def _apply(self, spec, rule, name, shape, rank, world) -> Selection | None:
        if isinstance(spec, Selection):
            return spec
        if isinstance(spec, Expert):  # expert parallelism reads the index in the name
            return self._expert(spec, rule, name, shape, rank, world)
        if isinstance(spec, Heads):
            self._check_head_dim(spec, rule, name, shape)
        key = (spec, rule, shape, rank, world)
        if key not in self._applied:  # errors are raised, never remembered
            self._applied[key] = self._split(spec, rule, name, shape, rank, world)
        return self._applied[key]

    def _split(self, spec, rule, name, shape, rank, world) -> Selection | None:
        if isinstance(spec, Replicate):
            return Selection.whole(shape, "replicated", rule)
        if isinstance(spec, FirstRank):
            return Selection.whole(shape, "replicated", rule) if rank == 0 else None
        if isinstance(spec, ConfigSections):
            return self._split(self._sections(spec, name), rule, name, shape, rank, world)
        dim = spec.dim if isinstance(spec, Split | FusedQKV | Intermediate) else 0
        if not -len(shape) <= dim < len(shape):
            raise ShardingError(f"{name!r}: rule {rule!r} splits dim {dim}, but shape is {shape}")
        dim %= len(shape)
        size = shape[dim]
        if isinstance(spec, Split):
            n = spec.sections
            sizes = (size // n,) * n if isinstance(n, int) else n
            if sum(sizes) != size:
                raise ShardingError(f"{name!r}: dim {dim} of size {size} cannot hold sections {n}")
            fused = len(sizes) > 1
            parts = [
                _chunk(
                    name,
                    f"dim {dim} section {i}" if fused else f"dim {dim}",
                    s,
                    rank,
                    world,
                    self.allow_uneven,
                )
                for i, s in enumerate(sizes)
            ]
            kind = "fused" if fused else "row" if dim == 0 else "column"
            return _selection(shape, dim, sizes, parts, kind, rule)
        if isinstance(spec, Vocab):
            return self._vocab(spec, rule, name, shape, rank, world)
        if isinstance(spec, Intermediate):
            return _intermediate(spec, rule, name, shape, dim, rank, world)
        if isinstance(spec, Heads):
            count = "vision_heads" if spec.vision else "num_kv_heads" if spec.kv else "num_heads"
            heads = self._need(count, name, rule)
            part = _heads(name, size, heads, rank, world, spec.kv, self._from[count])
            kind = "kv-replicated" if spec.kv and world > heads else "row"
            return _selection(shape, 0, (size,), [part], kind, rule)
        return self._fused_qkv(rule, name, shape, dim, rank, world, spec.vision)

    def _vocab(self, spec, rule, name, shape, rank, world) -> Selection:
        size = shape[0]
        padded = -(-size // spec.pad_to) * spec.pad_to
        if padded % world and not self.allow_uneven:
            raise ShardingError(
                f"{name!r}: dim 0 (vocab) of size {size}, padded to {padded} as vLLM does, "
                f"does not divide evenly by world size {world}; "
                "pass allow_uneven=True for a torch.chunk-style split",
                keywords=("allow_uneven=True",),
            )
        per = -(-padded // world)  # padded // world, unless allow_uneven let it through
        start = min(size, rank * per)
        return _selection(shape, 0, (size,), [(start, min(size, start + per) - start)], "row", rule)

    def _fused_qkv(self, rule, name, shape, dim, rank, world, vision) -> Selection:
        """q | k | v sections along ``dim``, each split by its own head count."""
        heads = self._need("vision_heads" if vision else "num_heads", name, rule)
        kv_heads = heads if vision else self._need("num_kv_heads", name, rule)
        size = shape[dim]
        head_dim = size // (heads + 2 * kv_heads)
        sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        sizes = sizes if vision or self.qkv_sections is None else self.qkv_sections
        hsrc = self._from["vision_heads" if vision else "num_heads"]
        ksrc = hsrc if vision else self._from["num_kv_heads"]
        if sum(sizes) != size:
            raise ShardingError(
                f"{name!r}: dim {dim} of size {size} is not q | k | v as {sizes} ({heads} heads "
                f"from {hsrc}, {kv_heads} kv heads from {ksrc}); pass num_heads=, num_kv_heads= "
                "or qkv_sections=",
                keywords=("num_heads=", "num_kv_heads=", "qkv_sections="),
            )
        counts = ((heads, False, hsrc), (kv_heads, True, ksrc), (kv_heads, True, ksrc))
        parts = [
            _heads(name, s, h, rank, world, kv, src)
            for s, (h, kv, src) in zip(sizes, counts, strict=True)
        ]
        return _selection(shape, dim, sizes, parts, "fused", rule)

    def _sections(self, spec: ConfigSections, name: str) -> Split:
        sizes = []
        for keys in spec.sections:
            values = [self.config.get(k) for k in keys]
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ShardingError(
                    f"{name!r}: its sections need config.json {' * '.join(keys)}, got {values}"
                )
            sizes.append(math.prod(values))
        return Split(spec.dim, tuple(sizes))

    def _check_head_dim(self, spec: Heads, rule: str, name: str, shape: tuple[int, ...]) -> None:
        """``q_proj``, ``k_proj`` and ``v_proj`` of one attention block agree
        on head_dim: a head count the tensors' shapes contradict would cut
        heads apart. (Only these names: MLA's ``q_b_proj``/``kv_b_proj``
        carry other widths per head; Qwen3-Next's q_proj holds a gate too.)"""
        block, _, leaf = name.rpartition(".")[0].rpartition(".")
        if leaf not in _QKV or not shape:
            return
        count = "vision_heads" if spec.vision else "num_kv_heads" if spec.kv else "num_heads"
        heads = getattr(self, count)
        if heads is None or shape[0] % heads:
            return  # unknown, or _heads says what is wrong
        per = shape[0] // heads // (2 if leaf == "q_proj" and self.family in _GATED_Q else 1)
        seen = self._head_dims.setdefault((block, spec.vision), (per, name, count))
        if seen[0] != per:
            other_dim, other, other_count = seen
            raise ShardingError(
                f"{name!r}: {shape[0]} rows over {heads} {count} give head_dim {per}, but "
                f"{other!r} gives {other_dim} over {getattr(self, other_count)} {other_count}; "
                f"the head counts do not match the tensors (num_heads from "
                f"{self._from['num_heads']}, num_kv_heads from {self._from['num_kv_heads']})"
            )

    def _need(self, attr: str, name: str, rule: str) -> int:
        if (count := getattr(self, attr)) is None:
            raise ShardingError(
                f"{name!r}: rule {rule!r} splits by attention heads, but the head count is "
                "unknown; pass num_heads= (and num_kv_heads=) or provide config.json "
                "(vision_config.num_attention_heads for a vision encoder)",
                keywords=("num_heads=", "num_kv_heads="),
            )
        return count

    def _expert(self, spec, rule, name, shape, rank, world) -> Selection | None:
        if spec.stacked and isinstance(spec.inner, Split) and len(shape) != 3:
            raise ShardingError(
                f"{name!r}: rule {rule!r} expects [E, out, in] experts, got {shape}"
            )
        if spec.hidden is not None and self.hidden not in (None, shape[spec.hidden]):
            raise ShardingError(
                f"{name!r}: rule {rule!r} expects hidden_size {self.hidden} on dim "
                f"{spec.hidden} (vLLM loads this family's stacked experts transposed, "
                f"[E, in, out]), got {shape}; pass a rule for the other layout"
            )
        if not self.expert_parallel:
            return self._apply(spec.inner, rule, name, shape, rank, world)
        if spec.stacked:  # the tensor itself says how many experts there are
            if shape[0] != (self.num_experts or shape[0]):
                raise ShardingError(f"{name!r}: {shape[0]} experts, num_experts={self.num_experts}")
            first, count = expert_block(shape[0], rank, world)
            block = _selection(shape, 0, (shape[0],), [(first, count)], "expert", rule)
            return block if count else None
        if (match := _EXPERT_INDEX.search(name)) is None:
            raise ShardingError(f"{name!r}: rule {rule!r} is an expert rule, but no experts.<e>.")
        if self.num_experts is None:
            raise ShardingError(
                f"{name!r}: expert parallelism needs the expert count; pass num_experts= "
                "or provide config.json (num_local_experts / num_experts / n_routed_experts)",
                keywords=("num_experts=",),
            )
        if (expert := int(match[2])) >= self.num_experts:
            raise ShardingError(f"{name!r}: expert {expert} >= num_experts={self.num_experts}")
        first, count = expert_block(self.num_experts, rank, world)
        return Selection.whole(shape, "expert", rule) if first <= expert < first + count else None
