"""Integer-quantized linear layers (GPTQ, AWQ, compressed-tensors pack-quantized).

Such a layer ``X`` stores no ``X.weight``: its logical ``[out, in]`` weight
is packed into int32 words (``32 / bits`` values a word) beside group scales
and zero points, each tensor with its own layout (:data:`PACKED`).
A rank owns the elements of the logical weight that the layer's rule gives it
(``X.weight``'s rule: heads, rows or columns), and of every tensor of ``X``
the words, groups and channels covering them, as vLLM's
``PackedvLLMParameter`` / ``GroupQuantScaleParameter`` load them. A rank
boundary that cuts a packed word or a quantization group raises, as vLLM's
``verify_group_size_divides_partition`` does; a tensor dim of size 1 (per
channel scales beside a row-parallel split, vLLM's
``marlin_repeat_scales_on_all_ranks``) stays whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from gpuload.errors import ShardingError
from gpuload.sharding.selection import Selection

# Per format, each tensor's dims as axes of
# the logical [out, in] weight, counted in elements, packed int32 words
# ("pack", 32 / bits values) or quantization groups ("group", the size read
# from the shapes), and whether it is the packed weight that gives the
# logical shape. No axes: whole on every rank. select() applies them.
PACKED: Mapping[str, Mapping[str, tuple[tuple[tuple[str, str], ...], bool]]] = {
    # vLLM auto_gptq.py AutoGPTQLinearMethod.create_weights: qweight packed
    # on input_dim 0, qzeros on output_dim 1, scales [in/g, out].
    "gptq": {
        "qweight": ((("in", "pack"), ("out", "elem")), True),
        "qzeros": ((("in", "group"), ("out", "pack")), False),
        "scales": ((("in", "group"), ("out", "elem")), False),
        # Dropped by vLLM (base_config.py get_checkpoint_weight_mapper) once
        # desc_act=True is refused: i // group_size, the same on every rank.
        "g_idx": ((), False),
    },
    # vLLM auto_awq.py AutoAWQMarlinLinearMethod.create_weights: qweight
    # [in, out/8] and qzeros packed on output_dim 1, scales [in/g, out].
    "awq": {
        "qweight": ((("in", "elem"), ("out", "pack")), True),
        "qzeros": ((("in", "group"), ("out", "pack")), False),
        "scales": ((("in", "group"), ("out", "elem")), False),
    },
    # vLLM compressed_tensors_wNa16.py CompressedTensorsWNA16.create_weights:
    # weight_packed [out, in/8], weight_scale [out, in/g] (or [out, 1]),
    # weight_zero_point [out/8, in/g], weight_shape [2] a plain parameter.
    "compressed-tensors": {
        "weight_packed": ((("out", "elem"), ("in", "pack")), True),
        "weight_scale": ((("out", "elem"), ("in", "group")), False),
        "weight_zero_point": ((("out", "pack"), ("in", "group")), False),
        "weight_shape": ((), False),
    },
}


@dataclasses.dataclass(frozen=True)
class Format:
    """The checkpoint's packed format and its values per int32 word."""

    name: str
    pack: int


def detect(config: Mapping[str, Any]) -> Format | None:
    """The packed format named by ``quantization_config`` in config.json, if any.

    Raises ShardingError where vLLM refuses the checkpoint.
    """
    q = config.get("quantization_config")
    if not isinstance(q, Mapping):
        return None
    method = str(q.get("quant_method", "")).lower()
    if method == "gptq":
        # vLLM utils/gptq_utils.py normalize_and_validate_gptq_desc_act: act
        # order with groups is refused (with one group it is a no-op).
        if q.get("desc_act") and q.get("group_size", -1) != -1:
            raise ShardingError(
                "quantization_config desc_act=True with group_size="
                f"{q.get('group_size')}: vLLM refuses GPTQ activation ordering"
            )
        return Format("gptq", _pack(q.get("bits"), "bits"))
    if method == "awq":
        return Format("awq", _pack(q.get("bits", q.get("w_bit")), "bits"))
    if method == "compressed-tensors":
        groups = q.get("config_groups")
        bits = set()
        for group in groups.values() if isinstance(groups, Mapping) else ():
            fmt = group.get("format", q.get("format")) if isinstance(group, Mapping) else None
            weights = group.get("weights") if isinstance(group, Mapping) else None
            if fmt == "pack-quantized" and isinstance(weights, Mapping):
                bits.add(weights.get("num_bits"))
        if len(bits) > 1:
            raise ShardingError(f"quantization_config config_groups pack {sorted(bits)} bits")
        if bits:
            return Format("compressed-tensors", _pack(bits.pop(), "num_bits"))
    return None


def _pack(bits: Any, key: str) -> int:
    if isinstance(bits, bool) or bits not in (2, 4, 8):
        raise ShardingError(f"quantization_config {key}={bits!r} has to be 2, 4 or 8")
    return 32 // bits


def tensor_of(
    name: str, fmt: Format | None, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[str, str] | None:
    """``(layer prefix, suffix)`` when ``name`` is a tensor of a packed layer:
    its suffix is the format's and the layer's packed weight is in ``shapes``."""
    if fmt is None:
        return None
    layer, _, suffix = name.rpartition(".")
    layouts = PACKED[fmt.name]
    if not layer or suffix not in layouts:
        return None
    main = next(s for s, (_, is_main) in layouts.items() if is_main)
    return (layer, suffix) if f"{layer}.{main}" in shapes else None


def select(
    name: str,
    shape: tuple[int, ...],
    layer: str,
    suffix: str,
    fmt: Format,
    shapes: Mapping[str, tuple[int, ...]],
    select_weight: Callable[[str, tuple[int, int]], Selection | None],
) -> Selection | None:
    """The part of packed-layer tensor ``name`` that goes with the rank's
    part of the logical weight ``layer.weight`` (chosen by ``select_weight``)."""
    layouts = PACKED[fmt.name]
    main = next(s for s, (_, is_main) in layouts.items() if is_main)
    main_shape = tuple(shapes.get(f"{layer}.{main}", ()))
    axes = layouts[suffix][0]
    if len(main_shape) != 2 or axes and len(shape) != len(axes):
        raise ShardingError(
            f"{name!r}: a {fmt.name} tensor of shape {shape} beside {layer}.{main} of shape "
            f"{main_shape or 'missing'}; expected the layout {axes} of [out, in]"
        )
    logical = {}
    for size, (axis, unit) in zip(main_shape, layouts[main][0], strict=True):
        logical[axis] = size * (fmt.pack if unit == "pack" else 1)
    weight = f"{layer}.weight"
    sel = select_weight(weight, (logical["out"], logical["in"]))
    if sel is None:  # another rank's expert
        return None
    rule = f"{fmt.name} {suffix} of {weight}" + (f" ({sel.rule})" if sel.rule else "")
    if sel.dim is None or not axes:  # a whole (or unknown) weight, or g_idx / weight_shape
        kind = sel.kind if sel.dim is None else "replicated"
        return Selection.whole(shape, kind, rule if sel.rule else None)
    axis = ("out", "in")[sel.dim]
    dim = next((d for d, (a, _) in enumerate(axes) if a == axis), None)
    if dim is None or shape[dim] == 1:  # per channel beside a split of the other axis
        return Selection.whole(shape, "replicated", rule)
    unit = axes[dim][1]
    if logical[axis] % shape[dim]:
        raise ShardingError(
            f"{name!r}: dim {dim} of size {shape[dim]} does not tile the {logical[axis]} "
            f"{axis} features of {layer}"
        )
    per = logical[axis] // shape[dim]
    what = {"pack": "packed int32 words", "group": "quantization groups"}.get(unit, "elements")
    ranges = []
    for start, n in sel.ranges:
        if start % per or n % per:
            raise ShardingError(
                f"{name!r}: the rank's {axis} features [{start}, {start + n}) of {layer} cut "
                f"through {what} of {per}; the world size does not fit the {fmt.name} layout"
            )
        ranges.append((start // per, n // per))
    out = list(shape)
    out[dim] = sum(n for _, n in ranges)
    return Selection(dim, tuple(ranges), tuple(out), sel.kind, rule)


__all__ = ["PACKED", "Format", "detect", "select", "tensor_of"]
