"""Which part of each tensor one tensor-parallel rank owns, as vLLM shards it.

A :class:`Sharder` maps ``(name, shape, rank, world)`` to the
:class:`~gpuload.sharding.selection.Selection` the rank owns. The mapping is data: an
ordered table of ``(regex, spec)`` rules per model family, searched with
``re.search``, first match wins. Caller rules (a dict or a callable) are
consulted before the built-in table. Sharding counts elements, not bytes;
dtype widths and sub-byte packing are the planner's business.

The specs and tables live in :mod:`gpuload.sharding.rules`. This module reads
the config, matches each name to its rule and dispatches; the per-spec splits
are in :mod:`gpuload.sharding.apply`, the cutting arithmetic in
:mod:`gpuload.sharding.cuts`.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from gpuload.errors import ShardingError
from gpuload.sharding import quant, scales
from gpuload.sharding.apply import SpecSplits
from gpuload.sharding.rules import (
    MODEL_TYPES,
    QUANT_FAMILIES,
    RULE_TABLES,
    Expert,
    Replicate,
    Spec,
    Split,
)
from gpuload.sharding.rules_vision import VISION as _VISION
from gpuload.sharding.rules_vision import VISION_DATA, VISION_FAMILIES, VISION_WEIGHTS
from gpuload.sharding.selection import Selection

_COMPILED: dict[tuple[str, str, str], tuple[tuple[str, re.Pattern[str], Spec], ...]] = {}
VISION_TP = ("weights", "data")


def _compiled(family: str, vision: str, mode: str):
    """The vision rules of ``vision`` in ``mode``, the catch-all, then the
    text family's table: compiled once per combination."""
    key = (family, vision, mode)
    if key not in _COMPILED:
        table = (VISION_DATA if mode == "data" else VISION_WEIGHTS)[vision]
        rules = table + _VISION + RULE_TABLES[family]
        _COMPILED[key] = tuple((p, re.compile(p), s) for p, s in rules)
    return _COMPILED[key]


_SHORTHANDS: Mapping[str, Spec] = {"replicate": Replicate(), "row": Split(0), "column": Split(1)}
# The index of a repeated layer, block or expert (a whole dotted component of
# digits after one of these names); other indices (Qwen-VL's merger.mlp.0 and
# mlp.2) can select different rules, so they stay in the key.
_INDEX = re.compile(r"(?<=\.)(layers|blocks|experts|h|layer)\.\d+(?=\.)")


def _as_spec(value: Any, where: str) -> Spec | Selection:
    # A Selection is taken as it is: exactly what the rank reads (the
    # DTensor loader's boxes, gpuload.integrations.torch.boxes).
    if isinstance(value, Spec | Selection):
        return value
    if isinstance(value, str) and value in _SHORTHANDS:
        return _SHORTHANDS[value]
    if isinstance(value, int) and not isinstance(value, bool):
        return Split(value)
    raise TypeError(
        f"{where}: {value!r} is not a spec; use Replicate(), Split(...), Heads(...), "
        "FusedQKV(), Vocab(), Expert(...), 'replicate', 'row', 'column' or an int dim"
    )


def _source(value: Any, keyword: str, config: Mapping[str, Any], where: str, *keys: str) -> str:
    """Where a count came from, for messages: the keyword, or the config key."""
    if value is not None:
        return f"the keyword {keyword}={value!r}"
    key = next((k for k in keys if config.get(k) is not None), None)
    return f"{where} {key}" if key else ""


def _count(label: str, value: Any, config: Mapping[str, Any], *keys: str) -> int | None:
    """``value`` if given, else the first of ``keys`` in the config; a positive int.

    A bad argument is the caller's ValueError; a bad config.json value is
    bad input, a ShardingError (the loader adds the file's path)."""
    bad = ValueError
    for key in keys if value is None else ():
        label, value, bad = f"config.json {key}", config.get(key), ShardingError
        if value is not None:
            break
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise bad(f"{label}={value!r} has to be a positive int")
    return value


def _compile_rule(pattern: str, value: Any) -> tuple[str, re.Pattern[str], Spec]:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"rules: bad pattern {pattern!r}: {e}") from None
    return pattern, regex, _as_spec(value, f"rules[{pattern!r}]")


class Sharder(SpecSplits):
    """Decides, per tensor, what one tensor-parallel rank loads.

    Parameters
    ----------
    config
        The parsed HF ``config.json`` (may be empty). ``model_type`` picks the
        rule table; head and expert counts are read from it.
    rules
        Caller rules, consulted before the built-in table: a dict
        ``{regex: spec}`` searched in order, or a callable
        ``(name, shape) -> spec | None`` (None falls through). A spec is a
        spec object or ``"replicate"``, ``"row"`` (dim 0), ``"column"``
        (dim 1) or an int dim, or a :class:`~gpuload.sharding.selection.Selection`:
        exactly what the rank reads, whatever ``rank`` and ``world``.
    num_heads, num_kv_heads, num_experts, qkv_sections
        Override the config: attention and key/value head counts, routed
        expert count, and fused qkv section sizes ``(q, k, v)`` in elements.
    expert_parallel
        Give each rank whole experts (contiguous blocks, remainder to the
        lowest ranks) instead of splitting every expert.
    allow_uneven
        Accept dimensions that do not divide by the world size and split them
        like ``torch.chunk``: ``per = ceil(size / world)``, rank ``r`` takes
        ``[r * per, min(size, (r + 1) * per))``, possibly nothing. Head counts
        must still divide (a head cannot be cut).
    shapes
        Every tensor's shape in the checkpoint (name -> shape). With it, a
        quantization scale no caller rule claims (``X.weight_scale_inv``,
        ``X.weight_scale``, ...) follows the shard of its weight ``X.weight``
        (see :mod:`gpuload.sharding.scales`).
    weight_block_size
        ``(out, in)`` elements per quantization block of block-scaled weights;
        default: ``quantization_config.weight_block_size`` in the config.
    vision_tp
        vLLM's ``mm_encoder_tp_mode``: ``"weights"`` (default, as vLLM's)
        splits the vision encoder's linears over the ranks; ``"data"`` keeps
        the encoder whole on every rank, in the families where vLLM supports
        it (Qwen2/2.5/3-VL, Llama 4); the others stay ``"weights"`` as vLLM
        falls back.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        rules: Mapping[str, Spec | str | int] | Callable[..., Any] | None = None,
        *,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        num_experts: int | None = None,
        qkv_sections: tuple[int, int, int] | None = None,
        expert_parallel: bool = False,
        allow_uneven: bool = False,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        weight_block_size: tuple[int, int] | None = None,
        vision_tp: str = "weights",
        config_path: str | None = None,
    ) -> None:
        if vision_tp not in VISION_TP:
            raise ValueError(f"vision_tp={vision_tp!r} has to be one of {VISION_TP}")
        config = dict(config or {})
        vision = VISION_FAMILIES.get(str(config.get("model_type")), "generic")
        self.vision_tp = "data" if vision_tp == "data" and vision in VISION_DATA else "weights"
        vcfg = config.get("vision_config")
        vcfg = vcfg if isinstance(vcfg, Mapping) else {}
        self.vision_heads = _count("vision heads", None, vcfg, "num_attention_heads", "num_heads")
        self.shapes = dict(shapes or {})
        self.blocks = scales.block_sizes(config, weight_block_size)
        self.quant = quant.detect(config)  # GPTQ, AWQ, compressed-tensors packed
        self.blocks_from = scales.block_source(weight_block_size)
        # Multimodal configs (Gemma 3, LLaVA, Mistral 3) keep the text model's
        # type and head counts in text_config; top-level keys win.
        text = config.get("text_config")
        if isinstance(text, Mapping):
            top_type = str(config.get("model_type"))
            config = {**text, **config}
            if top_type not in MODEL_TYPES:
                config["model_type"] = text.get("model_type")
        self.family = MODEL_TYPES.get(str(config.get("model_type")), "generic")
        self.config = config  # text_config merged: read by ConfigSections rules
        qcfg = config.get("quantization_config")
        method = str(qcfg.get("quant_method")) if isinstance(qcfg, Mapping) else ""
        self.family = QUANT_FAMILIES.get((self.family, method), self.family)
        self._rules = _compiled(self.family, vision, self.vision_tp)
        self.num_heads = _count("num_heads", num_heads, config, "num_attention_heads", "n_head")
        kv = _count("num_kv_heads", num_kv_heads, config, "num_key_value_heads")
        self.num_kv_heads = kv or self.num_heads
        where = config_path or "config.json"
        self._from = {
            "num_heads": _source(
                num_heads, "num_heads", config, where, "num_attention_heads", "n_head"
            ),
            "num_kv_heads": _source(
                num_kv_heads if kv else num_heads,
                "num_kv_heads" if kv else "num_heads",
                config,
                where,
                *(("num_key_value_heads",) if kv else ("num_attention_heads", "n_head")),
            ),
            "vision_heads": _source(
                None, "", vcfg, f"{where} vision_config", "num_attention_heads", "num_heads"
            ),
        }
        if self.num_heads and self.num_kv_heads > self.num_heads:
            raise ShardingError(
                f"{self.num_kv_heads} kv heads (from {self._from['num_kv_heads']}) exceed "
                f"{self.num_heads} heads (from {self._from['num_heads']}): a model has at most "
                "as many key/value heads as query heads"
            )
        self._head_dims: dict[tuple[str, bool], tuple[int, str, str]] = {}
        self.hidden = _count("hidden_size", None, config, "hidden_size")
        keys = ("num_local_experts", "num_experts", "n_routed_experts")
        self.num_experts = _count("num_experts", num_experts, config, *keys)
        if qkv_sections is not None:
            qkv_sections = tuple(_count("qkv_sections", s, {}) for s in qkv_sections)
            if len(qkv_sections) != 3 or None in qkv_sections:
                raise ValueError(f"{qkv_sections=} has to be three sizes (q, k, v)")
        self.qkv_sections = qkv_sections
        self.expert_parallel = bool(expert_parallel)
        self.allow_uneven = bool(allow_uneven)
        self._rule_fn = rules if callable(rules) and not isinstance(rules, Mapping) else None
        self._caller = ()
        if isinstance(rules, Mapping):
            self._caller = tuple(_compile_rule(p, v) for p, v in rules.items())
        elif rules is not None and self._rule_fn is None:
            raise TypeError(f"rules has to be a dict or a callable, got {type(rules).__name__}")
        # A checkpoint repeats a few tensor shapes over layers and experts
        # (DeepSeek-V3: ~94k tensors). The built-in match depends on a name
        # only up to its layer and expert indices, and a split only on
        # (spec, shape, rank, world): both are remembered.
        self._matched: dict[str, tuple[str | None, Spec | None]] = {}
        self._applied: dict[tuple[Any, ...], Selection | None] = {}

    def select(self, name: str, shape: tuple[int, ...], rank: int, world: int) -> Selection | None:
        """The part of tensor ``name`` that ``rank`` of ``world`` owns.

        Parameters
        ----------
        name
            The tensor's name in the checkpoint.
        shape
            Its full shape, in elements.
        rank, world
            This rank and the tensor-parallel world size.

        Returns
        -------
        Selection or None
            ``None`` when the rank holds no part of the tensor (another rank's
            expert under expert parallelism). ``Selection.rule`` names the
            matching rule; ``None``: no rule matched, replicated as unknown.

        Raises
        ------
        ValueError
            ``world < 1`` or ``rank`` outside ``[0, world)``.
        ShardingError
            The tensor cannot be split as its rule asks (a dimension that does
            not divide, unknown or indivisible head or expert counts).
        """
        try:  # any integral type (numpy, torch scalars), not bools or floats
            if isinstance(rank, bool) or isinstance(world, bool):
                raise TypeError
            rank, world = operator.index(rank), operator.index(world)
        except TypeError:
            raise TypeError(f"rank and world have to be ints, got {rank=!r}, {world=!r}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need world >= 1 and 0 <= rank < world, got {rank=}, {world=}")
        shape = tuple(shape)
        rule, spec = self._match(name, shape)
        if spec is None and (packed := quant.tensor_of(name, self.quant, self.shapes)):
            return quant.select(
                name,
                shape,
                *packed,
                self.quant,
                self.shapes,
                lambda weight, wshape: self.select(weight, wshape, rank, world),
            )
        if spec is None and (weight := scales.weight_of(name, self.shapes)) is not None:
            wshape = tuple(self.shapes[weight])
            sel = self.select(weight, wshape, rank, world)
            experts = isinstance(self._match(weight, wshape)[1], Expert)
            return scales.follow(
                name, shape, weight, wshape, sel, self.blocks, experts, self.blocks_from
            )
        if spec is None:
            if len(shape) <= 1:  # norms, biases and scalars no rule claimed
                return Selection.whole(shape, "replicated", "1-d" if shape else "scalar")
            return Selection.whole(shape, "replicated", None)
        return self._apply(spec, rule, name, shape, rank, world)

    def _match(self, name: str, shape: tuple[int, ...]) -> tuple[str | None, Spec | None]:
        for pattern, regex, spec in self._caller:
            if regex.search(name):
                return pattern, spec
        if self._rule_fn is not None and (value := self._rule_fn(name, shape)) is not None:
            label = getattr(self._rule_fn, "__name__", type(self._rule_fn).__name__)
            return f"callable:{label}", _as_spec(value, f"rules({name!r})")
        key = _INDEX.sub(r"\1.#", name)  # built-in patterns never name a layer's index
        hit = self._matched.get(key)
        if hit is None:
            hit = next(
                ((pattern, spec) for pattern, regex, spec in self._rules if regex.search(name)),
                (None, None),
            )
            self._matched[key] = hit
        return hit


__all__ = ["Sharder"]
