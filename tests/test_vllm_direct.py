"""The vLLM plug-in's choice of shards read straight into parameters.

:func:`gpuload.integrations.vllm.direct` needs no vLLM (tests/vllm_tier runs
the plug-in itself): given each shard's destinations, it keeps only those a
load can fill in place, a contiguous CPU tensor of the checkpoint's dtype
and the shard's byte size, overlapping no other, and leaves the rest to be
copied.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from gpuload.integrations.vllm import direct  # noqa: E402


def plan(**shards: tuple[str, int]) -> SimpleNamespace:
    tensors = [
        SimpleNamespace(name=n, info=SimpleNamespace(dtype=SimpleNamespace(torch=d)), out_nbytes=b)
        for n, (d, b) in shards.items()
    ]
    return SimpleNamespace(tensors=tensors)


def test_contiguous_parts_of_a_parameter_are_read_in_place():
    qkv = torch.zeros(8, 4, dtype=torch.bfloat16)
    p = plan(q=("bfloat16", 32), k=("bfloat16", 16), v=("bfloat16", 16))
    places = {"q": [qkv[:4]], "k": [qkv.narrow(0, 4, 2)], "v": [qkv[6:]]}
    into = direct(p, places)
    assert set(into) == {"q", "k", "v"}
    into["k"][:] = 7  # the bytes land in the parameter's own memory
    assert (qkv[4:6].view(torch.uint8) == 7).all() and (qkv[:4] == 0).all()


def test_what_cannot_be_read_in_place_is_left_to_the_copy():
    w = torch.zeros(4, 4, dtype=torch.bfloat16)
    f32 = torch.zeros(4, 4, dtype=torch.float32)
    places = {
        "column": [w[:, :2]],  # not contiguous
        "cast": [f32],  # bf16 on disk, f32 parameter
        "twice": [w, w],  # one shard, two destinations
        "size": [w],  # the shard's bytes differ from the destination's
        "unplaced": [],
    }
    p = plan(
        column=("bfloat16", 16),
        cast=("bfloat16", 32),
        twice=("bfloat16", 32),
        size=("bfloat16", 16),
        unplaced=("bfloat16", 32),
    )
    assert direct(p, places) == {}


def test_overlapping_destinations_are_both_copied():
    w = torch.zeros(4, 4, dtype=torch.bfloat16)
    other = torch.zeros(2, 4, dtype=torch.bfloat16)
    places = {"a": [w[:3]], "b": [w[2:]], "c": [other]}
    p = plan(a=("bfloat16", 24), b=("bfloat16", 16), c=("bfloat16", 16))
    assert set(direct(p, places)) == {"c"}
