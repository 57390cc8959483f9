"""Which part of each tensor one tensor-parallel rank owns, as vLLM shards it.

A :class:`Sharder` maps ``(name, shape, rank, world)`` to the
:class:`~gpuload.sharding.selection.Selection` the rank owns. The mapping is data: an
ordered table of ``(regex, spec)`` rules per model family, searched with
``re.search``, first match wins. Caller rules (a dict or a callable) are
consulted before the built-in table. Sharding counts elements, not bytes;
dtype widths and sub-byte packing are the planner's business.

The specs and tables live in :mod:`gpuload.sharding.rules`; this module applies them.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from gpuload.errors import ShardingError
from gpuload.sharding import quant, scales
from gpuload.sharding.rules import (
    MODEL_TYPES,
    QUANT_FAMILIES,
    RULE_TABLES,
    ConfigSections,
    Expert,
    FirstRank,
    FusedQKV,
    Heads,
    Intermediate,
    Replicate,
    Spec,
    Split,
    Vocab,
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
_EXPERT_INDEX = re.compile(r"(^|\.)experts\.(\d+)\.")
# The index of a repeated layer, block or expert (a whole dotted component of
# digits after one of these names); other indices (Qwen-VL's merger.mlp.0 and
# mlp.2) can select different rules, so they stay in the key.
_INDEX = re.compile(r"(?<=\.)(layers|blocks|experts|h|layer)\.\d+(?=\.)")


def expert_block(num_experts: int, rank: int, world: int) -> tuple[int, int]:
    """The experts a rank owns under expert parallelism, as ``(first, count)``.

    Contiguous blocks, the remainder going to the lowest ranks: 10 experts
    over 4 ranks give 3, 3, 2, 2. ``count`` is 0 when ``num_experts < world``
    leaves the rank without an expert.
    """
    base, extra = divmod(num_experts, world)
    return rank * base + min(rank, extra), base + (rank < extra)


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


_QKV = frozenset({"q_proj", "k_proj", "v_proj"})
_GATED_Q = frozenset({"qwen3_next"})  # q_proj: each head's query, then its output gate


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


def _chunk(name: str, what: str, size: int, rank: int, world: int, uneven: bool) -> tuple[int, int]:
    """``(start, length)`` of the rank's even share of ``size`` elements."""
    if size % world and not uneven:
        raise ShardingError(
            f"{name!r}: {what} of size {size} does not divide evenly by world size {world}; "
            "pass allow_uneven=True for a torch.chunk-style split",
            keywords=("allow_uneven=True",),
        )
    per = -(-size // world)  # ceil: torch.chunk sizes, the last ranks short or empty
    start = min(size, rank * per)
    return start, min(size, start + per) - start


def _heads(
    name: str, size: int, heads: int, rank: int, world: int, kv: bool, source: str = ""
) -> tuple[int, int]:
    """``(start, length)`` of the rank's whole heads in ``size`` = heads * head_dim.
    ``source`` says where ``heads`` came from, for the errors."""
    label = "kv heads" if kv else "heads"
    whence = f"; the {heads} {label} came from {source}" if source else ""
    if size % heads:
        raise ShardingError(f"{name!r}: size {size} is not a multiple of {heads} {label}{whence}")
    head_dim = size // heads
    if kv and world > heads:
        if world % heads:
            raise ShardingError(
                f"{name!r}: world size {world} is not a multiple of {heads} kv heads, "
                f"so kv heads cannot be replicated evenly{whence}"
            )
        return rank // (world // heads) * head_dim, head_dim
    if heads % world:
        raise ShardingError(
            f"{name!r}: {heads} {label} do not divide by world size {world}{whence}"
        )
    per = heads // world * head_dim
    return rank * per, per


def _selection(shape, dim, sizes, parts, kind: str, rule: str | None) -> Selection:
    """Place each section's ``(start, length)`` at the section's offset along ``dim``."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    # Empty ranges (uneven tails, ranks without experts) are dropped: nothing to read.
    ranges = tuple((off + start, n) for off, (start, n) in zip(offsets, parts, strict=True) if n)
    out = list(shape)
    out[dim] = sum(n for _, n in ranges)
    return Selection(dim, ranges, tuple(out), kind, rule)


def _intermediate(spec, rule, name, shape, dim, rank, world) -> Selection:
    """gpt-oss: whole blocks of the intermediate size, ceil(blocks / world) a rank."""
    size = shape[dim]
    if (size * spec.block) % spec.entries or (size * spec.block // spec.entries) % spec.block:
        raise ShardingError(
            f"{name!r}: dim {dim} of size {size} is not {spec.entries} entries per "
            f"{spec.block} intermediate elements"
        )
    inter = size * spec.block // spec.entries
    per = -(-inter // spec.block // world) * spec.block
    start, end = min(inter, rank * per), min(inter, (rank + 1) * per)
    part = (start * spec.entries // spec.block, (end - start) * spec.entries // spec.block)
    return _selection(shape, dim, (size,), [part], "row" if dim == 0 else "column", rule)


def _compile_rule(pattern: str, value: Any) -> tuple[str, re.Pattern[str], Spec]:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"rules: bad pattern {pattern!r}: {e}") from None
    return pattern, regex, _as_spec(value, f"rules[{pattern!r}]")


class Sharder:
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


__all__ = [
    "MODEL_TYPES",
    "RULE_TABLES",
    "ConfigSections",
    "Expert",
    "FirstRank",
    "FusedQKV",
    "Heads",
    "Intermediate",
    "Replicate",
    "Sharder",
    "Spec",
    "Split",
    "Vocab",
    "expert_block",
]
