"""Sizing: :func:`scale_spec` resizes an architecture to a byte budget."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator

import numpy as np

from gpuload.format.dtypes import DTYPES
from gpuload.synth.models import ModelSpec, check_dtype, get_spec


def _round(x: float, m: int) -> int:
    return max(m, round(x / m) * m)


def _kv_heads(heads: int, group: int) -> int:
    """KV heads near heads / group that world 8 can use: a divisor of 8 (replicated
    across ranks) or a multiple of 8 (split), and a divisor of heads."""
    ok = [k for k in range(1, heads + 1) if heads % k == 0 and (8 % k == 0 or k % 8 == 0)]
    want = heads / group
    return min(ok, key=lambda k: (abs(math.log(k / want)), -k))


def _widths(base: ModelSpec, limit: int) -> Iterator[tuple[int, int]]:
    """Candidate ``(hidden, head_dim)``: multiples of 128 with heads a multiple of 8.

    The preset's head_dim is kept from ``8 x head_dim`` up; narrower models
    (fewer than 8 heads of that size) use the widest of 64/32/16 that fits.
    """
    hd0 = base.head_dim
    for h in range(128, limit + 1, 128):
        if h >= 8 * hd0:
            if h % (8 * hd0) == 0:
                yield h, hd0
        else:
            hd = next((d for d in (64, 32, 16) if d <= hd0 and h % (8 * d) == 0), None)
            if hd is not None:
                yield h, hd


def _at_width(base: ModelSpec, h: int, hd: int, ffn: float, layers: int) -> ModelSpec:
    """``base`` at hidden size ``h``, head_dim ``hd``, FFN widths scaled by ``ffn``."""
    heads = h // hd
    w = h / base.hidden

    def width(x: int) -> int:
        return _round(x * w * ffn, 128) if x else 0

    return dataclasses.replace(
        base,
        hidden=h,
        heads=heads,
        kv_heads=_kv_heads(heads, base.heads // base.kv_heads),
        head_dim=hd,
        intermediate=width(base.intermediate),
        vocab=min(_round(base.vocab * w, 512), -(-base.vocab // 512) * 512),
        layers=layers,
        moe_intermediate=width(base.moe_intermediate),
        shared_intermediate=width(base.shared_intermediate),
    )


def scale_spec(
    preset: str | ModelSpec, target_bytes: int, *, dtype: str = "BF16", tolerance: float = 0.1
) -> ModelSpec:
    """The architecture of ``preset`` resized to about ``target_bytes`` of tensors.

    Hidden size, layer count and FFN widths are chosen together: among widths
    whose model lands within 3% of the target (FFN widths may move by up to a
    third to get there), the one whose depth is closest to the preset's
    depth-to-width ratio wins. Dims stay multiples of 128, heads a multiple of
    8 (so world 8 divides them), KV heads a divisor or multiple of 8, the vocab
    a multiple of 512 (64 x 8, vLLM's padding unit times world 8), expert
    counts as in the preset.

    Raises
    ------
    ValueError
        No such model lies within ``tolerance`` (default ±10%) of the target.
    """
    base = get_spec(preset)
    check_dtype(dtype)
    if isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes < 1:
        raise ValueError(f"{target_bytes=} must be a positive int (bytes)")
    best: tuple[float, float, ModelSpec] | None = None
    for h, hd in _widths(base, 4 * max(base.hidden, 1024)):
        one = _at_width(base, h, hd, 1.0, 1)
        g = sum(math.prod(s) for _, s in one.global_tensors()) * DTYPES[dtype].bits // 8
        per_layer = one.nbytes(dtype) - g
        est = round((target_bytes - g) / per_layer)
        natural = max(1.0, base.layers * h / base.hidden)
        for layers, ffn in itertools.product(
            range(max(1, est - 2), max(1, est + 2) + 1), np.linspace(0.75, 4 / 3, 29)
        ):
            spec = _at_width(base, h, hd, float(ffn), layers)
            err = abs(spec.nbytes(dtype) - target_bytes) / target_bytes
            score = (abs(math.log(layers / natural)) if err <= 0.03 else 100 + err, err)
            if best is None or score < best[:2]:
                best = (*score, spec)
    assert best is not None
    spec = best[2]
    size = spec.nbytes(dtype)
    if abs(size - target_bytes) > tolerance * target_bytes:
        raise ValueError(
            f"no {base.family} model within {tolerance:.0%} of {target_bytes} bytes "
            f"(closest: {size} bytes); the smallest has hidden 128 and 1 layer"
        )
    return spec
